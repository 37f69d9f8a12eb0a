"""A deterministic local provider for development, tests and benchmarks; it never leaves the process.

Counting rule (a token is a whitespace-separated word):
- the reply is "echo: " followed by the words of the last user message, joined by single spaces
  (so whitespace is normalized; with no user message the reply is "echo:");
- input_tokens = the number of words across the contents of all messages (every role, every text part);
- output_tokens = the number of words in the reply ("echo:" counts as one);
- with max_tokens the reply is cut to that many words and finish_reason is "length", else "stop";
- cached_tokens is always 0.
Streaming yields one word per TextDelta, each with its following space (the last word has none), so the
deltas joined equal the non-streaming content and their count equals output_tokens; then a StreamEnd.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator

from aikit.llm.base import ChatRequest, ChatResult, Provider, ProviderEvent, StreamEnd, TextDelta, Usage

PREFIX = "echo:"


def count_words(text: str) -> int:
    return len(text.split())


def _input_words(req: ChatRequest) -> int:
    total = 0
    for message in req.messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.split())
        elif isinstance(content, list):
            total += sum(len(str(part.get("text", "")).split()) for part in content if isinstance(part, dict))
    return total


def _last_user_words(req: ChatRequest) -> list[str]:
    for message in reversed(req.messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content.split()
            if isinstance(content, list):
                return [w for p in content if isinstance(p, dict) for w in str(p.get("text", "")).split()]
            return []
    return []


def _reply(req: ChatRequest) -> tuple[list[str], str, Usage]:
    words = [PREFIX, *_last_user_words(req)]
    finish = "stop"
    if req.max_tokens is not None and len(words) > req.max_tokens:
        words, finish = words[: req.max_tokens], "length"
    return words, finish, Usage(input_tokens=_input_words(req), output_tokens=len(words))


class EchoProvider(Provider):
    name = "echo"

    def __init__(self, default_model: str | None = None) -> None:
        self.default_model = default_model or "echo-1"

    async def chat(self, req: ChatRequest) -> ChatResult:
        words, finish, usage = _reply(req)
        return ChatResult(
            id="chatcmpl-echo-" + uuid.uuid4().hex,
            model=req.model,
            content=" ".join(words),
            finish_reason=finish,
            usage=usage,
        )

    async def stream(self, req: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        words, finish, usage = _reply(req)
        last = len(words) - 1
        for i, word in enumerate(words):
            yield TextDelta(word if i == last else word + " ")
        yield StreamEnd(finish_reason=finish, usage=usage)

    # Echo knows its own counts exactly, even for a stream cut short.
    def estimate_input_tokens(self, req: ChatRequest) -> int:
        return _input_words(req)

    def estimate_output_tokens(self, text: str, deltas: int) -> int:
        return count_words(text)

    def input_token_bound(self, req: ChatRequest) -> int:
        return _input_words(req)
