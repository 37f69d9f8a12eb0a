"""POST /v1/webhooks/stripe: the raw body goes to aikit.webhooks; this file only maps results to HTTP.

Both kinds of Stripe delivery come here: snapshot events of a webhook endpoint (STRIPE_WEBHOOK_SECRET) and thin
events of an event destination (STRIPE_EVENT_DESTINATION_SECRET), such as meter-event error reports."""

from __future__ import annotations

from functools import partial

import anyio
from fastapi import APIRouter, FastAPI, Request

from aikit.api.body_limit import BodyLimitMiddleware
from aikit.api.builtin_route import BuiltinRoute
from aikit.api.deps import RuntimeDep
from aikit.api.errors import install_error_handlers
from aikit.runtime import Runtime, get_runtime
from aikit.webhooks import MAX_BODY_BYTES, Outcome, handle_webhook

router = APIRouter(route_class=BuiltinRoute)


async def read_at_most(request: Request, limit: int) -> bytes:
    """The raw body, but no more than `limit` bytes of it (a longer one is refused as too large anyway)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


@router.post("/v1/webhooks/stripe")
async def stripe_webhook(request: Request, runtime: RuntimeDep) -> dict[str, object]:
    raw = await read_at_most(request, MAX_BODY_BYTES + 1)
    work = partial(
        handle_webhook,
        raw,
        request.headers.get("stripe-signature"),
        settings=runtime.settings,
        engine=runtime.engine,
        mailer=runtime.mailer,
        gateway=runtime.billing,
    )
    # Not configured (503), not a verified event (4xx) or not applied now (500: Stripe delivers it again)
    # propagate: the app answers each from what it carries (aikit.errors).
    result = await anyio.to_thread.run_sync(work)
    if result.outcome is Outcome.APPLIED:
        # This process sees the new access state at once; other instances within KEY_CACHE_TTL_SECONDS.
        runtime.keys.clear()
    return {"received": True, "id": result.event.id, "type": result.event.type,
            "outcome": result.outcome.value}


def create_webhook_app(runtime: Runtime | None = None) -> FastAPI:
    """An app with only the webhook route (the webhook Lambda)."""
    app = FastAPI(title="aikit webhooks", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = runtime or get_runtime()
    install_error_handlers(app)
    app.include_router(router)
    settings = app.state.runtime.settings
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_request_body_bytes,
                       body_timeout=settings.body_read_timeout_seconds,
                       send_stall_timeout=settings.send_stall_timeout_seconds)
    return app
