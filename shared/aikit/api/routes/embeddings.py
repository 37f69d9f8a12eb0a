"""POST /v1/embeddings: OpenAI-compatible, metered (the input tokens the provider reports) and limited through
the same admission, quota reservation and settlement as chat (`llm.embed(..., track_tokens=True)`)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from aikit.api.billed_route import BilledRoute
from aikit.api.deps import BilledDep
from aikit.api.openai_format import embeddings_json
from aikit.api.schemas import EmbeddingsRequest

router = APIRouter(route_class=BilledRoute)  # a hot route: FastAPI's declaration, a lean handler


@router.post("/v1/embeddings", response_model=None)
async def embeddings(body: EmbeddingsRequest, billing: BilledDep) -> JSONResponse:
    result = await billing.llm.embed(body.input, model=body.model, dimensions=body.dimensions, **body.params())
    return JSONResponse(embeddings_json(result, body.encoding_format))
