"""The long-running server of `aikit serve`: the API plus an in-process flush every FLUSH_INTERVAL_SECONDS
(on AWS the flush is its own Lambda on an EventBridge schedule instead)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from aikit.api.app import create_app
from aikit.observability import logger
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


def create_server_app(settings: Settings) -> FastAPI:
    runtime = Runtime(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            if settings.flush_interval_seconds > 0:
                tg.start_soon(flush_forever, settings)
            yield
            tg.cancel_scope.cancel()
        await runtime.aclose()

    app = create_app(runtime=runtime)
    app.router.lifespan_context = lifespan
    return app
