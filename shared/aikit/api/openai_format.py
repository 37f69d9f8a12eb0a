"""Our answers in OpenAI's wire format: chat completions, streamed chunks, embeddings.

What an OpenAI-compatible upstream sent comes back unchanged (tool calls, refusals, logprobs, fields we do not
model); the usage is the one metered, so what the client is told equals what it is billed.
"""

from __future__ import annotations

import json
from typing import Any

from aikit.api.errors import error_body
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
from aikit.llm.embeddings import encode_vector


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def tool_call_json(call: ToolCall) -> dict[str, Any]:
    if call.type == "custom":
        return {"id": call.id, "type": "custom", "custom": {"name": call.name, "input": call.arguments}}
    return {"id": call.id, "type": call.type, "function": {"name": call.name, "arguments": call.arguments}}


def completion_json(completion_id: str, result: ChatResult, created: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.content, "refusal": result.refusal}
    message.update(result.message_extra)
    if result.tool_calls:
        message["tool_calls"] = [tool_call_json(c) for c in result.tool_calls]
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": result.model,
        "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason,
                     "logprobs": result.logprobs}],
        "usage": usage_json(result.usage),
    }
    body.update(result.response_extra)
    return body


def tool_call_delta_json(delta: ToolCallDelta) -> dict[str, Any]:
    """A tool call piece as OpenAI streams it: id, type and name on the call's first piece only."""
    spec_key, text_key = ("custom", "input") if delta.type == "custom" else ("function", "arguments")
    spec: dict[str, Any] = {text_key: delta.arguments}
    found: dict[str, Any] = {"index": delta.index}
    if delta.id is not None:
        found.update(id=delta.id, type=delta.type)
    if delta.name is not None:
        spec["name"] = delta.name
    found[spec_key] = spec
    return found


def sse(payload: object) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class ChunkStream:
    """The `chat.completion.chunk` events of one streamed completion, as server-sent events."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.include_usage = include_usage

    def chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs: object = None) -> str:
        payload: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}],
        }
        if self.include_usage:
            payload["usage"] = None  # only the last chunk carries usage, as OpenAI streams it
        return sse(payload)

    def start(self) -> str:
        return self.chunk({"role": "assistant", "content": ""})

    def event(self, event: StreamEvent) -> str | None:
        """The chunk of one output event; None for a `StreamEnd` (see `finish`)."""
        if isinstance(event, TextDelta):
            return self.chunk({"content": event.text}, logprobs=event.logprobs)
        if isinstance(event, RefusalDelta):
            return self.chunk({"refusal": event.text})
        if isinstance(event, ToolCallDelta):
            return self.chunk({"tool_calls": [tool_call_delta_json(event)]})
        if isinstance(event, ExtraDelta):
            return self.chunk(dict(event.fields))
        return None

    def finish(self, end: StreamEnd) -> list[str]:
        """The finish_reason chunk, then the usage chunk when the client asked for it."""
        chunks = [self.chunk({}, end.finish_reason)]
        if self.include_usage:
            chunks.append(sse({"id": self.completion_id, "object": "chat.completion.chunk", "created": self.created,
                               "model": self.model, "choices": [], "usage": usage_json(end.usage)}))
        return chunks

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"

    @staticmethod
    def error(status: int, message: str, code: str | None) -> str:
        """A failure after the headers were sent, in-band as OpenAI reports it."""
        return sse(error_body(status, message, code))


def embeddings_json(result: EmbeddingResult, encoding_format: str | None) -> dict[str, Any]:
    encode = encoding_format == "base64"
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode_vector(v) if encode else v}
                 for i, v in enumerate(result.embeddings)],
        "model": result.model,
        "usage": {"prompt_tokens": result.usage.input_tokens, "total_tokens": result.usage.input_tokens},
    }
