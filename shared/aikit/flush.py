"""The flush: Redis buffer -> Postgres (rows, rollups, Stripe outbox) -> Stripe billing meter events.

One run holds the advisory lock (one flush at a time saves work; correctness does not depend on it), then:
1. drain (aikit.drain): the buffer into Postgres, store then ACK, idempotent on request_id;
2. seal (aikit.outbox.seal): fix the value of every report whose window has ended;
3. send (aikit.send): sealed reports to Stripe, each under its fixed identifier, so it bills once.
A drain that fails (Redis down, a bad batch) does not stop 2 and 3: what already reached Postgres (the request
path's fallback writes included) still gets sealed and sent. Part of the time budget is kept for sending, so a
big backlog cannot starve Stripe reports.

Money rules (each module states its own in full):
- An entry leaves Redis only after the transaction that stored it committed; rows are idempotent on request_id.
- A Stripe report's identifier is its outbox row id, fixed before the first attempt: every retry, in this run or
  a later one, re-sends it, so a crash anywhere, two flushes at once, or an answer lost on the wire bills once.
- One meter event per customer per reporting window (STRIPE_REPORT_WINDOW_SECONDS): Stripe calls grow with
  customers, not requests. At most one call per customer at a time (Stripe's per-customer concurrency rule).
- The event timestamp lies inside the usage's window (so it lands in the invoice of that period) and never in
  the future; windows are cut where one of the customer's billing periods begins or ends (aikit.periods), so
  usage just before a period end or a cancellation is stamped, and invoiced, in that period (at the store; an
  edge learned after the usage was stored splits the report when it is sealed, aikit.outbox). Late usage, whose
  period's invoice has finalized, is carried forward into the current period (aikit.send, aikit.outbox).
- A 401/403 stops sending and parks nothing; a permanent refusal or a report unconfirmed past Stripe's
  identifier memory is parked for a human (aikit.send).

Metering switched off (STRIPE_METERING_ENABLED=false) or no STRIPE_SECRET_KEY: usage still reaches Postgres
(api_key_usage, usage_daily) with billable=false and no outbox rows, and nothing is sent; keys without a Stripe
customer are always stored that way. Switching metering on later bills only usage flushed from then on: rows
stored while it was off stay billable=false and are never back-billed (usage still waiting in Redis at the switch
is billed by the next flush). Reports sealed before metering was switched off wait, unsent, until it is on again.

Fault injection for tests: aikit.faults (AIKIT_CRASH_AT).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Engine, text

from aikit.db.engine import get_engine
from aikit.drain import STORE_WORKERS, Drain, read_raw_entries
from aikit.faults import crash_point
from aikit.metering.layout import RedisLayout
from aikit.observability import EVENTS_FLUSHED, FLUSH_DURATION, emit, logger
from aikit.outbox import seal as seal_reports
from aikit.redis_client import make_sync_redis
from aikit.send import SEND_WORKERS, RetryPolicy, Sender, SendResult
from aikit.settings import Settings
from aikit.stripe_gateway import BillingGateway, gateway_from_settings

_FLUSH_LOCK_ID = 7_214_002
# Part of the time budget kept for sending (a big backlog must not starve Stripe reports).
_SEND_RESERVE_SHARE = 0.25
_SEND_RESERVE_MAX_SECONDS = 30.0


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
    drain_seconds: float = 0.0
    duration_ms: float = 0.0
    skipped: bool = False  # another flush held the lock
    stopped_early: bool = False  # the time budget ran out; the rest goes next run
    sending_stopped: bool = False  # Stripe refused the key (401/403): nothing more was sent, nothing parked
    reports_carried_forward: int = 0  # sent into the current period: their own period's invoice had finalized
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def add_send(self, sent: SendResult) -> None:
        """Adds what the send did (aikit.send) into the run's summary."""
        self.stripe_calls += sent.stripe_calls
        self.reports_sent += sent.reports_sent
        self.reports_already_recorded += sent.reports_already_recorded
        self.reports_parked += sent.reports_parked
        self.reports_left_pending += sent.reports_left_pending
        self.reports_carried_forward += sent.reports_carried_forward
        self.stopped_early = self.stopped_early or sent.stopped_early
        self.sending_stopped = self.sending_stopped or sent.sending_stopped
        self.errors.extend(sent.errors)


class Flusher:
    def __init__(self, settings: Settings, *, redis: Any = None, engine: Engine | None = None,
                 gateway: BillingGateway | None = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, use_lock: bool = True,
                 send_workers: int = SEND_WORKERS, store_workers: int = STORE_WORKERS) -> None:
        """`use_lock=False` skips the one-flush-at-a-time advisory lock (tests prove idempotency alone keeps
        concurrent flushes correct). `sleep` and `clock` let tests run the backoff and the budget quickly."""
        self.settings = settings
        self._owns_redis = redis is None
        self.redis = redis if redis is not None else make_sync_redis(settings)
        if self._owns_redis and hasattr(self.redis, "set_response_callback") and not settings.redis_cluster:
            read_raw_entries(self.redis)
        self.engine = engine or get_engine(settings.database_url)
        self._owns_gateway = gateway is None
        self.gateway = gateway if gateway is not None else gateway_from_settings(settings)
        self.layout = RedisLayout(settings.redis_key_prefix, settings.redis_usage_shards)
        self.clock = clock
        self.use_lock = use_lock
        self.drainer = Drain(settings, self.redis, self.engine, self.layout, metering_on=self.billable,
                             clock=clock, store_workers=store_workers)
        self.sender = Sender(settings, self.engine, self.gateway, metering_on=self.billable,
                             retry=RetryPolicy(sleep=sleep, clock=clock), workers=send_workers)

    @property
    def billable(self) -> bool:
        return self.gateway is not None and self.settings.stripe_metering_enabled

    def close(self) -> None:
        """Close the clients this Flusher created (not the ones passed in)."""
        if self._owns_gateway and self.gateway is not None:
            self.gateway.close()
        if self._owns_redis:
            self.redis.close()

    def seal(self, summary: FlushSummary, now: dt.datetime) -> None:
        """Fix the value of every report whose window has ended (aikit.outbox.seal)."""
        summary.reports_sealed += seal_reports(self.engine, now)
        crash_point("after_seal")

    def run(self, *, now: dt.datetime | None = None, time_budget: float | None = None) -> FlushSummary:
        """One flush. `now` only decides which windows are sealed (tests pass a later time to seal the current
        window); event timestamps always come from the usage itself and the real clock."""
        started = self.clock()
        budget = time_budget if time_budget is not None else self.settings.flush_time_budget_seconds
        deadline = started + budget
        drain_deadline = deadline - min(_SEND_RESERVE_MAX_SECONDS, budget * _SEND_RESERVE_SHARE)
        summary = FlushSummary()
        try:
            with self._exclusive() as acquired:
                if not acquired:
                    summary.skipped = True
                    return summary
                try:
                    self.drainer.run(summary, drain_deadline)
                except Exception as exc:
                    # Redis down or a bad batch: what already reached Postgres (the request path's fallback
                    # writes included) still gets sealed and sent.
                    logger.exception("flush_drain_failed")
                    summary.errors.append(f"drain: {type(exc).__name__}: {exc}")
                current = now or dt.datetime.now(dt.UTC)
                self.seal(summary, current)
                summary.add_send(self.sender.send(deadline))
        except Exception as exc:
            logger.exception("flush_failed")
            summary.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            summary.duration_ms = round((self.clock() - started) * 1000, 1)
            emit(FLUSH_DURATION, summary.duration_ms, unit="Milliseconds")
            emit(EVENTS_FLUSHED, summary.rows_inserted)
        return summary

    @contextmanager
    def _exclusive(self) -> Iterator[bool]:
        if not self.use_lock:
            yield True
            return
        with _flush_lock(self.engine) as acquired:
            yield acquired


@contextmanager
def _flush_lock(engine: Engine) -> Iterator[bool]:
    """One flush at a time saves work (correctness doesn't depend on it). The lock belongs to the
    connection, so a flush that dies releases it with its connection."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect() as conn:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": _FLUSH_LOCK_ID}).scalar())
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _FLUSH_LOCK_ID})
                conn.commit()


def run_flush(settings: Settings, **kwargs: Any) -> FlushSummary:
    flusher = Flusher(settings)
    try:
        return flusher.run(**kwargs)
    finally:
        flusher.close()
