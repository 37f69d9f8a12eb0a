"""Usage visibility: what a key (or an admin) sees of the usage metered so far.

Reads come from the `usage_daily` rollups plus the Redis `pending` hashes (usage recorded but not yet
flushed); never from the per-request `api_key_usage` rows. The flush subtracts from `pending` exactly what
it moved to Postgres, so rollups + pending is all usage, each event counted once.

Money (with a price table, see aikit.pricing): flushed usage carries the cost fixed when each event was
recorded (usage_daily.cost); pending usage is priced at the current rates (the same integers RECORD stored).
So `cost` is exactly what the cost meter reports to Stripe for the same usage. Per token type, `by_type` shows
tokens and their cost at the current rates (after a rate change inside the period these may differ from the
model's `cost`, which is what is billed).
"""

from __future__ import annotations

import calendar
import csv
import datetime as dt
import io
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DBAPIError

from aikit.db.models import ApiKey, UsageDaily, User
from aikit.errors import UsageNotFound, UsageQueryError, UsageUnavailable
from aikit.keys import KeyInfo
from aikit.metering.layout import RedisLayout
from aikit.metering.record import PENDING_COUNTERS
from aikit.pricing import TOKEN_TYPES, PriceBook, format_money, split_tokens
from aikit.redis_client import REDIS_DOWN_ERRORS
from aikit.runtime import Runtime

_T = TypeVar("_T")

PERIODS = ("current_month", "last_30_days")
MAX_RANGE_DAYS = 366
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")  # not \d: it matches non-ASCII digits too
# Pending hash field suffix -> counter name (aikit.metering.record).
_PENDING_FIELDS = {suffix: counter for suffix, (counter, _) in PENDING_COUNTERS.items()}
COUNT_FIELDS = ("requests", "input_tokens", "output_tokens", "cached_tokens", "tokens")
CSV_COLUMNS = ("date", "api_key_id", "customer_id", "model", *COUNT_FIELDS, "cost", "currency")

# --- periods -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Period:
    """A span of whole UTC days, both ends inclusive."""

    start: dt.date
    end: dt.date
    name: str  # current_month | last_30_days | range

    @property
    def start_iso(self) -> str:
        return f"{self.start.isoformat()}T00:00:00Z"

    @property
    def end_iso(self) -> str:
        return f"{self.end.isoformat()}T23:59:59Z"

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1

    def covers(self, day: dt.date) -> bool:
        return self.start <= day <= self.end


def month_bounds(today: dt.date) -> tuple[dt.date, dt.date]:
    return today.replace(day=1), today.replace(day=calendar.monthrange(today.year, today.month)[1])


def parse_date(value: str, param: str) -> dt.date:
    # fromisoformat alone also takes "20241101" and week dates; the API promises YYYY-MM-DD only.
    if not _DATE.fullmatch(value):
        raise UsageQueryError(f"{param} must be a date as YYYY-MM-DD, got {value[:40]!r}", param)
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise UsageQueryError(f"{param} is not a valid date: {value!r}", param) from None


def resolve_period(period: str | None, start: str | None, end: str | None, today: dt.date) -> Period:
    """`period` (default current_month) or an inclusive `start`..`end` range, never both."""
    if period is not None and (start is not None or end is not None):
        raise UsageQueryError("give either period or start/end, not both", "period")
    if start is not None or end is not None:
        if start is None:
            raise UsageQueryError("start is required when end is given", "start")
        if end is None:
            raise UsageQueryError("end is required when start is given", "end")
        first, last = parse_date(start, "start"), parse_date(end, "end")
        if last < first:
            raise UsageQueryError(f"end ({last}) is before start ({first})", "end")
        if (last - first).days + 1 > MAX_RANGE_DAYS:
            raise UsageQueryError(f"the range from start to end is longer than {MAX_RANGE_DAYS} days", "end")
        return Period(first, last, "range")
    name = "current_month" if period is None else period
    if name == "current_month":
        first, last = month_bounds(today)
        return Period(first, last, name)
    if name == "last_30_days":
        return Period(today - dt.timedelta(days=29), today, name)
    raise UsageQueryError(f"unknown period {name[:40]!r}: use one of {', '.join(PERIODS)}", "period")


# --- counting ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Counts:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    tokens: int = 0
    cost: int = 0  # 1e-12 currency units (aikit.pricing)

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cached_tokens += other.cached_tokens
        self.tokens += other.tokens
        self.cost += other.cost

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNT_FIELDS}


@dataclass(slots=True)
class UsageRow:
    """Usage of one key, one UTC day, one model."""

    api_key_id: str
    customer_id: str | None
    date: dt.date
    model: str
    counts: Counts = field(default_factory=Counts)


def parse_pending(api_key_id: str, customer_id: str | None, raw: Mapping[Any, Any],
                  period: Period, book: PriceBook | None = None) -> list[UsageRow]:
    """Rows from one key's pending hash (`YYYY-MM-DD|model|t` ...), limited to the period, priced at the
    book's current rates (cost is linear in tokens, so this is the sum of the events' own costs)."""
    rows: dict[tuple[dt.date, str], UsageRow] = {}
    for name, value in raw.items():
        name = name.decode() if isinstance(name, bytes) else str(name)
        day_s, sep, rest = name.partition("|")
        model, sep2, suffix = rest.rpartition("|")  # model names may contain '|'; the suffix cannot
        counter = _PENDING_FIELDS.get(suffix)
        if not sep or not sep2 or counter is None or not _DATE.fullmatch(day_s):
            continue  # not a field this code knows: ignore rather than fail the whole answer
        try:
            day, amount = dt.date.fromisoformat(day_s), int(value)
        except ValueError:
            continue
        if not period.covers(day):
            continue
        row = rows.get((day, model))
        if row is None:
            row = rows[(day, model)] = UsageRow(api_key_id, customer_id, day, model)
        setattr(row.counts, counter, getattr(row.counts, counter) + amount)
    if book is not None:
        for row in rows.values():
            c = row.counts
            row.counts.cost = book.cost(row.model, c.input_tokens, c.output_tokens, c.cached_tokens) or 0
    return list(rows.values())


def combine(*sources: Iterable[UsageRow]) -> list[UsageRow]:
    """Merge rows of the same key, day and model (flushed first: its customer id wins)."""
    merged: dict[tuple[str, dt.date, str], UsageRow] = {}
    for source in sources:
        for row in source:
            key = (row.api_key_id, row.date, row.model)
            have = merged.get(key)
            if have is None:
                merged[key] = UsageRow(row.api_key_id, row.customer_id, row.date, row.model, Counts())
                have = merged[key]
            have.counts.add(row.counts)
            have.customer_id = have.customer_id or row.customer_id
    return sorted(merged.values(), key=lambda r: (r.date, r.api_key_id, r.model))


def total(rows: Iterable[UsageRow]) -> Counts:
    out = Counts()
    for row in rows:
        out.add(row.counts)
    return out


def bucket(rows: Iterable[UsageRow], attr: str) -> dict[Any, list[UsageRow]]:
    out: dict[Any, list[UsageRow]] = {}
    for row in rows:
        out.setdefault(getattr(row, attr), []).append(row)
    return out


def group_by(rows: Iterable[UsageRow], attr: str) -> dict[Any, Counts]:
    groups: dict[Any, Counts] = {}
    for row in rows:
        key = getattr(row, attr)
        group = groups.get(key)
        if group is None:
            group = groups[key] = Counts()
        group.add(row.counts)
    return groups


# --- cost ----------------------------------------------------------------------------------------------


def usd(units: int) -> float:
    return round(units / 10**12, 6)


def money(units: int) -> str:
    """Exact amount in the currency's major unit, as a decimal string (no float)."""
    return format_money(units)


def unpriced_models(by_model: Mapping[str, Counts], book: PriceBook | None) -> list[str]:
    """Models the price book does not price (all of them without a price table)."""
    return sorted(m for m in by_model if book is None or not book.priced(m))


def _by_type(counts: Counts, model: str, book: PriceBook | None) -> dict[str, dict[str, Any]]:
    rates = book.rates_for(model) if book is not None else None
    split = split_tokens(counts.input_tokens, counts.output_tokens, counts.cached_tokens)
    out: dict[str, dict[str, Any]] = {}
    for i, kind in enumerate(TOKEN_TYPES):
        unit = getattr(rates, kind) if rates is not None else None
        out[kind] = {"tokens": split[kind],
                     "rate_per_million": None if rates is None else str(rates.per_million[i]),
                     "cost": None if unit is None else money(split[kind] * unit)}
    return out


def _models_json(by_model: Mapping[str, Counts], book: PriceBook | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for model, counts in sorted(by_model.items()):
        priced = counts.cost > 0 or (book is not None and book.priced(model))
        out.append({"model": model, **counts.as_dict(),
                    "estimated_cost_usd": usd(counts.cost) if priced else None,
                    "cost": money(counts.cost) if priced else None,
                    "by_type": _by_type(counts, model, book)})
    return out


def _money_json(counts: Counts, book: PriceBook | None) -> dict[str, Any]:
    return {"cost": money(counts.cost), "currency": book.currency if book is not None else "usd"}


def _days_json(rows: Iterable[UsageRow]) -> list[dict[str, Any]]:
    return [{"date": day.isoformat(), **counts.as_dict()}
            for day, counts in sorted(group_by(rows, "date").items())]


# --- responses -----------------------------------------------------------------------------------------


def key_usage_body(rows: Sequence[UsageRow], period: Period, remaining: Mapping[str, int | None] | None,
                   book: PriceBook | None, *, partial: bool) -> dict[str, Any]:
    """GET /v1/usage. The first five fields are the documented shape; the rest are additions."""
    totals = total(rows)
    by_model = group_by(rows, "model")
    remaining = remaining or {}
    return {
        "tokens_used": totals.tokens,
        "requests": totals.requests,
        "period_start": period.start_iso,
        "period_end": period.end_iso,
        "rate_limit_remaining": {"per_minute": remaining.get("per_minute"),
                                 "per_day": remaining.get("per_day")},
        "period": period.name,
        "input_tokens": totals.input_tokens,
        "output_tokens": totals.output_tokens,
        "cached_tokens": totals.cached_tokens,
        "estimated_cost_usd": usd(totals.cost),
        **_money_json(totals, book),
        "unpriced_models": unpriced_models(by_model, book),
        "monthly_tokens_remaining": remaining.get("tokens"),
        "by_model": _models_json(by_model, book),
        "by_day": _days_json(rows),
        "partial": partial,
    }


def admin_usage_body(rows: Sequence[UsageRow], period: Period, book: PriceBook | None,
                     *, customer_id: str | None, api_key_id: str | None, partial: bool) -> dict[str, Any]:
    """GET /v1/admin/usage: totals, per key (with its models) and per customer."""
    totals = total(rows)
    by_key: list[dict[str, Any]] = []
    for kid, mine in sorted(bucket(rows, "api_key_id").items()):
        models = group_by(mine, "model")
        customers = sorted({r.customer_id for r in mine if r.customer_id})
        key_total = total(mine)
        by_key.append({"api_key_id": kid, "customer_id": customers[-1] if customers else None,
                       **key_total.as_dict(), "estimated_cost_usd": usd(key_total.cost),
                       **_money_json(key_total, book), "by_model": _models_json(models, book)})
    by_customer: list[dict[str, Any]] = []
    for cid, mine in sorted(bucket(rows, "customer_id").items(), key=lambda kv: (kv[0] is None, kv[0] or "")):
        cust_total = total(mine)
        by_customer.append({"customer_id": cid, **cust_total.as_dict(),
                            "estimated_cost_usd": usd(cust_total.cost), **_money_json(cust_total, book),
                            "by_model": _models_json(group_by(mine, "model"), book)})
    return {
        "customer_id": customer_id,
        "api_key_id": api_key_id,
        "period_start": period.start_iso,
        "period_end": period.end_iso,
        "tokens_used": totals.tokens,
        **totals.as_dict(),
        "estimated_cost_usd": usd(totals.cost),
        **_money_json(totals, book),
        "unpriced_models": unpriced_models(group_by(rows, "model"), book),
        "by_key": by_key,
        "by_customer": by_customer,
        "by_day": _days_json(rows),
        "partial": partial,
    }


def _csv_text(value: str | None) -> str:
    # Model names come from API callers: keep a spreadsheet from reading one as a formula.
    if value and value[0] in "=+-@\t\r":
        return "'" + value
    return value or ""


def usage_csv(rows: Iterable[UsageRow], currency: str = "usd") -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        c = r.counts
        writer.writerow([r.date.isoformat(), _csv_text(r.api_key_id), _csv_text(r.customer_id),
                         _csv_text(r.model), c.requests, c.input_tokens, c.output_tokens, c.cached_tokens,
                         c.tokens, money(c.cost), currency])
    return buf.getvalue()


# --- reading -------------------------------------------------------------------------------------------


def read_rollups(engine: Engine, period: Period, *, api_key_id: str | None = None,
                 customer_id: str | None = None) -> list[UsageRow]:
    """Flushed usage from usage_daily (primary key or ix_usage_daily_customer_date; never api_key_usage)."""
    u = UsageDaily
    stmt = select(u.api_key_id, u.customer_id, u.date, u.model, u.requests, u.input_tokens, u.output_tokens,
                  u.cached_tokens, u.tokens, u.cost).where(u.date >= period.start, u.date <= period.end)
    if api_key_id is not None:
        stmt = stmt.where(u.api_key_id == api_key_id)
    if customer_id is not None:
        stmt = stmt.where(u.customer_id == customer_id)
    with engine.connect() as conn:
        result = conn.execute(stmt).all()
    return [UsageRow(kid, cid, day, model, Counts(int(req), int(inp), int(out), int(cached), int(tok), int(cost)))
            for kid, cid, day, model, req, inp, out, cached, tok, cost in result]


def keys_of(engine: Engine, *, api_key_id: str | None = None, customer_id: str | None = None
            ) -> dict[str, str | None]:
    """api_key_id -> its current customer, for the keys an admin query concerns."""
    stmt = select(ApiKey.id, User.stripe_customer_id).join(User, User.id == ApiKey.user_id)
    if api_key_id is not None:
        stmt = stmt.where(ApiKey.id == api_key_id)
    if customer_id is not None:
        stmt = stmt.where(User.stripe_customer_id == customer_id)
    with engine.connect() as conn:
        return {kid: cid for kid, cid in conn.execute(stmt).all()}


async def read_pending(redis: Any, layout: RedisLayout, keys: Mapping[str, str | None],
                       period: Period, book: PriceBook | None = None) -> list[UsageRow]:
    """Unflushed usage of the given keys: one HGETALL each (pipelined when there are several)."""
    ids = list(keys)
    if not ids:
        return []
    if len(ids) == 1:
        hashes = [await redis.hgetall(layout.pending(ids[0]))]
    else:
        # Not transactional: on a Redis Cluster the keys live in different slots.
        pipe = redis.pipeline(transaction=False)
        for kid in ids:
            pipe.hgetall(layout.pending(kid))
        hashes = await pipe.execute()
    rows: list[UsageRow] = []
    for kid, raw in zip(ids, hashes, strict=True):
        rows.extend(parse_pending(kid, keys[kid], raw or {}, period, book))
    return rows


async def _from_db(work: Callable[[], _T]) -> _T:
    try:
        return await anyio.to_thread.run_sync(work)
    except (DBAPIError, ConnectionError) as exc:  # pg8000 lets a reset while connecting through unwrapped
        raise UsageUnavailable("usage store unavailable") from exc


async def _pending_or_none(runtime: Runtime, keys: Mapping[str, str | None], period: Period
                           ) -> list[UsageRow] | None:
    try:
        return await read_pending(runtime.redis, runtime.layout, keys, period, runtime.settings.price_book)
    except REDIS_DOWN_ERRORS:
        return None


async def key_usage(runtime: Runtime, key: KeyInfo, period: Period) -> dict[str, Any]:
    """The caller's own usage over the period; Postgres alone (partial) when Redis cannot be reached."""
    remaining: dict[str, int | None] | None = None
    pending: list[UsageRow] | None = None
    flushed: list[UsageRow] = []

    async def read_remaining() -> None:
        nonlocal remaining
        try:
            remaining = await runtime.limiter.remaining(key)
        except REDIS_DOWN_ERRORS:
            remaining = None

    async def read_usage() -> None:
        nonlocal pending, flushed
        # Redis before Postgres: a flush commits rows and only then subtracts them from pending, so this
        # order never misses an event (at worst a batch being flushed right now shows twice until acked).
        pending = await _pending_or_none(runtime, {key.api_key_id: key.customer_id}, period)
        try:
            flushed = await _from_db(lambda: read_rollups(runtime.engine, period, api_key_id=key.api_key_id))
        except UsageUnavailable as exc:
            failed.append(exc)  # raised below, not as an ExceptionGroup out of the task group

    failed: list[UsageUnavailable] = []
    # Concurrently, so a Redis that hangs costs one timeout, not two.
    async with anyio.create_task_group() as tg:
        tg.start_soon(read_remaining)
        tg.start_soon(read_usage)
    if failed:
        raise failed[0]
    rows = combine(flushed, pending or [])
    return key_usage_body(rows, period, remaining, runtime.settings.price_book,
                          partial=pending is None or remaining is None)


async def admin_rows(runtime: Runtime, period: Period, *, customer_id: str | None, api_key_id: str | None
                     ) -> tuple[list[UsageRow], bool]:
    """Rollups + pending for one key or one customer's keys; raises UsageNotFound for an unknown key.
    Returns the rows and whether Redis was unreachable (pending left out)."""
    keys = await _from_db(lambda: keys_of(runtime.engine, api_key_id=api_key_id, customer_id=customer_id))
    if api_key_id is not None and not keys:
        raise UsageNotFound(f"no API key {api_key_id}")
    pending = await _pending_or_none(runtime, keys, period)
    flushed = await _from_db(
        lambda: read_rollups(runtime.engine, period, api_key_id=api_key_id, customer_id=customer_id))
    return combine(flushed, pending or []), pending is None


def admin_filter(customer_id: str | None, api_key_id: str | None) -> None:
    """Admin queries name exactly one customer or one key."""
    if customer_id is None and api_key_id is None:
        raise UsageQueryError("give customer_id or api_key_id", "customer_id")
    if customer_id is not None and api_key_id is not None:
        raise UsageQueryError("give customer_id or api_key_id, not both", "api_key_id")
    for name, value in (("customer_id", customer_id), ("api_key_id", api_key_id)):
        if value is not None and "\x00" in value:  # Postgres cannot even compare it: a 503 otherwise
            raise UsageQueryError(f"{name} must not contain a NUL character", name)


def tokens_used_since(engine: Engine, api_key_id: str, since: dt.date) -> int:
    """Flushed tokens of a key from a day on (rollups: one small index range, never the per-request table)."""
    with engine.connect() as conn:
        total = conn.execute(
            select(func.coalesce(func.sum(UsageDaily.tokens), 0))
            .where(UsageDaily.api_key_id == api_key_id, UsageDaily.date >= since)
        ).scalar_one()
    return int(total)
