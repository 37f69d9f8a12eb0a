"""POST /v1/messages: Anthropic's Messages API, so Anthropic SDKs and tools work unchanged.

The request (Anthropic's shape, the key in `x-api-key` or as a bearer token) is read into ours and sent to the
configured provider: to Anthropic it goes out as the body sent, to the others translated (what they cannot
express answers 422 naming the field). Metered and limited like /v1/chat/completions; the usage the client is
told is the one metered, as Anthropic bills it (uncached input beside cache reads and cache writes). Errors on
this route, the request's validation and auth included, come in Anthropic's error shape.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from aikit.api.anthropic_format import MessagesRequest, MessageStream, error_json, message_json
from aikit.api.builtin_route import BuiltinRoute
from aikit.api.deps import bearer_token, billed_request
from aikit.api.streaming import AnthropicEvents, respond
from aikit.errors import ApiError
from aikit.llm.admission import MeteredRequest


def _handler_for(app: FastAPI, exc: Exception) -> Callable[[Request, Any], Response | Awaitable[Response]] | None:
    for kind in type(exc).__mro__:
        if kind in app.exception_handlers:
            return app.exception_handlers[kind]
    return None


async def anthropic_error(request: Request, exc: Exception) -> Response:
    """The app's answer to `exc` (the OpenAI error shape), in Anthropic's: same status, message and headers."""
    handler = _handler_for(request.app, exc)
    if handler is None:
        raise exc
    answer = handler(request, exc)
    if inspect.isawaitable(answer):
        answer = await answer
    try:
        message = str(json.loads(bytes(answer.body))["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = "request failed"
    headers = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "content-type")}
    return JSONResponse(error_json(answer.status_code, message), answer.status_code, headers=headers)


class AnthropicErrors(BuiltinRoute):
    """A route whose errors, from validation, auth, limits or the provider, take Anthropic's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await handle(request)
            except Exception as exc:
                return await anthropic_error(request, exc)

        return handler


async def anthropic_key(request: Request) -> MeteredRequest:
    """The aikit key as Anthropic's clients send it: `x-api-key`, or `Authorization: Bearer` (auth_token=)."""
    token = request.headers.get("x-api-key", "").strip()
    if not token and not request.headers.get("authorization"):
        raise ApiError(401, "missing API key: send 'x-api-key: <key>' or 'Authorization: Bearer <key>'",
                       code="missing_api_key")
    return await billed_request(request, token or bearer_token(request))


router = APIRouter(route_class=AnthropicErrors)


@router.post("/v1/messages", response_model=None)
async def messages(body: MessagesRequest,
                   billing: Annotated[MeteredRequest, Depends(anthropic_key)]) -> JSONResponse | StreamingResponse:
    llm = billing.llm
    req = body.chat_request(llm.provider.name)
    kwargs: dict[str, Any] = {"messages": req.messages, "model": req.model, "max_tokens": req.max_tokens,
                              **req.params}
    message_id = "msg_" + billing.request_id.removeprefix("req_")
    if not body.stream:
        return JSONResponse(message_json(message_id, await llm.chat(**kwargs)))
    return await respond(llm.stream(**kwargs), AnthropicEvents(MessageStream(message_id, body.model)))
