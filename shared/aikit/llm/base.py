"""The provider interface: requests, results, stream events, errors, and the usage every provider reports.

Usage is normalized to one meaning across providers: `input_tokens` is all billable input, cache reads and
cache writes included; `cached_tokens` and `cache_write_tokens` say which part of it came from or went to the
provider's prompt cache.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

# Roles every provider understands; tool calling is out of scope for a text-only metering proxy.
ROLES = frozenset({"system", "developer", "user", "assistant"})


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int  # billable input, cache reads and cache writes included
    output_tokens: int
    cached_tokens: int = 0  # cache reads, a part of input_tokens
    cache_write_tokens: int = 0  # cache writes, a part of input_tokens

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def usage_with_cache_beside(input_tokens: int, cache_read: int, cache_write: int, output_tokens: int) -> Usage:
    """Providers that report cache tokens beside the input (Anthropic, Bedrock) bill all three as input."""
    return Usage(
        input_tokens=input_tokens + cache_read + cache_write,
        output_tokens=output_tokens,
        cached_tokens=cache_read,
        cache_write_tokens=cache_write,
    )


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: list[dict[str, Any]]  # OpenAI chat format; content is a str or a list of text parts
    model: str
    max_tokens: int | None = None
    # Other OpenAI parameters: temperature, top_p, stop...
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChatResult:
    id: str
    model: str
    content: str
    finish_reason: str
    usage: Usage


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class StreamEnd:
    finish_reason: str
    usage: Usage  # the provider's final figures


@dataclass(frozen=True, slots=True)
class InputUsage:
    """Input usage a provider reported before any text (Anthropic's message_start).

    Only `Provider.stream` yields it; the `LLM` facade keeps it to meter an abandoned stream and never passes
    it on, so its consumers see only `TextDelta` and `StreamEnd`.
    """

    usage: Usage


StreamEvent = TextDelta | StreamEnd
ProviderEvent = TextDelta | StreamEnd | InputUsage


class ProviderError(Exception):
    """The provider could not answer. `status_code` is what our API should answer with.

    502: the upstream failed or answered nonsense; 400: the upstream refused the request as invalid
    (the message carries its reason); 504: the upstream timed out. Messages never carry secrets.
    """

    def __init__(self, message: str, status_code: int = 502) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class ProviderTimeout(ProviderError):
    """`cut_off`: we stopped waiting while the upstream was working on the request (a read timeout, the call's
    deadline), so the upstream bills it; false when it never got the request or answered with a timeout."""

    def __init__(self, message: str = "provider timed out", status_code: int = 504, *, cut_off: bool = False) -> None:
        super().__init__(message, status_code)
        self.cut_off = cut_off


class InvalidRequestError(ProviderError):
    """The request is malformed before any provider sees it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 400)


def estimate_tokens(text: str) -> int:
    """A rough count for when a provider reports nothing: ~4 ASCII characters per token, and one token per
    other character (CJK, emoji and most non-Latin scripts take about one token or more each)."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return math.ceil(ascii_chars / 4) + len(text) - ascii_chars


def content_parts(content: object, where: str = "content") -> list[str]:
    """The text pieces of a message's content (a str, or a list of {"type": "text", "text": ...} parts)."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        parts: list[str] = []
        for i, part in enumerate(content):
            text = part.get("text") if isinstance(part, dict) else None
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(text, str):
                raise InvalidRequestError(f"{where}[{i}] must be a text part {{'type': 'text', 'text': str}}")
            parts.append(text)
        return parts
    raise InvalidRequestError(f"{where} must be a string or a list of text parts")


def content_text(content: object, where: str = "content") -> str:
    return "\n".join(content_parts(content, where))


def validate_messages(messages: object) -> list[dict[str, Any]]:
    """Check the OpenAI-format messages this layer supports; a problem raises a 400 naming the field."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}")
        if "content" not in message:
            raise InvalidRequestError(f"messages[{i}].content is required")
        content_parts(message["content"], f"messages[{i}].content")
    return messages


def validate_max_tokens(max_tokens: object) -> int | None:
    if max_tokens is None:
        return None
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequestError("max_tokens must be a positive integer")
    return max_tokens


def prompt_text(messages: Sequence[dict[str, Any]]) -> str:
    return "\n".join(content_text(m.get("content", "")) for m in messages)


class Provider(ABC):
    """One LLM backend. Instances hold connections: reuse one per process and `aclose()` it at the end."""

    name: ClassVar[str]
    default_model: str

    @abstractmethod
    async def chat(self, req: ChatRequest) -> ChatResult: ...

    @abstractmethod
    def stream(self, req: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        """Text as it comes, then one `StreamEnd`; an upstream failure raises `ProviderError`."""

    async def aclose(self) -> None:
        return None

    # Estimates for a stream cut short, when the provider never sent its final usage.
    def estimate_input_tokens(self, req: ChatRequest) -> int:
        return estimate_tokens(prompt_text(req.messages))

    def estimate_output_tokens(self, text: str, deltas: int) -> int:
        return max(deltas, estimate_tokens(text))

    def input_token_bound(self, req: ChatRequest) -> int:
        """At least the input tokens the upstream can bill for `req`, for quota reservations. Byte-level BPE
        tokens (OpenAI, Anthropic, Llama...) each cover one UTF-8 byte or more, so the bytes of the request's
        JSON (text, roles, names and structure) plus a margin for each message's special tokens bound them.
        A provider that takes inputs other than text (images) must override this."""
        raw = json.dumps([req.messages, req.params], ensure_ascii=False, separators=(",", ":"), default=str)
        return len(raw.encode()) + 4 * len(req.messages) + 16
