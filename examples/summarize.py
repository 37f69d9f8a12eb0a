"""Your own metered endpoint on aikit: POST /v1/summarize makes two LLM calls, each metered to the caller's API
key and admitted against its limits, with no billing code here.

    AIKIT_ROUTERS=examples.summarize:router make run

    curl -s http://127.0.0.1:8000/v1/summarize -H "Authorization: Bearer ak_..." \
         -H 'Content-Type: application/json' -d '{"text": "A long text to summarize ..."}'
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from aikit import llm
from aikit.api.deps import MeteredLLM

router = APIRouter()


class Document(BaseModel):
    text: str = Field(min_length=1, max_length=100_000)


@router.post("/v1/summarize")
async def summarize(doc: Document) -> dict[str, object]:
    summary = await llm.chat(messages=[{"role": "user", "content": f"Summarize: {doc.text}"}], track_tokens=True)
    title = await llm.chat(messages=[{"role": "user", "content": f"Title for: {summary.content}"}],
                           track_tokens=True, max_tokens=12)
    return {"title": title.content, "summary": summary.content,
            "tokens": summary.usage.total_tokens + title.usage.total_tokens}


@router.post("/v1/summarize/stream")
async def summarize_stream(doc: Document, model: MeteredLLM) -> StreamingResponse:
    """The dependency form: `model` is an LLM bound to this request's key; its calls are metered by default."""
    events = model.stream(messages=[{"role": "user", "content": f"Summarize: {doc.text}"}])
    first = await anext(events)  # before answering: a 429 or a provider failure is still a clean HTTP error

    async def text() -> AsyncIterator[str]:
        async with aclosing(events):
            event = first
            while event is not None:
                if isinstance(event, llm.TextDelta):
                    yield event.text
                event = await anext(events, None)

    return StreamingResponse(text(), media_type="text/plain")
