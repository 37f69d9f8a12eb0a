"""The long-running server of `aikit serve`: the API plus an in-process flush every FLUSH_INTERVAL_SECONDS
(on AWS the flush is its own Lambda on an EventBridge schedule instead)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

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
