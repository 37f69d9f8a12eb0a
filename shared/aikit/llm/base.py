"""The provider interface: requests, results, stream events, errors, and the usage every provider reports.

A request is the OpenAI Chat Completions request as the client sent it: messages with text and image parts,
assistant tool calls and tool results; every other field (tools, tool_choice, response_format, stop, seed,
unknown ones...) in `params`. OpenAI-compatible providers send it on unchanged; the others translate what they
can express and refuse the rest with `UnsupportedError` (422, naming the field and the provider).

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

from aikit.errors import InvalidRequestError, UnsupportedError

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# Rough input-token estimate of one image, for when a provider reports nothing (OpenAI's 512px-tile figure).
IMAGE_TOKEN_ESTIMATE = 765
# The most one image bills as input on the usual models (gpt-4o/4.1 high detail ~1,450-2,500, Claude ~1,600),
# for quota reservations; a model that bills more per image needs its provider to raise it.
IMAGE_TOKEN_BOUND = 2_500


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
    messages: list[dict[str, Any]]  # OpenAI chat format, as sent
    model: str
    max_tokens: int | None = None
    # Every other Chat Completions field as sent: temperature, stop, tools, tool_choice, response_format,
    # max_completion_tokens, fields this layer does not know...
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def output_limit(self) -> int | None:
        """The cap on generated tokens, whichever of max_tokens / max_completion_tokens the caller used."""
        if self.max_tokens is not None:
            return self.max_tokens
        limit = self.params.get("max_completion_tokens")
        return limit if isinstance(limit, int) and not isinstance(limit, bool) else None

    @property
    def tools(self) -> list[dict[str, Any]]:
        tools = self.params.get("tools")
        return tools if isinstance(tools, list) else []


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the JSON text the model wrote (for a "custom" tool: its raw input)
    type: str = "function"


@dataclass(frozen=True, slots=True)
class ChatResult:
    id: str
    model: str
    content: str | None  # None when the model only called tools (as OpenAI answers)
    finish_reason: str  # OpenAI's vocabulary: stop, length, tool_calls, content_filter
    usage: Usage
    tool_calls: tuple[ToolCall, ...] = ()
    refusal: str | None = None
    logprobs: dict[str, Any] | None = None  # the choice's logprobs object, as an OpenAI-compatible upstream sent it
    stop_sequence: str | None = None  # the stop sequence that ended the answer, where the provider says
    # Fields an OpenAI-compatible upstream sent that this layer does not model, passed back unchanged:
    message_extra: dict[str, Any] = field(default_factory=dict)  # of the message (annotations, audio...)
    response_extra: dict[str, Any] = field(default_factory=dict)  # of the response (system_fingerprint...)


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    logprobs: dict[str, Any] | None = None  # the chunk's logprobs object, where the upstream sent one


@dataclass(frozen=True, slots=True)
class RefusalDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call, as OpenAI streams it: the first piece of call `index` carries its id and name."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""  # the next fragment of the arguments' JSON text
    type: str = "function"


@dataclass(frozen=True, slots=True)
class ExtraDelta:
    """Delta fields an OpenAI-compatible upstream streamed that this layer does not model (reasoning_content...)."""

    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StreamEnd:
    finish_reason: str
    usage: Usage  # the provider's final figures
    stop_sequence: str | None = None


@dataclass(frozen=True, slots=True)
class InputUsage:
    """Input usage a provider reported before any output (Anthropic's message_start).

    Only `Provider.stream` yields it; the `LLM` facade keeps it to meter an abandoned stream and never passes
    it on.
    """

    usage: Usage


StreamEvent = TextDelta | RefusalDelta | ToolCallDelta | ExtraDelta | StreamEnd
ProviderEvent = StreamEvent | InputUsage


def output_text(event: object) -> str:
    """The generated output an event carries, for estimating the output tokens of a stream cut short."""
    if isinstance(event, TextDelta | RefusalDelta):
        return event.text
    if isinstance(event, ToolCallDelta):
        # A new call starts on its own line, so words of consecutive calls never run together.
        return f"\n{event.name} {event.arguments}" if event.name else event.arguments
    if isinstance(event, ExtraDelta):
        return " ".join(v for v in event.fields.values() if isinstance(v, str))
    return ""


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    input: str | list[str] | list[int] | list[list[int]]  # text(s), or token ids (OpenAI-compatible only)
    model: str
    dimensions: int | None = None
    # Other fields as sent (user, encoding_format, fields this layer does not know); OpenAI-compatible
    # upstreams get them unchanged.
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def texts(self) -> list[str] | None:
        """The inputs as a list of strings, or None when they are token ids."""
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(item, str) for item in self.input):
            return [str(item) for item in self.input]
        return None


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    model: str
    embeddings: list[list[float]]  # one vector per input, in input order
    usage: Usage  # input tokens as the provider reported them; output 0


def unsupported(provider: str, param: str, reason: str = "") -> UnsupportedError:
    message = f"{param} is not supported by the {provider} provider"
    return UnsupportedError(f"{message}: {reason}" if reason else message, param)


def estimate_tokens(text: str) -> int:
    """A rough count for when a provider reports nothing: ~4 ASCII characters per token, and one token per
    other character (CJK, emoji and most non-Latin scripts take about one token or more each)."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return math.ceil(ascii_chars / 4) + len(text) - ascii_chars


def content_parts(content: object, where: str = "content") -> list[dict[str, Any]]:
    """A message's content as a list of parts: a string is one text part, None (an assistant that only called
    tools) is none."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidRequestError(f"{where}[{i}] must be a content part with a type", f"{where}[{i}]")
            if part["type"] in ("text", "refusal") and not isinstance(part.get(part["type"]), str):
                raise InvalidRequestError(f"{where}[{i}].{part['type']} must be a string", f"{where}[{i}]")
        return content
    raise InvalidRequestError(f"{where} must be a string or a list of content parts", where)


def part_text(part: dict[str, Any]) -> str:
    """The text of a text or refusal part; '' for other parts (images, audio, files)."""
    value = part.get(part.get("type", ""))
    return value if isinstance(value, str) else ""


def content_text(content: object, where: str = "content") -> str:
    return "\n".join(part_text(p) for p in content_parts(content, where) if p["type"] in ("text", "refusal"))


def _validate_message(i: int, message: object) -> None:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise InvalidRequestError(f"{where} must be an object with role and content", where)
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequestError(f"{where}.role must be one of {', '.join(sorted(ROLES))}", f"{where}.role")
    calls = message.get("tool_calls")
    if calls is not None and (role != "assistant" or not isinstance(calls, list)):
        raise InvalidRequestError(f"{where}.tool_calls must be a list on an assistant message", f"{where}.tool_calls")
    if "content" not in message and not (role == "assistant" and calls):
        raise InvalidRequestError(f"{where}.content is required", f"{where}.content")
    if message.get("content") is None and role != "assistant":
        raise InvalidRequestError(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise InvalidRequestError(f"{where}.tool_call_id is required on a tool message", f"{where}.tool_call_id")
    content_parts(message.get("content"), f"{where}.content")


def validate_messages(messages: object) -> list[dict[str, Any]]:
    """Check the OpenAI-format messages this layer supports; a problem raises a 400 naming the field."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", "messages")
    for i, message in enumerate(messages):
        _validate_message(i, message)
    return messages


def validate_max_tokens(max_tokens: object) -> int | None:
    if max_tokens is None:
        return None
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequestError("max_tokens must be a positive integer", "max_tokens")
    return max_tokens


def validate_embedding_input(value: object) -> str | list[str] | list[int] | list[list[int]]:
    """A string, a non-empty list of strings, or token ids (a list of integers, or of such lists)."""
    def ids(item: object) -> bool:
        return isinstance(item, list) and bool(item) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in item)

    if isinstance(value, str) and value:
        return value
    texts = isinstance(value, list) and all(isinstance(item, str) and item for item in value)
    if isinstance(value, list) and value and (texts or ids(value) or all(ids(i) for i in value)):
        return value
    raise InvalidRequestError("input must be a non-empty string, a list of non-empty strings, or token ids "
                              "(a list of integers or of such lists)", "input")


def prompt_text(messages: Sequence[dict[str, Any]]) -> str:
    """All text of the messages: contents, and the names and arguments of assistant tool calls."""
    pieces: list[str] = []
    for message in messages:
        content = message.get("content")
        parts = content if isinstance(content, list) else content_parts(content) if isinstance(content, str) else []
        pieces.extend(part_text(p) for p in parts if isinstance(p, dict))
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                pieces.append(f"{function.get('name', '')} {function.get('arguments', '')}")
    return "\n".join(pieces)


def image_count(messages: Sequence[dict[str, Any]]) -> int:
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") == "image_url"
    )


def request_text(req: ChatRequest) -> str:
    """What the model reads besides images: messages, and the tool definitions and output schema it is given."""
    extra = [json.dumps(req.params[k]) for k in ("tools", "response_format") if req.params.get(k)]
    return "\n".join([prompt_text(req.messages), *extra])


class Provider(ABC):
    """One LLM backend. Instances hold connections: reuse one per process and `aclose()` it at the end."""

    name: ClassVar[str]
    default_model: str

    @abstractmethod
    async def chat(self, req: ChatRequest) -> ChatResult: ...

    @abstractmethod
    def stream(self, req: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        """Output as it comes (text, refusal and tool-call deltas), then one `StreamEnd`; an upstream failure
        raises `ProviderError`."""

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResult:
        raise UnsupportedError(f"embeddings are not supported by the {self.name} provider")

    async def aclose(self) -> None:
        return None

    # Estimates for a stream cut short, when the provider never sent its final usage.
    def estimate_input_tokens(self, req: ChatRequest) -> int:
        return estimate_tokens(request_text(req)) + IMAGE_TOKEN_ESTIMATE * image_count(req.messages)

    def estimate_output_tokens(self, text: str, deltas: int) -> int:
        return max(deltas, estimate_tokens(text))

    image_token_bound: ClassVar[int] = IMAGE_TOKEN_BOUND
    # The embedding model of an embeddings call that names none (LLM_EMBEDDING_MODEL overrides it).
    default_embedding_model: str = "text-embedding-3-small"

    def estimate_embedding_tokens(self, req: EmbeddingRequest) -> int:
        """The input tokens of an embeddings call whose usage never came (cut off, or not reported)."""
        texts = req.texts
        if texts is not None:
            return sum(estimate_tokens(t) for t in texts)
        return sum(len(item) if isinstance(item, list) else 1 for item in req.input)  # token ids count themselves

    def embedding_token_bound(self, req: EmbeddingRequest) -> int:
        """At least the input tokens the upstream can bill for an embeddings call, for quota reservations: one
        token per UTF-8 byte (byte-level tokenizers cover a byte or more per token) plus each input's special
        tokens; token ids are what they are."""
        texts = req.texts
        if texts is None:
            return self.estimate_embedding_tokens(req)
        return sum(len(t.encode()) + 4 for t in texts)

    def reserve_tokens(self, req: ChatRequest | EmbeddingRequest) -> int:
        """The most a call can bill: its input bound plus, for a chat, its output cap."""
        if isinstance(req, EmbeddingRequest):
            return self.embedding_token_bound(req)
        return self.input_token_bound(req) + (req.output_limit or 0)

    def input_token_bound(self, req: ChatRequest) -> int:
        """At least the input tokens the upstream can bill for `req`, for quota reservations. Byte-level BPE
        tokens (OpenAI, Anthropic, Llama...) each cover one UTF-8 byte or more, so the bytes of the request's
        JSON (text, tool definitions, roles, names and structure) plus a margin for each message's special
        tokens bound the text; each image adds `image_token_bound`."""
        raw = json.dumps([req.messages, req.params], ensure_ascii=False, separators=(",", ":"), default=str)
        images = image_count(req.messages)
        return len(raw.encode()) + 4 * len(req.messages) + 16 + self.image_token_bound * images
