"""The hot route's own request handler: `BilledRoute` is FastAPI's route class for an endpoint
`(body: SomeModel, billing: BilledDep) -> Response` (declared, documented and routed as any FastAPI route), whose
request is handled in three plain steps instead of FastAPI's general dependency solver:

1. the JSON body, read and decoded by FastAPI's rules (a JSON content type, or none: 422 `json_invalid`);
2. `authenticate` (401/402/429), which FastAPI would run as the endpoint's one dependency before the body model;
3. the body model, validated by FastAPI's own function (the same 422 errors, in the same shape).

The answers, their order and the OpenAPI schema are FastAPI's; what goes is the solver's per-request work for a
route whose dependencies are known in advance (issue 16: a tenth of the CPU time per request). The route
refuses, when it is built, an endpoint whose parameters are not exactly a body model and `BilledDep`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi._compat import Undefined
from fastapi.dependencies.utils import request_body_to_args
from fastapi.exceptions import RequestValidationError

from aikit.api.builtin_route import BuiltinRoute
from aikit.api.deps import authenticate
from aikit.llm.admission import MeteredRequest

BilledEndpoint = Callable[[Any, MeteredRequest], Awaitable[Response]]


def is_json(content_type: str | None) -> bool:
    """FastAPI's test of a body to decode as JSON (email.message's reading of the media type, without building
    a Message per request): application/json or application/*+json; no Content-Type is not JSON (FastAPI's
    strict content type)."""
    if not content_type:
        return False
    media = content_type.partition(";")[0].strip().lower()
    if media.count("/") != 1:
        return False  # email.message reads a malformed type as text/plain
    maintype, _, subtype = media.partition("/")
    return maintype == "application" and (subtype == "json" or subtype.endswith("+json"))


async def json_body(request: Request) -> Any:
    """The body as FastAPI hands it to validation: decoded JSON, the raw bytes when not JSON, or Undefined
    when empty."""
    raw = await request.body()
    if not raw:
        return Undefined
    if not is_json(request.headers.get("content-type")):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "input": {},
              "ctx": {"error": exc.msg}}], body=exc.doc) from exc
    except Exception as exc:  # not text in any JSON encoding: what FastAPI answers
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from exc


class BilledRoute(BuiltinRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        dependencies = [d.call for d in self.dependant.dependencies]
        parameters = len(inspect.signature(self.endpoint).parameters)
        if (self.body_field is None or dependencies != [authenticate] or len(self.dependant.body_params) != 1
                or parameters != 2):
            raise TypeError(f"{self.path}: a BilledRoute's endpoint takes one body model and BilledDep, "
                            f"nothing else")
        body_fields = [self.body_field]
        name = self.body_field.name
        endpoint: BilledEndpoint = self.endpoint

        async def handle(request: Request) -> Response:
            body = await json_body(request)
            billing = await authenticate(request)
            values, errors = await request_body_to_args(body_fields, body, embed_body_fields=False)
            if errors:
                raise RequestValidationError(errors, body=None if body is Undefined else body)
            return await endpoint(values[name], billing)

        return handle
