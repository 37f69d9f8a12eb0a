"""Writes usage events into Postgres/SQLite: the per-request rows, the daily rollups and the Stripe outbox,
all in one transaction, idempotent on request_id (a replayed event changes nothing)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, func, insert, select, text, update
from sqlalchemy.dialects import sqlite

from aikit.db.models import ApiKeyUsage, MeterReport, ReportState, UsageDaily, as_utc
from aikit.metering.base import UsageEvent
from aikit.metering.record import COPY_COLUMNS, billable_row, copy_rows
from aikit.periods import cut_window, period_edges
from aikit.settings import Settings

# Meters a report may belong to (MeterReport.meter): without a price table the token meter
# (STRIPE_METER_EVENT_NAME, value = tokens), with one the cost meter (STRIPE_COST_EVENT_NAME, value = cost in
# 1e-12 currency units, see aikit.pricing).
METER_TOKENS = "tokens"
METER_COST = "cost"


def report_meter(settings: Settings) -> str:
    """The meter new usage is reported on under these settings."""
    return METER_COST if settings.price_book is not None else METER_TOKENS


# Serialises "add to an open report" against "seal open reports", so a sealed report never grows.
REPORT_LOCK_ID = 7_214_001


def lock_reports(conn: Connection) -> None:
    """Take REPORT_LOCK for this transaction (SQLite has a single writer and needs none)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": REPORT_LOCK_ID})


def new_report_id() -> str:
    return "aikit-" + uuid.uuid4().hex


def utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def window_start(ts: float, window_seconds: int) -> dt.datetime:
    return utc(ts - ts % window_seconds)


def store_events(
    conn: Connection, events: Sequence[UsageEvent], *, billable: bool, window_seconds: int,
    meter: str = METER_TOKENS,
) -> int:
    """Insert events not seen before; returns how many were new. `billable` false keeps usage out of
    Stripe reports (metering off); events without a customer are never billable. `meter` is the report
    meter (`report_meter`): its reports sum tokens, or costs. Caller commits."""
    if not events:
        return 0
    if conn.dialect.name == "postgresql":
        return _store_postgres(conn, events, billable=billable, window_seconds=window_seconds, meter=meter)
    return _store_generic(conn, events, billable=billable, window_seconds=window_seconds, meter=meter)


# Staging for one batch, emptied at commit. Temp tables are per connection, so parallel writers never meet.
_PG_STAGE = (
    f"""CREATE TEMP TABLE IF NOT EXISTS aikit_usage_in (
  {", ".join(f"{name} {kind}" for name, kind in COPY_COLUMNS)}
) ON COMMIT DELETE ROWS""",
    """CREATE TEMP TABLE IF NOT EXISTS aikit_report_in (
  customer_id text, window_start timestamptz, value bigint, last_usage_ts timestamptz, window_end timestamptz
) ON COMMIT DELETE ROWS""",
)

# Rows and rollups, without the report lock, so writers of different keys run in parallel. Rows are inserted
# in request_id order and rollups in key order: every writer takes row locks in the same order, so two
# writers of the same rows (a replayed batch, the request path's fallback) wait for each other, never
# deadlock. Only rows that are new here count anywhere (RETURNING of ON CONFLICT DO NOTHING; duplicates within
# the batch are skipped the same way). Their billable tokens per customer and window go to aikit_report_in.
_PG_ROWS = """
WITH new AS (
  INSERT INTO api_key_usage (request_id, api_key_id, customer_id, date, ts, model,
                             input_tokens, output_tokens, cached_tokens, tokens, billable, cost)
  SELECT request_id, api_key_id, customer_id, (to_timestamp(ts) AT TIME ZONE 'UTC')::date, to_timestamp(ts),
         model, input_tokens, output_tokens, cached_tokens, input_tokens + output_tokens, billable, cost
  FROM aikit_usage_in ORDER BY request_id
  ON CONFLICT (request_id) DO NOTHING
  RETURNING api_key_id, customer_id, date, ts, model, input_tokens, output_tokens, cached_tokens,
            tokens, billable, cost
), roll AS (
  INSERT INTO usage_daily AS u (api_key_id, date, model, customer_id, requests, input_tokens,
                                output_tokens, cached_tokens, tokens, cost)
  SELECT api_key_id, date, model, max(customer_id), count(*), sum(input_tokens), sum(output_tokens),
         sum(cached_tokens), sum(tokens), sum(cost)
  FROM new GROUP BY api_key_id, date, model ORDER BY api_key_id, date, model
  ON CONFLICT (api_key_id, date, model) DO UPDATE SET
    requests = u.requests + EXCLUDED.requests,
    input_tokens = u.input_tokens + EXCLUDED.input_tokens,
    output_tokens = u.output_tokens + EXCLUDED.output_tokens,
    cached_tokens = u.cached_tokens + EXCLUDED.cached_tokens,
    tokens = u.tokens + EXCLUDED.tokens,
    cost = u.cost + EXCLUDED.cost,
    customer_id = coalesce(EXCLUDED.customer_id, u.customer_id)
), rep AS (
  INSERT INTO aikit_report_in (customer_id, window_start, window_end, value, last_usage_ts)
  SELECT n.customer_id, coalesce(c.lo, b.bin), coalesce(c.hi, b.bin + make_interval(secs => :window)),
         CASE WHEN :meter = 'cost' THEN sum(n.cost) ELSE sum(n.tokens) END, max(n.ts)
  FROM new n
  CROSS JOIN LATERAL (SELECT date_bin(make_interval(secs => :window), n.ts,
                                      TIMESTAMPTZ '1970-01-01 00:00:00+00') AS bin) b
  -- A window is cut where one of the customer's billing periods begins or ends inside it (aikit.periods):
  -- usage just before a period end stays in that period's report.
  LEFT JOIN LATERAL (
    SELECT max(e.at) FILTER (WHERE e.at <= n.ts) AS lo, min(e.at) FILTER (WHERE e.at > n.ts) AS hi
    FROM billing_periods p CROSS JOIN LATERAL (VALUES (p.period_start), (p.period_end)) e(at)
    WHERE p.customer_id = n.customer_id AND p.period_end > b.bin
      AND e.at > b.bin AND e.at < b.bin + make_interval(secs => :window)
  ) c ON true
  WHERE n.billable AND n.customer_id IS NOT NULL GROUP BY 1, 2, 3
  RETURNING 1
)
SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM rep)
"""

# Under REPORT_LOCK, held to commit: adds to the open report of each (customer, window), or opens one with
# its identifier fixed now. A window sealed meanwhile gets a new open report (sent as its own event).
_PG_REPORTS = f"""
INSERT INTO meter_reports AS r (id, customer_id, window_start, window_end, value, last_usage_ts,
                                status, attempts, created_at, meter)
SELECT 'aikit-' || replace(gen_random_uuid()::text, '-', ''), customer_id, window_start,
       window_end, value, last_usage_ts, '{ReportState.OPEN.value}', 0, now(), :meter
FROM aikit_report_in ORDER BY customer_id, window_start
ON CONFLICT (customer_id, window_start, meter) WHERE status = '{ReportState.OPEN.value}' DO UPDATE SET
  value = r.value + EXCLUDED.value,
  last_usage_ts = greatest(r.last_usage_ts, EXCLUDED.last_usage_ts)
"""


def _store_postgres(
    conn: Connection, events: Sequence[UsageEvent], *, billable: bool, window_seconds: int, meter: str
) -> int:
    return store_copy(conn, copy_rows(events, metering_on=billable), window_seconds=window_seconds, meter=meter)


def store_copy(conn: Connection, rows: bytes, *, window_seconds: int, meter: str = METER_TOKENS) -> int:
    """Postgres: stage COPY text rows (aikit.metering.record: COPY_COLUMNS, as `copy_rows` writes them) and merge
    them into api_key_usage, usage_daily and meter_reports; returns how many rows were new. Caller commits
    (soon: from the report step on, this transaction holds REPORT_LOCK)."""
    if not rows:
        return 0
    for statement in _PG_STAGE:  # cheap when they exist; created in this transaction if not
        conn.execute(text(statement))
    raw: Any = conn.connection.driver_connection
    cursor = raw.cursor()
    # One CopyData message (an iterable is sent item by item; a file object in 8 KiB pieces).
    cursor.execute("COPY aikit_usage_in FROM STDIN", stream=[rows])
    cursor.close()
    new, reports = conn.execute(text(_PG_ROWS), {"window": window_seconds, "meter": meter}).one()
    if reports:
        lock_reports(conn)
        conn.execute(text(_PG_REPORTS), {"meter": meter})
    return int(new)


def _store_generic(
    conn: Connection, events: Sequence[UsageEvent], *, billable: bool, window_seconds: int, meter: str
) -> int:
    rows: dict[str, dict[str, Any]] = {
        e.request_id: {
            "request_id": e.request_id, "api_key_id": e.api_key_id, "customer_id": e.customer_id,
            "date": utc(e.ts).date(), "ts": utc(e.ts), "model": e.model, "input_tokens": e.input_tokens,
            "output_tokens": e.output_tokens, "cached_tokens": e.cached_tokens, "tokens": e.tokens,
            "billable": billable_row(billable, e.customer_id), "cost": e.cost,
        }
        for e in events
    }
    stmt = sqlite.insert(ApiKeyUsage).on_conflict_do_nothing(index_elements=["request_id"])
    inserted: set[str] = set()
    for row in rows.values():  # SQLite: one row at a time keeps RETURNING exact under conflicts
        if conn.execute(stmt.values(**row).returning(ApiKeyUsage.request_id)).first() is not None:
            inserted.add(row["request_id"])
    new = [rows[r] for r in inserted]

    rollups: dict[tuple[str, dt.date, str], dict[str, Any]] = {}
    reports: dict[tuple[str, dt.datetime, dt.datetime], list[dict[str, Any]]] = defaultdict(list)
    edges: dict[tuple[str, dt.datetime], list[dt.datetime]] = {}
    for row in new:
        key = (row["api_key_id"], row["date"], row["model"])
        agg = rollups.setdefault(key, {"customer_id": row["customer_id"], "requests": 0, "input_tokens": 0,
                                       "output_tokens": 0, "cached_tokens": 0, "tokens": 0, "cost": 0})
        agg["requests"] += 1
        for f in ("input_tokens", "output_tokens", "cached_tokens", "tokens", "cost"):
            agg[f] += row[f]
        if row["billable"]:
            start = window_start(row["ts"].timestamp(), window_seconds)
            end = start + dt.timedelta(seconds=window_seconds)
            cut = edges.get((row["customer_id"], start))
            if cut is None:
                cut = edges[(row["customer_id"], start)] = period_edges(conn, row["customer_id"], start, end)
            reports[(row["customer_id"], *cut_window(start, end, row["ts"], cut))].append(row)

    for (kid, day, model), agg in rollups.items():
        ins = sqlite.insert(UsageDaily).values(api_key_id=kid, date=day, model=model, **agg)
        conn.execute(ins.on_conflict_do_update(
            index_elements=["api_key_id", "date", "model"],
            set_={
                **{f: getattr(UsageDaily, f) + ins.excluded[f] for f in
                   ("requests", "input_tokens", "output_tokens", "cached_tokens", "tokens", "cost")},
                "customer_id": func.coalesce(ins.excluded.customer_id, UsageDaily.customer_id),
            },
        ))

    for (customer, start, end), items in reports.items():
        value = sum(r["cost" if meter == METER_COST else "tokens"] for r in items)
        last = max(r["ts"] for r in items)
        existing = conn.execute(
            select(MeterReport.id, MeterReport.last_usage_ts).where(
                MeterReport.customer_id == customer, MeterReport.window_start == start,
                MeterReport.meter == meter, MeterReport.status == ReportState.OPEN)
        ).first()
        if existing is None:
            conn.execute(insert(MeterReport).values(
                id=new_report_id(), customer_id=customer, window_start=start,
                window_end=end, value=value, last_usage_ts=last,
                status=ReportState.OPEN, attempts=0, created_at=dt.datetime.now(dt.UTC), meter=meter))
        else:
            conn.execute(update(MeterReport).where(MeterReport.id == existing.id).values(
                value=MeterReport.value + value,
                last_usage_ts=max(as_utc(existing.last_usage_ts), last)))
    return len(new)


