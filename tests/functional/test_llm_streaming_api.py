"""Streaming through our API with a real upstream: LLM_PROVIDER=openai pointed at the local fake OpenAI server,
the API under uvicorn, clients that read everything, hang up midway, or meet a failing upstream."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from aikit.api.app import create_app
from aikit.flush import Flusher
from aikit.keys import IssuedKey
from aikit.llm import ChatRequest
from aikit.runtime import Runtime
from aikit.settings import Settings
from tests.fakes.llm_servers import FakeOpenAI
from tests.support.api import read_sdk_stream
from tests.support.proxy import UPSTREAM_TIMEOUT
from tests.support.redis import entries, held, pending_tokens
from tests.support.servers import serve_app


@pytest.fixture
def runtime(proxy_settings: Settings) -> Runtime:
    return Runtime(proxy_settings)


def wait_for_entries(runtime: Runtime, api_key_id: str, count: int, seconds: float = 5) -> list[dict[str, str]]:
    deadline = time.monotonic() + seconds
    while len(found := entries(runtime, api_key_id)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_openai_sdk_streams_through_our_api(runtime: Runtime, proxy_key: IssuedKey, slow_openai: FakeOpenAI) -> None:
    with serve_app(create_app(runtime=runtime)) as base:
        sdk = openai.OpenAI(api_key=proxy_key.api_key, base_url=base + "/v1", max_retries=0)
        stream = sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                             stream=True, stream_options={"include_usage": True})
        text, usage = read_sdk_stream(stream)
        reply = sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert text == slow_openai.reply
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (42, 6)
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 10
    assert reply.choices[0].message.content == slow_openai.reply
    # The upstream was asked for its usage on the stream, with our key, not the customer's.
    sent = slow_openai.requests[0]
    assert sent.json["stream_options"] == {"include_usage": True}
    assert sent.headers["authorization"] == f"Bearer {FakeOpenAI.api_key}"
    found = entries(runtime, proxy_key.api_key_id)
    assert [(e["m"], e["i"], e["o"], e["x"]) for e in found] == [("gpt-4o-mini", "42", "6", "10")] * 2
    assert pending_tokens(runtime, proxy_key.api_key_id) == 2 * 48
    assert held(runtime, proxy_key) == {}
    summary = Flusher(runtime.settings).run()
    assert summary.ok and summary.rows_inserted == 2


def test_a_client_that_hangs_up_midway_is_metered_once_for_what_was_generated(
        runtime: Runtime, proxy_key: IssuedKey, slow_openai: FakeOpenAI) -> None:
    # A long answer, so the hang-up comes while it is still being relayed.
    slow_openai.reply = " ".join(f"w{i}" for i in range(20_000))
    with serve_app(create_app(runtime=runtime)) as base, httpx.Client(base_url=base, timeout=10) as http:
        with http.stream("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {proxy_key.api_key}"},
                         json={"model": "gpt-4o-mini", "stream": True,
                               "messages": [{"role": "user", "content": "tell me everything"}]}) as r:
            assert r.status_code == 200
            request_id = r.headers["X-Request-Id"]
            chunks = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks += 1
                if chunks == 2:
                    break  # leaving the block closes the connection with the body unread
        found = wait_for_entries(runtime, proxy_key.api_key_id, 1)
        time.sleep(0.3)  # would a second record show up?
        found = entries(runtime, proxy_key.api_key_id)
    assert [e["r"] for e in found] == [request_id]  # exactly one usage event
    event = found[0]
    output = int(event["o"])
    # Cut short: the text relayed so far, with an estimated input (the upstream's usage never came).
    assert 0 < output < 20_000
    assert event["i"] == str(-(-len("tell me everything") // 4))
    assert pending_tokens(runtime, proxy_key.api_key_id) == int(event["i"]) + output > 0
    assert held(runtime, proxy_key) == {}
    summary = Flusher(runtime.settings).run()
    assert summary.ok and summary.rows_inserted == 1


def test_upstream_dying_mid_stream_is_reported_in_band_and_metered(
        runtime: Runtime, proxy_key: IssuedKey, slow_openai: FakeOpenAI) -> None:
    slow_openai.inject("die_mid_stream")
    with TestClient(create_app(runtime=runtime)) as client, client.stream(
            "POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {proxy_key.api_key}"},
            json={"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status_code == 200
        body = r.read().decode()
        request_id = r.headers["X-Request-Id"]
    events = [json.loads(line.removeprefix("data: ")) for line in body.split("\n\n") if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "provider_error"
    assert "[DONE]" not in body
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    assert text == "".join(slow_openai.words()[:2])
    found = entries(runtime, proxy_key.api_key_id)
    assert [e["r"] for e in found] == [request_id]
    assert int(found[0]["o"]) >= 2
    assert held(runtime, proxy_key) == {}


def own_reservation(runtime: Runtime, content: str) -> int:
    """What a call without max_tokens reserves: its input bound plus the default output cap."""
    cap = runtime.settings.quota_reserve_tokens
    req = ChatRequest(messages=[{"role": "user", "content": content}], model="gpt-4o-mini", max_tokens=cap)
    return runtime.llm.provider.input_token_bound(req) + cap


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("fault", "status"), [("500", 502), ("503", 502), ("slow", 504)])
def test_upstream_failure_answers_5xx_and_settles_the_reservation(
        runtime: Runtime, proxy_key: IssuedKey, slow_openai: FakeOpenAI, fault: str, status: int, stream: bool) -> None:
    """A refusal (5xx) is not billed and gives its reservation back; a timeout cut the call off while the
    upstream worked on it, so it bills the input (estimated: the upstream never said) and nothing is held."""
    slow_openai.inject(fault)
    with TestClient(create_app(runtime=runtime)) as client:
        started = time.monotonic()
        r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {proxy_key.api_key}"},
                        json={"model": "gpt-4o-mini", "stream": stream,
                              "messages": [{"role": "user", "content": "hi"}]})
        elapsed = time.monotonic() - started
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["code"] == "provider_error"
        assert error["type"] == ("timeout_error" if status == 504 else "api_error")
        if fault == "slow":
            assert elapsed < UPSTREAM_TIMEOUT + 1.0
            [event] = entries(runtime, proxy_key.api_key_id)
            assert (event["r"], event["i"], event["o"]) == (r.headers["X-Request-Id"], "1", "0")  # ceil(2 / 4)
            assert pending_tokens(runtime, proxy_key.api_key_id) == 1
        else:
            assert entries(runtime, proxy_key.api_key_id) == []
            assert pending_tokens(runtime, proxy_key.api_key_id) == 0
        assert held(runtime, proxy_key) == {}
        # Nothing is left held: the next call's headers show only its own reservation.
        ok = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {proxy_key.api_key}"},
                         json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200
        used = 1 if fault == "slow" else 0
        assert ok.headers["X-RateLimit-Remaining-Tokens"] == str(1_000_000 - used - own_reservation(runtime, "hi"))
    assert len(entries(runtime, proxy_key.api_key_id)) == 1 + used
