"""POST /v1/chat/completions: OpenAI-compatible, metered, rate limited (through the same path as any route
that calls `llm.chat(..., track_tokens=True)`)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from aikit.api.deps import BilledDep
from aikit.api.errors import error_body
from aikit.api.schemas import ChatCompletionRequest
from aikit.llm.base import ChatResult, ProviderError, StreamEnd, TextDelta, Usage
from aikit.metering.redis_meter import MeterUnavailable

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


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, billing: BilledDep) -> JSONResponse | StreamingResponse:
    llm = billing.llm
    kwargs = {"messages": body.messages_payload(), "model": body.model, "max_tokens": body.limit(),
              **body.provider_params()}
    created = int(time.time())
    if not body.stream:
        # Limits (429), provider failures and unrecorded usage (503) are answered by the app's error handlers.
        result = await llm.chat(**kwargs)
        return JSONResponse(completion_json(billing.request_id, result, created))

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # Pull the first event before answering, so a refusal or an upstream failure is a clean HTTP error, not a
    # broken stream.
    stream = llm.stream(**kwargs)
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = None
    chunk_id = "chatcmpl-" + billing.request_id.removeprefix("req_")
    model = body.model or llm.default_model

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
            # Headers are gone; report the failure (the deadline included: 504) in-band as OpenAI does, after
            # metering what was produced.
            yield f"data: {json.dumps(error_body(exc.status_code, exc.message, 'provider_error'))}\n\n"
        except MeterUnavailable:
            message = "usage could not be recorded, retry shortly"
            yield f"data: {json.dumps(error_body(503, message, 'metering_unavailable'))}\n\n"
        finally:
            await stream.aclose()

    return StreamingResponse(sse(), media_type="text/event-stream")
