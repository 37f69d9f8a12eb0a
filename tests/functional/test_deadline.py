"""LLM_DEADLINE_SECONDS: every LLM call has a total deadline, however the upstream trickles. A call that reaches
it ends cleanly (a final SSE error event in a stream, 504 otherwise) and is metered for what the upstream
bills: the input (estimated: the upstream never reported it) plus what it generated. The upstream is the
local fake OpenAI server, trickling one word every TRICKLE seconds; our API runs under uvicorn."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter

from aikit import llm
from aikit.api.app import create_app
from aikit.keys import IssuedKey
from aikit.runtime import Runtime
from aikit.settings import Settings
from tests.fakes.llm_servers import FakeOpenAI, openai_server
from tests.support.api import issue_key
from tests.support.redis import entries
from tests.support.servers import serve_app
from tests.support.settings import make_settings

DEADLINE = 1.0
TRICKLE = 0.15
PROMPT = "tell me a very long story please"  # 32 characters: an estimated 8 input tokens


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with openai_server(slow_seconds=4 * DEADLINE) as srv:
        srv.reply = " ".join(f"word{i}" for i in range(200))  # 30 s at TRICKLE per word
        srv.trickle_seconds = TRICKLE
        yield srv


@pytest.fixture
def deadline_settings(pg_url: str, redis_prefix: str, upstream: FakeOpenAI) -> Settings:
    # The per-read timeout is far longer: only the total deadline can end these calls.
    return make_settings(pg_url, redis_prefix, llm_provider="openai", openai_base_url=upstream.base_url,
                         openai_api_key=FakeOpenAI.api_key, llm_timeout_seconds=30, llm_deadline_seconds=DEADLINE)


@pytest.fixture
def key(deadline_settings: Settings) -> IssuedKey:
    return issue_key(deadline_settings, rpm=100, rpd=100, monthly_tokens=1_000_000)


def test_a_trickling_stream_past_the_deadline_ends_with_an_error_event_and_is_metered(
        deadline_settings: Settings, key: IssuedKey, upstream: FakeOpenAI) -> None:
    runtime = Runtime(deadline_settings)
    upstream.inject("trickle")
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
    with serve_app(create_app(runtime=runtime)) as base, httpx.Client(base_url=base, timeout=30) as http:
        started = time.monotonic()
        with http.stream("POST", "/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {key.api_key}"}) as r:
            assert r.status_code == 200
            first_chunk_at = None
            lines: list[str] = []
            for line in r.iter_lines():
                if line.startswith("data: ") and first_chunk_at is None:
                    first_chunk_at = time.monotonic() - started
                lines.append(line)
            request_id = r.headers["X-Request-Id"]
        elapsed = time.monotonic() - started
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
    assert events[-1]["error"]["type"] == "timeout_error"
    assert "deadline" in events[-1]["error"]["message"]
    assert "data: [DONE]" not in lines
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    delivered = len(text.split())
    assert 2 <= delivered < 200
    assert DEADLINE <= elapsed < DEADLINE + 1.5, elapsed
    [event] = entries(runtime, key.api_key_id, settled=True)
    assert event["r"] == request_id
    # What was generated: max(deltas, ceil(characters / 4)), the facade's documented estimate.
    assert (int(event["i"]), int(event["o"])) == (math.ceil(len(PROMPT) / 4),
                                                  max(delivered, math.ceil(len(text) / 4)))


def test_a_call_past_the_deadline_answers_504_and_bills_its_input(
        deadline_settings: Settings, key: IssuedKey, upstream: FakeOpenAI) -> None:
    runtime = Runtime(deadline_settings)
    upstream.inject("slow")  # answers after 4 x the deadline
    with serve_app(create_app(runtime=runtime)) as base, httpx.Client(base_url=base, timeout=30) as http:
        started = time.monotonic()
        r = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key.api_key}"},
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]})
        elapsed = time.monotonic() - started
    assert r.status_code == 504
    assert r.json()["error"]["type"] == "timeout_error" and "deadline" in r.json()["error"]["message"]
    assert elapsed < DEADLINE + 1.0
    [event] = entries(runtime, key.api_key_id, settled=True)
    assert (event["r"], int(event["i"]), int(event["o"])) == (r.headers["X-Request-Id"], 8, 0)


def test_the_deadline_holds_in_a_mounted_route_too(deadline_settings: Settings, key: IssuedKey,
                                                   upstream: FakeOpenAI) -> None:
    router = APIRouter()

    @router.post("/v1/story")
    async def story() -> dict[str, Any]:
        text = ""
        async for event in llm.stream(messages=[{"role": "user", "content": PROMPT}], track_tokens=True):
            if isinstance(event, llm.TextDelta):
                text += event.text
        return {"text": text}

    runtime = Runtime(deadline_settings)
    upstream.inject("trickle")
    with serve_app(create_app(runtime=runtime, routers=[router])) as base, \
            httpx.Client(base_url=base, timeout=30) as http:
        r = http.post("/v1/story", headers={"Authorization": f"Bearer {key.api_key}"})
    assert r.status_code == 504 and "deadline" in r.json()["error"]["message"]
    [event] = entries(runtime, key.api_key_id, settled=True)
    assert int(event["i"]) == 8 and int(event["o"]) >= 2
