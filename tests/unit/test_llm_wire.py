"""Provider translation without a network: usage normalization, request bodies, SSE, error mapping."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from botocore.eventstream import EventStreamBuffer

from aikit.errors import UnsupportedError
from aikit.llm import ChatRequest, ProviderTimeout, Usage
from aikit.llm import anthropic as anthropic_mod
from aikit.llm import bedrock as bedrock_mod
from aikit.llm._http import iter_sse, status_error
from aikit.llm.openai import _usage as openai_usage
from tests.fakes.llm_servers import bedrock_event, bedrock_exception

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------------------------ usage normalization


def test_openai_prompt_tokens_already_include_cached() -> None:
    raw = {"prompt_tokens": 100, "completion_tokens": 20, "prompt_tokens_details": {"cached_tokens": 60}}
    assert openai_usage(raw) == Usage(input_tokens=100, output_tokens=20, cached_tokens=60)
    assert openai_usage({"prompt_tokens": 3, "completion_tokens": 4}) == Usage(3, 4)
    assert openai_usage(None) is None


def test_anthropic_input_is_the_sum_of_fresh_cache_read_and_cache_write() -> None:
    raw = {
        "input_tokens": 10,
        "cache_read_input_tokens": 60,
        "cache_creation_input_tokens": 30,
        "output_tokens": 20,
    }
    usage = anthropic_mod.usage_from(raw)
    assert usage == Usage(input_tokens=100, output_tokens=20, cached_tokens=60, cache_write_tokens=30)
    assert usage.total_tokens == 120


def test_bedrock_input_is_the_sum_like_anthropic() -> None:
    raw = {"inputTokens": 10, "outputTokens": 5, "cacheReadInputTokens": 7, "cacheWriteInputTokens": 3}
    assert bedrock_mod.usage_from(raw) == Usage(20, 5, cached_tokens=7, cache_write_tokens=3)
    assert bedrock_mod.usage_from({"inputTokens": 1, "outputTokens": 2, "totalTokens": 3}) == Usage(1, 2)


def test_nonsense_token_counts_are_rejected() -> None:
    with pytest.raises(TypeError):
        anthropic_mod.usage_from({"input_tokens": "ten", "output_tokens": 1})
    with pytest.raises(TypeError):
        bedrock_mod.usage_from({"inputTokens": -1, "outputTokens": 1})


@pytest.mark.parametrize(
    ("stop", "finish"),
    [("end_turn", "stop"), ("max_tokens", "length"), ("stop_sequence", "stop"), ("tool_use", "tool_calls")],
)
def test_stop_reasons_map_to_openai_finish_reasons(stop: str, finish: str) -> None:
    assert anthropic_mod.finish_reason(stop) == finish
    assert bedrock_mod.finish_reason(stop) == finish


# --------------------------------------------------------------------------------------- request bodies

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": "go"},
]


def test_anthropic_body() -> None:
    params = {"temperature": 0.2, "stop": "END", "user": "u1", "presence_penalty": 0, "n": 1}  # neutral values pass
    body = anthropic_mod.build_body(ChatRequest(MESSAGES, "claude-x", None, params))
    assert body == {
        "model": "claude-x",
        "max_tokens": anthropic_mod.DEFAULT_MAX_TOKENS,
        "system": [{"type": "text", "text": "be brief"}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
            {"role": "user", "content": [{"type": "text", "text": "go"}]},
        ],
        "temperature": 0.2,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u1"},
    }
    assert anthropic_mod.build_body(ChatRequest(MESSAGES, "m", 50))["max_tokens"] == 50


def test_bedrock_kwargs() -> None:
    kwargs = bedrock_mod.build_kwargs(ChatRequest(MESSAGES, "amazon.nova", 99, {"top_p": 0.9, "stop": ["x"]}))
    assert kwargs == {
        "modelId": "amazon.nova",
        "system": [{"text": "be brief"}],
        "messages": [
            {"role": "user", "content": [{"text": "a"}, {"text": "b"}]},
            {"role": "assistant", "content": [{"text": "ok"}]},
            {"role": "user", "content": [{"text": "go"}]},
        ],
        "inferenceConfig": {"maxTokens": 99, "topP": 0.9, "stopSequences": ["x"]},
    }


def test_several_choices_are_refused_where_unsupported() -> None:
    with pytest.raises(UnsupportedError, match=r"^n is not supported by the anthropic provider$") as info:
        anthropic_mod.build_body(ChatRequest(MESSAGES, "m", None, {"n": 2}))
    assert (info.value.status, info.value.param) == (422, "n")
    with pytest.raises(UnsupportedError, match=r"^n is not supported by the bedrock provider$"):
        bedrock_mod.build_kwargs(ChatRequest(MESSAGES, "m", None, {"n": 3}))


# ----------------------------------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("status", "body", "expected_status", "fragment"),
    [
        (400, b'{"error": {"message": "bad temperature"}}', 400, "bad temperature"),
        (404, b'{"error": {"message": "model `x` does not exist"}}', 400, "does not exist"),
        (404, b"<html>nginx</html>", 502, "HTTP 404"),
        (401, b'{"error": {"message": "Incorrect API key provided: sk-123"}}', 502, "authentication failed"),
        (403, b"{}", 502, "authentication failed"),
        (429, b"{}", 502, "rate limiting"),
        (500, b"{}", 502, "HTTP 500"),
        (529, b"{}", 502, "HTTP 529"),
        (504, b"{}", 504, "timed out"),
    ],
)
def test_status_error_mapping(status: int, body: bytes, expected_status: int, fragment: str) -> None:
    error = status_error("openai", status, body, ("sk-secret",))
    assert error.status == expected_status
    assert fragment in error.message
    assert isinstance(error, ProviderTimeout) == (expected_status == 504)


def test_upstream_messages_never_echo_our_key() -> None:
    error = status_error("openai", 400, b'{"error": {"message": "key sk-secret is odd"}}', ("sk-secret",))
    assert "sk-secret" not in error.message
    assert error.message == "openai rejected the request: key *** is odd"


# ------------------------------------------------------------------------------------------------ SSE


async def _lines(text: str) -> AsyncIterator[str]:
    for line in text.split("\n"):
        yield line


async def test_sse_parser() -> None:
    text = 'event: a\ndata: {"x": 1}\n\n: keep-alive\n\ndata: line1\ndata: line2\n\ndata:nospace\n'
    got = [pair async for pair in iter_sse(_lines(text))]
    assert got == [("a", '{"x": 1}'), (None, "line1\nline2"), (None, "nospace")]


# ----------------------------------------------------------------------------------- AWS event stream


def test_fake_bedrock_event_stream_encoding_decodes_with_botocore() -> None:
    """The fake Bedrock server's binary framing is what botocore's own decoder reads."""
    buffer = EventStreamBuffer()
    buffer.add_data(bedrock_event("contentBlockDelta", {"delta": {"text": "hi"}}))
    buffer.add_data(bedrock_exception("throttlingException", "slow down"))
    messages: list[Any] = list(buffer)
    first, second = messages
    assert first.headers == {
        ":event-type": "contentBlockDelta",
        ":content-type": "application/json",
        ":message-type": "event",
    }
    assert first.payload == b'{"delta": {"text": "hi"}}'
    assert second.headers[":exception-type"] == "throttlingException"
    assert second.payload == b'{"message": "slow down"}'
