"""Any OpenAI-compatible API (OpenAI, Azure-style gateways, vLLM, LiteLLM...): chat completions and embeddings.

The request goes on as the client sent it (tools, images, response_format, fields this layer does not know);
the answer comes back unchanged: tool calls, refusals, logprobs and fields we do not model
(`ChatResult.message_extra` / `response_extra`, `ExtraDelta` in streams).
OpenAI's `prompt_tokens` already include `prompt_tokens_details.cached_tokens`, so they map straight onto
`Usage.input_tokens`. Streams ask for `stream_options.include_usage` so the last chunk carries the usage.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, Iterator
from typing import Any

from aikit.errors import ProviderError
from aikit.llm._http import (
    as_int,
    iter_sse,
    loads_object,
    log,
    make_client,
    status_error,
    transport_errors,
)
from aikit.llm.base import (
    ChatRequest,
    ChatResult,
    EmbeddingRequest,
    EmbeddingResult,
    ExtraDelta,
    Provider,
    ProviderEvent,
    RefusalDelta,
    StreamEnd,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
    output_text,
)
from aikit.llm.embeddings import decode_vector

# Fields we set ourselves; a caller's value for them is ignored.
_RESERVED = frozenset({"model", "messages", "stream"})
_MESSAGE_FIELDS = frozenset({"role", "content", "refusal", "tool_calls"})
_RESPONSE_FIELDS = frozenset({"id", "object", "created", "model", "choices", "usage"})


def _usage(raw: object) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    details = raw.get("prompt_tokens_details")
    cached = as_int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return Usage(
        input_tokens=as_int(raw.get("prompt_tokens")),
        output_tokens=as_int(raw.get("completion_tokens")),
        cached_tokens=cached,
    )


def _tool_call(raw: dict[str, Any]) -> ToolCall:
    kind = str(raw.get("type") or "function")
    if kind == "custom":
        custom = raw["custom"]
        return ToolCall(id=str(raw["id"]), name=str(custom["name"]), arguments=str(custom.get("input", "")),
                        type=kind)
    function = raw["function"]
    return ToolCall(id=str(raw["id"]), name=str(function["name"]), arguments=str(function.get("arguments", "")),
                    type=kind)


def _optional_str(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _deltas(choice: dict[str, Any]) -> Iterator[ProviderEvent]:
    """The events of one streamed choice delta, in the order OpenAI puts its fields."""
    delta = choice.get("delta") or {}
    piece = _optional_str(delta.get("content"))
    if piece:
        yield TextDelta(piece, choice.get("logprobs"))
    refusal = _optional_str(delta.get("refusal"))
    if refusal:
        yield RefusalDelta(refusal)
    for call in delta.get("tool_calls") or ():
        kind = str(call.get("type") or "function")
        spec = call.get("custom" if kind == "custom" else "function") or {}
        arguments = spec.get("input" if kind == "custom" else "arguments") or ""
        yield ToolCallDelta(int(call["index"]), id=call.get("id"), name=spec.get("name"), arguments=str(arguments),
                            type=kind)
    extra = {k: v for k, v in delta.items() if k not in _MESSAGE_FIELDS and v is not None}
    if extra:
        yield ExtraDelta(extra)


class OpenAIProvider(Provider):
    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        timeout_seconds: float,
        default_model: str | None = None,
    ) -> None:
        self.default_model = default_model or "gpt-4o-mini"
        self._api_key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = make_client(base_url, timeout_seconds, headers)

    def _body(self, req: ChatRequest, stream: bool) -> dict[str, Any]:
        # None means "not given" (an API model dumped with its defaults); some compatible servers reject null.
        body = {k: v for k, v in req.params.items() if k not in _RESERVED and v is not None}
        body.update(model=req.model, messages=req.messages, stream=stream)
        if req.max_tokens is not None:
            body["max_tokens"] = req.max_tokens
        if stream:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        else:
            body.pop("stream_options", None)  # OpenAI refuses stream_options without stream
        return body

    def _estimated(self, req: ChatRequest, text: str, deltas: int) -> Usage:
        log.warning("openai-compatible upstream sent no usage for model %s; estimating", req.model)
        return Usage(self.estimate_input_tokens(req), self.estimate_output_tokens(text, deltas))

    async def chat(self, req: ChatRequest) -> ChatResult:
        with transport_errors(self.name):
            resp = await self._client.post("/chat/completions", json=self._body(req, stream=False))
            if resp.status_code >= 400:
                raise status_error(self.name, resp.status_code, resp.content, (self._api_key,))
            data = loads_object(resp.content)
            choice = data["choices"][0]
            message = choice["message"]
            content = _optional_str(message.get("content"))
            calls = tuple(_tool_call(c) for c in message.get("tool_calls") or ())
            generated = " ".join([content or "", *(f"{c.name} {c.arguments}" for c in calls)])
            usage = _usage(data.get("usage")) or self._estimated(req, generated, 1)
            logprobs = choice.get("logprobs")
            return ChatResult(
                id=str(data.get("id") or "chatcmpl-" + uuid.uuid4().hex),
                model=str(data.get("model") or req.model),
                content=content,
                finish_reason=str(choice.get("finish_reason") or "stop"),
                usage=usage,
                tool_calls=calls,
                refusal=_optional_str(message.get("refusal")),
                logprobs=logprobs if isinstance(logprobs, dict) else None,
                message_extra={k: v for k, v in message.items() if k not in _MESSAGE_FIELDS},
                response_extra={k: v for k, v in data.items() if k not in _RESPONSE_FIELDS},
            )

    async def stream(self, req: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        finish: str | None = None
        usage: Usage | None = None
        text: list[str] = []
        with transport_errors(self.name):
            async with self._client.stream(
                "POST", "/chat/completions", json=self._body(req, stream=True)
            ) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise status_error(self.name, resp.status_code, resp.content, (self._api_key,))
                done = False
                async for _event, data in iter_sse(resp.aiter_lines()):
                    if data.strip() == "[DONE]":
                        done = True
                        break
                    chunk = loads_object(data)
                    if "error" in chunk:
                        raise ProviderError(f"{self.name} failed mid-stream", 502)
                    usage = _usage(chunk.get("usage")) or usage
                    for choice in chunk.get("choices") or ():
                        for event in _deltas(choice):
                            piece = output_text(event)
                            if piece:
                                text.append(piece)
                            yield event
                        if choice.get("finish_reason"):
                            finish = str(choice["finish_reason"])
                # A clean end of the body after finish_reason is a complete answer even without [DONE].
                if not done and finish is None:
                    raise ProviderError(f"{self.name} stream ended before completion", 502)
        if usage is None:
            usage = self._estimated(req, "".join(text), len(text))
        yield StreamEnd(finish_reason=finish or "stop", usage=usage)

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResult:
        body = {k: v for k, v in req.params.items() if v is not None}
        body.update(model=req.model, input=req.input)
        if req.dimensions is not None:
            body["dimensions"] = req.dimensions
        with transport_errors(self.name):
            resp = await self._client.post("/embeddings", json=body)
            if resp.status_code >= 400:
                raise status_error(self.name, resp.status_code, resp.content, (self._api_key,))
            data = loads_object(resp.content)
            items = sorted(data["data"], key=lambda item: int(item.get("index", 0)))
            vectors = [decode_vector(v) if isinstance(v, str) else [float(x) for x in v]
                       for v in (item["embedding"] for item in items)]
            raw = data.get("usage")
            if isinstance(raw, dict) and raw.get("prompt_tokens") is not None:
                tokens = as_int(raw["prompt_tokens"])
            else:
                log.warning("openai-compatible upstream sent no embedding usage for model %s; estimating", req.model)
                tokens = self.estimate_embedding_tokens(req)
            return EmbeddingResult(model=str(data.get("model") or req.model), embeddings=vectors,
                                   usage=Usage(input_tokens=tokens, output_tokens=0))

    async def aclose(self) -> None:
        await self._client.aclose()
