"""The FastAPI application: thin routes over aikit's plain functions."""

from __future__ import annotations

from fastapi import FastAPI

from aikit.api.errors import install_error_handlers
from aikit.api.routes import admin, billing, chat, health, usage, webhooks
from aikit.runtime import Runtime, get_runtime
from aikit.settings import Settings


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    runtime = runtime or (Runtime(settings) if settings is not None else get_runtime())
    app = FastAPI(title="aikit", version="0.1.0", docs_url="/docs", redoc_url=None)
    app.state.runtime = runtime
    install_error_handlers(app)
    for module in (health, chat, admin, billing, usage, webhooks):
        app.include_router(module.router)
    return app
