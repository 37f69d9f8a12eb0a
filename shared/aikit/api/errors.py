"""Errors in the OpenAI error shape, naming what is wrong; never a stack trace."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from aikit.errors import INTERNAL_ERROR_MESSAGE, UNHANDLED_ERROR_EVENT, AikitError
from aikit.observability import logger

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
}


# The id of the request being answered (set by api.body_limit for every HTTP request; a billed request's
# usage events carry the same id), so support can find the request's log lines from what a client reports.
REQUEST_ID_SCOPE_KEY = "aikit.request_id"
request_id_var: ContextVar[str | None] = ContextVar("aikit_request_id", default=None)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None,
               details: Mapping[str, object] | None = None) -> dict[str, Any]:
    """OpenAI's error object (`type` follows the status), the request id, then any `details` of the error."""
    error: dict[str, Any] = {"message": message, "type": ERROR_TYPES.get(status, "api_error"), "param": param,
                             "code": code}
    request_id = request_id_var.get()
    if request_id is not None:
        error["request_id"] = request_id
    error.update(details or {})
    return {"error": error}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None,
                   details: Mapping[str, object] | None = None) -> JSONResponse:
    """An error answer carrying the request id in its body and its X-Request-Id header."""
    body = error_body(status, message, code, param, details)
    request_id = body["error"].get("request_id")
    all_headers = {**({"X-Request-Id": request_id} if request_id else {}), **(headers or {})}
    return JSONResponse(body, status, headers=all_headers)


def field_path(loc: Sequence[Any], body: Any, error_type: str = "", field: object = None) -> str:
    """The field an error is about, in the client's notation (`messages[0].content[1].image_url`).

    Pydantic's location mixes the client's keys and indices with names of our own (union branches,
    validators); walking it along the body the client sent keeps only the client's part.
    """
    if loc and loc[0] in ("query", "path", "header", "cookie"):  # a parameter, named as the client named it
        return ".".join(str(p) for p in loc[1:]) or str(loc[0])
    path = ""
    value = body
    steps = list(loc[1:] if loc and loc[0] == "body" else loc)
    for i, step in enumerate(steps):
        path, value = _walk(path, value, step, missing=error_type == "missing" and i == len(steps) - 1)
    if isinstance(field, str):  # an error about a field of the object at its location
        path = _join(path, field)
    return path or "body"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _walk(path: str, value: Any, step: Any, *, missing: bool) -> tuple[str, Any]:
    """One step of a pydantic location along the client's body. `missing`: the last step of a missing field."""
    if isinstance(step, int) and isinstance(value, list) and 0 <= step < len(value):
        return f"{path}[{step}]", value[step]
    if isinstance(step, str) and isinstance(value, dict) and step in value:
        return _join(path, step), value[step]
    if isinstance(step, str) and missing:
        return _join(path, step), None
    return path, value  # a branch or a validator of ours, not a field of the client's JSON


def validation_message(exc: RequestValidationError) -> tuple[str, str]:
    return describe_errors(exc.errors(), exc.body)


def describe_errors(errors: Sequence[Any], body: Any) -> tuple[str, str]:
    """(message, field) of the first of pydantic's errors about `body` (the JSON the client sent): the field in
    the client's notation, the message without names of our own."""
    if not errors:
        return "invalid request", "body"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", "body"
    kind = str(first.get("type", ""))
    context = first.get("ctx") or {}
    msg = str(first.get("msg", "invalid value"))
    # Our own error types may name the field they are about: "<kind>:<field>" (see api.schemas.one_of).
    about: str | None = kind.partition(":")[2] or None
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # a union picked by a field (role, type)
        about = str(context.get("discriminator", "")).strip("'") or None
        tags = str(context.get("expected_tags", "")).replace("'", "")
        msg = f"must be one of {tags}" if kind == "union_tag_invalid" and tags else "Field required"
    field = field_path(first.get("loc", ()), body, kind, about)
    return f"{field}: {msg}", field


def sqlstate(exc: DBAPIError) -> str:
    """The Postgres SQLSTATE of a driver error; '' when there is none (no connection, SQLite)."""
    detail = exc.orig.args[0] if exc.orig is not None and exc.orig.args else None
    return str(detail.get("C", "")) if isinstance(detail, dict) else ""


def aikit_error_response(exc: AikitError, path: str) -> JSONResponse:
    """The answer to any of aikit's errors, from what the error carries (see aikit.errors)."""
    if exc.log_event == UNHANDLED_ERROR_EVENT:
        logger.exception(UNHANDLED_ERROR_EVENT, extra={"path": path})
    elif exc.log_event is not None:  # what Stripe or the database said: for the operator, not the client
        logger.warning(exc.log_event, extra={"error": str(exc)})
    return error_response(exc.status, exc.client_message(), exc.code, exc.param, exc.headers(), exc.details())


def install_error_handlers(app: FastAPI) -> None:
    """aikit's errors rendered from what they carry; foreign ones (validation, HTTP, database, connection,
    anything else) in the same shape."""

    @app.exception_handler(AikitError)
    async def _aikit_error(request: Request, exc: AikitError) -> JSONResponse:
        return aikit_error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = validation_message(exc)
        return error_response(422, message, "invalid_value", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: DBAPIError) -> JSONResponse:
        state = sqlstate(exc)
        if state.startswith("22"):  # data exception: a NUL character, a string too long, a number too big
            message = "a value in the request cannot be stored: too long, out of range or holding a NUL character"
            return error_response(422, message, "invalid_value")
        if isinstance(exc, (OperationalError, InterfaceError)) or state.startswith(("08", "57P", "3D000")):
            # No connection, the server starting or stopping, or the database missing: a retry may do.
            logger.warning("database_unavailable", extra={"path": request.url.path, "sqlstate": state})
            return error_response(503, "the database is unavailable, retry shortly", "database_unavailable",
                                  headers={"Retry-After": "5"})
        logger.exception(UNHANDLED_ERROR_EVENT, extra={"path": request.url.path})
        return error_response(500, INTERNAL_ERROR_MESSAGE)

    @app.exception_handler(ConnectionError)
    async def _connection(request: Request, exc: ConnectionError) -> JSONResponse:
        # A backend connection broke below the driver's own error types (e.g. reset while connecting).
        logger.warning("backend_connection_error", extra={"path": request.url.path, "error": type(exc).__name__})
        return error_response(503, "a backend is unavailable, retry shortly", "backend_unavailable",
                              headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception(UNHANDLED_ERROR_EVENT, extra={"path": request.url.path})
        return error_response(500, INTERNAL_ERROR_MESSAGE)
