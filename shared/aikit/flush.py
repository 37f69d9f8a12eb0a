"""The flush: Redis buffer -> Postgres (rows, rollups, Stripe outbox) -> Stripe billing meter events.

Money rules, in order:
- An entry leaves Redis only after the transaction that stored it committed (store, then ACK).
- Rows are idempotent on request_id, so a replayed batch (crash before ACK, two flushes at once) adds nothing.
- A Stripe report's identifier is its outbox row id, fixed before the first attempt; every retry re-sends it.
  Stripe's "An event already exists with identifier" means the first send landed: success.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, select, text, update

from aikit.db.engine import get_engine
from aikit.db.models import MeterReport
from aikit.metering.base import UsageEvent
from aikit.metering.layout import RedisLayout
from aikit.metering.scripts import ACK
from aikit.metering.sql_sink import REPORT_LOCK_ID, store_events
from aikit.observability import (
    EVENTS_FLUSHED,
    FLUSH_DURATION,
    FLUSH_LAG,
    PARKED_BATCHES,
    STRIPE_ERRORS,
    emit,
    logger,
)
from aikit.redis_client import make_sync_redis
from aikit.settings import Settings
from aikit.stripe_gateway import BillingGateway, ReportStatus, gateway_from_settings

FLUSH_LOCK_ID = 7_214_002
RETRY_DELAYS = (0.5, 1.0, 2.0)  # backoff within one run; what still fails waits for the next run
SEND_WORKERS = 8  # reports go out in parallel across customers, one at a time per customer


@dataclass
class FlushSummary:
    events_read: int = 0
    rows_inserted: int = 0
    malformed: int = 0
    reports_sealed: int = 0
    reports_sent: int = 0
    reports_already_recorded: int = 0
    reports_parked: int = 0
    reports_left_pending: int = 0
    stripe_calls: int = 0
    flush_lag_seconds: float = 0.0
    duration_ms: float = 0.0
    skipped: bool = False  # another flush held the lock
    stopped_early: bool = False  # the time budget ran out; the rest goes next run
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def parse_entry(fields: dict[str, str]) -> UsageEvent:
    return UsageEvent(
        request_id=fields["r"],
        api_key_id=fields["k"],
        customer_id=fields["c"] or None,
        model=fields["m"],
        input_tokens=int(fields["i"]),
        output_tokens=int(fields["o"]),
        cached_tokens=int(fields["x"]),
        ts=float(fields["t"]),
    )


class Flusher:
    def __init__(self, settings: Settings, *, redis: Any = None, engine: Engine | None = None,
                 gateway: BillingGateway | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self.redis = redis if redis is not None else make_sync_redis(settings)
        self.engine = engine or get_engine(settings.database_url)
        self.gateway = gateway if gateway is not None else gateway_from_settings(settings)
        self.layout = RedisLayout(settings.redis_key_prefix, settings.redis_usage_shards)
        self.sleep = sleep

    @property
    def billable(self) -> bool:
        return self.gateway is not None and self.settings.stripe_metering_enabled

    # -- Redis -> Postgres ------------------------------------------------------------------------------

    def drain(self, summary: FlushSummary, deadline: float) -> None:
        oldest: float | None = None
        for shard in range(self.layout.shards):
            stream = self.layout.stream(shard)
            first = self.redis.xrange(stream, count=1)
            if first:
                ms = int(first[0][0].split("-")[0]) / 1000
                oldest = ms if oldest is None else min(oldest, ms)
            while True:
                if time.monotonic() >= deadline:
                    summary.stopped_early = True
                    break
                entries = self.redis.xrange(stream, count=self.settings.flush_batch_size)
                if not entries:
                    break
                self._store_batch(shard, entries, summary)
                if len(entries) < self.settings.flush_batch_size:
                    break
            if summary.stopped_early:
                break
        summary.flush_lag_seconds = round(max(0.0, time.time() - oldest), 3) if oldest else 0.0
        emit(FLUSH_LAG, summary.flush_lag_seconds, unit="Seconds")

    def _store_batch(self, shard: int, entries: list[tuple[str, dict[str, str]]], summary: FlushSummary) -> None:
        events: list[UsageEvent] = []
        ids: list[str] = []
        for entry_id, fields in entries:
            try:
                events.append(parse_entry(fields))
            except (KeyError, ValueError):
                # Never silently dropped: kept aside in the same slot for a human to look at.
                self.redis.xadd(self.layout.tag(shard) + ":malformed", fields or {"empty": "1"})
                summary.malformed += 1
            ids.append(entry_id)
        with self.engine.begin() as conn:
            summary.rows_inserted += store_events(
                conn, events, billable=self.billable,
                window_seconds=self.settings.stripe_report_window_seconds)
        # Only now, with the rows committed, may the entries leave Redis.
        pending_keys = sorted({self.layout.pending(e.api_key_id) for e in events})
        ACK.run(self.redis, [self.layout.stream(shard), *pending_keys],
                [self.layout.pending_prefix(shard), *ids])
        summary.events_read += len(entries)

    # -- Postgres -> Stripe -----------------------------------------------------------------------------

    def seal(self, summary: FlushSummary, now: dt.datetime) -> None:
        """Fix the value of every report whose window has ended; its identifier was fixed at creation."""
        with self.engine.begin() as conn:
            lock(conn, REPORT_LOCK_ID)
            result = conn.execute(
                update(MeterReport)
                .where(MeterReport.status == "open", MeterReport.window_end <= now)
                .values(status="pending")
            )
            summary.reports_sealed += result.rowcount or 0

    def send(self, summary: FlushSummary, now: dt.datetime, deadline: float) -> None:
        if self.gateway is None:
            return
        with self.engine.connect() as conn:
            pending = list(conn.execute(
                select(MeterReport.id, MeterReport.customer_id, MeterReport.value, MeterReport.window_start,
                       MeterReport.window_end, MeterReport.last_usage_ts)
                .where(MeterReport.status == "pending").order_by(MeterReport.window_start)
            ))
        by_customer: dict[str, list[Any]] = defaultdict(list)
        for row in pending:
            by_customer[row.customer_id].append(row)
        workers = max(1, min(SEND_WORKERS, len(by_customer)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda rows: self._send_customer(rows, now, deadline), by_customer.values()))
        for part in results:
            for name, value in part.items():
                setattr(summary, name, getattr(summary, name) + value)
            if part.get("reports_left_pending") and time.monotonic() >= deadline:
                summary.stopped_early = True

    def _send_customer(self, rows: list[Any], now: dt.datetime, deadline: float) -> dict[str, int]:
        assert self.gateway is not None
        counts = {"stripe_calls": 0, "reports_sent": 0, "reports_already_recorded": 0, "reports_parked": 0,
                  "reports_left_pending": 0}
        for i, row in enumerate(rows):
            outcome = None
            for delay in (0.0, *RETRY_DELAYS):
                if time.monotonic() + delay >= deadline:
                    break
                if delay:
                    self.sleep(delay)
                counts["stripe_calls"] += 1
                outcome = self.gateway.report_meter_event(
                    identifier=row.id, customer_id=row.customer_id, value=int(row.value),
                    timestamp=event_timestamp(row, now))
                if outcome.status is not ReportStatus.RETRYABLE:
                    break
                emit(STRIPE_ERRORS, kind=outcome.error_code or "retryable")
            if outcome is None or outcome.status is ReportStatus.RETRYABLE:
                # Same identifier next run. Stop this customer here: keeps its reports in order.
                self._mark(row.id, attempts=True, error=_describe(outcome))
                counts["reports_left_pending"] += len(rows) - i
                break
            if outcome.status is ReportStatus.PERMANENT:
                emit(STRIPE_ERRORS, kind=outcome.error_code or "permanent")
                emit(PARKED_BATCHES)
                logger.error("meter_report_parked", extra={"report_id": row.id, "customer_id": row.customer_id,
                                                            "reason": _describe(outcome)})
                self._mark(row.id, status="parked", attempts=True, error=_describe(outcome))
                counts["reports_parked"] += 1
                continue
            self._mark(row.id, status="sent", attempts=True, sent=True)
            key = "reports_sent" if outcome.status is ReportStatus.ACCEPTED else "reports_already_recorded"
            counts[key] += 1
        return counts

    def _mark(self, report_id: str, *, status: str | None = None, attempts: bool = False,
              error: str | None = None, sent: bool = False) -> None:
        values: dict[str, Any] = {}
        if status:
            values["status"] = status
        if attempts:
            values["attempts"] = MeterReport.attempts + 1
        if error is not None:
            values["last_error"] = error[:2000]
        if sent:
            values["sent_at"] = dt.datetime.now(dt.UTC)
        with self.engine.begin() as conn:
            # Never move a report backwards (a concurrent flush may have finished it already).
            conn.execute(update(MeterReport).where(MeterReport.id == report_id,
                                                   MeterReport.status == "pending").values(**values))

    def run(self, *, now: dt.datetime | None = None, time_budget: float | None = None) -> FlushSummary:
        started = time.monotonic()
        deadline = started + (time_budget if time_budget is not None else self.settings.flush_time_budget_seconds)
        summary = FlushSummary()
        with flush_lock(self.engine) as acquired:
            if not acquired:
                summary.skipped = True
                return summary
            try:
                self.drain(summary, deadline)
                current = now or dt.datetime.now(dt.UTC)
                self.seal(summary, current)
                self.send(summary, current, deadline)
            except Exception as exc:
                logger.exception("flush_failed")
                summary.errors.append(f"{type(exc).__name__}: {exc}")
        summary.duration_ms = round((time.monotonic() - started) * 1000, 1)
        emit(FLUSH_DURATION, summary.duration_ms, unit="Milliseconds")
        emit(EVENTS_FLUSHED, summary.rows_inserted)
        return summary


def event_timestamp(row: Any, now: dt.datetime) -> int:
    """Inside the usage's own window (so it lands in the right invoice), never in the future."""
    last = _aware(row.last_usage_ts).timestamp()
    start = _aware(row.window_start).timestamp()
    end = _aware(row.window_end).timestamp() - 1
    return int(min(max(last, start), end, now.timestamp()))


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _describe(outcome: Any) -> str:
    if outcome is None:
        return "out of time before the first attempt"
    return f"{outcome.status.name.lower()}: {outcome.error_code or ''} {outcome.message or ''}".strip()


def lock(conn: Connection, lock_id: int) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id})


@contextmanager
def flush_lock(engine: Engine) -> Iterator[bool]:
    """One flush at a time saves work (correctness doesn't depend on it). The lock belongs to the
    connection, so a flush that dies releases it with its connection."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect() as conn:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": FLUSH_LOCK_ID}).scalar())
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": FLUSH_LOCK_ID})
                conn.commit()


def run_flush(settings: Settings, **kwargs: Any) -> FlushSummary:
    return Flusher(settings).run(**kwargs)
