"""A deterministic local provider for development, tests and benchmarks; it never leaves the process.

Counting rule (a token is a whitespace-separated word):
- input_tokens = the words of every text and refusal part of every message, plus the name and arguments of
  every assistant tool call, plus the words of `json.dumps(tools)` and `json.dumps(response_format)` when given,
  plus IMAGE_TOKENS for each image, audio or file part;
- the reply answers the last user or tool message: "echo: " followed by its words, joined by single spaces
  (with no such message the reply is "echo:"); with response_format json_object or json_schema the reply is
  `json.dumps({"echo": "<those words>"})` instead;
- tool calls: when function tools are given, tool_choice is not "none" and the last message is a user message,
  each of its lines reading `call <name> <json object>` for a given tool becomes a tool call (only the first
  with parallel_tool_calls false); tool_choice "required" or a named function with no such line calls the first
  (or the named) tool with `{}`. Then content is None, finish_reason "tool_calls", ids are
  `call_echo<message count>_<n>`, arguments `json.dumps(<the object>)`;
- output_tokens = the words of the reply ("echo:" counts as one), or for tool calls 1 + the words of the
  arguments per call;
- with max_tokens the reply (not tool calls) is cut to that many words and finish_reason is "length";
- cached_tokens is always 0.
Streaming yields one word per TextDelta, each with its following space (the last word has none), so the
deltas joined equal the non-streaming content and their count equals output_tokens; a tool call streams as a
ToolCallDelta with its id and name, then its arguments word by word; then a StreamEnd.
Embeddings: a unit vector of `dimensions` (default DIMENSIONS) numbers drawn from SHAKE-256 of the text, the
same text always giving the same vector; input_tokens = the words of the inputs (token-id inputs: the ids).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from anyio.lowlevel import checkpoint

from aikit.llm.base import (
    ChatRequest,
    ChatResult,
    EmbeddingRequest,
    EmbeddingResult,
    Provider,
    ProviderEvent,
    StreamEnd,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
    part_text,
)

PREFIX = "echo:"
IMAGE_TOKENS = 85
DIMENSIONS = 16


def count_words(text: str) -> int:
    return len(text.split())


def _message_words(message: dict[str, Any]) -> int:
    content = message.get("content")
    total = 0
    if isinstance(content, str):
        total += count_words(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                text = part_text(part)
                total += count_words(text) if part.get("type") in ("text", "refusal") else IMAGE_TOKENS
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            total += count_words(f"{function.get('name', '')} {function.get('arguments', '')}")
    return total


def _input_words(req: ChatRequest) -> int:
    total = sum(_message_words(m) for m in req.messages)
    for key in ("tools", "response_format"):
        if req.params.get(key):
            total += count_words(json.dumps(req.params[key]))
    return total


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part_text(p) for p in content if isinstance(p, dict))
    return ""


def _answered(req: ChatRequest) -> dict[str, Any] | None:
    found: list[dict[str, Any]] = [m for m in req.messages if m.get("role") in ("user", "tool")]
    return found[-1] if found else None


def _tool_names(req: ChatRequest) -> list[str]:
    names = []
    for tool in req.tools:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.append(function["name"])
    return names


def _parse_call(line: str, names: list[str]) -> tuple[str, dict[str, Any]] | None:
    words = line.strip().split(maxsplit=2)
    if len(words) < 2 or words[0] != "call" or words[1] not in names:
        return None
    try:
        arguments = json.loads(words[2]) if len(words) == 3 else {}
    except ValueError:
        return None
    return (words[1], arguments) if isinstance(arguments, dict) else None


def _tool_calls(req: ChatRequest) -> list[ToolCall]:
    names = _tool_names(req)
    choice = req.params.get("tool_choice")
    last = req.messages[-1] if req.messages else {}
    if not names or choice == "none" or last.get("role") != "user":
        return []
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    found = [c for c in (_parse_call(line, names) for line in _text(last).splitlines()) if c is not None]
    if named is not None:
        found = [c for c in found if c[0] == named] or [(named, {})]
    elif choice == "required" and not found:
        found = [(names[0], {})]
    if req.params.get("parallel_tool_calls") is False:
        found = found[:1]
    prefix = f"call_echo{len(req.messages)}_"
    return [ToolCall(id=f"{prefix}{n}", name=name, arguments=json.dumps(args)) for n, (name, args) in enumerate(found)]


@dataclass(frozen=True, slots=True)
class _Reply:
    words: list[str]  # the content, word by word (empty with tool calls)
    calls: list[ToolCall]
    finish: str
    usage: Usage


def _reply(req: ChatRequest) -> _Reply:
    input_tokens = _input_words(req)
    calls = _tool_calls(req)
    if calls:
        output = sum(1 + count_words(c.arguments) for c in calls)
        return _Reply([], calls, "tool_calls", Usage(input_tokens, output))
    answered = _answered(req)
    said = _text(answered).split() if answered else []
    fmt = req.params.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        words = json.dumps({"echo": " ".join(said)}).split(" ")
    else:
        words = [PREFIX, *said]
    finish = "stop"
    limit = req.output_limit
    if limit is not None and len(words) > limit:
        words, finish = words[:limit], "length"
    return _Reply(words, [], finish, Usage(input_tokens=input_tokens, output_tokens=len(words)))


def _pieces(words: list[str]) -> list[str]:
    last = len(words) - 1
    return [word if i == last else word + " " for i, word in enumerate(words)]


def vector(text: str, dimensions: int) -> list[float]:
    raw = hashlib.shake_256(text.encode()).digest(4 * dimensions)
    values = [v / 2**31 - 1.0 for v in struct.unpack(f"<{dimensions}I", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _embedded_texts(req: EmbeddingRequest) -> list[str]:
    texts = req.texts
    if texts is not None:
        return texts
    ids: list[Any] = [req.input] if req.input and isinstance(req.input[0], int) else list(req.input)
    return [" ".join(map(str, item)) for item in ids]  # token ids: each id one word


class EchoProvider(Provider):
    name = "echo"
    default_embedding_model = "echo-embed-1"

    def __init__(self, default_model: str | None = None) -> None:
        self.default_model = default_model or "echo-1"

    async def chat(self, req: ChatRequest) -> ChatResult:
        reply = _reply(req)
        return ChatResult(
            id="chatcmpl-echo-" + uuid.uuid4().hex,
            model=req.model,
            content=None if reply.calls else " ".join(reply.words),
            finish_reason=reply.finish,
            usage=reply.usage,
            tool_calls=tuple(reply.calls),
        )

    async def stream(self, req: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        reply = _reply(req)
        # Every event yields to the event loop, as a network read would: a long reply must neither starve
        # other requests nor miss its consumer's cancellation (a client that hung up).
        for word in _pieces(reply.words):
            await checkpoint()
            yield TextDelta(word)
        for n, call in enumerate(reply.calls):
            yield ToolCallDelta(n, id=call.id, name=call.name)
            for piece in _pieces(call.arguments.split(" ")):
                await checkpoint()
                yield ToolCallDelta(n, arguments=piece)
        yield StreamEnd(finish_reason=reply.finish, usage=reply.usage)

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResult:
        dimensions = req.dimensions or DIMENSIONS
        texts = _embedded_texts(req)
        return EmbeddingResult(model=req.model, embeddings=[vector(t, dimensions) for t in texts],
                               usage=Usage(input_tokens=self.estimate_embedding_tokens(req), output_tokens=0))

    def estimate_embedding_tokens(self, req: EmbeddingRequest) -> int:
        return sum(count_words(t) for t in _embedded_texts(req))

    def embedding_token_bound(self, req: EmbeddingRequest) -> int:
        return self.estimate_embedding_tokens(req)

    # Echo knows its own counts exactly, even for a stream cut short.
    def estimate_input_tokens(self, req: ChatRequest) -> int:
        return _input_words(req)

    def estimate_output_tokens(self, text: str, deltas: int) -> int:
        return count_words(text)

    def input_token_bound(self, req: ChatRequest) -> int:
        return _input_words(req)
