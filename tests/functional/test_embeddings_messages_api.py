"""POST /v1/embeddings and POST /v1/messages on the kit's one metered path, against the local upstream fakes:
a failing upstream bills nothing and gives its reservation back, a cut-off call bills its input, limits answer
429 (in Anthropic's shape on /v1/messages), a stream failing midway is reported in-band as Anthropic reports
it and metered for what was produced, and `llm.embed(..., track_tokens=True)` in a mounted route meters to the
caller."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient

from aikit import llm
from aikit.api.app import create_app
from aikit.keys import IssuedKey
from aikit.runtime import Runtime
from aikit.settings import Settings
from tests.fakes.llm_servers import FakeAnthropic, FakeOpenAI, anthropic_server
from tests.support.api import bearer, issue_key
from tests.support.redis import entries, held
from tests.support.settings import make_settings

TEXTS = ["the quick brown fox", "jumps over the lazy dog"]


def embed(client: TestClient, proxy_key: IssuedKey, **body: Any) -> Any:
    return client.post("/v1/embeddings", headers=bearer(proxy_key),
                       json={"model": "text-embedding-3-small", "input": TEXTS, **body})


def test_embeddings_are_metered_as_the_upstream_reports(proxy_settings: Settings, proxy_key: IssuedKey,
                                                        slow_openai: FakeOpenAI) -> None:
    runtime = Runtime(proxy_settings)
    with TestClient(create_app(runtime=runtime)) as client:
        r = embed(client, proxy_key, dimensions=8, encoding_format="float", user="u-1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [len(d["embedding"]) for d in body["data"]] == [8, 8]
    assert slow_openai.requests[-1].json == {"model": "text-embedding-3-small", "input": TEXTS, "dimensions": 8,
                                          "encoding_format": "float", "user": "u-1"}
    tokens = slow_openai.last_usage["prompt_tokens"]
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    [event] = entries(runtime, proxy_key.api_key_id)
    assert (event["r"], event["m"], event["i"], event["o"]) == (
        r.headers["X-Request-Id"], "text-embedding-3-small", str(tokens), "0")
    assert held(runtime, proxy_key) == {}


@pytest.mark.parametrize(("fault", "status"), [("500", 502), ("slow", 504)])
def test_embeddings_upstream_failure_settles_the_reservation(
        proxy_settings: Settings, proxy_key: IssuedKey, slow_openai: FakeOpenAI, fault: str, status: int) -> None:
    """A refusal bills nothing; a timeout cut the call off while the upstream worked on it, so its input is
    billed (estimated: the upstream never said). Either way nothing stays held against the quota."""
    runtime = Runtime(proxy_settings)
    slow_openai.inject(fault)
    with TestClient(create_app(runtime=runtime)) as client:
        r = embed(client, proxy_key)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == "provider_error"
    found = entries(runtime, proxy_key.api_key_id)
    if fault == "slow":
        estimated = sum(math.ceil(len(t) / 4) for t in TEXTS)
        assert [(e["r"], e["i"], e["o"]) for e in found] == [(r.headers["X-Request-Id"], str(estimated), "0")]
    else:
        assert found == []
    assert held(runtime, proxy_key) == {}


def test_embeddings_bad_input_names_the_field(proxy_settings: Settings, proxy_key: IssuedKey,
                                              slow_openai: FakeOpenAI) -> None:
    with TestClient(create_app(runtime=Runtime(proxy_settings))) as client:
        for body, param in (({"input": [""]}, "input[0]"), ({"input": True}, "input"),
                            ({"dimensions": "8"}, "dimensions"), ({"encoding_format": "hex"}, "encoding_format")):
            r = embed(client, proxy_key, **body)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["param"] == param
    assert slow_openai.requests == []


embedding_router = APIRouter()


@embedding_router.post("/v1/similar")
async def similar(body: dict[str, Any]) -> dict[str, Any]:
    """A user's route embedding two texts with the line the README shows."""
    result = await llm.embed([body["a"], body["b"]], track_tokens=True)
    a, b = result.embeddings
    return {"cosine": sum(x * y for x, y in zip(a, b, strict=True)), "tokens": result.usage.input_tokens}


def test_llm_embed_in_a_mounted_route_is_metered_to_the_caller(pg_url: str, redis_prefix: str) -> None:
    settings = make_settings(pg_url, redis_prefix)  # echo
    runtime = Runtime(settings)
    proxy_key = issue_key(settings, rpm=1000, rpd=10_000, monthly_tokens=1_000_000)
    with TestClient(create_app(runtime=runtime, routers=[embedding_router])) as client:
        r = client.post("/v1/similar", headers=bearer(proxy_key), json={"a": "one two", "b": "one two"})
        assert client.post("/v1/similar", json={"a": "x", "b": "y"}).status_code == 401
    assert r.status_code == 200, r.text
    assert r.json() == {"cosine": pytest.approx(1.0), "tokens": 4}
    [event] = entries(runtime, proxy_key.api_key_id)
    assert (event["r"], event["m"], event["i"], event["o"]) == (r.headers["X-Request-Id"], "echo-embed-1", "4", "0")
    assert held(runtime, proxy_key) == {}


# ------------------------------------------------------------------------------------------- /v1/messages


@pytest.fixture
def claude() -> Iterator[FakeAnthropic]:
    with anthropic_server() as srv:
        yield srv


@pytest.fixture
def claude_runtime(pg_url: str, redis_prefix: str, claude: FakeAnthropic) -> Runtime:
    return Runtime(make_settings(pg_url, redis_prefix, llm_provider="anthropic", anthropic_base_url=claude.base_url,
                                 anthropic_api_key=FakeAnthropic.api_key, llm_timeout_seconds=5))


MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        found.append((lines["event"], json.loads(lines["data"])))
    return found


def test_messages_stream_failing_midway_is_reported_as_anthropic_does_and_metered(
        claude_runtime: Runtime, claude: FakeAnthropic) -> None:
    proxy_key = issue_key(claude_runtime.settings, rpm=1000, rpd=10_000, monthly_tokens=1_000_000)
    claude.inject("error_event")
    with TestClient(create_app(runtime=claude_runtime)) as client, client.stream(
            "POST", "/v1/messages", headers={"x-api-key": proxy_key.api_key}, json={**MESSAGE, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r.read().decode())
        request_id = r.headers["X-Request-Id"]
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-1] == "error" and "message_stop" not in names
    assert events[-1][1]["type"] == "error" and events[-1][1]["error"]["type"] == "api_error"
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert text == "".join(claude.words()[:2])
    # The input Anthropic reported in message_start, cache reads and writes included, and what was generated.
    [event] = entries(claude_runtime, proxy_key.api_key_id)
    usage = claude.last_usage
    assert event["r"] == request_id
    assert int(event["i"]) == usage["input_tokens"] + usage["cache_read_input_tokens"] + \
        usage["cache_creation_input_tokens"]
    assert int(event["x"]) == usage["cache_read_input_tokens"]
    assert int(event["o"]) >= 2
    assert held(claude_runtime, proxy_key) == {}


def test_messages_limits_answer_in_anthropics_shape(claude_runtime: Runtime, claude: FakeAnthropic) -> None:
    proxy_key = issue_key(claude_runtime.settings, rpm=1, rpd=10_000, monthly_tokens=1_000_000)
    with TestClient(create_app(runtime=claude_runtime)) as client:
        assert client.post("/v1/messages", headers={"x-api-key": proxy_key.api_key}, json=MESSAGE).status_code == 200
        r = client.post("/v1/messages", headers={"x-api-key": proxy_key.api_key}, json=MESSAGE)
    assert r.status_code == 429
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "rate_limit_error"
    assert "Retry-After" in r.headers and r.headers["X-RateLimit-Remaining-Requests"] == "0"
    assert len(claude.requests) == 1
    assert len(entries(claude_runtime, proxy_key.api_key_id)) == 1
