"""Tools, images, JSON output and embeddings through every provider, against local imitations of the real APIs
(boto3 for Bedrock): what goes upstream, what comes back, and that the tokens metered are the ones the upstream
reported, the cost of tool definitions and images included."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import openai
import pytest

from aikit.errors import UnsupportedError
from aikit.llm import LLM, Caller, ProviderError, build_provider
from aikit.llm.base import (
    EmbeddingRequest,
    ExtraDelta,
    RefusalDelta,
    StreamEnd,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from aikit.settings import load_settings
from tests.fakes.llm_servers import (
    IMAGE_TOKENS,
    TOOL_TOKENS,
    FakeLLMServer,
    anthropic_server,
    bedrock_server,
    openai_server,
)
from tests.support.meters import MemoryMeter

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("aws_credentials")]

CALLER = Caller(api_key_id="key_1", customer_id="cus_1")
ARGUMENTS = {"city": "Paris", "unit": "celsius"}  # what the fakes call tools with
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                           "required": ["city"]},
        },
    }
]
# The echo provider calls a tool when the user's line says so; the fakes call the first tool anyway.
QUESTION = {"role": "user", "content": "What is the weather in Paris?\ncall get_weather " + json.dumps(ARGUMENTS)}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {
    "name": "weather", "schema": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": True}}


def figures(*usages: Usage) -> list[tuple[int, int, int]]:
    return [(u.input_tokens, u.output_tokens, u.cached_tokens) for u in usages]


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, FakeLLMServer]]:
    with openai_server() as o, anthropic_server() as a, bedrock_server() as b:
        yield {"openai": o, "anthropic": a, "bedrock": b}


class Upstream:
    def __init__(self, name: str, server: Any) -> None:
        self.name = name
        self.server = server  # None for echo
        self.meter = MemoryMeter()
        base = server.base_url if server is not None else "http://127.0.0.1:9"
        settings = load_settings(
            _env_file=None, llm_provider=name, llm_timeout_seconds=5.0, openai_base_url=base,
            openai_api_key=getattr(server, "api_key", None), anthropic_base_url=base,
            anthropic_api_key=getattr(server, "api_key", "unused"), bedrock_region="us-east-1",
            bedrock_endpoint_url=base,
        )
        self.llm = LLM(build_provider(settings), meter=self.meter)

    def reported(self) -> Usage:
        """The usage the upstream last reported, normalized as the provider must read it."""
        u = self.server.last_usage
        if self.name == "openai":
            return Usage(u["prompt_tokens"], u["completion_tokens"], u["prompt_tokens_details"]["cached_tokens"])
        if self.name == "anthropic":
            read, write = u["cache_read_input_tokens"], u["cache_creation_input_tokens"]
            return Usage(u["input_tokens"] + read + write, u["output_tokens"], read, write)
        read, write = u["cacheReadInputTokens"], u["cacheWriteInputTokens"]
        return Usage(u["inputTokens"] + read + write, u["outputTokens"], read, write)

    def base_input(self) -> int:
        """The upstream's input figure for a plain request, before tools and images."""
        return {"openai": 42, "anthropic": 12 + 30 + 5, "bedrock": 20 + 8 + 4}[self.name]

    def bodies(self) -> list[dict[str, Any]]:
        return [r.json for r in self.server.requests]


@pytest.fixture(params=["openai", "anthropic", "bedrock", "echo"])
async def upstream(request: pytest.FixtureRequest, servers: dict[str, FakeLLMServer]) -> AsyncIterator[Upstream]:
    server = servers.get(request.param)
    if server is not None:
        server.reset()
    found = Upstream(request.param, server)
    yield found
    await found.llm.aclose()


def by_name(*names: str) -> Any:
    return pytest.mark.parametrize("upstream", names, indirect=True)


def assistant_turn(calls: tuple[ToolCall, ...] | list[ToolCall]) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}


def collect(events: list[Any]) -> tuple[str, list[ToolCall], StreamEnd]:
    """Text, tool calls and end of a stream, assembled as an OpenAI client does from the deltas."""
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls: dict[int, dict[str, str]] = {}
    for e in (e for e in events if isinstance(e, ToolCallDelta)):
        if e.id is not None:
            assert e.index not in calls, "a call's id comes once, on its first piece"
            calls[e.index] = {"id": e.id, "name": e.name or "", "arguments": e.arguments}
        else:
            calls[e.index]["arguments"] += e.arguments
    end = events[-1]
    assert isinstance(end, StreamEnd)
    return text, [ToolCall(**c) for _, c in sorted(calls.items())], end


# ----------------------------------------------------------------------------------------- function calling


async def test_function_calling_round_trip(upstream: Upstream) -> None:
    """Tool call, tool result, final answer; each call metered as the upstream reported it."""
    first = await upstream.llm.chat([QUESTION], tools=TOOLS, track_tokens=True, caller=CALLER)
    [call] = first.tool_calls
    assert (first.content, first.finish_reason, call.name, call.type) == (None, "tool_calls", "get_weather", "function")
    assert json.loads(call.arguments) == ARGUMENTS
    conversation = [QUESTION, assistant_turn(first.tool_calls),
                    {"role": "tool", "tool_call_id": call.id, "content": "22 degrees"}]
    final = await upstream.llm.chat(conversation, tools=TOOLS, track_tokens=True, caller=CALLER)
    assert (final.tool_calls, final.finish_reason) == ((), "stop")
    if upstream.name == "echo":
        assert final.content == "echo: 22 degrees"
        assert upstream.meter.usages() == figures(first.usage, final.usage)
        return
    assert final.content == "The tool said: 22 degrees"
    # The tool definition is billed: the upstream counts it in the input, and so does the meter.
    assert final.usage == upstream.reported()
    assert final.usage.input_tokens == upstream.base_input() + TOOL_TOKENS
    assert upstream.meter.usages() == figures(first.usage, final.usage)


async def test_function_calling_round_trip_streamed(upstream: Upstream) -> None:
    events = [e async for e in upstream.llm.stream([QUESTION], tools=TOOLS, track_tokens=True, caller=CALLER)]
    text, calls, end = collect(events)
    assert (text, end.finish_reason, [c.name for c in calls]) == ("", "tool_calls", ["get_weather"])
    assert json.loads(calls[0].arguments) == ARGUMENTS
    pieces = [e for e in events if isinstance(e, ToolCallDelta)]
    assert len(pieces) > 2  # the arguments arrive in fragments, passed on as they come
    conversation = [QUESTION, assistant_turn(calls), {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"}]
    events = [e async for e in upstream.llm.stream(conversation, tools=TOOLS, track_tokens=True, caller=CALLER)]
    text, calls, final = collect(events)
    assert (text, calls, final.finish_reason) == (
        "echo: sunny" if upstream.name == "echo" else "The tool said: sunny", [], "stop")
    assert upstream.meter.usages() == figures(end.usage, final.usage)
    if upstream.name != "echo":
        assert final.usage == upstream.reported()


@by_name("openai", "anthropic", "bedrock")
async def test_each_upstream_gets_tools_in_its_own_shape(upstream: Upstream) -> None:
    first = await upstream.llm.chat([QUESTION], tools=TOOLS)
    [call] = first.tool_calls
    result = {"role": "tool", "tool_call_id": call.id, "content": "22 degrees"}
    await upstream.llm.chat([QUESTION, assistant_turn([call]), result], tools=TOOLS)
    body = upstream.bodies()[-1]
    spec = TOOLS[0]["function"]
    if upstream.name == "openai":  # as sent
        assert body["tools"] == TOOLS
        assert body["messages"] == [QUESTION, assistant_turn([call]), result]
    elif upstream.name == "anthropic":
        assert body["tools"] == [{"name": "get_weather", "input_schema": spec["parameters"],
                                  "description": spec["description"]}]
        assert body["messages"] == [
            {"role": "user", "content": [{"type": "text", "text": QUESTION["content"]}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": "get_weather",
                                               "input": ARGUMENTS}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "22 degrees"}]},
        ]
    else:
        assert body["toolConfig"] == {"tools": [{"toolSpec": {
            "name": "get_weather", "inputSchema": {"json": spec["parameters"]}, "description": spec["description"]}}]}
        assert body["messages"] == [
            {"role": "user", "content": [{"text": QUESTION["content"]}]},
            {"role": "assistant", "content": [{"toolUse": {"toolUseId": call.id, "name": "get_weather",
                                                           "input": ARGUMENTS}}]},
            {"role": "user", "content": [{"toolResult": {"toolUseId": call.id, "content": [{"text": "22 degrees"}]}}]},
        ]


@by_name("openai", "anthropic", "bedrock")
async def test_parallel_tool_calls_and_a_forced_tool(upstream: Upstream) -> None:
    upstream.server.tool_calls_per_turn = 2
    try:
        two = await upstream.llm.chat([QUESTION], tools=TOOLS, tool_choice="required")
        named = {"type": "function", "function": {"name": "get_weather"}}
        if upstream.name == "bedrock":  # Converse has no switch for parallel calls: refused by name
            with pytest.raises(UnsupportedError) as info:
                await upstream.llm.chat([QUESTION], tools=TOOLS, tool_choice=named, parallel_tool_calls=False)
            assert info.value.param == "parallel_tool_calls"
            one = await upstream.llm.chat([QUESTION], tools=TOOLS, tool_choice=named)
        else:
            one = await upstream.llm.chat([QUESTION], tools=TOOLS, tool_choice=named, parallel_tool_calls=False)
    finally:
        upstream.server.tool_calls_per_turn = 1
    assert [c.name for c in two.tool_calls] == ["get_weather", "get_weather"]
    assert len({c.id for c in two.tool_calls}) == 2
    if upstream.name != "bedrock":
        assert len(one.tool_calls) == 1
    required, forced = upstream.bodies()[0], upstream.bodies()[-1]
    if upstream.name == "anthropic":
        assert required["tool_choice"] == {"type": "any"}
        assert forced["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    elif upstream.name == "bedrock":
        assert (required["toolConfig"]["toolChoice"], forced["toolConfig"]["toolChoice"]) == (
            {"any": {}}, {"tool": {"name": "get_weather"}})
    else:
        assert (required["tool_choice"], forced["parallel_tool_calls"]) == ("required", False)


@by_name("openai", "anthropic", "bedrock")
async def test_the_upstream_refuses_a_broken_conversation(upstream: Upstream) -> None:
    """A tool result that answers no tool call is refused by every real API; the fakes too, and the refusal
    reaches the caller as a 400 carrying the upstream's reason, with nothing metered."""
    stray = [QUESTION, {"role": "assistant", "content": "ok"},
             {"role": "tool", "tool_call_id": "call_x", "content": "?"}]
    with pytest.raises(ProviderError) as info:
        await upstream.llm.chat(stray, tools=TOOLS, track_tokens=True, caller=CALLER)
    assert info.value.status == 400
    assert "rejected the request" in info.value.message
    assert upstream.meter.events == []


# ----------------------------------------------------------------------------------------- JSON and images


async def test_json_schema_output(upstream: Upstream) -> None:
    result = await upstream.llm.chat([{"role": "user", "content": "weather as JSON"}],
                                     response_format=SCHEMA_FORMAT, track_tokens=True, caller=CALLER)
    answer = json.loads(result.content or "")
    if upstream.name == "echo":
        assert answer == {"echo": "weather as JSON"}
        return
    assert answer == upstream.server.json_reply
    assert upstream.meter.usages() == figures(upstream.reported())
    body = upstream.bodies()[-1]
    schema = SCHEMA_FORMAT["json_schema"]["schema"]  # type: ignore[index]
    if upstream.name == "openai":
        assert body["response_format"] == SCHEMA_FORMAT
    elif upstream.name == "anthropic":
        assert body["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    else:
        assert body["outputConfig"] == {"textFormat": {"type": "json_schema", "structure": {
            "jsonSchema": {"schema": json.dumps(schema), "name": "weather"}}}}


@by_name("anthropic", "bedrock")
async def test_json_mode_without_schema_is_refused_by_name(upstream: Upstream) -> None:
    json_mode = {"type": "json_object"}
    with pytest.raises(UnsupportedError) as info:
        await upstream.llm.chat([QUESTION], response_format=json_mode, track_tokens=True, caller=CALLER)
    stream = upstream.llm.stream([QUESTION], response_format=json_mode, track_tokens=True, caller=CALLER)
    with pytest.raises(UnsupportedError) as streamed:
        await stream.__anext__()
    for error in (info.value, streamed.value):
        assert (error.status, error.param) == (422, "response_format.type")
        assert f"not supported by the {upstream.name} provider" in error.message
    assert upstream.server.requests == []
    assert upstream.meter.events == []


async def test_image_message(upstream: Upstream) -> None:
    message = {"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                           {"type": "image_url", "image_url": {"url": PNG_URL}}]}
    result = await upstream.llm.chat([message], track_tokens=True, caller=CALLER)
    if upstream.name == "echo":
        assert result.usage.input_tokens == 5 + 85  # five words and one image, by echo's rule
        return
    # Image tokens are billed as the upstream reports them.
    assert result.usage == upstream.reported()
    assert upstream.meter.usages() == figures(result.usage)
    assert result.usage.input_tokens == upstream.base_input() + IMAGE_TOKENS
    sent = upstream.bodies()[-1]["messages"][0]["content"][1]
    if upstream.name == "openai":
        assert sent == message["content"][1]  # type: ignore[index]
    elif upstream.name == "anthropic":
        data = base64.b64encode(PNG).decode()
        assert sent == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    else:  # boto3 sends the bytes base64-encoded in the JSON body
        assert sent == {"image": {"format": "png", "source": {"bytes": base64.b64encode(PNG).decode()}}}


async def test_image_by_url(upstream: Upstream) -> None:
    url = "https://example.com/cat.png"
    message = {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                           {"type": "image_url", "image_url": {"url": url}}]}
    if upstream.name == "bedrock":  # Converse takes image bytes only
        with pytest.raises(UnsupportedError) as info:
            await upstream.llm.chat([message], track_tokens=True, caller=CALLER)
        assert (info.value.status, info.value.param) == (422, "messages[0].content[1].image_url.url")
        assert "bedrock" in info.value.message
        assert upstream.server.requests == upstream.meter.events == []
        return
    await upstream.llm.chat([message])
    if upstream.name == "anthropic":
        assert upstream.bodies()[-1]["messages"][0]["content"][1] == {"type": "image",
                                                                      "source": {"type": "url", "url": url}}
    elif upstream.name == "openai":
        assert upstream.bodies()[-1]["messages"] == [message]


@by_name("anthropic", "bedrock")
async def test_a_damaged_image_is_refused_before_any_upstream(upstream: Upstream) -> None:
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}
    with pytest.raises(ProviderError) as info:
        await upstream.llm.chat([message])
    assert (info.value.status, info.value.param) == (400, "messages[0].content[0].image_url.url")
    assert upstream.server.requests == []


# ----------------------------------------------------------------------------------- what a provider lacks

REFUSED = [
    ({"seed": 7}, "seed"),
    ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"n": 2}, "n"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"reasoning_effort": "minimal"}, "reasoning_effort"),
    ({"metadata": {"team": "a"}}, "metadata.team"),  # Anthropic keeps only user_id
]


@by_name("anthropic", "bedrock")
@pytest.mark.parametrize(("params", "param"), REFUSED)
async def test_what_a_provider_lacks_is_a_422_naming_field_and_provider(
    upstream: Upstream, params: dict[str, Any], param: str
) -> None:
    if upstream.name == "bedrock" and param == "metadata.team":
        await upstream.llm.chat([QUESTION], **params)  # Bedrock keeps it as requestMetadata
        assert upstream.bodies()[-1]["requestMetadata"] == {"team": "a"}
        return
    with pytest.raises(UnsupportedError) as info:
        await upstream.llm.chat([QUESTION], track_tokens=True, caller=CALLER, **params)
    assert (info.value.status, info.value.param) == (422, param)
    assert info.value.message.startswith(f"{param} is not supported by the {upstream.name} provider")
    assert upstream.server.requests == upstream.meter.events == []


@by_name("anthropic", "bedrock")
async def test_neutral_values_of_missing_features_pass(upstream: Upstream) -> None:
    """OpenAI SDKs and frameworks send defaults (n=1, logprobs=false...): they ask for nothing, so they pass."""
    neutral = {"n": 1, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0, "store": False,
               "parallel_tool_calls": True, "stream_options": {"include_usage": True}, "top_logprobs": 0}
    result = await upstream.llm.chat([QUESTION], **neutral)
    assert result.content == upstream.server.reply


@by_name("anthropic", "bedrock")
async def test_message_names_and_audio_are_refused_by_field(upstream: Upstream) -> None:
    named = {"role": "user", "content": "hi", "name": "alice"}
    audio = {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}
    for messages, param in (([named], "messages[0].name"), ([QUESTION, audio], "messages[1].content[0].type")):
        with pytest.raises(UnsupportedError) as info:
            await upstream.llm.chat(messages)
        assert info.value.param == param
    assert upstream.server.requests == []


@by_name("openai")
async def test_openai_gets_every_field_as_sent(upstream: Upstream) -> None:
    fields = {"seed": 7, "logprobs": True, "top_logprobs": 2, "verbosity": "low", "service_tier": "flex",
              "metadata": {"team": "a"}, "store": False, "max_completion_tokens": 30, "reasoning_effort": "minimal",
              "prediction": {"type": "content", "content": "x"}, "user": "u-1"}
    await upstream.llm.chat([QUESTION], model="gpt-x", **fields)
    assert upstream.bodies()[-1] == {"model": "gpt-x", "messages": [QUESTION], "stream": False, **fields}


@by_name("openai")
async def test_openai_refusing_an_unknown_field_reaches_the_caller(upstream: Upstream) -> None:
    """Unknown fields go to the upstream (OpenAI-compatible servers add fields often); OpenAI itself refuses
    those it does not know, and that refusal comes back as a 400 with its reason."""
    with pytest.raises(ProviderError) as info:
        await upstream.llm.chat([QUESTION], frobnicate=True)
    assert info.value.status == 400
    assert "Unrecognized request argument supplied: frobnicate" in info.value.message
    assert upstream.bodies()[-1]["frobnicate"] is True


@by_name("openai")
async def test_openai_answer_comes_back_unchanged(upstream: Upstream) -> None:
    result = await upstream.llm.chat([{"role": "user", "content": "hi"}], logprobs=True)
    assert result.logprobs is not None
    assert [t["token"] for t in result.logprobs["content"]] == ["Hello", " ", "from", " ", "the", " ", "fake", " ",
                                                                "provider", " ", "today"]
    assert result.message_extra == {"annotations": []}
    assert result.response_extra == {"service_tier": "default", "system_fingerprint": "fp_fake"}
    upstream.server.inject("refusal")
    refused = await upstream.llm.chat([{"role": "user", "content": "hi"}])
    assert (refused.content, refused.refusal) == (None, upstream.server.refusal)
    upstream.server.inject("refusal")
    events = [e async for e in upstream.llm.stream([{"role": "user", "content": "hi"}])]
    assert "".join(e.text for e in events if isinstance(e, RefusalDelta)) == upstream.server.refusal
    events = [e async for e in upstream.llm.stream([{"role": "user", "content": "hi"}], logprobs=True)]
    texts = [e for e in events if isinstance(e, TextDelta)]
    assert all(e.logprobs is not None and e.logprobs["content"][0]["token"] == e.text.strip() for e in texts)


@by_name("openai")
async def test_openai_fields_we_do_not_model_stream_through(upstream: Upstream) -> None:
    upstream.server.reasoning = "First, the weather."
    try:
        result = await upstream.llm.chat([{"role": "user", "content": "hi"}], track_tokens=True, caller=CALLER)
        events = [e async for e in upstream.llm.stream([{"role": "user", "content": "hi"}])]
    finally:
        upstream.server.reasoning = None
    assert result.message_extra["reasoning_content"] == "First, the weather."
    extra = [e.fields for e in events if isinstance(e, ExtraDelta)]
    assert "".join(f["reasoning_content"] for f in extra) == "First, the weather."


# ---------------------------------------------------------------------------------------- cut tool streams


@by_name("echo", "openai")
async def test_a_tool_call_stream_cut_short_meters_the_arguments_sent(upstream: Upstream) -> None:
    """Tool-call pieces are generated output: a stream abandoned in the middle of the arguments bills them."""
    gen = upstream.llm.stream([QUESTION], tools=TOOLS, track_tokens=True, caller=CALLER)
    seen = [await gen.__anext__() for _ in range(3)]
    await gen.aclose()
    assert all(isinstance(e, ToolCallDelta) for e in seen)
    [(input_tokens, output_tokens, _)] = upstream.meter.usages()
    if upstream.name == "echo":  # exact: the name and the argument words sent so far
        assert [e.arguments for e in seen] == ["", '{"city": ', '"Paris", ']
        assert output_tokens == 1 + 2
    else:  # estimated: the pieces, or their characters / 4
        chars = len("\nget_weather ") + sum(len(e.arguments) for e in seen)
        assert output_tokens == max(3, math.ceil(chars / 4))
        assert input_tokens > 0


# ------------------------------------------------------------------------------------------------ embeddings


@by_name("openai")
async def test_openai_embeddings(upstream: Upstream) -> None:
    provider = upstream.llm.provider
    plain = await provider.embed(EmbeddingRequest(["first text", "the second"], "text-embedding-3-small", 8))
    assert plain.usage == Usage(upstream.server.last_usage["prompt_tokens"], 0)
    encoded = await provider.embed(EmbeddingRequest(["first text", "the second"], "text-embedding-3-small", 8,
                                                    {"encoding_format": "base64", "user": "u-1"}))
    # base64 is float32: the same vectors, to float32 precision
    for got, expected in zip(encoded.embeddings, plain.embeddings, strict=True):
        assert got == pytest.approx(expected, abs=1e-6)
    assert upstream.bodies()[-1] == {"model": "text-embedding-3-small", "input": ["first text", "the second"],
                                     "dimensions": 8, "encoding_format": "base64", "user": "u-1"}
    ids = await provider.embed(EmbeddingRequest([[1, 2, 3], [4, 5]], "text-embedding-3-small"))
    assert (len(ids.embeddings), ids.usage.input_tokens) == (2, 5)


@by_name("bedrock")
async def test_bedrock_titan_embeddings(upstream: Upstream) -> None:
    provider = upstream.llm.provider
    texts = ["one two three", "four", "five six"]
    result = await provider.embed(EmbeddingRequest(texts, "amazon.titan-embed-text-v2:0", 256, {"normalize": True}))
    assert len(result.embeddings) == 3
    # One InvokeModel per text (Titan takes one); the usage is the sum of what Bedrock reported for each.
    bodies = sorted(upstream.bodies(), key=lambda b: texts.index(b["inputText"]))
    assert bodies == [{"inputText": t, "normalize": True, "dimensions": 256} for t in texts]
    assert result.usage == Usage(sum(len(t.split()) + 1 for t in texts), 0)
    assert result.embeddings[0] != result.embeddings[1]
    with pytest.raises(UnsupportedError) as info:
        await provider.embed(EmbeddingRequest("x", "amazon.titan-embed-text-v2:0", 300))
    assert (info.value.param, "256, 512, 1024" in info.value.message) == ("dimensions", True)


@by_name("bedrock")
async def test_bedrock_cohere_embeddings_read_the_token_header(upstream: Upstream) -> None:
    provider = upstream.llm.provider
    texts = [f"text number {i}" for i in range(100)]  # more than Cohere's 96 per call
    request = EmbeddingRequest(texts, "cohere.embed-english-v3", None, {"input_type": "search_query"})
    result = await provider.embed(request)
    assert len(result.embeddings) == 100
    assert [len(b["texts"]) for b in upstream.bodies()] == [96, 4]
    assert upstream.bodies()[0]["input_type"] == "search_query"
    # Cohere's body has no token count; Bedrock reports it in a header, per call.
    assert result.usage == Usage(sum(len(t.split()) + 2 for t in texts), 0)
    await provider.embed(EmbeddingRequest("x", "cohere.embed-v4:0", 512))
    assert upstream.bodies()[-1]["output_dimension"] == 512
    for req, param in ((EmbeddingRequest("x", "cohere.embed-english-v3", 512), "dimensions"),
                       (EmbeddingRequest([1, 2], "cohere.embed-english-v3"), "input"),
                       (EmbeddingRequest("x", "cohere.embed-english-v3", None, {"normalize": True}), "normalize"),
                       (EmbeddingRequest("x", "anthropic.claude-3-haiku"), "model")):
        with pytest.raises(UnsupportedError) as info:
            await provider.embed(req)
        assert info.value.param == param


@by_name("anthropic")
async def test_anthropic_has_no_embeddings(upstream: Upstream) -> None:
    with pytest.raises(UnsupportedError) as info:
        await upstream.llm.provider.embed(EmbeddingRequest("x", "claude"))
    assert info.value.status == 422
    assert info.value.message == "embeddings are not supported by the anthropic provider"


# ---------------------------------------------------------------------- the fakes speak the real wire format


def test_openai_sdk_drives_a_tool_round_trip_on_the_fake(servers: dict[str, Any]) -> None:
    server = servers["openai"]
    server.reset()
    client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    question: Any = [QUESTION]
    with client.chat.completions.stream(model="gpt-4o-mini", messages=question, tools=TOOLS) as stream:  # type: ignore[arg-type]
        completion = stream.get_final_completion()
    [call] = completion.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", ARGUMENTS)
    follow: Any = [*question, completion.choices[0].message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "22 degrees"}]
    final = client.chat.completions.create(model="gpt-4o-mini", messages=follow, tools=TOOLS)  # type: ignore[arg-type]
    assert final.choices[0].message.content == "The tool said: 22 degrees"
    with pytest.raises(openai.BadRequestError, match="did not have response messages"):
        client.chat.completions.create(model="gpt-4o-mini", messages=follow[:2], tools=TOOLS)  # type: ignore[arg-type]
    # The SDK asks for base64 embeddings by default and decodes them.
    vectors = client.embeddings.create(model="text-embedding-3-small", input=["a b"], dimensions=8)
    assert len(vectors.data[0].embedding) == 8
    client.close()


def test_anthropic_sdk_drives_a_tool_round_trip_on_the_fake(servers: dict[str, Any]) -> None:
    server = servers["anthropic"]
    server.reset()
    client = anthropic.Anthropic(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    tools: Any = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    question: Any = [{"role": "user", "content": "weather?"}]
    with client.messages.stream(model="claude-x", max_tokens=100, messages=question, tools=tools) as stream:
        message = stream.get_final_message()
    [use] = message.content
    assert use.type == "tool_use"
    assert (use.name, use.input, message.stop_reason) == ("get_weather", ARGUMENTS, "tool_use")
    answer: Any = [*question, {"role": "assistant", "content": [use.model_dump()]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "22"}]}]
    final = client.messages.create(model="claude-x", max_tokens=100, messages=answer, tools=tools)
    assert final.content[0].type == "text"
    assert final.content[0].text == "The tool said: 22"
    with pytest.raises(anthropic.BadRequestError, match="without `tool_result` blocks"):
        client.messages.create(model="claude-x", max_tokens=100, messages=[*answer[:2], question[0]], tools=tools)
    client.close()


@by_name("openai")
async def test_openai_stream_options_are_ours_to_set(upstream: Upstream) -> None:
    """The stream always asks for usage (we meter it), keeping the client's other stream options; a plain call
    sends none (OpenAI refuses stream_options without stream)."""
    options = {"include_usage": False, "include_obfuscation": False}
    await upstream.llm.chat([QUESTION], stream_options=options)
    events = [e async for e in upstream.llm.stream([QUESTION], stream_options=options)]
    plain, streamed = upstream.bodies()
    assert "stream_options" not in plain
    assert streamed["stream_options"] == {"include_usage": True, "include_obfuscation": False}
    assert isinstance(events[-1], StreamEnd) and events[-1].usage == upstream.reported()
