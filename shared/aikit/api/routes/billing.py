"""POST /v1/billing/checkout and /v1/billing/portal, for an API key's user or (admin token) a named user."""

from __future__ import annotations

import hmac
import re
from functools import partial

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, EmailStr

from aikit.api.deps import RuntimeDep, bearer_token, current_key
from aikit.api.errors import ApiError, error_body
from aikit.billing import (
    AlreadySubscribed,
    BillingUnavailable,
    NoCustomer,
    StripeFailed,
    UnknownUser,
    open_portal,
    start_checkout,
    user_id_for_email,
)
from aikit.observability import logger
from aikit.runtime import Runtime

router = APIRouter(prefix="/v1/billing")


class BillingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: EmailStr | None = None  # admin token only: the user to act for


async def caller_user_id(request: Request, runtime: Runtime, body: BillingBody | None) -> str:
    """The admin token acts for body.email; an API key (revoked: 401) for its own user, billed or not."""
    token = bearer_token(request)
    email = body.email if body is not None else None
    admin = runtime.settings.admin_token
    if admin and hmac.compare_digest(token.encode(), admin.encode()):
        if email is None:
            raise ApiError(400, "email: required with the admin token", code="invalid_value", param="email")
        try:
            return await anyio.to_thread.run_sync(user_id_for_email, runtime.engine, str(email))
        except UnknownUser as exc:
            raise ApiError(404, str(exc), code="not_found") from None
    if email is not None:
        raise ApiError(400, "email: only accepted with the admin token", code="invalid_value", param="email")
    key = await current_key(request, runtime)
    return key.user_id


# "Stripe <step> failed: <what Stripe or the network said>" (stripe_gateway.BillingError): the step only.
_STRIPE_STEP = re.compile(r"Stripe ([a-z ]{1,40}) failed")


def _billing_error(exc: Exception) -> ApiError:
    if isinstance(exc, BillingUnavailable):
        return ApiError(503, str(exc), code="billing_not_configured")
    if isinstance(exc, UnknownUser):
        return ApiError(404, str(exc), code="not_found")
    if isinstance(exc, NoCustomer):
        return ApiError(409, str(exc), code="no_customer")
    # What Stripe or the network said (connection errors, Stripe's own messages) is for the operator's logs;
    # the client can only retry, with the request id to quote.
    logger.warning("stripe_failed", extra={"error": str(exc)})
    step = _STRIPE_STEP.match(str(exc))
    return ApiError(502, f"Stripe {step.group(1) if step else 'request'} failed; retry shortly",
                    code="stripe_error", headers={"Retry-After": "5"})


_ERRORS = (BillingUnavailable, UnknownUser, NoCustomer, StripeFailed)


@router.post("/checkout", response_model=None)
async def checkout(
    request: Request, runtime: RuntimeDep, body: BillingBody | None = None
) -> dict[str, object] | JSONResponse:
    user_id = await caller_user_id(request, runtime, body)
    work = partial(start_checkout, runtime.engine, runtime.settings, runtime.billing, user_id)
    try:
        session, customer_created = await anyio.to_thread.run_sync(work)
    except AlreadySubscribed as exc:
        # 409 in the usual error shape, plus the portal link where a client can find it without parsing.
        content = error_body(409, str(exc), "already_subscribed")
        content["error"]["portal_url"] = exc.portal_url
        return JSONResponse(content, 409)
    except _ERRORS as exc:
        raise _billing_error(exc) from None
    if customer_created:
        runtime.keys.clear()  # cached key lookups carry the customer id
    return {"url": session.url, "id": session.id}


@router.post("/portal")
async def portal(request: Request, runtime: RuntimeDep, body: BillingBody | None = None) -> dict[str, object]:
    user_id = await caller_user_id(request, runtime, body)
    work = partial(open_portal, runtime.engine, runtime.settings, runtime.billing, user_id)
    try:
        url = await anyio.to_thread.run_sync(work)
    except _ERRORS as exc:
        raise _billing_error(exc) from None
    return {"url": url}
