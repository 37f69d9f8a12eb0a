"""The API Lambda in-process: functions/api/app.py loaded from its file as Lambda would, invoked with API Gateway
HTTP API (payload 2.0) events and a Lambda-shaped context, against real Postgres and Redis."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import redis

from aikit.flush import Flusher
from aikit.keys import IssuedKey
from aikit.runtime import Runtime
from tests.support.aws_lambda import (
    ROOT,
    body_of,
    header,
    http_event,
    invoke,
)
from tests.support.redis import pending_tokens
from tests.support.settings import REDIS_URL


def stream_entries(runtime: Runtime, api_key_id: str) -> list[dict[str, str]]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    entries = client.xrange(runtime.layout.stream(runtime.layout.shard_of(api_key_id)))
    client.close()
    return [fields for _, fields in entries if fields["k"] == api_key_id]


def test_handler_is_wrapped_mangum_without_lifespan(lambda_module: ModuleType) -> None:
    wrapped = getattr(lambda_module.handler, "__wrapped__", lambda_module.handler)
    assert type(wrapped).__name__ == "Mangum"
    assert wrapped.lifespan == "off"


def test_healthz(lambda_module: ModuleType, event_template: dict[str, Any]) -> None:
    response = invoke(lambda_module, http_event(event_template, "GET", "/healthz"))
    assert response["statusCode"] == 200
    assert json.loads(body_of(response)) == {"status": "ok"}


def test_chat_completion_through_the_handler_is_metered(lambda_module: ModuleType, event_template: dict[str, Any],
                                                        key: IssuedKey) -> None:
    runtime: Runtime = lambda_module.app.state.runtime
    auth = {"Authorization": f"Bearer {key.api_key}"}
    body = {"model": "echo-1", "messages": [{"role": "user", "content": "one two three"}]}
    response = invoke(lambda_module, http_event(event_template, "POST", "/v1/chat/completions", body, auth))
    assert response["statusCode"] == 200, body_of(response)
    reply = json.loads(body_of(response))
    assert reply["choices"][0]["message"]["content"] == "echo: one two three"
    assert reply["usage"]["total_tokens"] == 7
    assert header(response, "x-ratelimit-limit-requests") == "100"
    request_id = header(response, "x-request-id")
    # A base64-encoded body (API Gateway sends binary content that way) works the same; a warm container
    # answers from its key cache.
    again = invoke(lambda_module, http_event(event_template, "POST", "/v1/chat/completions", body, auth, b64=True))
    assert again["statusCode"] == 200, body_of(again)
    assert [e["r"] for e in stream_entries(runtime, key.api_key_id)] == [request_id, header(again, "x-request-id")]
    assert pending_tokens(runtime, key.api_key_id) == 14

    summary = Flusher(runtime.settings).run()
    assert summary.ok and summary.rows_inserted == 2
    assert pending_tokens(runtime, key.api_key_id) == 0


def test_errors_through_the_handler(lambda_module: ModuleType, event_template: dict[str, Any],
                                    key: IssuedKey) -> None:
    body = {"messages": [{"role": "user", "content": "x"}]}
    missing = invoke(lambda_module, http_event(event_template, "POST", "/v1/chat/completions", body))
    assert missing["statusCode"] == 401
    assert json.loads(body_of(missing))["error"]["code"] == "missing_api_key"
    bad = invoke(lambda_module, http_event(event_template, "POST", "/v1/chat/completions", {"messages": []},
                                           {"Authorization": f"Bearer {key.api_key}"}))
    assert bad["statusCode"] == 422
    assert json.loads(body_of(bad))["error"]["param"] == "messages"


def test_streaming_through_mangum_is_buffered_whole_and_metered(
        lambda_module: ModuleType, event_template: dict[str, Any], key: IssuedKey) -> None:
    runtime: Runtime = lambda_module.app.state.runtime
    body = {"model": "echo-1", "messages": [{"role": "user", "content": "alpha beta gamma"}], "stream": True,
            "stream_options": {"include_usage": True}}
    response = invoke(lambda_module, http_event(event_template, "POST", "/v1/chat/completions", body,
                                                {"Authorization": f"Bearer {key.api_key}"}))
    assert response["statusCode"] == 200
    assert (header(response, "content-type") or "").startswith("text/event-stream")
    # Mangum never streams: the whole SSE body comes back in one response.
    events = [line.removeprefix("data: ") for line in body_of(response).split("\n\n") if line]
    assert events[-1] == "data: [DONE]".removeprefix("data: ")
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "echo: alpha beta gamma"
    usage = chunks[-1]["usage"]
    assert usage["total_tokens"] == 3 + 4
    # Metered before the handler returned (a frozen Lambda runs nothing afterwards).
    entries = stream_entries(runtime, key.api_key_id)
    assert [e["r"] for e in entries] == [header(response, "x-request-id")]
    assert pending_tokens(runtime, key.api_key_id) == 7


def test_the_sample_event_in_the_repository_works(lambda_module: ModuleType, key: IssuedKey) -> None:
    event = json.loads((ROOT / "events" / "chat_completions.json").read_text())
    event["headers"]["authorization"] = f"Bearer {key.api_key}"
    response = invoke(lambda_module, event)
    assert response["statusCode"] == 200, body_of(response)
    assert json.loads(body_of(response))["choices"][0]["message"]["content"] == "echo: Say hello"
