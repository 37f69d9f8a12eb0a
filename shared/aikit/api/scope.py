"""The per-request scope of the LLM layer, as ASGI middleware: every HTTP request gets a fresh `RequestScope`
(so billing state never leaks between requests, whatever runs the app), its billed responses carry the
rate-limit headers of their latest admission, and a billed request that made no metered call is counted
against requests per minute/day once it is answered.

This middleware does not wrap `send`: it leaves the request's extra response headers under
RESPONSE_HEADERS_SCOPE_KEY, and the one response-start rewrite of the request (api.body_limit, which adds
X-Request-Id) adds them in the same pass (issue 16: one send wrapper and one header scan per response)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aikit.llm.admission import MeteredRequest
from aikit.llm.context import CallGate, RequestScope, current_request
from aikit.runtime import Runtime

# Where a request's extra response headers are found in its ASGI scope: a callable returning them as
# (lowercase name, value) byte pairs, asked when the response starts (the latest admission's, by then).
RESPONSE_HEADERS_SCOPE_KEY = "aikit.response_headers"
ResponseHeaders = Callable[[], Iterable[tuple[bytes, bytes]]]


def add_missing_headers(message: Message, headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Each of `headers` (lowercase names) on an http.response.start message unless the response has it
    already (what MutableHeaders.setdefault does, without its scan of the list per header: this runs per
    request)."""
    present_headers: list[tuple[bytes, bytes]] = list(message.get("headers", ()))
    message["headers"] = present_headers
    present = {name.lower() for name, _ in present_headers}
    for name, value in headers:
        if name not in present:
            present.add(name)
            present_headers.append((name, value))


def rate_limit_headers(request_scope: RequestScope) -> list[tuple[bytes, bytes]]:
    """The rate-limit headers of the request's latest admitted call (none before its first)."""
    gate = request_scope.gate
    if not isinstance(gate, MeteredRequest):
        return []
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in gate.headers.items()]


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
        scope[RESPONSE_HEADERS_SCOPE_KEY] = partial(rate_limit_headers, request_scope)
        token = current_request.set(request_scope)
        try:
            await self.app(scope, receive, send)
        finally:
            # The response has been sent. The entry refers back to the scope (through `authenticate`): a cycle
            # left for the garbage collector would cost every request more than the rest of this module.
            del scope[RESPONSE_HEADERS_SCOPE_KEY]
            current_request.reset(token)
            if isinstance(request_scope.gate, MeteredRequest):
                await request_scope.gate.finish()
