"""aikit.api.billed_route: the hot route's lean handler answers exactly what FastAPI's own handler answers for
the same endpoint (statuses, 422/401 order, error bodies), for well- and ill-formed requests."""

from __future__ import annotations

import email.message
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
from aikit.api.routes import chat
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


def reference_router() -> APIRouter:
    """The same endpoint on FastAPI's own route class."""
    router = APIRouter()
    router.add_api_route("/v1/chat/completions", chat.chat_completions, methods=["POST"], response_model=None)
    return router


def answer(client: TestClient, content_type: str | None, body: bytes, key: str | None) -> tuple[int, Any]:
    headers = {"content-type": content_type} if content_type else {}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    reply = client.post("/v1/chat/completions", content=body, headers=headers)
    if reply.status_code == 200:
        return 200, reply.json()["choices"][0]["message"]
    data = reply.json()
    data["error"].pop("request_id", None)
    return reply.status_code, data


@pytest.mark.parametrize(("content_type", "body"), REQUESTS)
@pytest.mark.parametrize("who", ["valid key", "no key", "unknown key"])
def test_the_lean_handler_answers_what_fastapi_answers(runtime: Runtime, api_key: IssuedKey,
                                                        monkeypatch: pytest.MonkeyPatch, content_type: str | None,
                                                        body: bytes, who: str) -> None:
    key = {"valid key": api_key.api_key, "no key": None, "unknown key": "ak_unknown0_" + "x" * 40}[who]
    lean = create_app(runtime=runtime)
    with monkeypatch.context() as patched:
        patched.setattr(chat, "router", reference_router())
        reference = create_app(runtime=runtime)
    with TestClient(lean) as a, TestClient(reference) as b:
        assert answer(a, content_type, body, key) == answer(b, content_type, body, key)


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
