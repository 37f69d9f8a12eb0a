"""Each provider against a local imitation of its API: usage, streams, faults, metering of cut streams."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from aikit.llm import (
    LLM,
    Caller,
    ProviderError,
    ProviderTimeout,
    StreamEnd,
    TextDelta,
    Usage,
    build_provider,
)
from aikit.settings import load_settings
from tests.fakes.llm_servers import (
    FakeLLMServer,
    anthropic_server,
    bedrock_server,
    openai_server,
)
from tests.support.meters import MemoryMeter

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("aws_credentials")]

CALLER = Caller(api_key_id="key_1", customer_id="cus_1")
PROMPT = "x" * 40  # 40 chars: an estimated 10 input tokens
MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": PROMPT}]
REPLY_PIECES = ["Hello ", "from ", "the ", "fake ", "provider ", "today"]
# What each fake reports, normalized: OpenAI's prompt_tokens include cached; the others report cache beside.
USAGE = {
    "openai": Usage(input_tokens=42, output_tokens=6, cached_tokens=10),
    "anthropic": Usage(input_tokens=12 + 30 + 5, output_tokens=6, cached_tokens=30, cache_write_tokens=5),
    "bedrock": Usage(input_tokens=20 + 8 + 4, output_tokens=6, cached_tokens=8, cache_write_tokens=4),
}
# After two pieces ("Hello from ", 11 chars): output max(2, ceil(11/4)) = 3; input as reported or estimated.
PARTIAL = {
    "openai": (10, 3, 0),
    "anthropic": (47, 3, 30),  # message_start reported the input before the text
    "bedrock": (10, 3, 0),
}


@dataclass
class Upstream:
    name: str
    server: Any  # FakeOpenAI | FakeAnthropic | FakeBedrock
    meter: MemoryMeter

    def llm(self, timeout: float = 5.0, **overrides: Any) -> LLM:
        values: dict[str, Any] = {
            "_env_file": None,
            "llm_provider": self.name,
            "llm_timeout_seconds": timeout,
            "openai_base_url": self.server.base_url,
            "openai_api_key": getattr(self.server, "api_key", None),
            "anthropic_base_url": self.server.base_url,
            "anthropic_api_key": getattr(self.server, "api_key", "unused"),
            "bedrock_region": "us-east-1",
            "bedrock_endpoint_url": self.server.base_url,
        }
        values.update(overrides)
        return LLM(build_provider(load_settings(**values)), meter=self.meter)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, FakeLLMServer]]:
    with (
        openai_server(slow_seconds=1.0) as o,
        anthropic_server(slow_seconds=1.0) as a,
        bedrock_server(slow_seconds=1.0) as b,
    ):
        yield {"openai": o, "anthropic": a, "bedrock": b}


@pytest.fixture(params=["openai", "anthropic", "bedrock"])
def upstream(request: pytest.FixtureRequest, servers: dict[str, FakeLLMServer]) -> Upstream:
    server = servers[request.param]
    server.reset()
    return Upstream(request.param, server, MemoryMeter())


@pytest.fixture
async def llm(upstream: Upstream) -> AsyncIterator[LLM]:
    instance = upstream.llm()
    yield instance
    await instance.aclose()


async def _stream_all(llm: LLM, **kwargs: Any) -> list[TextDelta | StreamEnd]:
    return [event async for event in llm.stream(MESSAGES, track_tokens=True, caller=CALLER, **kwargs)]


# ---------------------------------------------------------------------------------------------- happy paths


async def test_chat_normalizes_usage(upstream: Upstream, llm: LLM) -> None:
    result = await llm.chat(
        MESSAGES, model="some-model", track_tokens=True, caller=CALLER, request_id="req_1"
    )
    assert result.content == "Hello from the fake provider today"
    assert result.finish_reason == "stop"
    assert result.usage == USAGE[upstream.name]
    [event] = upstream.meter.events
    expected = USAGE[upstream.name]
    assert (event.request_id, event.model, event.api_key_id, event.customer_id) == (
        "req_1",
        "some-model",
        "key_1",
        "cus_1",
    )
    assert (event.input_tokens, event.output_tokens, event.cached_tokens) == (
        expected.input_tokens,
        expected.output_tokens,
        expected.cached_tokens,
    )


async def test_stream_yields_text_then_final_usage(upstream: Upstream, llm: LLM) -> None:
    events = await _stream_all(llm)
    assert [e.text for e in events if isinstance(e, TextDelta)] == REPLY_PIECES
    assert events[-1] == StreamEnd(finish_reason="stop", usage=USAGE[upstream.name])
    assert all(isinstance(e, TextDelta | StreamEnd) for e in events)  # InputUsage stays inside the facade
    expected = USAGE[upstream.name]
    assert upstream.meter.usages() == [
        (expected.input_tokens, expected.output_tokens, expected.cached_tokens)
    ]


async def test_stop_reason_length(upstream: Upstream, llm: LLM) -> None:
    upstream.server.finish_reason = "length"  # OpenAI's field
    upstream.server.stop_reason = "max_tokens"  # Anthropic's and Bedrock's
    try:
        result = await llm.chat(MESSAGES, max_tokens=6)
        events = await _stream_all(llm, max_tokens=6)
    finally:
        upstream.server.finish_reason = "stop"
        upstream.server.stop_reason = "end_turn"
    assert result.finish_reason == "length"
    assert isinstance(events[-1], StreamEnd)
    assert events[-1].finish_reason == "length"


# ----------------------------------------------------------------------------------------- fault mapping

FAULTS = [
    ("500", 502, "failed"),
    ("503", 502, "failed"),
    ("429", 502, "rate limiting"),
    ("401", 502, "provider authentication failed"),
    ("malformed", 502, "malformed"),
    ("invalid_model", 400, "rejected the request"),
]


@pytest.mark.parametrize(("fault", "status", "fragment"), FAULTS)
async def test_chat_faults(upstream: Upstream, llm: LLM, fault: str, status: int, fragment: str) -> None:
    upstream.server.inject(fault)
    with pytest.raises(ProviderError) as info:
        await llm.chat(MESSAGES, track_tokens=True, caller=CALLER)
    assert (info.value.status, type(info.value)) == (status, ProviderError)
    assert fragment in info.value.message
    assert upstream.meter.events == []


@pytest.mark.parametrize(("fault", "status", "fragment"), [f for f in FAULTS if f[0] != "malformed"])
async def test_stream_faults_before_output_record_nothing(
    upstream: Upstream, llm: LLM, fault: str, status: int, fragment: str
) -> None:
    upstream.server.inject(fault)
    with pytest.raises(ProviderError) as info:
        await _stream_all(llm)
    assert info.value.status == status
    assert fragment in info.value.message
    assert upstream.meter.events == []


async def test_invalid_request_carries_the_upstreams_reason(upstream: Upstream, llm: LLM) -> None:
    upstream.server.inject("validation" if upstream.name == "bedrock" else "bad_request")
    with pytest.raises(ProviderError) as info:
        await llm.chat(MESSAGES)
    assert info.value.status == 400
    reason = {"openai": "temperature", "anthropic": "max_tokens", "bedrock": "maxTokens"}[upstream.name]
    assert reason in info.value.message


@pytest.mark.parametrize("upstream", ["openai", "anthropic"], indirect=True)  # Bedrock: the 401 fault
async def test_wrong_credentials_are_a_gateway_failure(upstream: Upstream) -> None:
    llm = upstream.llm(openai_api_key="sk-wrong", anthropic_api_key="sk-ant-wrong")
    try:
        with pytest.raises(ProviderError) as info:
            await llm.chat(MESSAGES)
    finally:
        await llm.aclose()
    assert (info.value.status, info.value.message) == (
        502,
        f"{upstream.name}: provider authentication failed",
    )
    assert "wrong" not in info.value.message


@pytest.mark.parametrize("streaming", [False, True])
async def test_slow_upstream_times_out_and_bills_the_input(upstream: Upstream, streaming: bool) -> None:
    """The request reached the upstream, which works on it (and bills it) though we stopped waiting: the input
    is metered, estimated as the upstream never reported it."""
    llm = upstream.llm(timeout=0.2)
    upstream.server.inject("slow")
    call = _stream_all(llm) if streaming else llm.chat(MESSAGES, track_tokens=True, caller=CALLER)
    try:
        with pytest.raises(ProviderTimeout) as info:
            await call
    finally:
        await llm.aclose()
    assert info.value.status == 504
    assert info.value.cut_off
    assert upstream.meter.usages() == [(10, 0, 0)]  # 40 characters: an estimated 10 input tokens


async def test_unreachable_upstream_is_502(upstream: Upstream) -> None:
    closed = "http://127.0.0.1:9"  # discard port: nothing listens
    llm = upstream.llm(openai_base_url=closed + "/v1", anthropic_base_url=closed, bedrock_endpoint_url=closed)
    try:
        with pytest.raises(ProviderError) as info:
            await llm.chat(MESSAGES, track_tokens=True, caller=CALLER)
    finally:
        await llm.aclose()
    assert (info.value.status, type(info.value)) == (502, ProviderError)
    assert "connection failed" in info.value.message
    assert upstream.meter.events == []


# ------------------------------------------------------------------------------- streams cut short, metered


@pytest.mark.parametrize("fault", ["die_mid_stream", "truncate", "malformed"])
async def test_upstream_dying_mid_stream_meters_what_was_sent(
    upstream: Upstream, llm: LLM, fault: str
) -> None:
    upstream.server.inject(fault)
    received: list[str] = []

    async def consume() -> None:
        async for event in llm.stream(MESSAGES, track_tokens=True, caller=CALLER, request_id="req_cut"):
            assert isinstance(event, TextDelta)
            received.append(event.text)

    with pytest.raises(ProviderError) as info:
        await consume()
    assert info.value.status == 502
    assert received == REPLY_PIECES[:2]
    assert upstream.meter.usages() == [PARTIAL[upstream.name]]
    assert upstream.meter.events[0].request_id == "req_cut"


async def test_abandoned_stream_meters_what_was_sent(upstream: Upstream, llm: LLM) -> None:
    gen = llm.stream(MESSAGES, track_tokens=True, caller=CALLER)
    assert await gen.__anext__() == TextDelta("Hello ")
    assert await gen.__anext__() == TextDelta("from ")
    await gen.aclose()
    assert upstream.meter.usages() == [PARTIAL[upstream.name]]
    # The connection was given back: the same LLM still works.
    assert (await llm.chat(MESSAGES)).usage == USAGE[upstream.name]


@pytest.mark.parametrize("upstream", ["anthropic", "bedrock"], indirect=True)  # OpenAI has no error event
async def test_provider_error_events_mid_stream(upstream: Upstream, llm: LLM) -> None:
    upstream.server.inject("stream_exception" if upstream.name == "bedrock" else "error_event")
    with pytest.raises(ProviderError) as info:
        await _stream_all(llm)
    assert info.value.status == 502
    assert upstream.meter.usages() == [PARTIAL[upstream.name]]


# ------------------------------------------------------------------------------------ provider specifics


async def test_openai_request_shape(servers: dict[str, Any]) -> None:
    server = servers["openai"]
    server.reset()
    llm = Upstream("openai", server, MemoryMeter()).llm()
    try:
        await llm.chat(MESSAGES, model="gpt-x", max_tokens=7, temperature=0.5, stream=True)
        await _stream_all(llm)
    finally:
        await llm.aclose()
    plain, streamed = (r.json for r in server.requests)
    assert plain == {
        "model": "gpt-x",
        "messages": MESSAGES,
        "stream": False,
        "max_tokens": 7,
        "temperature": 0.5,
    }
    assert streamed["stream"] is True
    assert streamed["stream_options"] == {"include_usage": True}
    assert server.requests[0].headers["authorization"] == f"Bearer {server.api_key}"


async def test_openai_stream_without_usage_is_estimated(servers: dict[str, Any]) -> None:
    server = servers["openai"]
    server.reset()
    server.inject("no_usage")
    meter = MemoryMeter()
    llm = Upstream("openai", server, meter).llm()
    try:
        events = await _stream_all(llm)
    finally:
        await llm.aclose()
    text = "".join(REPLY_PIECES)
    expected = Usage(10, max(len(REPLY_PIECES), math.ceil(len(text) / 4)))
    assert events[-1] == StreamEnd("stop", expected)
    assert meter.usages() == [(expected.input_tokens, expected.output_tokens, 0)]


async def test_anthropic_request_shape(servers: dict[str, Any]) -> None:
    server = servers["anthropic"]
    server.reset()
    llm = Upstream("anthropic", server, MemoryMeter()).llm(anthropic_version="2023-06-01")
    messages = [{"role": "system", "content": "be brief"}, *MESSAGES]
    try:
        await llm.chat(messages, model="claude-x", stop=["END"])
    finally:
        await llm.aclose()
    [req] = server.requests
    assert req.path == "/v1/messages"
    assert (req.headers["x-api-key"], req.headers["anthropic-version"]) == (server.api_key, "2023-06-01")
    assert req.json == {
        "model": "claude-x",
        "max_tokens": 4096,
        "system": [{"type": "text", "text": "be brief"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
        "stop_sequences": ["END"],
    }


async def test_anthropic_529_and_error_before_text(servers: dict[str, Any]) -> None:
    server = servers["anthropic"]
    server.reset()
    meter = MemoryMeter()
    llm = Upstream("anthropic", server, meter).llm()
    try:
        server.inject("529")
        with pytest.raises(ProviderError) as overloaded:
            await llm.chat(MESSAGES, track_tokens=True, caller=CALLER)
        server.inject("error_before_text")
        with pytest.raises(ProviderError) as early:
            await _stream_all(llm)
    finally:
        await llm.aclose()
    assert overloaded.value.status == early.value.status == 502
    assert meter.events == []  # message_start reported input, but the provider failed before any output


async def test_anthropic_stream_abandoned_before_text_meters_reported_input(servers: dict[str, Any]) -> None:
    """Anthropic accepted the prompt (message_start) and bills it even if the client hangs up at once."""
    server = servers["anthropic"]
    server.reset()
    meter = MemoryMeter()
    llm = Upstream("anthropic", server, meter).llm()
    upstream = llm.provider.stream(llm._request(MESSAGES, None, None, {}))
    try:
        first = await upstream.__anext__()  # InputUsage from message_start
    finally:
        await upstream.aclose()
    gen = llm.stream(MESSAGES, track_tokens=True, caller=CALLER)
    assert await gen.__anext__() == TextDelta("Hello ")
    await gen.aclose()
    await llm.aclose()
    assert first.usage.input_tokens == 47  # type: ignore[union-attr]
    assert meter.usages() == [(47, 2, 30)]  # one delta of 6 chars: max(1, ceil(6/4)) = 2


@pytest.mark.parametrize(
    ("fault", "status"), [("throttle", 502), ("model_timeout", 504), ("validation", 400)]
)
async def test_bedrock_error_codes(servers: dict[str, Any], fault: str, status: int) -> None:
    server = servers["bedrock"]
    server.reset()
    llm = Upstream("bedrock", server, MemoryMeter()).llm()
    for streaming in (False, True):
        server.inject(fault)
        call = _stream_all(llm) if streaming else llm.chat(MESSAGES)
        with pytest.raises(ProviderError) as info:
            await call
        assert info.value.status == status


async def test_bedrock_request_shape(servers: dict[str, Any]) -> None:
    server = servers["bedrock"]
    server.reset()
    llm = Upstream("bedrock", server, MemoryMeter()).llm()
    await llm.chat([{"role": "system", "content": "sys"}, *MESSAGES], max_tokens=5)
    [req] = server.requests
    assert req.path == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
    assert req.json == {
        "messages": [{"role": "user", "content": [{"text": PROMPT}]}],
        "system": [{"text": "sys"}],
        "inferenceConfig": {"maxTokens": 5},
    }
    assert req.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIAFAKE/")


# ------------------------------------------------------------------------------ the fake speaks real OpenAI


def test_openai_sdk_reads_the_fake_openai_server(servers: dict[str, Any]) -> None:
    """The imitation is checked against the real openai SDK, so the provider meets the real shape."""
    server = servers["openai"]
    server.reset()
    client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 10
    chunks = list(
        client.chat.completions.create(  # type: ignore[call-overload]
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(REPLY_PIECES)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 42
    server.inject("invalid_model")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)  # type: ignore[arg-type]
    client.close()
