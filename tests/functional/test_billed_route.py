"""aikit.api.billed_route: the hot routes' lean handler answers exactly what FastAPI's own handler answers for
the same endpoint (statuses, 422/401 order, error bodies), for well- and ill-formed requests."""

from __future__ import annotations

import email.message
import gc
import json
from typing import Any

import pytest
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel

from aikit.api import billed_route
from aikit.api.app import create_app
from aikit.api.billed_route import BilledRoute, is_json
from aikit.api.deps import BilledDep
from aikit.api.routes import chat, embeddings
from aikit.keys import IssuedKey
from aikit.runtime import Runtime
from tests.support.api import issue_key

GOOD = b'{"model": "echo-1", "messages": [{"role": "user", "content": "hi there"}]}'
JSON = "application/json"
# (content type, body) pairs: JSON well and ill formed, other and odd content types, no body.
REQUESTS: list[tuple[str | None, bytes]] = [
    (JSON, GOOD), ("application/json; charset=utf-8", GOOD), ("Application/JSON", GOOD),
    ("application/vnd.aikit+json", GOOD), (None, GOOD), ("text/plain", GOOD), ("application", GOOD),
    ("application/json/x", GOOD), (JSON, b'{"model": "echo-1", "messages": ['), (JSON, b""), (JSON, b"[]"),
    (JSON, b"null"), (JSON, b'"text"'), (JSON, b'{"model": "echo-1"}'), (JSON, b'{"model": 5, "messages": "hi"}'),
    (JSON, b'{"model": "echo-1", "messages": [{"role": "robot", "content": "x"}]}'),
    (JSON, b"\xff\xfe{\x00"), (JSON, GOOD.replace(b"hi there", b"caf\xe9")), (JSON, b'{"a": NaN}'),
]


EMBEDDING = b'{"model": "echo-embed-1", "input": ["one two", "three"]}'
EMBEDDING_REQUESTS: list[tuple[str | None, bytes]] = [
    (JSON, EMBEDDING), (None, EMBEDDING), ("text/plain", EMBEDDING), (JSON, b'{"input": '), (JSON, b""),
    (JSON, b'{"input": 5}'), (JSON, b'{"model": "echo-embed-1"}'), (JSON, b"[]"),
]
# The routes on BilledRoute: (module, path, its requests).
ROUTES = {"chat": (chat, "/v1/chat/completions", REQUESTS),
          "embeddings": (embeddings, "/v1/embeddings", EMBEDDING_REQUESTS)}
CASES = [(name, ct, body) for name, (_, _, requests) in ROUTES.items() for ct, body in requests]


def reference_router(name: str) -> APIRouter:
    """The same endpoint on FastAPI's own route class."""
    module, path, _ = ROUTES[name]
    (route,) = module.router.routes
    assert isinstance(route, BilledRoute)
    router = APIRouter()
    router.add_api_route(path, route.endpoint, methods=["POST"], response_model=None)
    return router


def answer(client: TestClient, path: str, content_type: str | None, body: bytes,
           key: str | None) -> tuple[int, Any]:
    headers = {"content-type": content_type} if content_type else {}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    reply = client.post(path, content=body, headers=headers)
    if reply.status_code == 200:
        data = reply.json()
        return 200, data["choices"][0]["message"] if "choices" in data else data["usage"]
    data = reply.json()
    data["error"].pop("request_id", None)
    return reply.status_code, data


@pytest.mark.parametrize(("route", "content_type", "body"), CASES)
@pytest.mark.parametrize("who", ["valid key", "no key", "unknown key"])
def test_the_lean_handler_answers_what_fastapi_answers(runtime: Runtime, api_key: IssuedKey,
                                                        monkeypatch: pytest.MonkeyPatch, route: str,
                                                        content_type: str | None, body: bytes, who: str) -> None:
    key = {"valid key": api_key.api_key, "no key": None, "unknown key": "ak_unknown0_" + "x" * 40}[who]
    module, path, _ = ROUTES[route]
    lean = create_app(runtime=runtime)
    with monkeypatch.context() as patched:
        patched.setattr(module, "router", reference_router(route))
        reference = create_app(runtime=runtime)
    with TestClient(lean) as a, TestClient(reference) as b:
        assert answer(a, path, content_type, body, key) == answer(b, path, content_type, body, key)


def test_the_hot_route_runs_the_lean_handler(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not FastAPI's solver: counted through the one body function both share."""
    calls: list[int] = []
    real = billed_route.request_body_to_args

    async def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(billed_route, "request_body_to_args", counting)
    key = issue_key(runtime.settings)
    with TestClient(create_app(runtime=runtime)) as client:
        reply = client.post("/v1/chat/completions", content=GOOD,
                            headers={"content-type": JSON, "authorization": f"Bearer {key.api_key}"})
    assert reply.status_code == 200 and calls == [1]


def test_the_openapi_schema_documents_the_body_model(runtime: Runtime) -> None:
    operation = create_app(runtime=runtime).openapi()["paths"]["/v1/chat/completions"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ChatCompletionRequest")


class Thing(BaseModel):
    name: str


def test_an_endpoint_with_other_parameters_is_refused_when_declared() -> None:
    router = APIRouter(route_class=BilledRoute)

    async def extra(body: Thing, billing: BilledDep, request: Request) -> JSONResponse:
        return JSONResponse({})

    async def no_billing(body: Thing) -> JSONResponse:
        return JSONResponse({})

    for endpoint in (extra, no_billing):
        with pytest.raises(TypeError, match="one body model and BilledDep"):
            router.add_api_route("/x", endpoint, methods=["POST"])


@pytest.mark.parametrize("content_type", [
    "application/json", "application/JSON", " application/json ; charset=utf-8", "application/problem+json",
    "application/json+x", "application", "application/json/x", "text/json", "", ";application/json", "x/y;z",
    "APPLICATION/LD+JSON", "application/ json",
])
def test_json_content_types_are_read_as_fastapi_reads_them(content_type: str) -> None:
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    expected = bool(content_type) and message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))
    assert is_json(content_type) is expected


@pytest.mark.anyio
async def test_a_billed_request_leaves_no_cyclic_garbage(runtime: Runtime, api_key: IssuedKey) -> None:
    """Every object of a billed request is freed by reference counting: one reference cycle per request (a scope
    entry pointing back at the scope did) makes the garbage collector's passes cost ~10% of the CPU per request
    (issue 16, measured with callgrind)."""
    app = create_app(runtime=runtime)
    body = json.dumps({"model": "echo-1", "messages": [{"role": "user", "content": "hi"}]}).encode()

    async def billed_request() -> int:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "root_path": "", "query_string": b"", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                             (b"authorization", f"Bearer {api_key.api_key}".encode())]}
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope, receive, send)
        return statuses[0]

    try:
        assert await billed_request() == 200  # warm: key cache, scripts loaded
        gc.collect()
        gc.disable()
        assert [await billed_request() for _ in range(20)] == [200] * 20
        assert gc.collect() == 0
    finally:
        gc.enable()
        await runtime.aclose()
