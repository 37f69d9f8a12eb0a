"""POST /v1/chat/completions: OpenAI-compatible, metered, rate limited (through the same path as any route
that calls `llm.chat(..., track_tokens=True)`).

The validated request goes on whole (tools, response_format, images, unknown fields...): OpenAI-compatible
upstreams get it as sent, the other providers translate it or refuse a field by name (422). The answer comes
back whole (tool calls, refusal, logprobs, fields we do not model), streamed as deltas when asked; its usage is
the one metered.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from aikit.api.billed_route import BilledRoute
from aikit.api.deps import BilledDep
from aikit.api.json_response import FastJSONResponse
from aikit.api.openai_format import ChunkStream, completion_json, usage_json
from aikit.api.schemas import ChatCompletionRequest
from aikit.api.streaming import OpenAIEvents, respond

__all__ = ["completion_json", "router", "usage_json"]  # the formatters, as this module exported them

router = APIRouter(route_class=BilledRoute)  # the hot route: FastAPI's declaration, a lean handler


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, billing: BilledDep) -> JSONResponse | StreamingResponse:
    llm = billing.llm
    kwargs: dict[str, Any] = {"messages": body.messages_payload(), "model": body.model,
                              "max_tokens": body.max_tokens, **body.params()}
    created = int(time.time())
    completion_id = "chatcmpl-" + billing.request_id.removeprefix("req_")
    if not body.stream:
        # Limits (429), provider failures and unrecorded usage (503) are answered by the app's error handlers.
        result = await llm.chat(**kwargs)
        return FastJSONResponse(completion_json(completion_id, result, created))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunks = ChunkStream(completion_id, created, body.model or llm.default_model, include_usage)
    return await respond(llm.stream(**kwargs), OpenAIEvents(chunks))
