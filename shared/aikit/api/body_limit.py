"""Hostile-traffic limits of every request, as pure ASGI middleware (the outermost of the app's own, so the same
code runs under `aikit serve`, Lambda Web Adapter and Mangum):

- the body is read here, counted while it arrives, before anything parses it and before auth: more than
  MAX_REQUEST_BODY_BYTES is a 413 (a Content-Length above it is refused without reading a byte), a body not
  complete within BODY_READ_TIMEOUT_SECONDS a 408;
- every request gets its id (X-Request-Id, and `error.request_id` in error bodies); its response start also
  gets the headers the app left under RESPONSE_HEADERS_SCOPE_KEY (api.scope: the rate-limit headers);
- a response the client stops reading for SEND_STALL_TIMEOUT_SECONDS is abandoned (its stream is cancelled and
  metered for what it produced), so a reader that never reads cannot hold a stream open.

The body is handed on as one message; later `receive()` calls go to the server, so a streaming response still
hears the client's disconnect.
"""

from __future__ import annotations

import asyncio
import json

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aikit.api.errors import REQUEST_ID_SCOPE_KEY, error_body, request_id_var
from aikit.api.scope import RESPONSE_HEADERS_SCOPE_KEY, ResponseHeaders, add_missing_headers
from aikit.deadlines import within
from aikit.errors import ApiError
from aikit.metering.base import new_request_id
from aikit.observability import logger


def declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, body_timeout: float, send_stall_timeout: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.send_stall_timeout = send_stall_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        # Not reset afterwards on purpose: the app's last-resort 500 handler runs outside this middleware and
        # still names the request; every request runs in a context of its own.
        request_id_var.set(request_id)
        stalled = asyncio.Event()
        send = self._guarded_send(send, scope, request_id, stalled)
        try:
            message = await self._read_body(scope, receive)
        except ApiError as exc:
            await self._refuse(send, exc)
            return
        if message is None:  # the client went away while sending
            return
        await self.app(scope, self._replay(message, receive, stalled), send)

    async def _read_body(self, scope: Scope, receive: Receive) -> Message | None:
        length = declared_length(scope)
        if length is not None and length > self.max_body_bytes:
            raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        try:
            with within(self.body_timeout) as waited:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise self._too_large()
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        except TimeoutError:
            if not waited.expired():
                raise
        raise ApiError(408, f"the request body did not arrive within {self.body_timeout:g}s", code="request_timeout")

    def _too_large(self) -> ApiError:
        return ApiError(413, f"request body is larger than {self.max_body_bytes} bytes (MAX_REQUEST_BODY_BYTES)",
                        code="request_too_large")

    @staticmethod
    def _replay(message: Message, receive: Receive, stalled: asyncio.Event) -> Receive:
        """The body once; then what the server says, or a disconnect once the client stopped reading."""
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return message
            got: Message = {"type": "http.disconnect"}
            async with anyio.create_task_group() as tg:

                async def from_server() -> None:
                    nonlocal got
                    got = await receive()
                    tg.cancel_scope.cancel()

                async def on_stall() -> None:
                    await stalled.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(from_server)
                tg.start_soon(on_stall)
            return got

        return replay

    def _guarded_send(self, send: Send, scope: Scope, request_id: str, stalled: asyncio.Event) -> Send:
        id_header = (b"x-request-id", request_id.encode("latin-1"))

        async def guarded(message: Message) -> None:
            if stalled.is_set():
                return  # the client stopped reading: the rest of the response goes nowhere
            if message["type"] == "http.response.start":
                more: ResponseHeaders | None = scope.get(RESPONSE_HEADERS_SCOPE_KEY)
                add_missing_headers(message, (id_header, *more()) if more is not None else (id_header,))
            try:
                with within(self.send_stall_timeout) as waited:
                    await send(message)
            except TimeoutError:
                if not waited.expired():
                    raise
            if waited.expired():
                # Told as a disconnect (see _replay): a streaming response cancels its stream as it does for a
                # client that hung up, so the stream stops at its next step and is metered for what it made.
                # The server closes the connection: the response was never completed.
                logger.warning("client_stalled", extra={"request_id": request_id})
                stalled.set()

        return guarded

    @staticmethod
    async def _refuse(send: Send, exc: ApiError) -> None:
        body = json.dumps(error_body(exc.status, exc.client_message(), exc.code)).encode()
        # The rest of the body is never read: the connection cannot carry another request.
        await send({"type": "http.response.start", "status": exc.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})
