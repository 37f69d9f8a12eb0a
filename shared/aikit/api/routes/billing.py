"""POST /v1/billing/checkout and /v1/billing/portal, for an API key's user or (admin token) a named user."""

from __future__ import annotations

import hmac
from functools import partial

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, EmailStr

from aikit.api.builtin_route import BuiltinRoute
from aikit.api.deps import RuntimeDep, bearer_token, current_key
from aikit.billing import open_portal, start_checkout, user_id_for_email
from aikit.errors import ApiError
from aikit.runtime import Runtime

router = APIRouter(prefix="/v1/billing", route_class=BuiltinRoute)


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
        return await anyio.to_thread.run_sync(user_id_for_email, runtime.engine, str(email))
    if email is not None:
        raise ApiError(400, "email: only accepted with the admin token", code="invalid_value", param="email")
    key = await current_key(request, runtime)
    return key.user_id


# What these raise (aikit.errors: UnknownUser 404, NoCustomer and AlreadySubscribed 409, BillingUnavailable 503,
# a failed Stripe call 502 naming only its step) propagates: the app answers it from what it carries.


@router.post("/checkout", response_model=None)
async def checkout(request: Request, runtime: RuntimeDep, body: BillingBody | None = None) -> dict[str, object]:
    user_id = await caller_user_id(request, runtime, body)
    work = partial(start_checkout, runtime.engine, runtime.settings, runtime.billing, user_id)
    session, customer_created = await anyio.to_thread.run_sync(work)
    if customer_created:
        runtime.keys.clear()  # cached key lookups carry the customer id
    return {"url": session.url, "id": session.id}


@router.post("/portal")
async def portal(request: Request, runtime: RuntimeDep, body: BillingBody | None = None) -> dict[str, object]:
    user_id = await caller_user_id(request, runtime, body)
    work = partial(open_portal, runtime.engine, runtime.settings, runtime.billing, user_id)
    return {"url": await anyio.to_thread.run_sync(work)}
