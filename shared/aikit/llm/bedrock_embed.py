"""Embeddings on Bedrock through InvokeModel: Amazon Titan Text Embeddings (v1, v2) and Cohere Embed (v3, v4).

Titan embeds one text per call (inputs run a few at a time) and reports `inputTextTokenCount`; Cohere takes up
to 96 texts per call and Bedrock reports its tokens in the `X-Amzn-Bedrock-Input-Token-Count` header. The
usage is their sum, as Bedrock bills it. `dimensions` maps to Titan v2's `dimensions` and Cohere v4's
`output_dimension` where the value is one they offer; the model's own options pass as extra fields
(Titan: `normalize`; Cohere: `input_type`, default `search_document`, and `truncate`). `user` goes to
`requestMetadata`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from aikit.llm._http import as_int, log
from aikit.llm.base import EmbeddingRequest, EmbeddingResult, Usage, estimate_tokens, unsupported

PROVIDER = "bedrock"
COHERE_BATCH = 96  # Cohere's limit of texts per call
TITAN_CONCURRENCY = 8  # Titan calls in flight at once for a list input
TOKEN_HEADER = "x-amzn-bedrock-input-token-count"
# Fields every family accepts besides its own: ours (encoding_format shapes our answer) and user.
COMMON = ("encoding_format", "user")

Invoke = Callable[[dict[str, Any]], Any]  # a bound bedrock-runtime invoke_model taking its kwargs


class Family:
    name: str
    options: tuple[str, ...]  # the model's own request fields a caller may pass
    dimensions: tuple[int, ...] = ()

    def __init__(self, model: str) -> None:
        self.model = model

    def check(self, req: EmbeddingRequest) -> None:
        allowed = frozenset(COMMON + self.options)
        for key, value in req.params.items():
            if key not in allowed and value is not None:
                options = ", ".join(self.options) or "no options"
                raise unsupported(PROVIDER, key, f"{self.name} embeddings take {options}")
        if req.dimensions is not None and req.dimensions not in self.dimensions:
            offered = ", ".join(map(str, self.dimensions)) if self.dimensions else "no choice of dimensions"
            raise unsupported(PROVIDER, "dimensions", f"{self.name} offers {offered}")

    def options_of(self, req: EmbeddingRequest) -> dict[str, Any]:
        return {k: req.params[k] for k in self.options if req.params.get(k) is not None}


class Titan(Family):
    name = "titan"
    options = ("normalize",)

    def __init__(self, model: str) -> None:
        super().__init__(model)
        if "v2" in model:
            self.dimensions = (256, 512, 1024)

    def body(self, text: str, req: EmbeddingRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"inputText": text, **self.options_of(req)}
        if req.dimensions is not None:
            body["dimensions"] = req.dimensions
        return body


class Cohere(Family):
    name = "cohere"
    options = ("input_type", "truncate")

    def __init__(self, model: str) -> None:
        super().__init__(model)
        if "v4" in model:
            self.dimensions = (256, 512, 1024, 1536)

    def body(self, texts: list[str], req: EmbeddingRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"texts": texts, "input_type": "search_document", **self.options_of(req)}
        body["embedding_types"] = ["float"]
        if req.dimensions is not None:
            body["output_dimension"] = req.dimensions
        return body


def family(model: str) -> Titan | Cohere:
    if "titan-embed-text" in model:
        return Titan(model)
    if "cohere.embed" in model:
        return Cohere(model)
    raise unsupported(PROVIDER, "model", f"{model!r}: Bedrock embeddings support Titan Text and Cohere Embed models")


def _invoke(invoke: Invoke, model: str, payload: dict[str, Any], user: str | None) -> tuple[dict[str, Any], int | None]:
    """One InvokeModel call, in a worker thread: the decoded body and the token count Bedrock's header gave."""
    kwargs: dict[str, Any] = {"modelId": model, "body": json.dumps(payload), "contentType": "application/json",
                              "accept": "application/json"}
    if user is not None:
        kwargs["requestMetadata"] = {"user": user}
    resp = invoke(kwargs)
    data = json.loads(resp["body"].read())
    if not isinstance(data, dict):
        raise TypeError("expected a JSON object")
    headers = (resp.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}
    count = headers.get(TOKEN_HEADER)
    return data, int(count) if count is not None else None


def _tokens(reported: int | None, texts: list[str], model: str) -> int:
    if reported is not None:
        return reported
    log.warning("bedrock reported no input tokens for embedding model %s; estimating", model)
    return sum(estimate_tokens(t) for t in texts)


def _vector(value: object) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
        raise TypeError("an embedding must be a list of numbers")
    return [float(x) for x in value]


async def _titan(
    invoke: Invoke, fam: Titan, req: EmbeddingRequest, texts: list[str]
) -> tuple[list[list[float]], int]:
    vectors: list[list[float]] = [[] for _ in texts]
    tokens = [0] * len(texts)
    limiter = anyio.CapacityLimiter(TITAN_CONCURRENCY)
    user = req.params.get("user")

    failures: list[Exception] = []

    async def one(i: int, group: anyio.abc.TaskGroup) -> None:
        try:
            call = functools.partial(_invoke, invoke, fam.model, fam.body(texts[i], req), user)
            data, header = await anyio.to_thread.run_sync(call, limiter=limiter)
            vectors[i] = _vector(data["embedding"])
            count = data.get("inputTextTokenCount")
            tokens[i] = _tokens(as_int(count) if count is not None else header, [texts[i]], fam.model)
        except Exception as exc:  # raised below as itself (not in an ExceptionGroup), so callers can map it
            failures.append(exc)
            group.cancel_scope.cancel()  # start no further calls

    async with anyio.create_task_group() as group:
        for i in range(len(texts)):
            group.start_soon(one, i, group)
    if failures:
        raise failures[0]
    return vectors, sum(tokens)


async def _cohere(
    invoke: Invoke, fam: Cohere, req: EmbeddingRequest, texts: list[str]
) -> tuple[list[list[float]], int]:
    vectors: list[list[float]] = []
    total = 0
    for start in range(0, len(texts), COHERE_BATCH):
        batch = texts[start : start + COHERE_BATCH]
        call = functools.partial(_invoke, invoke, fam.model, fam.body(batch, req), req.params.get("user"))
        data, header = await anyio.to_thread.run_sync(call)
        found = data["embeddings"]
        found = found["float"] if isinstance(found, dict) else found  # by type when embedding_types was given
        if not isinstance(found, list) or len(found) != len(batch):
            raise TypeError("one embedding per text expected")
        vectors.extend(_vector(v) for v in found)
        total += _tokens(header, batch, fam.model)
    return vectors, total


async def embed(req: EmbeddingRequest, invoke: Invoke) -> EmbeddingResult:
    fam = family(req.model)
    texts = req.texts
    if texts is None:
        raise unsupported(PROVIDER, "input", "token ids; send text")
    fam.check(req)
    if isinstance(fam, Titan):
        vectors, tokens = await _titan(invoke, fam, req, texts)
    else:
        vectors, tokens = await _cohere(invoke, fam, req, texts)
    return EmbeddingResult(model=req.model, embeddings=vectors, usage=Usage(input_tokens=tokens, output_tokens=0))
