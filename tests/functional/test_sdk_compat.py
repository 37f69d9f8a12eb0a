"""Any OpenAI or Anthropic client works unchanged (issue 14): the official `openai` and `anthropic` SDKs against
`aikit serve` (a real server on a real socket, configured by environment variables only), over local upstreams
that speak each provider's wire format: function calling round trips (tool-call deltas streamed), JSON-schema
output, images, embeddings and the Messages API, streamed and not. Every call's usage is checked three ways:
what the upstream reported == what the client was told == what was metered (GET /v1/usage, Redis + Postgres).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx
import openai
import pydantic
import pytest
import redis

from aikit.keys import IssuedKey
from aikit.llm import echo
from aikit.settings import Settings
from tests.fakes import llm_servers
from tests.fakes.llm_servers import IMAGE_TOKENS, TOOL_TOKENS, FakeLLMServer
from tests.support.api import issue_key
from tests.support.servers import aikit_serve
from tests.support.settings import REDIS_URL, make_settings

PROVIDERS = ("openai", "anthropic", "bedrock", "echo")
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4-5", "bedrock": "anthropic.claude-3-haiku-v1:0",
          "echo": "echo-1"}
ARGUMENTS = {"city": "Paris", "unit": "celsius"}  # what the fakes call tools with
# The echo provider calls a tool when the user's line says so; the fakes call the first tool anyway.
QUESTION = "What is the weather in Paris?\ncall get_weather " + json.dumps(ARGUMENTS)
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                  "required": ["city"]}
TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city", "parameters": WEATHER_SCHEMA}}]
ANTHROPIC_TOOLS: list[Any] = [{"name": "get_weather", "description": "Current weather of a city",
                               "input_schema": WEATHER_SCHEMA}]
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24
PNG_B64 = base64.b64encode(PNG).decode()


@dataclass(frozen=True)
class Figures:
    """Usage in one normalized meaning: all billable input (cache reads and writes included), output, cache reads."""

    input: int
    output: int
    cached: int = 0

    def __add__(self, other: Figures) -> Figures:
        return Figures(self.input + other.input, self.output + other.output, self.cached + other.cached)


@dataclass
class Served:
    """`aikit serve` configured for one provider, over that provider's local imitation (none for echo)."""

    name: str
    base: str
    upstream: FakeLLMServer | None
    settings: Settings
    keys: list[str] = field(default_factory=list)

    @property
    def fake(self) -> Any:
        assert self.upstream is not None
        return self.upstream

    def key(self) -> IssuedKey:
        return issue_key(self.settings, rpm=1000, rpd=100_000, monthly_tokens=10_000_000)

    def reported(self) -> Figures:
        """The usage the upstream last reported, as it bills it."""
        u = self.fake.last_usage
        if self.name == "openai":
            return Figures(u["prompt_tokens"], u["completion_tokens"], u["prompt_tokens_details"]["cached_tokens"])
        if self.name == "anthropic":
            read, write = u["cache_read_input_tokens"], u["cache_creation_input_tokens"]
            return Figures(u["input_tokens"] + read + write, u["output_tokens"], read)
        read, write = u["cacheReadInputTokens"], u["cacheWriteInputTokens"]
        return Figures(u["inputTokens"] + read + write, u["outputTokens"], read)

    def base_input(self) -> int:
        """The upstream's input figure for a plain request, before tools and images."""
        return {"openai": 42, "anthropic": 12 + 30 + 5, "bedrock": 20 + 8 + 4}[self.name]

    def openai(self, key: IssuedKey) -> openai.OpenAI:
        return openai.OpenAI(api_key=key.api_key, base_url=self.base + "/v1", max_retries=0, timeout=20)

    def anthropic(self, key: IssuedKey, bearer: bool = False) -> anthropic.Anthropic:
        if bearer:
            return anthropic.Anthropic(auth_token=key.api_key, base_url=self.base, max_retries=0, timeout=20)
        return anthropic.Anthropic(api_key=key.api_key, base_url=self.base, max_retries=0, timeout=20)

    def metered(self, key: IssuedKey) -> tuple[Figures, int, int]:
        """What was metered to the key (GET /v1/usage): figures, total tokens, usage events."""
        r = httpx.get(self.base + "/v1/usage", headers={"Authorization": f"Bearer {key.api_key}"}, timeout=10)
        assert r.status_code == 200, r.text
        u = r.json()
        return Figures(u["input_tokens"], u["output_tokens"], u["cached_tokens"]), u["tokens_used"], u["requests"]


def told_openai(usage: Any) -> Figures:
    details = usage.prompt_tokens_details
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    return Figures(usage.prompt_tokens, usage.completion_tokens, details.cached_tokens if details else 0)


def told_anthropic(usage: Any) -> Figures:
    """Anthropic's usage: uncached input beside cache writes and cache reads, all billed as input."""
    read, write = usage.cache_read_input_tokens or 0, usage.cache_creation_input_tokens or 0
    return Figures(usage.input_tokens + read + write, usage.output_tokens, read)


def assert_metered(served: Served, key: IssuedKey, *told: Figures) -> None:
    total = sum(told, Figures(0, 0))
    assert served.metered(key) == (total, total.input + total.output, len(told))


# ------------------------------------------------------------------------------------------------ servers


def serve_env(settings: Settings, name: str, upstream: FakeLLMServer | None) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    base = upstream.base_url if upstream is not None else "http://127.0.0.1:9"
    env.update({
        "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
        "REDIS_KEY_PREFIX": settings.redis_key_prefix, "FLUSH_INTERVAL_SECONDS": "0",
        "POWERTOOLS_METRICS_DISABLED": "true", "LLM_PROVIDER": name, "LLM_TIMEOUT_SECONDS": "10",
        "OPENAI_BASE_URL": base, "OPENAI_API_KEY": getattr(upstream, "api_key", "unused"),
        "ANTHROPIC_BASE_URL": base, "ANTHROPIC_API_KEY": getattr(upstream, "api_key", "unused"),
        "BEDROCK_REGION": "us-east-1", "BEDROCK_ENDPOINT_URL": base,
        # Fake credentials so boto3 signs requests to the local Bedrock imitation (never a real endpoint).
        "AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": "fake-secret", "AWS_EC2_METADATA_DISABLED": "true",
    })
    return env


@pytest.fixture(scope="module")
def serve(pg_url: str) -> Iterator[Callable[[str], Served]]:
    """`serve(provider)`: that provider's server, started on first use and kept for the module."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    settings = make_settings(pg_url, prefix)
    running: dict[str, Served] = {}
    with contextlib.ExitStack() as stack:

        def start(name: str) -> Served:
            if name not in running:
                upstream = None if name == "echo" else stack.enter_context(getattr(llm_servers, f"{name}_server")())
                base = stack.enter_context(aikit_serve(serve_env(settings, name, upstream)))
                running[name] = Served(name, base, upstream, settings)
            found = running[name]
            if found.upstream is not None:
                found.upstream.reset()
            return found

        yield start
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(params=PROVIDERS)
def served(request: pytest.FixtureRequest, serve: Callable[[str], Served]) -> Served:
    return serve(request.param)


def by_name(*names: str) -> Any:
    return pytest.mark.parametrize("served", names, indirect=True)


# ------------------------------------------------------------------------------ chat completions (openai SDK)


@dataclass
class Streamed:
    text: str
    calls: list[dict[str, str]]
    finish: str | None
    usage: Any
    tool_pieces: int


def read_stream(stream: Any) -> Streamed:
    """A chat stream assembled as an OpenAI client does: text, tool calls from their deltas, the usage chunk."""
    text, finish, usage, pieces = "", None, None, 0
    calls: dict[int, dict[str, str]] = {}
    for chunk in stream:
        if chunk.usage is not None:
            assert not chunk.choices  # the usage chunk comes last, on its own
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                pieces += 1
                if delta.id is not None:
                    assert delta.index not in calls, "a call's id comes once, on its first piece"
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    return Streamed(text, [c for _, c in sorted(calls.items())], finish, usage, pieces)


def ask(sdk: openai.OpenAI, served: Served, messages: list[Any], stream: bool, **params: Any) -> tuple[Any, Figures]:
    """One chat call, streamed or not: (text, tool calls, finish reason) and the usage the client was told."""
    model = MODELS[served.name]
    if not stream:
        reply = sdk.chat.completions.create(model=model, messages=messages, **params)
        message = reply.choices[0].message
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in message.tool_calls or ()]
        return (message.content, calls, reply.choices[0].finish_reason), told_openai(reply.usage)
    found = read_stream(sdk.chat.completions.create(model=model, messages=messages, stream=True,
                                                    stream_options={"include_usage": True}, **params))
    if found.calls:
        assert found.tool_pieces > len(found.calls)  # the arguments arrived in pieces, passed on as they came
    return (found.text or None, found.calls, found.finish), told_openai(found.usage)


@pytest.mark.parametrize("stream", [False, True])
def test_function_calling_round_trip(served: Served, stream: bool) -> None:
    """Tool call -> tool result -> final answer with the openai SDK; the tool definition is billed as the
    upstream counts it, and each call's usage is what the upstream reported, the client was told and was
    metered."""
    key = served.key()
    sdk = served.openai(key)
    question = {"role": "user", "content": QUESTION}
    (content, calls, finish), first = ask(sdk, served, [question], stream, tools=TOOLS)
    assert (content, finish, [c["name"] for c in calls]) == (None, "tool_calls", ["get_weather"])
    assert json.loads(calls[0]["arguments"]) == ARGUMENTS
    if served.upstream is not None:
        assert first == served.reported()
    conversation = [question,
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": calls[0]["id"], "type": "function",
                         "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}]},
                    {"role": "tool", "tool_call_id": calls[0]["id"], "content": "22 degrees"}]
    (content, calls, finish), final = ask(sdk, served, conversation, stream, tools=TOOLS)
    assert (calls, finish) == ([], "stop")
    if served.upstream is None:
        assert content == "echo: 22 degrees"
    else:
        assert content == "The tool said: 22 degrees"
        assert final == served.reported()
        assert final.input == served.base_input() + TOOL_TOKENS
    assert_metered(served, key, first, final)


class Weather(pydantic.BaseModel):
    city: str
    temperature: int


class EchoReply(pydantic.BaseModel):
    echo: str


def test_json_schema_output(served: Served) -> None:
    """Structured output as the SDK asks for it (a strict JSON schema from a pydantic model), parsed by it."""
    key = served.key()
    shape: type[pydantic.BaseModel] = EchoReply if served.name == "echo" else Weather
    reply = served.openai(key).beta.chat.completions.parse(
        model=MODELS[served.name], messages=[{"role": "user", "content": "Weather in Paris as JSON"}],
        response_format=shape)
    parsed = reply.choices[0].message.parsed
    if served.upstream is None:
        assert parsed == EchoReply(echo="Weather in Paris as JSON")
    else:
        assert parsed == Weather(city="Paris", temperature=22)
        assert told_openai(reply.usage) == served.reported()
        sent = served.fake.requests[-1].json
        if served.name == "openai":  # the very schema the SDK wrote, as sent
            assert sent["response_format"]["json_schema"]["schema"] == shape.model_json_schema() | {
                "additionalProperties": False}
    assert_metered(served, key, told_openai(reply.usage))


def test_image_message(served: Served) -> None:
    """A base64 image part reaches the upstream as its format's image and is billed as the upstream counts it."""
    key = served.key()
    content = [{"type": "text", "text": "What is in this picture?"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}]
    reply = served.openai(key).chat.completions.create(model=MODELS[served.name],
                                                       messages=[{"role": "user", "content": content}])
    told = told_openai(reply.usage)
    if served.upstream is None:
        assert told.input == 5 + echo.IMAGE_TOKENS  # the words of the text part, and the image
    else:
        assert told == served.reported()
        assert told.input == served.base_input() + IMAGE_TOKENS
        sent = json.dumps(served.fake.requests[-1].json)
        assert PNG_B64 in sent
    assert_metered(served, key, told)


@by_name("openai")
def test_openai_fields_pass_through_both_ways(served: Served) -> None:
    """Unknown request fields reach an OpenAI-compatible upstream as sent; logprobs, refusals and fields we do
    not model come back unchanged."""
    key = served.key()
    sdk = served.openai(key)
    reply = sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2, seed=7,
        user="u-1", metadata={"team": "a"}, reasoning_effort="low", stop=["\n\n"], max_completion_tokens=50,
        parallel_tool_calls=False, extra_body={"prompt_cache_key": "pk-1", "verbosity": "low"})
    sent = served.fake.requests[-1].json
    expected = {"logprobs": True, "top_logprobs": 2, "seed": 7, "user": "u-1", "metadata": {"team": "a"},
                "reasoning_effort": "low", "stop": ["\n\n"], "max_completion_tokens": 50,
                "parallel_tool_calls": False, "prompt_cache_key": "pk-1", "verbosity": "low"}
    assert {k: sent.get(k) for k in expected} == expected
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    assert reply.system_fingerprint == "fp_fake"
    served.fake.inject("refusal")
    refused = sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "bad"}])
    assert (refused.choices[0].message.content, refused.choices[0].message.refusal) == (None, served.fake.refusal)
    assert_metered(served, key, told_openai(reply.usage), told_openai(refused.usage))


@by_name("anthropic", "bedrock")
def test_fields_a_provider_cannot_honour_are_refused_by_name(served: Served) -> None:
    key = served.key()
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        served.openai(key).chat.completions.create(model=MODELS[served.name], seed=7,
                                                   messages=[{"role": "user", "content": "hi"}])
    error = caught.value.body
    assert isinstance(error, dict)
    assert (error["param"], error["message"]) == ("seed", f"seed is not supported by the {served.name} provider")
    assert served.fake.requests == []
    assert_metered(served, key)


@by_name("openai")
def test_bad_input_names_the_clients_field(served: Served) -> None:
    key = served.key()
    headers = {"Authorization": f"Bearer {key.api_key}"}
    image = {"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}
    for body, param in (
        ({"stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]},
         "messages[0].content[1].image_url.url"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ):
        payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **body}
        r = httpx.post(served.base + "/v1/chat/completions", json=payload, headers=headers, timeout=10)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == param
    assert served.fake.requests == []


# ------------------------------------------------------------------------------------- embeddings (openai SDK)

EMBEDDING_MODELS = {"openai": "text-embedding-3-small", "bedrock": "cohere.embed-english-v3", "echo": "echo-embed-1"}


@by_name("openai", "bedrock", "echo")
@pytest.mark.parametrize("encoding", ["base64", "float"])
def test_embeddings(served: Served, encoding: str) -> None:
    """The SDK asks for base64 by default; either way the vectors are the upstream's (float32 exact) and the
    input tokens metered are the ones the upstream reported."""
    key = served.key()
    texts = ["the quick brown fox", "jumps over the lazy dog"]
    dimensions = 8 if served.name == "openai" else None
    params: dict[str, Any] = {"encoding_format": "float"} if encoding == "float" else {}
    if dimensions:
        params["dimensions"] = dimensions
    reply = served.openai(key).embeddings.create(model=EMBEDDING_MODELS[served.name], input=texts, **params)
    vectors = [item.embedding for item in reply.data]
    if served.name == "echo":
        expected = [echo.vector(t, echo.DIMENSIONS) for t in texts]
        assert reply.usage.prompt_tokens == 4 + 5  # the words
    else:
        expected = [llm_servers.vector(t, 8) for t in texts]
        reported = served.fake.last_usage
        assert reply.usage.prompt_tokens == reported.get("prompt_tokens", reported.get("inputTokens"))
        if served.name == "openai":
            assert served.fake.requests[-1].json["encoding_format"] == encoding
    for found, want in zip(vectors, expected, strict=True):
        assert found == pytest.approx(want, abs=1e-6)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens
    again = served.openai(key).embeddings.create(model=EMBEDDING_MODELS[served.name], input=texts[0], **params)
    assert again.data[0].embedding == vectors[0]  # deterministic
    told = [Figures(r.usage.prompt_tokens, 0) for r in (reply, again)]
    assert_metered(served, key, *told)


@by_name("anthropic")
def test_embeddings_on_a_provider_without_them_are_refused(served: Served) -> None:
    key = served.key()
    with pytest.raises(openai.UnprocessableEntityError, match="embeddings are not supported by the anthropic"):
        served.openai(key).embeddings.create(model="text-embedding-3-small", input="hi")
    assert_metered(served, key)


@by_name("echo")
def test_embeddings_are_limited_like_chat(served: Served) -> None:
    """The monthly quota covers embeddings (a call starts while used + reserved < quota): once spent, the next
    call is refused before it runs, and nothing more is metered."""
    key = issue_key(served.settings, rpm=1000, rpd=1000, monthly_tokens=10)
    sdk = served.openai(key)
    first = sdk.embeddings.create(model="echo-embed-1", input="one two three four five six seven eight nine ten")
    assert first.usage.prompt_tokens == 10
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.embeddings.create(model="echo-embed-1", input="one more")
    assert refused.value.response.headers["X-RateLimit-Remaining-Tokens"] == "0"
    assert_metered(served, key, Figures(10, 0))


# ------------------------------------------------------------------------------ the Messages API (anthropic SDK)

RAW_EVENTS = {"message_start", "content_block_start", "content_block_delta", "content_block_stop",
              "message_delta", "message_stop"}


def stream_message(client: anthropic.Anthropic, served: Served, messages: list[Any]) -> tuple[Any, list[Any]]:
    with client.messages.stream(model=MODELS[served.name], max_tokens=512, tools=ANTHROPIC_TOOLS,
                                messages=messages) as stream:
        events = [e for e in stream if e.type in RAW_EVENTS]
        return stream.get_final_message(), events


def test_messages_api_streaming_tool_round_trip(served: Served) -> None:
    """Anthropic's event types in Anthropic's order, the tool call streamed as input_json_delta pieces, then the
    tool result answered; usage as Anthropic bills it (cache reads and writes beside the input) is metered."""
    key = served.key()
    client = served.anthropic(key)
    question = {"role": "user", "content": QUESTION}
    first, events = stream_message(client, served, [question])
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1] == "content_block_start" and "content_block_stop" in kinds
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert len(deltas) > 1 and all(d.type == "input_json_delta" for d in deltas)
    assert first.stop_reason == "tool_use"
    [call] = [b for b in first.content if b.type == "tool_use"]
    assert (call.name, call.input) == ("get_weather", ARGUMENTS)
    if served.upstream is not None:
        assert told_anthropic(first.usage) == served.reported()
    conversation = [question, {"role": "assistant", "content": first.content},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                  "content": "22 degrees"}]}]
    final, events = stream_message(client, served, conversation)
    assert final.stop_reason == "end_turn"
    [text] = final.content
    assert text.text == ("echo: 22 degrees" if served.upstream is None else "The tool said: 22 degrees")
    assert any(e.type == "content_block_delta" and e.delta.type == "text_delta" for e in events)
    if served.upstream is not None:
        assert told_anthropic(final.usage) == served.reported()
    if served.name == "anthropic":  # the native route: the upstream's figures, field for field
        assert final.usage.model_dump(include={"input_tokens", "cache_read_input_tokens",
                                               "cache_creation_input_tokens", "output_tokens"}) == \
            served.fake.last_usage
    assert_metered(served, key, told_anthropic(first.usage), told_anthropic(final.usage))


def test_messages_api_image_and_system_with_a_bearer_key(served: Served) -> None:
    key = served.key()
    message = served.anthropic(key, bearer=True).messages.create(
        model=MODELS[served.name], max_tokens=256, system="Answer briefly.",
        messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
            {"type": "text", "text": "What is in this picture?"}]}])
    assert message.type == "message" and message.role == "assistant" and message.stop_reason == "end_turn"
    told = told_anthropic(message.usage)
    if served.upstream is None:
        assert message.content[0].text == "echo: What is in this picture?"
        assert told.input == 2 + 5 + echo.IMAGE_TOKENS
    else:
        assert told == served.reported()
        assert told.input == served.base_input() + IMAGE_TOKENS
    if served.name == "anthropic":  # sent on as Anthropic's own body
        sent = served.fake.requests[-1].json
        assert sent["system"] == [{"type": "text", "text": "Answer briefly."}]
        assert sent["messages"][0]["content"][0]["source"] == {"type": "base64", "media_type": "image/png",
                                                               "data": PNG_B64}
    assert_metered(served, key, told)


@by_name("anthropic")
def test_messages_api_json_output(served: Served) -> None:
    key = served.key()
    message = served.anthropic(key).messages.create(
        model=MODELS["anthropic"], max_tokens=256, messages=[{"role": "user", "content": "Weather as JSON"}],
        extra_body={"output_config": {"format": {"type": "json_schema", "schema": WEATHER_SCHEMA}}})
    assert json.loads(message.content[0].text) == {"city": "Paris", "temperature": 22}
    assert served.fake.requests[-1].json["output_config"]["format"]["schema"] == WEATHER_SCHEMA
    assert_metered(served, key, told_anthropic(message.usage))


@by_name("openai")
def test_messages_api_errors_take_anthropics_shape(served: Served) -> None:
    """Auth, validation and fields the route cannot honour answer in Anthropic's error shape, naming the field;
    nothing reaches the upstream and nothing is metered."""
    key = served.key()
    with pytest.raises(anthropic.AuthenticationError) as bad_key:
        anthropic.Anthropic(api_key="ak_wrong", base_url=served.base, max_retries=0).messages.create(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert bad_key.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                             "message": "invalid API key"}}
    with pytest.raises(anthropic.UnprocessableEntityError) as thinking:
        served.anthropic(key).messages.create(model="gpt-4o-mini", max_tokens=2048,
                                              thinking={"type": "enabled", "budget_tokens": 1024},
                                              messages=[{"role": "user", "content": "hi"}])
    assert thinking.value.body == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "thinking is not supported by this Messages API"}}
    r = httpx.post(served.base + "/v1/messages", headers={"x-api-key": key.api_key}, timeout=10,
                   json={"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": 5}]})
    assert r.status_code == 422
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("messages[0].content: ")
    r = httpx.post(served.base + "/v1/messages", timeout=10,
                   json={"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"] == {
        "type": "authentication_error",
        "message": "missing API key: send 'x-api-key: <key>' or 'Authorization: Bearer <key>'"}
    assert served.fake.requests == []
    assert_metered(served, key)
