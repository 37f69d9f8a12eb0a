"""Admin endpoints for keys, behind ADMIN_TOKEN."""

from __future__ import annotations

import json
from typing import Annotated

import anyio
from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, EmailStr, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from aikit.api.builtin_route import BuiltinRoute
from aikit.api.deps import AdminDep, RuntimeDep
from aikit.db.models import ApiKey, User
from aikit.errors import ApiError
from aikit.keys import create_key, parse_allowed_models, revoke_key

router = APIRouter(prefix="/v1/admin", route_class=BuiltinRoute)
ModelName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f,]+$")]


class CreateKeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: EmailStr
    customer_id: Annotated[str, Field(pattern=r"^cus_[A-Za-z0-9]{1,100}$")] | None = None
    name: Annotated[str, Field(max_length=200)] | None = None
    # Bounded by the columns (rpm/rpd INTEGER, monthly tokens BIGINT): a larger value is a 422, not a 500.
    rpm: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    rpd: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    monthly_tokens: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    # Models this key may call: names or glob patterns (`gpt-4o*`); omitted: every model the price book serves.
    allowed_models: Annotated[list[ModelName], Field(min_length=1, max_length=100)] | None = None


class UpdateKeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # null lifts the allow-list (every model the price book serves).
    allowed_models: Annotated[list[ModelName], Field(min_length=1, max_length=100)] | None


def key_models(key: ApiKey) -> list[str] | None:
    found = parse_allowed_models(key.allowed_models)
    return None if found is None else list(found)


def key_json(key: ApiKey, user: User) -> dict[str, object]:
    return {"api_key_id": key.id, "prefix": key.prefix, "email": user.email, "customer_id": user.stripe_customer_id,
            "status": key.status, "name": key.name, "rpm": key.rpm_limit, "rpd": key.rpd_limit,
            "monthly_tokens": key.monthly_token_limit, "allowed_models": key_models(key),
            "created_at": key.created_at.isoformat()}


@router.post("/keys", status_code=201)
async def create(body: CreateKeyBody, _: AdminDep, runtime: RuntimeDep) -> dict[str, object]:
    def work() -> dict[str, object]:
        with Session(runtime.engine) as session:
            issued = create_key(session, runtime.settings, email=str(body.email), customer_id=body.customer_id,
                                name=body.name, rpm=body.rpm, rpd=body.rpd, monthly_tokens=body.monthly_tokens,
                                allowed_models=body.allowed_models)  # KeyRefused: 409
            session.commit()
            return {"api_key": issued.api_key, "api_key_id": issued.api_key_id, "prefix": issued.prefix}

    return await anyio.to_thread.run_sync(work)


@router.get("/keys")
async def list_keys(_: AdminDep, runtime: RuntimeDep,
                    email: Annotated[str | None, Query(max_length=320)] = None) -> dict[str, object]:
    def work() -> list[dict[str, object]]:
        with Session(runtime.engine) as session:
            stmt = select(ApiKey, User).join(User, User.id == ApiKey.user_id).order_by(ApiKey.created_at)
            if email:
                stmt = stmt.where(User.email == email)
            return [key_json(k, u) for k, u in session.execute(stmt).all()]

    return {"data": await anyio.to_thread.run_sync(work)}


@router.patch("/keys/{api_key_id}")
async def update(api_key_id: Annotated[str, Field(max_length=64)], body: UpdateKeyBody, _: AdminDep,
                 runtime: RuntimeDep) -> dict[str, object]:
    """Change a key's model allow-list; it applies within KEY_CACHE_TTL_SECONDS on every instance."""
    def work() -> dict[str, object] | None:
        with Session(runtime.engine) as session:
            key = session.get(ApiKey, api_key_id)
            if key is None:
                return None
            key.allowed_models = None if body.allowed_models is None else json.dumps(body.allowed_models)
            session.commit()
            user = session.get(User, key.user_id)
            assert user is not None
            return key_json(key, user)

    found = await anyio.to_thread.run_sync(work)
    if found is None:
        raise ApiError(404, f"no API key {api_key_id}", code="not_found")
    runtime.keys.clear()
    return found


@router.post("/keys/{api_key_id}/revoke")
async def revoke(api_key_id: Annotated[str, Field(max_length=64)], _: AdminDep,
                 runtime: RuntimeDep) -> dict[str, object]:
    def work() -> bool:
        with Session(runtime.engine) as session:
            found = revoke_key(session, api_key_id)
            session.commit()
            return found

    if not await anyio.to_thread.run_sync(work):
        raise ApiError(404, f"no API key {api_key_id}", code="not_found")
    runtime.keys.clear()
    return {"api_key_id": api_key_id, "status": "revoked"}
