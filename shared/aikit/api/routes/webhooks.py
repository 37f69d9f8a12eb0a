"""POST /v1/webhooks/stripe: the raw body goes to aikit.webhooks; this file only maps results to HTTP.

Both kinds of Stripe delivery come here: snapshot events of a webhook endpoint (STRIPE_WEBHOOK_SECRET) and thin
events of an event destination (STRIPE_EVENT_DESTINATION_SECRET), such as meter-event error reports."""

from __future__ import annotations

import re
from functools import partial

import anyio
from fastapi import APIRouter, FastAPI, Request

from aikit.api.body_limit import BodyLimitMiddleware
from aikit.api.deps import RuntimeDep
from aikit.api.errors import ApiError, install_error_handlers
from aikit.observability import logger
from aikit.runtime import Runtime, get_runtime
from aikit.webhooks import (
    MAX_BODY_BYTES,
    Outcome,
    WebhookFailed,
    WebhookRejected,
    WebhooksNotConfigured,
    handle_webhook,
)

router = APIRouter()
_MISSING_SETTING = re.compile(r"\b[A-Z][A-Z_]{3,} is not set\b")

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
    try:
        result = await anyio.to_thread.run_sync(work)
    except WebhooksNotConfigured as exc:
        raise ApiError(503, str(exc), code="webhooks_not_configured") from None
    except WebhookRejected as exc:
        raise ApiError(exc.status, exc.reason, code=f"webhook_{exc.kind}") from None
    except WebhookFailed as exc:
        # 5xx makes Stripe deliver the event again later; nothing of it was kept. What Stripe or the database
        # said is for the logs: the answer shows in Stripe's dashboard.
        logger.warning("webhook_failed", extra={"reason": str(exc)})
        missing = _MISSING_SETTING.search(str(exc))  # our own configuration: the operator can act on it
        message = "the event could not be applied now; Stripe will retry" + (f" ({missing[0]})" if missing else "")
        raise ApiError(500, message, code="webhook_failed") from None
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
