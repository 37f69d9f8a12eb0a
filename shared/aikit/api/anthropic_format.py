"""Anthropic's Messages API as a wire format of ours: its request read into our (OpenAI-shaped) request, and
results and stream events written back as Anthropic's JSON and server-sent events.

In: system, messages (text, image, tool_use and tool_result blocks), tools, tool_choice, stop_sequences,
metadata.user_id, temperature, top_p, top_k, output_config (format json_schema, effort). Other Anthropic fields
(thinking, service_tier, documents...) are refused with a 422 naming them, never dropped. Toward the Anthropic
and Bedrock providers `cache_control` and a tool result's `is_error` travel along (both have them); toward
others `cache_control` is left out (a caching hint they do not take) and an error result's text starts
with "Error: ".
Out: usage as Anthropic bills it: `input_tokens` is the uncached input, beside `cache_read_input_tokens` and
`cache_creation_input_tokens`; a stream's `message_start` has no figures yet, its `message_delta` carries the
final ones (the Anthropic SDKs take message_delta's as the totals).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, Tag

from aikit.api.schemas import (
    MAX_DATA_URL,
    MAX_DESCRIPTION,
    MAX_MESSAGES,
    MAX_PARTS,
    MAX_TOOLS,
    Ident,
    JsonObject,
    ModelName,
    Open,
    ShortText,
    Text,
    by_kind,
    one_of,
)
from aikit.errors import UnsupportedError
from aikit.llm.base import (
    ChatRequest,
    ChatResult,
    RefusalDelta,
    StreamEnd,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    Usage,
)

NATIVE = frozenset({"anthropic", "bedrock"})  # providers that take cache_control and is_error
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}
ToolName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]  # Anthropic's rule
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}

# ---------------------------------------------------------------------------------------------- the request


class CacheControl(Open):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(Open):
    type: Literal["text"]
    text: Text
    cache_control: CacheControl | None = None


class Base64Source(Open):
    type: Literal["base64"]
    media_type: Literal["image/png", "image/jpeg", "image/gif", "image/webp"]
    data: Annotated[str, Field(min_length=1, max_length=MAX_DATA_URL)]


class URLSource(Open):
    type: Literal["url"]
    url: Annotated[str, Field(min_length=1, max_length=MAX_DATA_URL, pattern=r"^https?://")]


ImageSource = Annotated[
    Base64Source | URLSource,
    Field(discriminator="type"),
]


class ImageBlock(Open):
    type: Literal["image"]
    source: ImageSource
    cache_control: CacheControl | None = None


class ToolUseBlock(Open):
    type: Literal["tool_use"]
    id: Ident
    name: ToolName
    input: JsonObject
    cache_control: CacheControl | None = None


ResultContent = Annotated[
    Annotated[Text, Tag("kind:str")]
    | Annotated[list[TextBlock], Field(max_length=MAX_PARTS), Tag("kind:list")],
    one_of(by_kind, "must be a string or a list of text blocks"),
]


class ToolResultBlock(Open):
    type: Literal["tool_result"]
    tool_use_id: Ident
    content: ResultContent | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None


Block = Annotated[
    TextBlock
    | ImageBlock
    | ToolUseBlock
    | ToolResultBlock,
    Field(discriminator="type"),
]
Content = Annotated[
    Annotated[Text, Tag("kind:str")]
    | Annotated[list[Block], Field(max_length=MAX_PARTS), Tag("kind:list")],
    one_of(by_kind, "must be a string or a list of content blocks"),
]


class InputMessage(Open):
    role: Literal["user", "assistant"]
    content: Content


class ToolDefinition(Open):
    name: ToolName
    description: Annotated[str, Field(max_length=MAX_DESCRIPTION)] | None = None
    input_schema: JsonObject
    type: Literal["custom"] | None = None
    strict: bool | None = None
    cache_control: CacheControl | None = None


class AutoChoice(Open):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class AnyChoice(Open):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolNameChoice(Open):
    type: Literal["tool"]
    name: ToolName
    disable_parallel_tool_use: bool | None = None


class NoneChoice(Open):
    type: Literal["none"]


ToolChoice = Annotated[
    AutoChoice
    | AnyChoice
    | ToolNameChoice
    | NoneChoice,
    Field(discriminator="type"),
]
System = Annotated[
    Annotated[Text, Tag("kind:str")]
    | Annotated[list[TextBlock], Field(max_length=MAX_PARTS), Tag("kind:list")],
    one_of(by_kind, "must be a string or a list of text blocks"),
]


class JsonOutputFormat(Open):
    type: Literal["json_schema"]
    schema_: Annotated[JsonObject, Field(alias="schema")]


class OutputConfig(Open):
    format: JsonOutputFormat | None = None
    effort: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z_]+$")] | None = None


class Metadata(Open):
    user_id: ShortText | None = None


class MessagesRequest(Open):
    model: ModelName
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)]
    messages: Annotated[list[InputMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    system: System | None = None
    metadata: Metadata | None = None
    stop_sequences: Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=64)] | None = None
    stream: bool = False
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    tools: Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None

    def chat_request(self, provider: str) -> ChatRequest:
        """Our request for `provider` (the name of the configured provider, see `NATIVE`)."""
        return _Translation(provider in NATIVE).request(self)


def refused(field: str) -> UnsupportedError:
    return UnsupportedError(f"{field} is not supported by this Messages API", field)


def _refuse_unknown(obj: Open, where: str) -> None:
    for key, value in (obj.model_extra or {}).items():
        if value is not None:
            raise refused(f"{where}.{key}" if where else key)


class _Translation:
    def __init__(self, native: bool) -> None:
        self.native = native

    def _cached(self, target: dict[str, Any], block: TextBlock | ImageBlock | ToolUseBlock | ToolDefinition) -> None:
        if self.native and block.cache_control is not None:
            target["cache_control"] = block.cache_control.model_dump(exclude_none=True)

    def text(self, block: TextBlock, where: str) -> dict[str, Any]:
        _refuse_unknown(block, where)
        part: dict[str, Any] = {"type": "text", "text": block.text}
        self._cached(part, block)
        return part

    def image(self, block: ImageBlock, where: str) -> dict[str, Any]:
        _refuse_unknown(block, where)
        source = block.source
        _refuse_unknown(source, f"{where}.source")
        url = source.url if isinstance(source, URLSource) else f"data:{source.media_type};base64,{source.data}"
        part: dict[str, Any] = {"type": "image_url", "image_url": {"url": url}}
        self._cached(part, block)
        return part

    def tool_result(self, block: ToolResultBlock, where: str) -> dict[str, Any]:
        _refuse_unknown(block, where)
        content = block.content
        if isinstance(content, list):
            parts: str | list[dict[str, Any]] = [self.text(b, f"{where}.content[{j}]") for j, b in enumerate(content)]
        else:
            parts = content or ""
        message: dict[str, Any] = {"role": "tool", "tool_call_id": block.tool_use_id, "content": parts}
        if block.is_error:
            if self.native:
                message["is_error"] = True
            elif isinstance(parts, str):
                message["content"] = "Error: " + parts
            else:
                message["content"] = [{"type": "text", "text": "Error: "}, *parts]
        return message

    def user(self, message: InputMessage, where: str) -> list[dict[str, Any]]:
        """Tool results become tool messages (first, as Anthropic puts them); the rest one user message."""
        if isinstance(message.content, str):
            return [{"role": "user", "content": message.content}]
        found: list[dict[str, Any]] = []
        parts: list[dict[str, Any]] = []
        for j, block in enumerate(message.content):
            at = f"{where}.content[{j}]"
            if isinstance(block, ToolResultBlock):
                found.append(self.tool_result(block, at))
            elif isinstance(block, TextBlock):
                parts.append(self.text(block, at))
            elif isinstance(block, ImageBlock):
                parts.append(self.image(block, at))
            else:
                raise UnsupportedError(f"{at}: tool_use blocks belong in assistant messages", f"{at}.type")
        if parts:
            found.append({"role": "user", "content": parts})
        return found

    def assistant(self, message: InputMessage, where: str) -> dict[str, Any]:
        if isinstance(message.content, str):
            return {"role": "assistant", "content": message.content}
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(message.content):
            at = f"{where}.content[{j}]"
            if isinstance(block, TextBlock):
                parts.append(self.text(block, at))
            elif isinstance(block, ToolUseBlock):
                _refuse_unknown(block, at)
                calls.append({"id": block.id, "type": "function",
                              "function": {"name": block.name, "arguments": json.dumps(block.input)}})
            else:
                raise UnsupportedError(f"{at}: {block.type} blocks belong in user messages", f"{at}.type")
        found: dict[str, Any] = {"role": "assistant", "content": parts or None}
        if calls:
            found["tool_calls"] = calls
        return found

    def tools(self, body: MessagesRequest, params: dict[str, Any]) -> None:
        if body.tools:
            tools = []
            for j, tool in enumerate(body.tools):
                _refuse_unknown(tool, f"tools[{j}]")
                function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
                if tool.description is not None:
                    function["description"] = tool.description
                if tool.strict is not None:
                    function["strict"] = tool.strict
                spec: dict[str, Any] = {"type": "function", "function": function}
                self._cached(spec, tool)
                tools.append(spec)
            params["tools"] = tools
        choice = body.tool_choice
        if choice is None:
            return
        _refuse_unknown(choice, "tool_choice")
        modes = {"auto": "auto", "any": "required", "none": "none"}
        if isinstance(choice, ToolNameChoice):
            params["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            params["tool_choice"] = modes[choice.type]
        if not isinstance(choice, NoneChoice) and choice.disable_parallel_tool_use:
            params["parallel_tool_calls"] = False

    def system(self, body: MessagesRequest) -> list[dict[str, Any]]:
        if body.system is None:
            return []
        if isinstance(body.system, str):
            return [{"role": "system", "content": body.system}]
        return [{"role": "system", "content": [self.text(b, f"system[{j}]") for j, b in enumerate(body.system)]}]

    def params(self, body: MessagesRequest) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for key in ("temperature", "top_p", "top_k"):
            if getattr(body, key) is not None:
                params[key] = getattr(body, key)
        if body.stop_sequences:
            params["stop"] = body.stop_sequences
        if body.metadata is not None:
            _refuse_unknown(body.metadata, "metadata")
            if body.metadata.user_id is not None:
                params["user"] = body.metadata.user_id
        self.tools(body, params)
        output = body.output_config
        if output is not None:
            _refuse_unknown(output, "output_config")
            if output.format is not None:
                _refuse_unknown(output.format, "output_config.format")
                params["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": "output", "schema": output.format.schema_, "strict": True}}
            if output.effort is not None:
                params["reasoning_effort"] = output.effort
        return params

    def request(self, body: MessagesRequest) -> ChatRequest:
        _refuse_unknown(body, "")
        messages = self.system(body)
        for i, message in enumerate(body.messages):
            where = f"messages[{i}]"
            _refuse_unknown(message, where)
            if message.role == "user":
                messages.extend(self.user(message, where))
            else:
                messages.append(self.assistant(message, where))
        return ChatRequest(messages, body.model, body.max_tokens, self.params(body))


# ------------------------------------------------------------------------------------------------ the answer


def usage_json(usage: Usage) -> dict[str, int]:
    """Usage as Anthropic bills it: uncached input beside cache reads and cache writes."""
    return {
        "input_tokens": usage.input_tokens - usage.cached_tokens - usage.cache_write_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": usage.output_tokens,
    }


def stop_reason(finish_reason: str, stop_sequence: str | None) -> str:
    if stop_sequence is not None:
        return "stop_sequence"
    return STOP_REASONS.get(finish_reason, "end_turn")


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic's tool_use carries; text that is not a JSON object
    (a model may write broken JSON) is kept whole under "arguments" rather than lost."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"arguments": arguments}


def message_json(message_id: str, result: ChatResult) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    text = result.content or result.refusal
    if text:
        content.append({"type": "text", "text": text})
    content.extend({"type": "tool_use", "id": c.id, "name": c.name, "input": tool_input(c.arguments)}
                   for c in result.tool_calls)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": result.model,
        "content": content,
        "stop_reason": stop_reason(result.finish_reason, result.stop_sequence),
        "stop_sequence": result.stop_sequence,
        "usage": usage_json(result.usage),
    }


def sse(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def error_json(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


class MessageStream:
    """The server-sent events of one streamed message, in Anthropic's order: message_start, per content block
    content_block_start / _delta... / _stop, then message_delta (stop reason, final usage) and message_stop."""

    def __init__(self, message_id: str, model: str) -> None:
        self.message_id = message_id
        self.model = model
        self.blocks = 0  # content blocks started
        self.open: tuple[str, int] | None = None  # ("text", -1) or ("tool", call index) of the open block
        self.tool_blocks: dict[int, int] = {}  # tool call index -> content block index

    def start(self) -> str:
        message: dict[str, Any] = {
            "id": self.message_id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": usage_json(Usage(0, 0)),
        }
        return sse("message_start", {"type": "message_start", "message": message})

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        index = self.blocks - 1
        self.open = None
        return [sse("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _begin(self, kind: tuple[str, int], block: dict[str, Any]) -> list[str]:
        events = self._close()
        self.open = kind
        self.blocks += 1
        events.append(sse("content_block_start",
                          {"type": "content_block_start", "index": self.blocks - 1, "content_block": block}))
        return events

    def _delta(self, index: int, delta: dict[str, Any]) -> str:
        return sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})

    def event(self, event: StreamEvent) -> list[str]:
        """The events of one output event; a `StreamEnd` closes the message."""
        if isinstance(event, TextDelta | RefusalDelta):
            events = [] if self.open == ("text", -1) else self._begin(("text", -1), {"type": "text", "text": ""})
            return [*events, self._delta(self.blocks - 1, {"type": "text_delta", "text": event.text})]
        if isinstance(event, ToolCallDelta):
            return self._tool(event)
        if isinstance(event, StreamEnd):
            return self.finish(event)
        return []  # fields of OpenAI-compatible upstreams that Anthropic's format has no place for

    def _tool(self, event: ToolCallDelta) -> list[str]:
        events: list[str] = []
        if event.id is not None or event.index not in self.tool_blocks:
            block = {"type": "tool_use", "id": event.id or f"toolu_{event.index}", "name": event.name or "",
                     "input": {}}
            events = self._begin(("tool", event.index), block)
            self.tool_blocks[event.index] = self.blocks - 1
        if event.arguments:
            delta = {"type": "input_json_delta", "partial_json": event.arguments}
            events.append(self._delta(self.tool_blocks[event.index], delta))
        return events

    def finish(self, end: StreamEnd) -> list[str]:
        delta = {"stop_reason": stop_reason(end.finish_reason, end.stop_sequence), "stop_sequence": end.stop_sequence}
        return [
            *self._close(),
            sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage_json(end.usage)}),
            sse("message_stop", {"type": "message_stop"}),
        ]

    @staticmethod
    def error(status: int, message: str) -> str:
        return sse("error", error_json(status, message))
