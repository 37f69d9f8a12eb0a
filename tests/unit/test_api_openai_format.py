"""Our answers in OpenAI's wire format, read back by the official openai SDK (over an in-memory transport):
completions with tool calls, refusals and logprobs; streams of tool-call deltas; embeddings."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from aikit.api.openai_format import ChunkStream, completion_json, embeddings_json
from aikit.llm.base import (
    ChatResult,
    EmbeddingResult,
    ExtraDelta,
    RefusalDelta,
    StreamEnd,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)

USAGE = Usage(input_tokens=120, output_tokens=30, cached_tokens=100)
MESSAGES: Any = [{"role": "user", "content": "hi"}]


def sdk(answer: Callable[[httpx.Request], httpx.Response]) -> openai.OpenAI:
    transport = httpx.MockTransport(answer)
    return openai.OpenAI(api_key="k", base_url="http://aikit.test/v1", max_retries=0,
                         http_client=httpx.Client(transport=transport))


def serving_json(body: dict[str, Any]) -> openai.OpenAI:
    return sdk(lambda _: httpx.Response(200, json=body))


def serving_stream(lines: list[str]) -> openai.OpenAI:
    body = "".join(lines).encode()
    return sdk(lambda _: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"}))


def test_a_completion_with_tool_calls() -> None:
    result = ChatResult(
        id="up-1", model="gpt-x", content=None, finish_reason="tool_calls", usage=USAGE,
        tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris"}'),
                    ToolCall("call_2", "run_sql", "SELECT 1", type="custom")),
        message_extra={"annotations": []}, response_extra={"system_fingerprint": "fp_1"},
    )
    completion = serving_json(completion_json("chatcmpl-abc", result, 1700000000)).chat.completions.create(
        model="gpt-x", messages=MESSAGES)
    message = completion.choices[0].message
    assert (completion.id, completion.created, completion.system_fingerprint) == ("chatcmpl-abc", 1700000000, "fp_1")
    assert (message.content, message.refusal, completion.choices[0].finish_reason) == (None, None, "tool_calls")
    function, custom = message.tool_calls or []
    assert function.type == "function" and custom.type == "custom"
    assert (function.id, function.function.name, function.function.arguments) == (
        "call_1", "get_weather", '{"city": "Paris"}')
    assert (custom.custom.name, custom.custom.input) == ("run_sql", "SELECT 1")
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        120, 30, 150)
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 100


def test_a_refusal_and_logprobs_come_back_as_given() -> None:
    logprobs = {"content": [{"token": "No", "logprob": -0.1, "bytes": [78, 111], "top_logprobs": []}],
                "refusal": None}
    result = ChatResult(id="x", model="m", content=None, finish_reason="stop", usage=USAGE, refusal="I can't.",
                        logprobs=logprobs)
    completion = serving_json(completion_json("chatcmpl-1", result, 0)).chat.completions.create(
        model="m", messages=MESSAGES)
    choice = completion.choices[0]
    assert choice.message.refusal == "I can't."
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert choice.logprobs.content[0].token == "No"


def render(events: list[StreamEvent], include_usage: bool = True) -> list[str]:
    chunks = ChunkStream("chatcmpl-s", 1700000000, "gpt-x", include_usage)
    lines = [chunks.start()]
    for event in events:
        if isinstance(event, StreamEnd):
            lines.extend(chunks.finish(event))
        else:
            line = chunks.event(event)
            assert line is not None
            lines.append(line)
    return [*lines, chunks.done()]


def test_streamed_tool_calls_assemble_in_the_sdk() -> None:
    events: list[StreamEvent] = [
        TextDelta("Let me check. "),
        ToolCallDelta(0, id="call_1", name="get_weather"),
        ToolCallDelta(0, arguments='{"city": '),
        ToolCallDelta(1, id="call_2", name="get_time", arguments="{}"),
        ToolCallDelta(0, arguments='"Paris"}'),
        StreamEnd("tool_calls", USAGE),
    ]
    client = serving_stream(render(events))
    with client.chat.completions.stream(model="gpt-x", messages=MESSAGES) as stream:
        completion = stream.get_final_completion()
    message = completion.choices[0].message
    assert (message.content, completion.choices[0].finish_reason) == ("Let me check. ", "tool_calls")
    calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []
             if c.type == "function"]
    assert calls == [("call_1", "get_weather", '{"city": "Paris"}'), ("call_2", "get_time", "{}")]
    assert completion.usage is not None and completion.usage.total_tokens == 150


def test_stream_chunks_are_openai_chunks() -> None:
    events: list[StreamEvent] = [TextDelta("Hi", logprobs={"content": [{"token": "Hi", "logprob": -1.0,
                                                                        "bytes": None, "top_logprobs": []}]}),
                                 RefusalDelta("no"), ExtraDelta({"reasoning_content": "hmm"}),
                                 StreamEnd("stop", USAGE)]
    chunks = list(serving_stream(render(events)).chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert [c.object for c in chunks] == ["chat.completion.chunk"] * 6
    first, text, refusal, extra, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    assert text.choices[0].delta.content == "Hi"
    assert text.choices[0].logprobs is not None and text.choices[0].logprobs.content is not None
    assert refusal.choices[0].delta.refusal == "no"
    assert extra.choices[0].delta.model_extra == {"reasoning_content": "hmm"}
    assert (finish.choices[0].finish_reason, finish.usage) == ("stop", None)
    assert usage.choices == [] and usage.usage is not None and usage.usage.prompt_tokens == 120


def test_no_usage_chunk_unless_asked() -> None:
    lines = render([TextDelta("x"), StreamEnd("stop", USAGE)], include_usage=False)
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("usage" not in p for p in payloads)
    assert lines[-1] == "data: [DONE]\n\n"


def test_an_error_after_the_headers_is_in_band() -> None:
    line = ChunkStream.error(502, "openai failed mid-stream", "provider_error")
    assert json.loads(line.removeprefix("data: ")) == {"error": {
        "message": "openai failed mid-stream", "type": "api_error", "param": None, "code": "provider_error"}}


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_read_by_the_sdk(encoding: str) -> None:
    vectors = [[0.25, -0.5, 0.125], [1.0, 0.0, -1.0]]
    body = embeddings_json(EmbeddingResult(model="te-3", embeddings=vectors, usage=Usage(7, 0)), encoding)
    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(json.loads(request.content)["encoding_format"])
        return httpx.Response(200, json=body)

    # Left to itself the SDK asks for base64, and decodes it.
    found = sdk(answer).embeddings.create(model="te-3", input=["a", "b"],
                                         **({"encoding_format": "float"} if encoding == "float" else {}))
    assert asked == [encoding]
    assert [d.embedding for d in found.data] == vectors  # these values are exact in float32
    assert (found.usage.prompt_tokens, found.usage.total_tokens) == (7, 7)
    assert isinstance(body["data"][0]["embedding"], str) == (encoding == "base64")
