"""Request dependencies: the runtime, the caller's key and billing state, the admin token."""

from __future__ import annotations

import hmac
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Request

from aikit.access import Access
from aikit.api.errors import REQUEST_ID_SCOPE_KEY
from aikit.errors import ApiError
from aikit.keys import _PREFIX_LEN, KEY_PREFIX, KeyInfo
from aikit.llm import BoundLLM
from aikit.llm.admission import MeteredRequest
from aikit.llm.context import RequestScope, current_request
from aikit.runtime import Runtime


def get_runtime_dep(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime_dep)]


def too_many_failures() -> ApiError:
    return ApiError(429, "too many invalid API keys from this address; try again in a minute",
                    code="too_many_auth_failures", headers={"Retry-After": "60"})


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    return token


def key_prefix(token: str) -> str | None:
    """The displayed prefix a guess claims (ak_ + 8 characters), counted on its own: guessing the secret of
    one known prefix from many addresses is slowed too."""
    return token[:_PREFIX_LEN] if token.startswith(KEY_PREFIX) and len(token) > _PREFIX_LEN else None


async def verified_key(request: Request, runtime: Runtime, token: str | None = None) -> KeyInfo:
    """The caller's key (`token`, else the bearer token): valid and not revoked (401). A valid key is never
    refused for what others sent from its address (a shared NAT or proxy): the guard only turns the 401 of an
    unknown key into a 429 once its address or its prefix has failed too often this minute."""
    token = bearer_token(request) if token is None else token
    info: KeyInfo | None = None
    if len(token) <= 200:
        found, info = runtime.keys.cached(token)
        if not found:
            info = await anyio.to_thread.run_sync(runtime.keys.lookup, token)
    if info is None:
        if await runtime.auth_guard.failed(client_address(request), key_prefix(token)):
            raise too_many_failures()
        raise ApiError(401, "invalid API key", code="invalid_api_key")
    if not info.active:
        raise ApiError(401, "API key has been revoked", code="revoked_api_key")
    return info


async def current_key(request: Request, runtime: RuntimeDep) -> KeyInfo:
    """The caller's key, whatever its billing state (its own usage stays readable after a subscription ends)."""
    return await verified_key(request, runtime)


KeyDep = Annotated[KeyInfo, Depends(current_key)]


async def authenticate(request: Request) -> MeteredRequest:
    """The one auth-and-admission step of a metered route: a valid key (401/429) whose customer may use the
    API now (402), and the request's billing state, which the route's metered LLM calls are admitted and
    metered through. No Redis or database round trip on a warm key: limits are checked with the first call."""
    return await billed_request(request, bearer_token(request))


async def billed_request(request: Request, token: str) -> MeteredRequest:
    """`authenticate` with the key taken from wherever the route's clients send it (Anthropic's x-api-key)."""
    runtime: Runtime = request.app.state.runtime
    key = await verified_key(request, runtime, token)
    if key.access is Access.NONE:
        raise ApiError(402, f"payment required: {key.access_reason}", code="subscription_inactive")
    # The request's id (api.body_limit) is its billing id too: one id in the logs, the headers and the usage.
    billing = MeteredRequest(key, runtime.limiter, runtime.llm, runtime.settings.quota_reserve_tokens,
                             request_id=request.scope.get(REQUEST_ID_SCOPE_KEY),
                             price_book=runtime.settings.price_book)
    scope = current_request.get()
    if scope is None:  # an app built without create_app's middleware
        scope = RequestScope(runtime)
        current_request.set(scope)
    scope.gate = billing
    return billing


BilledDep = Annotated[MeteredRequest, Depends(authenticate)]


async def metered_llm(billing: BilledDep) -> BoundLLM:
    return billing.llm


# A route parameter `llm: MeteredLLM` gets an LLM whose calls meter to the caller's key, within its limits.
MeteredLLM = Annotated[BoundLLM, Depends(metered_llm)]

PUBLIC_ATTRIBUTE = "aikit_public"


def public(router: APIRouter) -> APIRouter:
    """Opt a router out of the API-key check that mounting applies to every route (health checks, webhooks).
    A metered LLM call made in one of its routes still needs a valid key: it authenticates on first use."""
    setattr(router, PUBLIC_ATTRIBUTE, True)
    return router


def is_public(router: APIRouter) -> bool:
    return bool(getattr(router, PUBLIC_ATTRIBUTE, False))


async def require_admin(request: Request, runtime: RuntimeDep) -> None:
    """The admin token (401); wrong tokens from one address beyond ADMIN_FAILURES_PER_MINUTE a minute are 429s
    (the right token still passes: the guard only counts failures)."""
    expected = runtime.settings.admin_token
    if not expected:
        raise ApiError(403, "admin API is disabled: set ADMIN_TOKEN", code="admin_disabled")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode()):
        return
    if await runtime.admin_guard.failed(client_address(request)):
        raise ApiError(429, "too many invalid admin tokens from this address; try again in a minute",
                       code="too_many_auth_failures", headers={"Retry-After": "60"})
    raise ApiError(401, "invalid admin token", code="invalid_admin_token")


AdminDep = Annotated[None, Depends(require_admin)]
