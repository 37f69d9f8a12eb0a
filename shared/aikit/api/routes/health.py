from __future__ import annotations

from fastapi import APIRouter

from aikit.api.builtin_route import BuiltinRoute

router = APIRouter(route_class=BuiltinRoute)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
