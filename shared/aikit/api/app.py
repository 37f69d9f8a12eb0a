"""The FastAPI application: thin routes over aikit's plain functions, plus the routers you mount.

    create_app(routers=[my_router])   # or AIKIT_ROUTERS=myapp.routes:router for aikit serve / the Lambda

Every route of a mounted router needs an API key exactly like the built-in routes (401, 402, 429), unless
the router opted out with `aikit.api.deps.public(router)`; inside it, `llm.chat(..., track_tokens=True)`
meters to the caller and is admitted against its limits.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from fastapi import APIRouter, Depends, FastAPI

from aikit.api.body_limit import BodyLimitMiddleware
from aikit.api.deps import authenticate, is_public
from aikit.api.errors import install_error_handlers
from aikit.api.routes import admin, billing, chat, embeddings, health, messages, usage, webhooks
from aikit.api.scope import RequestScopeMiddleware
from aikit.errors import SettingsError
from aikit.runtime import Runtime, get_runtime
from aikit.settings import Settings


def _bad_routers(spec: str, why: str) -> SettingsError:
    return SettingsError(f"invalid setting AIKIT_ROUTERS: {spec}: {why}".replace("\n", " "))


def load_router(spec: str) -> APIRouter:
    """The APIRouter a `module:attribute` names; anything wrong is a SettingsError of one line naming it."""
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as uvicorn does: modules of the directory the server runs in
    try:
        found: object = importlib.import_module(module_name)
    except Exception as exc:
        raise _bad_routers(spec, f"cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    for name in attribute.split("."):
        if not hasattr(found, name):
            raise _bad_routers(spec, f"{module_name} has no attribute {attribute}") from None
        found = getattr(found, name)
    if not isinstance(found, APIRouter):
        raise _bad_routers(spec, f"is a {type(found).__name__}, not a fastapi.APIRouter")
    return found


def create_app(settings: Settings | None = None, runtime: Runtime | None = None,
               routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The API: built-in routes, then `routers` and those AIKIT_ROUTERS names (a bad one raises SettingsError)."""
    runtime = runtime or (Runtime(settings) if settings is not None else get_runtime())
    mounted = [*routers, *(load_router(spec) for spec in runtime.settings.routers)]
    app = FastAPI(title="aikit", version="0.1.0", docs_url="/docs", redoc_url=None)
    app.state.runtime = runtime
    install_error_handlers(app)
    # The built-in routes are the app's own routes, first in its list (before FastAPI's /openapi.json and /docs):
    # a request is matched against the routes in order, and FastAPI 0.165 matches an included router through a
    # second, lazy layer whose cost grows with each route it passes (issue 16: ~25 k instructions per built-in
    # route for a route mounted after them). Routers you mount come after: a built-in path is never theirs.
    app.router.routes[:0] = [route for module in (chat, messages, embeddings, health, admin, billing, usage, webhooks)
                             for route in module.router.routes]
    for router in mounted:
        app.include_router(router, dependencies=[] if is_public(router) else [Depends(authenticate)])
    app.add_middleware(RequestScopeMiddleware, runtime=runtime)
    settings = runtime.settings
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_request_body_bytes,  # outermost: first
                       body_timeout=settings.body_read_timeout_seconds,
                       send_stall_timeout=settings.send_stall_timeout_seconds)
    return app
