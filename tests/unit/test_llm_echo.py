"""The echo provider's documented counts, and the LLM facade's metering, driven through echo."""

from __future__ import annotations

import asyncio
import json
import math
import time
from contextlib import aclosing
from typing import Any

import anyio
import pytest

from aikit.errors import SettingsError
from aikit.llm import (
    LLM,
    Caller,
    CallerRequired,
    ChatRequest,
    InvalidRequestError,
    StreamEnd,
    TextDelta,
    Usage,
    build_provider,
    use_caller,
)
from aikit.llm.base import EmbeddingRequest, ToolCallDelta
from aikit.llm.echo import DIMENSIONS, IMAGE_TOKENS, EchoProvider, count_words
from aikit.metering.base import Meter
from aikit.settings import load_settings
from tests.support.meters import MemoryMeter

pytestmark = pytest.mark.anyio

CALLER = Caller(api_key_id="key_1", customer_id="cus_1")
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are   terse"},
    {"role": "user", "content": [{"type": "text", "text": "first part"}, {"type": "text", "text": "two"}]},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": "hello big\n world"},
]
INPUT_WORDS = 3 + 3 + 1 + 3  # every word of every message


def echo_llm(meter: Meter | None = None) -> LLM:
    return LLM(EchoProvider(), meter=meter)


# ------------------------------------------------------------------------------------ echo's counting rule


async def test_echo_chat_counts_words() -> None:
    result = await EchoProvider().chat(ChatRequest(messages=MESSAGES, model="echo-1"))
    assert result.content == "echo: hello big world"  # whitespace normalized
    assert result.finish_reason == "stop"
    assert result.usage == Usage(input_tokens=INPUT_WORDS, output_tokens=4)
    assert result.usage.total_tokens == INPUT_WORDS + 4
    assert result.model == "echo-1"


async def test_echo_max_tokens_truncates_to_that_many_words() -> None:
    result = await EchoProvider().chat(ChatRequest(messages=MESSAGES, model="echo-1", max_tokens=2))
    assert result.content == "echo: hello"
    assert result.finish_reason == "length"
    assert result.usage.output_tokens == 2


async def test_echo_max_tokens_not_reached_is_stop() -> None:
    result = await EchoProvider().chat(ChatRequest(messages=MESSAGES, model="echo-1", max_tokens=4))
    assert (result.content, result.finish_reason) == ("echo: hello big world", "stop")


async def test_echo_without_user_message() -> None:
    req = ChatRequest(messages=[{"role": "system", "content": "be nice"}], model="echo-1")
    result = await EchoProvider().chat(req)
    assert (result.content, result.usage) == ("echo:", Usage(2, 1))


async def test_echo_stream_is_one_word_per_delta() -> None:
    req = ChatRequest(messages=MESSAGES, model="echo-1")
    events = [e async for e in EchoProvider().stream(req)]
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert deltas == ["echo: ", "hello ", "big ", "world"]
    assert events[-1] == StreamEnd(finish_reason="stop", usage=Usage(INPUT_WORDS, 4))
    chat = await EchoProvider().chat(req)
    assert "".join(deltas) == chat.content


async def test_echo_stream_honours_max_tokens() -> None:
    req = ChatRequest(messages=MESSAGES, model="echo-1", max_tokens=3)
    events = [e async for e in EchoProvider().stream(req)]
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["echo: ", "hello ", "big"]
    assert events[-1] == StreamEnd(finish_reason="length", usage=Usage(INPUT_WORDS, 3))


async def test_echo_is_fast() -> None:
    llm = echo_llm()
    start = time.perf_counter()
    for _ in range(2000):
        await llm.chat(MESSAGES)
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------------------------ metering: chat


async def test_chat_records_usage_for_explicit_caller() -> None:
    meter = MemoryMeter()
    result = await echo_llm(meter).chat(
        MESSAGES, model="echo-x", track_tokens=True, caller=CALLER, request_id="req_abc"
    )
    [event] = meter.events
    assert (event.request_id, event.api_key_id, event.customer_id, event.model) == (
        "req_abc",
        "key_1",
        "cus_1",
        "echo-x",
    )
    assert (event.input_tokens, event.output_tokens, event.cached_tokens) == (INPUT_WORDS, 4, 0)
    assert event.tokens == result.usage.total_tokens


async def test_chat_records_for_current_caller() -> None:
    meter = MemoryMeter()
    with use_caller(Caller("key_ctx", None)):
        await echo_llm(meter).chat(MESSAGES, track_tokens=True)
    assert [(e.api_key_id, e.customer_id, e.model) for e in meter.events] == [("key_ctx", None, "echo-1")]


async def test_chat_without_tracking_records_nothing() -> None:
    meter = MemoryMeter()
    with use_caller(CALLER):
        await echo_llm(meter).chat(MESSAGES)
    assert meter.events == []


async def test_tracking_needs_a_caller_and_a_meter() -> None:
    with pytest.raises(CallerRequired, match="outside an authenticated request"):
        await echo_llm(MemoryMeter()).chat(MESSAGES, track_tokens=True)
    with pytest.raises(RuntimeError, match="needs an LLM built with a meter"):
        await echo_llm().chat(MESSAGES, track_tokens=True, caller=CALLER)
    with pytest.raises(CallerRequired, match="outside an authenticated request"):
        echo_llm(MemoryMeter()).stream(MESSAGES, track_tokens=True)  # raised before the first event


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, r"messages\[0\].role must be one of"),
        ({"messages": [{"role": "tool", "content": "x"}]}, r"messages\[0\].tool_call_id is required"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\].content is required"),
        ({"messages": [{"role": "user", "content": 5}]}, r"messages\[0\].content must be a string"),
        ({"messages": [{"role": "user", "content": None}]}, r"messages\[0\].content must be a string"),
        (
            {"messages": [{"role": "user", "content": [{"text": "x"}]}]},
            r"content\[0\] must be a content part with a type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
            r"content\[0\].text must be a string",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
            r"messages\[0\].tool_calls must be a list on an assistant message",
        ),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"messages": MESSAGES, "model": " "}, "model must be a non-empty string"),
    ],
)
async def test_bad_requests_are_400_naming_the_field(kwargs: dict[str, object], message: str) -> None:
    meter = MemoryMeter()
    with pytest.raises(InvalidRequestError, match=message) as info:
        await echo_llm(meter).chat(track_tokens=True, caller=CALLER, **kwargs)  # type: ignore[arg-type]
    assert info.value.status == 400
    assert meter.events == []


# ---------------------------------------------------------------------------------- metering: streams


async def test_completed_stream_records_final_usage_once() -> None:
    meter = MemoryMeter()
    gen = echo_llm(meter).stream(MESSAGES, track_tokens=True, caller=CALLER, request_id="req_s")
    events = [e async for e in gen]
    await gen.aclose()
    assert isinstance(events[-1], StreamEnd)
    [event] = meter.events
    assert (event.request_id, event.input_tokens, event.output_tokens) == ("req_s", INPUT_WORDS, 4)


async def test_abandoned_stream_records_exact_echo_counts() -> None:
    meter = MemoryMeter()
    gen = echo_llm(meter).stream(MESSAGES, track_tokens=True, caller=CALLER)
    assert await gen.__anext__() == TextDelta("echo: ")
    assert await gen.__anext__() == TextDelta("hello ")
    await gen.aclose()
    [event] = meter.events
    assert (event.input_tokens, event.output_tokens) == (INPUT_WORDS, 2)


async def test_stream_abandoned_after_its_end_records_final_usage() -> None:
    meter = MemoryMeter()
    async with aclosing(echo_llm(meter).stream(MESSAGES, track_tokens=True, caller=CALLER)) as gen:
        async for event in gen:
            if isinstance(event, StreamEnd):
                break
    assert [(e.input_tokens, e.output_tokens) for e in meter.events] == [(INPUT_WORDS, 4)]


async def test_abandoned_before_any_text_records_nothing() -> None:
    meter = MemoryMeter()
    gen = echo_llm(meter).stream(MESSAGES, track_tokens=True, caller=CALLER)
    await gen.aclose()
    assert meter.events == []


async def test_stream_uses_the_caller_current_when_it_was_created() -> None:
    meter = MemoryMeter()
    with use_caller(Caller("key_then", "cus_then")):
        gen = echo_llm(meter).stream(MESSAGES, track_tokens=True)
    with use_caller(Caller("key_now", None)):
        _ = [e async for e in gen]
    assert [(e.api_key_id, e.customer_id) for e in meter.events] == [("key_then", "cus_then")]


async def test_record_survives_anyio_cancellation() -> None:
    """Starlette cancels a streaming response's task group when the client hangs up."""
    meter = MemoryMeter(delay=0.05)
    llm = echo_llm(meter)
    seen: list[TextDelta | StreamEnd] = []
    three = anyio.Event()

    async def consume() -> None:
        async with aclosing(llm.stream(MESSAGES, track_tokens=True, caller=CALLER)) as gen:
            async for event in gen:
                seen.append(event)
                if len(seen) == 3:
                    three.set()
                    await anyio.sleep(10)  # cancelled here; aclose then runs inside the cancelled scope

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await three.wait()
        tg.cancel_scope.cancel()
    assert [(e.input_tokens, e.output_tokens) for e in meter.events] == [(INPUT_WORDS, 3)]


async def test_record_survives_task_cancel_during_the_record() -> None:
    meter = MemoryMeter(delay=0.1)
    llm = echo_llm(meter)

    async def consume() -> None:
        gen = llm.stream(MESSAGES, track_tokens=True, caller=CALLER)
        await gen.__anext__()
        await gen.aclose()  # records 1 output word, slowly

    task = asyncio.create_task(consume())
    await meter.entered.wait()
    task.cancel()  # lands inside meter.record
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    assert [(e.input_tokens, e.output_tokens) for e in meter.events] == [(INPUT_WORDS, 1)]


async def test_estimates_for_non_echo_providers_follow_the_chars_rule() -> None:
    """The base rule: ceil(chars / 4) for the prompt; max(deltas, ceil(chars / 4)) for the output."""
    from aikit.llm.base import Provider

    req = ChatRequest(messages=[{"role": "user", "content": "x" * 41}], model="m")
    assert Provider.estimate_input_tokens(EchoProvider(), req) == math.ceil(41 / 4)
    assert Provider.estimate_output_tokens(EchoProvider(), "abcdefghij", 2) == 3
    assert Provider.estimate_output_tokens(EchoProvider(), "abc", 5) == 5


# ------------------------------------------------------------------------------------- build_provider


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("echo", "echo-1"),
        ("openai", "gpt-4o-mini"),
        ("anthropic", "claude-sonnet-4-5"),
        ("bedrock", "anthropic.claude-3-haiku-20240307-v1:0"),
    ],
)
async def test_build_provider_picks_by_settings(provider: str, model: str) -> None:
    settings = load_settings(
        _env_file=None, llm_provider=provider, anthropic_api_key="k", bedrock_region="us-east-1"
    )
    built = build_provider(settings)
    assert (built.name, built.default_model, LLM(built).default_model) == (provider, model, model)
    await built.aclose()
    custom = build_provider(
        load_settings(
            _env_file=None, llm_provider=provider, anthropic_api_key="k", llm_default_model="my-model"
        )
    )
    assert custom.default_model == "my-model"
    await custom.aclose()


async def test_llm_default_model_overrides_the_providers() -> None:
    result = await LLM(EchoProvider(), default_model="echo-big").chat(MESSAGES)
    assert result.model == "echo-big"


def test_anthropic_without_key_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="ANTHROPIC_API_KEY"):
        build_provider(load_settings(_env_file=None, llm_provider="anthropic", anthropic_api_key=None))


# ------------------------------------------------------------------------------- tools, JSON, images, vectors

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time"}},
]
TOOLS_WORDS = len(json.dumps(TOOLS).split())


def ask(text: str, **params: Any) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], model="echo-1", params=params)


async def test_echo_calls_the_tools_its_user_names() -> None:
    text = 'weather and time please\ncall get_weather {"city": "Paris"}\ncall get_time\ncall unknown {}'
    result = await EchoProvider().chat(ask(text, tools=TOOLS))
    assert (result.content, result.finish_reason) == (None, "tool_calls")
    assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [
        ("call_echo1_0", "get_weather", '{"city": "Paris"}'), ("call_echo1_1", "get_time", "{}")]
    # input: the message's words and the tool definitions; output: 1 + argument words per call
    assert result.usage == Usage(count_words(text) + TOOLS_WORDS, (1 + 2) + (1 + 1))


@pytest.mark.parametrize(
    ("params", "calls"),
    [
        ({"tool_choice": "none"}, []),
        ({"parallel_tool_calls": False}, ["get_weather"]),
        ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, ["get_time"]),
    ],
)
async def test_echo_follows_tool_choice(params: dict[str, Any], calls: list[str]) -> None:
    result = await EchoProvider().chat(ask("call get_weather {}\ncall get_time {}", tools=TOOLS, **params))
    assert [c.name for c in result.tool_calls] == calls


async def test_echo_required_or_named_tool_without_a_call_line() -> None:
    required = await EchoProvider().chat(ask("hello", tools=TOOLS, tool_choice="required"))
    named = await EchoProvider().chat(
        ask("hello", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert [(c.name, c.arguments) for c in required.tool_calls] == [("get_weather", "{}")]
    assert [(c.name, c.arguments) for c in named.tool_calls] == [("get_time", "{}")]


async def test_echo_answers_the_tool_result() -> None:
    messages = [{"role": "user", "content": "call get_time"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "noon  exactly"}]
    result = await EchoProvider().chat(ChatRequest(messages, "echo-1", params={"tools": TOOLS}))
    assert (result.content, result.tool_calls) == ("echo: noon exactly", ())
    assert result.usage.input_tokens == 2 + 2 + 2 + TOOLS_WORDS  # the call's name and arguments count too


async def test_echo_streams_tool_calls_as_deltas() -> None:
    events = [e async for e in EchoProvider().stream(ask('call get_weather {"city": "Paris", "day": 2}', tools=TOOLS))]
    assert events[:-1] == [
        ToolCallDelta(0, id="call_echo1_0", name="get_weather"),
        ToolCallDelta(0, arguments='{"city": '), ToolCallDelta(0, arguments='"Paris", '),
        ToolCallDelta(0, arguments='"day": '), ToolCallDelta(0, arguments="2}"),
    ]
    assert events[-1] == StreamEnd("tool_calls", Usage(6 + TOOLS_WORDS, 1 + 4))  # six words asked


async def test_echo_json_output() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    result = await EchoProvider().chat(ask("hello  big world", response_format=fmt))
    assert json.loads(result.content or "") == {"echo": "hello big world"}
    assert result.usage == Usage(3 + len(json.dumps(fmt).split()), count_words(result.content or ""))
    streamed = [e async for e in EchoProvider().stream(ask("hello  big world", response_format=fmt))]
    assert "".join(e.text for e in streamed if isinstance(e, TextDelta)) == result.content


async def test_echo_counts_images_and_files_as_a_fixed_figure() -> None:
    message = {"role": "user", "content": [{"type": "text", "text": "what is it"},
                                           {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                                           {"type": "file", "file": {"file_id": "f"}}]}
    result = await EchoProvider().chat(ChatRequest([message], "echo-1"))
    assert result.usage.input_tokens == 3 + 2 * IMAGE_TOKENS
    assert result.content == "echo: what is it"


async def test_echo_embeddings_are_deterministic_unit_vectors() -> None:
    provider = EchoProvider()
    first = await provider.embed(EmbeddingRequest(["the same text", "other words"], "echo-embed"))
    again = await provider.embed(EmbeddingRequest("the same text", "echo-embed"))
    assert first.embeddings[0] == again.embeddings[0] != first.embeddings[1]
    assert len(first.embeddings[0]) == DIMENSIONS
    assert math.isclose(sum(v * v for v in first.embeddings[0]), 1.0)
    assert (first.usage, again.usage) == (Usage(5, 0), Usage(3, 0))
    sized = await provider.embed(EmbeddingRequest([[1, 2, 3]], "echo-embed", dimensions=64))
    assert (len(sized.embeddings[0]), sized.usage.input_tokens) == (64, 3)


async def test_a_cut_tool_stream_meters_exactly_what_echo_sent() -> None:
    meter = MemoryMeter()
    gen = echo_llm(meter).stream([{"role": "user", "content": "call get_weather {\"a\": 1, \"b\": 2}"}],
                                 tools=TOOLS, track_tokens=True, caller=CALLER)
    assert await gen.__anext__() == ToolCallDelta(0, id="call_echo1_0", name="get_weather")
    assert await gen.__anext__() == ToolCallDelta(0, arguments='{"a": ')
    await gen.aclose()
    [event] = meter.events
    assert (event.input_tokens, event.output_tokens) == (6 + TOOLS_WORDS, 1 + 1)  # six words asked
