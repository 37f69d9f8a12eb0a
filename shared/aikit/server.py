"""The long-running server of `aikit serve`: the API plus an in-process flush every FLUSH_INTERVAL_SECONDS
(on AWS the flush is its own Lambda on an EventBridge schedule instead), under uvicorn with limits a slow or
hostile client cannot outwait: HEADER_READ_TIMEOUT_SECONDS for request headers (uvicorn's parsers have no such
timeout of their own, hence the protocol subclass), KEEP_ALIVE_SECONDS for idle connections, SERVER_CONCURRENCY_LIMIT
requests at once (503 beyond), and the body and stall limits of api.body_limit."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from aikit import observability
from aikit.api.app import create_app
from aikit.observability import flush_metrics, logger
from aikit.runtime import Runtime
from aikit.settings import Settings


async def flush_forever(settings: Settings) -> None:
    from aikit.flush import run_flush

    while True:
        await anyio.sleep(settings.flush_interval_seconds)
        try:
            summary = await anyio.to_thread.run_sync(run_flush, settings)
            logger.info("flush", extra=summary.as_dict())
        except Exception:
            logger.exception("flush_failed")


async def write_metrics_forever() -> None:
    """Buffered metrics leave at least every WRITE_INTERVAL_SECONDS, quiet periods included."""
    while True:
        await anyio.sleep(observability.WRITE_INTERVAL_SECONDS)
        flush_metrics()


def create_server_app(settings: Settings) -> FastAPI:
    runtime = Runtime(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            if settings.flush_interval_seconds > 0:
                tg.start_soon(flush_forever, settings)
            tg.start_soon(write_metrics_forever)
            yield
            tg.cancel_scope.cancel()
        flush_metrics()
        await runtime.aclose()

    app = create_app(runtime=runtime)
    app.router.lifespan_context = lifespan
    return app


def http_protocol_base() -> type[Any]:
    """uvicorn's httptools protocol when httptools is installed (it is a dependency: the faster parser), else
    its h11 protocol; both keep `cycle`, `loop`, `transport` and `client` as the header timeout needs."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools missing from an install
        return H11Protocol
    return HttpToolsProtocol


def header_timeout_protocol(base: type[Any], header_timeout: float) -> type[Any]:
    """`base` (one of uvicorn's HTTP/1.1 protocols), closing a connection whose request headers are not
    complete `header_timeout` seconds after it opened or after its first bytes following a response (slow-drip
    headers): neither parser has such a timeout of its own."""

    class HeaderTimeoutProtocol(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None

        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or bool(self.cycle.response_complete)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self._waiting_for_headers():
                self._arm()  # the first bytes of a next request on a kept-alive connection
            super().data_received(data)
            if not self._waiting_for_headers():
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                logger.warning("request_headers_timeout", extra={"client": f"{self.client}"})
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

    HeaderTimeoutProtocol.__name__ = HeaderTimeoutProtocol.__qualname__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeoutProtocol


def uvicorn_config(settings: Settings, host: str, port: int) -> uvicorn.Config:
    protocol = header_timeout_protocol(http_protocol_base(), settings.header_read_timeout_seconds)
    return uvicorn.Config(create_server_app(settings), host=host, port=port, workers=1,
                          log_level=settings.log_level.lower(), access_log=settings.access_log, proxy_headers=False,
                          http=protocol,
                          timeout_keep_alive=settings.keep_alive_seconds,
                          limit_concurrency=settings.server_concurrency_limit)


def serve(settings: Settings, host: str, port: int) -> None:
    config = uvicorn_config(settings, host, port)
    config.load()
    # What start-up built (modules, the app, settings) lives as long as the process: moved out of the
    # collector's generations, a full collection scans only what requests allocate. Before, those collections
    # paused the server up to 30 ms at a time (its p99 under load) and took a tenth of its CPU (bench_ab).
    gc.freeze()
    uvicorn.Server(config).run()
