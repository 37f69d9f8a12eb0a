"""Anthropic's Messages API, spoken over httpx.

OpenAI-format requests are translated, and what has no equivalent is refused with a 422 naming it:
- system/developer messages go to `system`; tool messages become `tool_result` blocks of a user turn;
  assistant `tool_calls` become `tool_use` blocks; image parts become base64 or URL image blocks;
  `cache_control` on parts and tools (the convention of OpenAI-compatible gateways) passes through;
- tools, tool_choice (`required` is `any`), parallel_tool_calls=false (`disable_parallel_tool_use`),
  response_format json_schema (`output_config.format`), reasoning_effort (`output_config.effort`), stop
  (`stop_sequences`), temperature, top_p, top_k, user (`metadata.user_id`);
- anything else that asks for something (seed, logprobs, penalties, n > 1, JSON mode without a schema, message
  names, audio/file parts, unknown fields) is refused.
`max_tokens` is required by Anthropic, so a default is sent when the caller gives none. Anthropic reports
`input_tokens` beside `cache_read_input_tokens` and `cache_creation_input_tokens`; the normalized input is their
sum. Tool calls come back in OpenAI's shape, streamed as tool-call deltas.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from aikit.errors import InvalidRequestError, ProviderError
from aikit.llm._http import (
    as_int,
    iter_sse,
    loads_object,
    make_client,
    status_error,
    transport_errors,
)
from aikit.llm.base import (
    ChatRequest,
    ChatResult,
    InputUsage,
    Provider,
    ProviderEvent,
    StreamEnd,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
    unsupported,
    usage_with_cache_beside,
)
from aikit.llm.translate import (
    effort,
    function_tools,
    image,
    json_schema,
    parts,
    refuse_keys,
    refuse_unhandled,
    stop_list,
    texts_only,
    tool_choice,
    tool_input,
)

PROVIDER = "anthropic"
DEFAULT_MAX_TOKENS = 4096

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
}
HANDLED = frozenset(
    {"temperature", "top_p", "top_k", "stop", "metadata", "user", "tools", "tool_choice", "parallel_tool_calls",
     "response_format", "reasoning_effort"}
)
EFFORTS = ("low", "medium", "high", "xhigh")  # the OpenAI reasoning_effort values Anthropic also has
_MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "refusal", "is_error")


def finish_reason(stop_reason: object) -> str:
    return STOP_REASONS.get(str(stop_reason), "stop")


def usage_from(raw: dict[str, Any]) -> Usage:
    return usage_with_cache_beside(as_int(raw.get("input_tokens")), as_int(raw.get("cache_read_input_tokens")),
                                   as_int(raw.get("cache_creation_input_tokens")), as_int(raw.get("output_tokens")))


def _cached(block: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    if part.get("cache_control") is not None:
        block["cache_control"] = part["cache_control"]
    return block


def _user_block(part: dict[str, Any], where: str) -> dict[str, Any]:
    kind = part["type"]
    refuse_keys(PROVIDER, part, ("type", kind, "cache_control"), where)
    if kind == "text":
        return _cached({"type": "text", "text": part["text"]}, part)
    if kind == "image_url":
        img = image(PROVIDER, part, where)
        source = ({"type": "url", "url": img.url} if img.url is not None
                  else {"type": "base64", "media_type": img.media_type, "data": img.data})
        return _cached({"type": "image", "source": source}, part)
    raise unsupported(PROVIDER, f"{where}.type", f"{kind} parts")


def _assistant_blocks(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(parts(message, where)):
        if part["type"] not in ("text", "refusal"):
            raise unsupported(PROVIDER, f"{where}.content[{j}].type", f"{part['type']} parts in assistant messages")
        refuse_keys(PROVIDER, part, ("type", part["type"], "cache_control"), f"{where}.content[{j}]")
        if part[part["type"]]:  # Anthropic refuses empty text blocks
            blocks.append(_cached({"type": "text", "text": part[part["type"]]}, part))
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        blocks.append({"type": "text", "text": message["refusal"]})
    for k, call in enumerate(message.get("tool_calls") or ()):
        ident, name, arguments = tool_input(PROVIDER, call, f"{where}.tool_calls[{k}]")
        blocks.append({"type": "tool_use", "id": ident, "name": name, "input": arguments})
    return blocks


def _tool_result(message: dict[str, Any], where: str) -> dict[str, Any]:
    content = message.get("content")
    body = content if isinstance(content, str) else [
        _cached({"type": "text", "text": p["text"]}, p) for p in texts_only(PROVIDER, message, where)
    ]
    result = {"type": "tool_result", "tool_use_id": message["tool_call_id"], "content": body}
    if message.get("is_error") is True:  # carried from an Anthropic-shaped request
        result["is_error"] = True
    return result


def _append(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    # Tool results and the user text after them form one user turn, as Anthropic wants them.
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _messages(req: ChatRequest) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(req.messages):
        where, role = f"messages[{i}]", message["role"]
        refuse_keys(PROVIDER, message, _MESSAGE_KEYS, where)
        if role in ("system", "developer"):
            system.extend(_cached({"type": "text", "text": p["text"]}, p)
                          for p in texts_only(PROVIDER, message, where) if p["text"])
        elif role == "user":
            _append(turns, "user", [_user_block(p, f"{where}.content[{j}]")
                                    for j, p in enumerate(parts(message, where))])
        elif role == "assistant":
            _append(turns, "assistant", _assistant_blocks(message, where))
        else:
            _append(turns, "user", [_tool_result(message, where)])
    return system, turns


def _tools(req: ChatRequest, body: dict[str, Any]) -> None:
    tools = []
    for tool in function_tools(PROVIDER, req, ("cache_control",)):
        spec: dict[str, Any] = {"name": tool.name, "input_schema": tool.parameters, **tool.extra}
        if tool.description:
            spec["description"] = tool.description
        if tool.strict is not None:
            spec["strict"] = tool.strict
        tools.append(spec)
    mode, name = tool_choice(req)
    parallel = req.params.get("parallel_tool_calls")
    if not tools:
        if mode in ("required", "named"):
            raise InvalidRequestError("tool_choice needs tools", "tool_choice")
        return
    body["tools"] = tools
    choices: dict[str, dict[str, Any]] = {"auto": {"type": "auto"}, "required": {"type": "any"},
                                          "none": {"type": "none"}, "named": {"type": "tool", "name": name}}
    choice = choices[mode]
    if parallel is False and mode != "none":
        choice["disable_parallel_tool_use"] = True
    if choice != {"type": "auto"}:
        body["tool_choice"] = choice


def _metadata(req: ChatRequest) -> dict[str, Any]:
    metadata = dict(req.params.get("metadata") or {})
    for key in metadata:
        if key != "user_id":
            raise unsupported(PROVIDER, f"metadata.{key}", "it keeps only metadata.user_id")
    if req.params.get("user") is not None:
        metadata["user_id"] = req.params["user"]
    return metadata


def build_body(req: ChatRequest) -> dict[str, Any]:
    params = req.params
    refuse_unhandled(PROVIDER, params, HANDLED)
    system, turns = _messages(req)
    body: dict[str, Any] = {"model": req.model, "messages": turns, "max_tokens": req.output_limit or DEFAULT_MAX_TOKENS}
    if system:
        body["system"] = system
    for key in ("temperature", "top_p", "top_k"):
        if params.get(key) is not None:
            body[key] = params[key]
    stop = stop_list(req)
    if stop is not None:
        body["stop_sequences"] = stop
    metadata = _metadata(req)
    if metadata:
        body["metadata"] = metadata
    _tools(req, body)
    output: dict[str, Any] = {}
    schema = json_schema(PROVIDER, req)
    if schema is not None:
        output["format"] = {"type": "json_schema", "schema": schema.schema}
    level = effort(PROVIDER, req, EFFORTS)
    if level is not None:
        output["effort"] = level
    if output:
        body["output_config"] = output
    return body


def result_from(data: dict[str, Any], model: str) -> ChatResult:
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block in data["content"]:
        if block.get("type") == "text":
            texts.append(str(block["text"]))
        elif block.get("type") == "tool_use":
            arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
            calls.append(ToolCall(id=str(block["id"]), name=str(block["name"]), arguments=arguments))
    stop_sequence = data.get("stop_sequence")
    return ChatResult(
        id=str(data["id"]),
        model=str(data.get("model") or model),
        content="".join(texts) if texts or not calls else None,
        finish_reason=finish_reason(data.get("stop_reason")),
        usage=usage_from(data["usage"]),
        tool_calls=tuple(calls),
        stop_sequence=stop_sequence if isinstance(stop_sequence, str) else None,
    )


def _error_event(provider: str, data: dict[str, Any]) -> ProviderError:
    error = data.get("error") or {}
    kind = error.get("type") if isinstance(error, dict) else None
    if kind == "invalid_request_error":
        return ProviderError(f"{provider} rejected the request: {str(error.get('message', ''))[:500]}", 400)
    if kind in ("authentication_error", "permission_error"):
        return ProviderError(f"{provider}: provider authentication failed", 502)
    return ProviderError(f"{provider} failed mid-stream ({kind or 'error'})", 502)


class _StreamState:
    """What a Messages stream has said so far, turned into provider events."""

    def __init__(self) -> None:
        self.usage: dict[str, Any] = {}
        self.stop_reason: object = None
        self.stop_sequence: str | None = None
        self.tool_index: dict[int, int] = {}  # content block index -> tool call index

    def block_start(self, data: dict[str, Any]) -> ProviderEvent | None:
        block = data["content_block"]
        if block.get("type") != "tool_use":
            return None
        index = self.tool_index[int(data["index"])] = len(self.tool_index)
        initial = block.get("input")
        arguments = json.dumps(initial) if initial else ""
        return ToolCallDelta(index, id=str(block["id"]), name=str(block["name"]), arguments=arguments)

    def block_delta(self, data: dict[str, Any]) -> ProviderEvent | None:
        delta = data["delta"]
        if delta.get("type") == "text_delta" and delta.get("text"):
            return TextDelta(str(delta["text"]))
        if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
            return ToolCallDelta(self.tool_index[int(data["index"])], arguments=str(delta["partial_json"]))
        return None  # thinking, signatures, citations: nothing we asked for

    def message_delta(self, data: dict[str, Any]) -> None:
        # message_delta usage is cumulative and may repeat the input figures.
        self.usage.update({k: v for k, v in (data.get("usage") or {}).items() if v is not None})
        delta = data.get("delta") or {}
        self.stop_reason = delta.get("stop_reason", self.stop_reason)
        sequence = delta.get("stop_sequence")
        self.stop_sequence = sequence if isinstance(sequence, str) else self.stop_sequence


class AnthropicProvider(Provider):
    name = PROVIDER

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        version: str,
        timeout_seconds: float,
        default_model: str | None = None,
    ) -> None:
        self.default_model = default_model or "claude-sonnet-4-5"
        self._api_key = api_key
        headers = {"x-api-key": api_key, "anthropic-version": version}
        self._client = make_client(base_url, timeout_seconds, headers)

    async def chat(self, req: ChatRequest) -> ChatResult:
        body = build_body(req)
        with transport_errors(self.name):
            resp = await self._client.post("/v1/messages", json=body)
            if resp.status_code >= 400:
                raise status_error(self.name, resp.status_code, resp.content, (self._api_key,))
            return result_from(loads_object(resp.content), req.model)

    async def stream(self, req: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        body = {**build_body(req), "stream": True}
        state = _StreamState()
        with transport_errors(self.name):
            async with self._client.stream("POST", "/v1/messages", json=body) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise status_error(self.name, resp.status_code, resp.content, (self._api_key,))
                complete = False
                async for _event, raw in iter_sse(resp.aiter_lines()):
                    data = loads_object(raw)
                    kind = data.get("type")
                    event: ProviderEvent | None = None
                    if kind == "message_start":
                        state.usage.update(data["message"].get("usage") or {})
                        event = InputUsage(usage_from(state.usage))
                    elif kind == "content_block_start":
                        event = state.block_start(data)
                    elif kind == "content_block_delta":
                        event = state.block_delta(data)
                    elif kind == "message_delta":
                        state.message_delta(data)
                    elif kind == "message_stop":
                        complete = True
                        break
                    elif kind == "error":
                        raise _error_event(self.name, data)
                    if event is not None:
                        yield event
                if not complete:
                    raise ProviderError(f"{self.name} stream ended before completion", 502)
                final = usage_from(state.usage)
        yield StreamEnd(finish_reason=finish_reason(state.stop_reason), usage=final, stop_sequence=state.stop_sequence)

    async def aclose(self) -> None:
        await self._client.aclose()
