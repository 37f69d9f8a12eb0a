"""The per-request scope of the LLM layer, as ASGI middleware: every HTTP request gets a fresh `RequestScope`
(so billing state never leaks between requests, whatever runs the app), its billed responses carry
X-Request-Id and the rate-limit headers of their latest admission, and a billed request that made no
metered call is counted against requests per minute/day once it is answered."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aikit.llm.admission import MeteredRequest
from aikit.llm.context import CallGate, RequestScope, current_request
from aikit.runtime import Runtime


def add_missing_headers(message: Message, headers: Iterable[tuple[str, str]]) -> None:
    """Each of `headers` on an http.response.start message unless the response has it already (what
    MutableHeaders.setdefault does, without its scan of the list per header: this runs per request)."""
    present_headers: list[tuple[bytes, bytes]] = list(message.get("headers", ()))
    message["headers"] = present_headers
    present = {name.lower() for name, _ in present_headers}
    for name, value in headers:
        key = name.lower().encode("latin-1")
        if key not in present:
            present.add(key)
            present_headers.append((key, value.encode("latin-1")))


class RequestScopeMiddleware:
    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def authenticate() -> CallGate:
            from aikit.api.deps import authenticate

            return await authenticate(Request(scope, receive))

        request_scope = RequestScope(self.runtime, authenticate)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and isinstance(request_scope.gate, MeteredRequest):
                gate = request_scope.gate  # X-Request-Id and the latest admission's rate-limit headers
                add_missing_headers(message, (("x-request-id", gate.request_id), *gate.headers.items()))
            await send(message)

        token = current_request.set(request_scope)
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            current_request.reset(token)
            if isinstance(request_scope.gate, MeteredRequest):
                await request_scope.gate.finish()
