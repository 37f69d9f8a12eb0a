"""POST /v1/chat/completions: OpenAI-compatible, metered, rate limited."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from aikit.api.deps import BilledKeyDep, RuntimeDep
from aikit.api.errors import ApiError, error_body
from aikit.api.schemas import ChatCompletionRequest
from aikit.keys import KeyInfo
from aikit.limits import LimiterUnavailable
from aikit.llm.base import ChatResult, ProviderError, StreamEnd, TextDelta, Usage
from aikit.llm.context import Caller
from aikit.metering.base import new_request_id
from aikit.metering.redis_meter import MeterUnavailable
from aikit.observability import RATE_LIMITED, REQUESTS, emit
from aikit.runtime import Runtime

router = APIRouter()


def usage_json(usage: Usage) -> dict[str, object]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def completion_json(request_id: str, result: ChatResult, created: int) -> dict[str, object]:
    return {
        "id": "chatcmpl-" + request_id.removeprefix("req_"),
        "object": "chat.completion",
        "created": created,
        "model": result.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.content},
                     "finish_reason": result.finish_reason, "logprobs": None}],
        "usage": usage_json(result.usage),
    }


async def admit(runtime: Runtime, key: KeyInfo, body: ChatCompletionRequest, request_id: str) -> dict[str, str]:
    reserve = body.prompt_chars() // 4 + (body.limit() or runtime.settings.quota_reserve_tokens)
    try:
        decision = await runtime.limiter.admit(key, request_id, reserve)
    except LimiterUnavailable:
        raise ApiError(503, "rate limiter unavailable, try again shortly", code="limiter_unavailable",
                       headers={"Retry-After": "5"}) from None
    if not decision.allowed:
        emit(RATE_LIMITED, limit=decision.limit_hit or "unknown")
        what = {"minute": "requests per minute", "day": "requests per day", "tokens": "monthly token quota"}
        raise ApiError(429, f"rate limit exceeded: {what.get(decision.limit_hit or '', 'limit')}",
                       code="rate_limit_exceeded", headers=decision.headers)
    return decision.headers


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, key: BilledKeyDep,
                           runtime: RuntimeDep) -> JSONResponse | StreamingResponse:
    request_id = new_request_id()
    headers = await admit(runtime, key, body, request_id)
    headers["X-Request-Id"] = request_id
    emit(REQUESTS)
    caller = Caller(api_key_id=key.api_key_id, customer_id=key.customer_id)
    kwargs = {"messages": body.messages_payload(), "model": body.model, "track_tokens": True,
              "request_id": request_id, "caller": caller, "max_tokens": body.limit(), **body.provider_params()}
    created = int(time.time())
    if not body.stream:
        try:
            result = await runtime.llm.chat(**kwargs)
        except ProviderError as exc:
            await runtime.limiter.release(key, request_id)
            raise ApiError(exc.status_code, exc.message, code="provider_error") from None
        except MeterUnavailable:
            # The request id lets support match the rare case where the write did commit before the failure.
            raise ApiError(503, "usage could not be recorded, retry shortly",
                           code="metering_unavailable", headers={"X-Request-Id": request_id}) from None
        return JSONResponse(completion_json(request_id, result, created), headers=headers)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # Pull the first event before answering, so an upstream failure is a clean HTTP error, not a broken stream.
    try:
        stream = runtime.llm.stream(**kwargs)
        first = await anext(stream)
    except ProviderError as exc:
        await runtime.limiter.release(key, request_id)
        raise ApiError(exc.status_code, exc.message, code="provider_error") from None
    except StopAsyncIteration:
        first = None
    chunk_id = "chatcmpl-" + request_id.removeprefix("req_")
    model = body.model or runtime.llm.default_model

    def chunk(delta: dict[str, object], finish: str | None = None) -> str:
        payload = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

    async def sse() -> AsyncIterator[str]:
        try:
            yield chunk({"role": "assistant", "content": ""})
            event = first
            while event is not None:
                if isinstance(event, TextDelta):
                    yield chunk({"content": event.text})
                elif isinstance(event, StreamEnd):
                    # The stream meters as it finishes: finish it before telling the client its usage, so a
                    # usage that could not be recorded is never shown (the client gets an error instead).
                    following = await anext(stream, None)
                    yield chunk({}, event.finish_reason)
                    if include_usage:
                        final = {"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                                 "model": model, "choices": [], "usage": usage_json(event.usage)}
                        yield f"data: {json.dumps(final, separators=(',', ':'))}\n\n"
                    event = following
                    continue
                event = await anext(stream, None)
            yield "data: [DONE]\n\n"
        except ProviderError as exc:
            # Headers are gone; report the failure in-band as OpenAI does, after metering what was produced.
            yield f"data: {json.dumps(error_body(exc.status_code, exc.message, 'provider_error'))}\n\n"
        except MeterUnavailable:
            message = "usage could not be recorded, retry shortly"
            yield f"data: {json.dumps(error_body(503, message, 'metering_unavailable'))}\n\n"
        finally:
            await stream.aclose()

    return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)
