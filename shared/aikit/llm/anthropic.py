"""Anthropic's Messages API, spoken over httpx.

OpenAI-format requests are translated: system/developer messages go to `system`; `stop` becomes
`stop_sequences`; `temperature`, `top_p`, `top_k` and `metadata` pass through; `user` becomes
`metadata.user_id`; other OpenAI-only parameters are dropped, `n` > 1 is refused. `max_tokens` is required by
Anthropic, so a default is sent when the caller gives none.
Anthropic reports `input_tokens` beside `cache_read_input_tokens` and `cache_creation_input_tokens`; the
normalized input is their sum.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

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
    InvalidRequestError,
    Provider,
    ProviderError,
    ProviderEvent,
    StreamEnd,
    TextDelta,
    Usage,
    content_parts,
    usage_with_cache_beside,
)

DEFAULT_MAX_TOKENS = 4096

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
}


def finish_reason(stop_reason: object) -> str:
    return STOP_REASONS.get(str(stop_reason), "stop")


def usage_from(raw: dict[str, Any]) -> Usage:
    return usage_with_cache_beside(as_int(raw.get("input_tokens")), as_int(raw.get("cache_read_input_tokens")),
                                   as_int(raw.get("cache_creation_input_tokens")), as_int(raw.get("output_tokens")))


def build_body(req: ChatRequest) -> dict[str, Any]:
    system: list[dict[str, str]] = []
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(req.messages):
        parts = content_parts(message.get("content", ""), f"messages[{i}].content")
        if message["role"] in ("system", "developer"):
            system.extend({"type": "text", "text": p} for p in parts if p)
        else:
            blocks = [{"type": "text", "text": p} for p in parts]
            messages.append({"role": message["role"], "content": blocks})
    body: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "max_tokens": req.max_tokens or DEFAULT_MAX_TOKENS,
    }
    if system:
        body["system"] = system
    params = req.params
    if params.get("n", 1) != 1:
        raise InvalidRequestError("n: anthropic returns one choice; n must be 1")
    for key in ("temperature", "top_p", "top_k", "metadata"):
        if params.get(key) is not None:
            body[key] = params[key]
    stop = params.get("stop")
    if stop is not None:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if params.get("user") is not None:
        body.setdefault("metadata", {})["user_id"] = params["user"]
    return body


def _error_event(provider: str, data: dict[str, Any]) -> ProviderError:
    error = data.get("error") or {}
    kind = error.get("type") if isinstance(error, dict) else None
    if kind == "invalid_request_error":
        return ProviderError(f"{provider} rejected the request: {str(error.get('message', ''))[:500]}", 400)
    if kind in ("authentication_error", "permission_error"):
        return ProviderError(f"{provider}: provider authentication failed", 502)
    return ProviderError(f"{provider} failed mid-stream ({kind or 'error'})", 502)


class AnthropicProvider(Provider):
    name = "anthropic"

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
            data = loads_object(resp.content)
            text = "".join(block["text"] for block in data["content"] if block.get("type") == "text")
            return ChatResult(
                id=str(data["id"]),
                model=str(data.get("model") or req.model),
                content=text,
                finish_reason=finish_reason(data.get("stop_reason")),
                usage=usage_from(data["usage"]),
            )

    async def stream(self, req: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        body = {**build_body(req), "stream": True}
        usage: dict[str, Any] = {}
        stop_reason: object = None
        with transport_errors(self.name):
            async with self._client.stream("POST", "/v1/messages", json=body) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise status_error(self.name, resp.status_code, resp.content, (self._api_key,))
                complete = False
                async for _event, raw in iter_sse(resp.aiter_lines()):
                    data = loads_object(raw)
                    kind = data.get("type")
                    if kind == "message_start":
                        usage.update(data["message"].get("usage") or {})
                        yield InputUsage(usage_from(usage))
                    elif kind == "content_block_delta":
                        delta = data["delta"]
                        if delta.get("type") == "text_delta" and delta.get("text"):
                            yield TextDelta(str(delta["text"]))
                    elif kind == "message_delta":
                        # message_delta usage is cumulative and may repeat the input figures.
                        usage.update({k: v for k, v in (data.get("usage") or {}).items() if v is not None})
                        stop_reason = (data.get("delta") or {}).get("stop_reason", stop_reason)
                    elif kind == "message_stop":
                        complete = True
                        break
                    elif kind == "error":
                        raise _error_event(self.name, data)
                if not complete:
                    raise ProviderError(f"{self.name} stream ended before completion", 502)
                final = usage_from(usage)
        yield StreamEnd(finish_reason=finish_reason(stop_reason), usage=final)

    async def aclose(self) -> None:
        await self._client.aclose()
