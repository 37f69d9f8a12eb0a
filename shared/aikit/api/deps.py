"""Request dependencies: the runtime, the caller's key, the admin token."""

from __future__ import annotations

import hmac
from typing import Annotated

import anyio
from fastapi import Depends, Request

from aikit.access import Access
from aikit.api.errors import ApiError
from aikit.keys import KeyInfo
from aikit.runtime import Runtime


def get_runtime_dep(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime_dep)]


def too_many_failures() -> ApiError:
    return ApiError(429, "too many invalid API keys from this address; try again in a minute",
                    code="too_many_auth_failures", headers={"Retry-After": "60"})


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    return token


async def current_key(request: Request, runtime: RuntimeDep) -> KeyInfo:
    """The caller's key: valid and not revoked (401). Billing state is checked by `billed_key`."""
    token = bearer_token(request)
    if len(token) > 200:
        raise ApiError(401, "invalid API key", code="invalid_api_key")
    found, info = runtime.keys.cached(token)
    address = request.client.host if request.client else "unknown"
    if not found:
        if await runtime.auth_guard.blocked(address):
            raise too_many_failures()
        info = await anyio.to_thread.run_sync(runtime.keys.lookup, token)
    if info is None:
        await runtime.auth_guard.failed(address)
        raise ApiError(401, "invalid API key", code="invalid_api_key")
    if not info.active:
        raise ApiError(401, "API key has been revoked", code="revoked_api_key")
    runtime.quota_periods[info.api_key_id] = info.quota_period_start
    return info


KeyDep = Annotated[KeyInfo, Depends(current_key)]


async def billed_key(key: KeyDep) -> KeyInfo:
    """A key whose customer may use the API now (402 otherwise)."""
    if key.access is Access.NONE:
        raise ApiError(402, f"payment required: {key.access_reason}", code="subscription_inactive")
    return key


BilledKeyDep = Annotated[KeyInfo, Depends(billed_key)]


def require_admin(request: Request, runtime: RuntimeDep) -> None:
    expected = runtime.settings.admin_token
    if not expected:
        raise ApiError(403, "admin API is disabled: set ADMIN_TOKEN", code="admin_disabled")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise ApiError(401, "invalid admin token", code="invalid_admin_token")


AdminDep = Annotated[None, Depends(require_admin)]
