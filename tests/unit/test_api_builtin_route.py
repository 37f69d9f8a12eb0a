"""aikit.api.builtin_route: a built-in route answers `matches` exactly as FastAPI's APIRoute does, for every
scope, while turning a foreign path away before FastAPI's per-route work."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Match

from aikit.api.app import create_app
from aikit.api.builtin_route import BuiltinRoute
from aikit.runtime import Runtime
from aikit.settings import load_settings

PATHS = ["/v1/chat/completions", "/v1/messages", "/healthz", "/v1/admin/keys", "/v1/admin/keys/k_1",
         "/v1/admin/keys/k_1/revoke", "/v1/usage", "/v1/admin/usage.csv", "/v1/webhooks/stripe", "/v1/mine",
         "/", "", "/v1/usage/", "/prod/v1/usage", "/v1/chat/completions/x"]


def scope(path: str, method: str, root_path: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": "http", "path": path, "method": method, "root_path": root_path, **extra}


def builtin_routes() -> list[BuiltinRoute]:
    app = create_app(runtime=Runtime(load_settings(_env_file=None)))
    return [route for route in app.router.routes if isinstance(route, BuiltinRoute)]


def test_every_built_in_route_of_the_app_is_a_builtin_route() -> None:
    app = create_app(runtime=Runtime(load_settings(_env_file=None)))
    api_routes = [route for route in app.router.routes if isinstance(route, APIRoute)]
    assert api_routes and all(isinstance(route, BuiltinRoute) for route in api_routes)


@pytest.mark.parametrize("root_path", ["", "/prod"])
@pytest.mark.parametrize("method", ["GET", "POST", "PATCH"])
def test_matches_answers_what_apiroute_answers(method: str, root_path: str) -> None:
    for route in builtin_routes():
        for path in PATHS:
            full_path = root_path + path if root_path and path else path
            for extra in ({}, {"fastapi": {}}):
                ours = route.matches(scope(full_path, method, root_path, **extra))
                theirs = APIRoute.matches(route, scope(full_path, method, root_path, **extra))
                assert ours == theirs, (route.path, path, method, root_path, extra)


def test_a_root_path_is_resolved_before_matching() -> None:
    route = next(r for r in builtin_routes() if r.path == "/v1/usage")
    match, child = route.matches(scope("/prod/v1/usage", "GET", "/prod"))
    assert match is Match.FULL and child["route"] is route


def test_a_router_of_builtin_routes_included_with_a_prefix_still_routes() -> None:
    router = APIRouter(route_class=BuiltinRoute)

    @router.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    app = FastAPI()
    app.include_router(router, prefix="/api")
    app.include_router(router)
    with TestClient(app) as client:
        assert client.get("/api/ping").json() == {"pong": "yes"}
        assert client.get("/ping").json() == {"pong": "yes"}
        assert client.post("/api/ping").status_code == 405
        assert client.get("/api/nope").status_code == 404
