"""Any OpenAI-compatible chat completions API (OpenAI, Azure-style gateways, vLLM, LiteLLM...).

OpenAI's `prompt_tokens` already include `prompt_tokens_details.cached_tokens`, so they map straight onto
`Usage.input_tokens`. Streams ask for `stream_options.include_usage` so the last chunk carries the usage.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from typing import Any

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
    Provider,
    ProviderError,
    ProviderEvent,
    StreamEnd,
    TextDelta,
    Usage,
)

# Parameters we set ourselves; a caller's value for them is ignored.
_RESERVED = frozenset({"model", "messages", "stream", "stream_options", "max_tokens"})


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
            body["stream_options"] = {"include_usage": True}
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
            content = choice["message"].get("content") or ""
            if not isinstance(content, str):
                raise TypeError("content must be a string")
            usage = _usage(data.get("usage")) or self._estimated(req, content, 1)
            return ChatResult(
                id=str(data.get("id") or "chatcmpl-" + uuid.uuid4().hex),
                model=str(data.get("model") or req.model),
                content=content,
                finish_reason=str(choice.get("finish_reason") or "stop"),
                usage=usage,
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
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            text.append(piece)
                            yield TextDelta(piece)
                        if choice.get("finish_reason"):
                            finish = str(choice["finish_reason"])
                # A clean end of the body after finish_reason is a complete answer even without [DONE].
                if not done and finish is None:
                    raise ProviderError(f"{self.name} stream ended before completion", 502)
        if usage is None:
            usage = self._estimated(req, "".join(text), len(text))
        yield StreamEnd(finish_reason=finish or "stop", usage=usage)

    async def aclose(self) -> None:
        await self._client.aclose()
