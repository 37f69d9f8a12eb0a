"""GET /v1/usage (a key's own usage) and the admin usage report and CSV export."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from aikit.api.builtin_route import BuiltinRoute
from aikit.api.deps import AdminDep, KeyDep, RuntimeDep
from aikit.usage import (
    Period,
    UsageRow,
    admin_filter,
    admin_rows,
    admin_usage_body,
    key_usage,
    resolve_period,
    usage_csv,
)

router = APIRouter(route_class=BuiltinRoute)

PeriodQ = Annotated[str | None, Query(max_length=40, description="current_month (default) | last_30_days")]
DateQ = Annotated[str | None, Query(max_length=40, description="YYYY-MM-DD, UTC, inclusive")]
CustomerQ = Annotated[str | None, Query(max_length=255)]
KeyIdQ = Annotated[str | None, Query(max_length=40)]


# A wrong parameter (UsageQueryError, 422), an unknown key (UsageNotFound, 404) or an unreadable database
# (UsageUnavailable, 503) propagate: the app answers each from what it carries (aikit.errors).


def _period(period: str | None, start: str | None, end: str | None) -> Period:
    return resolve_period(period, start, end, dt.datetime.now(dt.UTC).date())


@router.get("/v1/usage")
async def get_usage(key: KeyDep, runtime: RuntimeDep, period: PeriodQ = None, start: DateQ = None,
                    end: DateQ = None) -> dict[str, Any]:
    return await key_usage(runtime, key, _period(period, start, end))


async def _admin(runtime: RuntimeDep, customer_id: str | None, api_key_id: str | None, period: str | None,
                 start: str | None, end: str | None) -> tuple[Period, list[UsageRow], bool]:
    admin_filter(customer_id, api_key_id)
    span = _period(period, start, end)
    rows, partial = await admin_rows(runtime, span, customer_id=customer_id, api_key_id=api_key_id)
    return span, rows, partial


@router.get("/v1/admin/usage")
async def admin_usage(_: AdminDep, runtime: RuntimeDep, customer_id: CustomerQ = None,
                      api_key_id: KeyIdQ = None, period: PeriodQ = None, start: DateQ = None,
                      end: DateQ = None) -> dict[str, Any]:
    span, rows, partial = await _admin(runtime, customer_id, api_key_id, period, start, end)
    return admin_usage_body(rows, span, runtime.settings.price_book, customer_id=customer_id,
                            api_key_id=api_key_id, partial=partial)


@router.get("/v1/admin/usage.csv", response_class=Response)
async def admin_usage_csv(_: AdminDep, runtime: RuntimeDep, customer_id: CustomerQ = None,
                          api_key_id: KeyIdQ = None, period: PeriodQ = None, start: DateQ = None,
                          end: DateQ = None) -> Response:
    span, rows, partial = await _admin(runtime, customer_id, api_key_id, period, start, end)
    filename = f"usage_{span.start.isoformat()}_{span.end.isoformat()}.csv"
    headers = {"Content-Disposition": f'attachment; filename="{filename}"',
               # Redis was unreachable: the export holds flushed usage only.
               "X-Usage-Partial": "true" if partial else "false"}
    book = runtime.settings.price_book
    body = usage_csv(rows, book.currency if book else "usd")
    return Response(body, media_type="text/csv; charset=utf-8", headers=headers)
