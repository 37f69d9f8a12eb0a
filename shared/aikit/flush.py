"""The flush: Redis buffer -> Postgres (rows, rollups, Stripe outbox) -> Stripe billing meter events.

Money rules, in order:
- An entry leaves Redis only after the transaction that stored it committed (store, then ACK).
- Rows are idempotent on request_id, so a replayed batch (crash before ACK, two flushes at once) adds nothing.
- A Stripe report's identifier is its outbox row id, fixed before the first attempt; every retry, in this run
  or a later one, re-sends it. Stripe's "An event already exists with identifier" means an earlier send
  landed: success. So a crash anywhere, two flushes at once, or an answer lost on the wire bills once.
- One meter event per customer per reporting window (STRIPE_REPORT_WINDOW_SECONDS): Stripe calls grow with
  customers, not requests. At most one call per customer at a time (Stripe's per-customer concurrency rule).
- The event timestamp lies inside the usage's window (so it lands in the invoice of that period) and never in
  the future; windows are cut where one of the customer's billing periods begins or ends (aikit.periods), so
  usage just before a period end or a cancellation is stamped, and invoiced, in that period (at the store; an
  edge learned after the usage was stored splits the report when it is sealed, aikit.outbox).
- Late usage: when the period a report's timestamp falls in has finalized its invoice (its end plus
  STRIPE_FINALIZATION_GRACE_SECONDS, less CARRY_MARGIN_SECONDS), Stripe would accept the event and never
  invoice it. Such a report is carried forward: stamped now, inside the customer's current period, recorded
  in `carried_forward_from`/`carried_forward_to` before the send (retries stamp the same), listed by
  `aikit reconcile`. Without known periods for the customer the timestamp is kept.
  Stripe refuses timestamps older than 35 days: such a backlog is parked with Stripe's reason
  (`timestamp_too_far_in_past`); it needs a human (see `aikit.outbox.requeue_parked` after a fix, or bill it by
  other means).
- A 401/403 (key wrong, revoked or restricted) is no verdict on a report: the run stops sending, every report
  stays pending (none parked), one `stripe_sending_stopped` log line, STRIPE_AUTH_FAILURES (alarmed).
- A permanent refusal (unknown customer, no active meter, too old) parks that report (status `parked`,
  `last_error` = Stripe's reason) and emits PARKED_BATCHES; other customers are still billed.
  Note that live Stripe validates some things asynchronously (an unknown customer may be accepted and
  reported later as `meter_event_customer_not_found`); `aikit reconcile` shows that as drift.
- Stripe keeps identifiers unique for "at least 24 hours". A report first tried more than
  IDENTIFIER_SAFE_HOURS ago and still unconfirmed is parked instead of resent (a first send that landed unseen
  would otherwise be billed twice). `aikit requeue-parked` settles it against Stripe's totals first (held:
  marked sent; not held: sent again; unclear: left parked), see `aikit.outbox.settle_unconfirmed`.

Throughput: shards are stored by STORE_WORKERS parallel lanes, each reading ahead while it stores (COPY into
a temp table, one merge statement, REPORT_LOCK only for the outbox upsert), and a stored batch leaves Redis
with ACK_FAST (the pending-counter deltas computed while reading). Memory stays at a few batches per lane.

Metering switched off (STRIPE_METERING_ENABLED=false) or no STRIPE_SECRET_KEY: usage still reaches Postgres
(api_key_usage, usage_daily) with billable=false and no outbox rows, and nothing is sent; keys without a Stripe
customer are always stored that way. Switching metering on later bills only usage flushed from then on: rows
stored while it was off stay billable=false and are never back-billed (usage still waiting in Redis at the switch
is billed by the next flush). Reports sealed before metering was switched off wait, unsent, until it is on again.

Fault injection (tests only): `crash_point(name)` hard-exits the process (os._exit(70): no cleanup, no commit,
no finally) when the environment variable AIKIT_CRASH_AT equals `name`. Points: after_read (a batch read from
Redis, not stored), after_store (committed to Postgres, not yet removed from Redis), after_ack, after_seal
(reports sealed, nothing sent) and after_send (Stripe accepted an event, the flush has not recorded it).
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Engine, text

from aikit.db.engine import get_engine
from aikit.metering.layout import RedisLayout
from aikit.metering.record import PENDING_COUNTERS, Batch, decode_batch
from aikit.metering.scripts import ACK_FAST, ACK_THROUGH
from aikit.metering.sql_sink import report_meter, store_copy, store_events
from aikit.observability import (
    EVENTS_FLUSHED,
    FLUSH_DURATION,
    FLUSH_LAG,
    PARKED_BATCHES,
    STRIPE_AUTH_FAILURES,
    STRIPE_ERRORS,
    emit,
    logger,
)
from aikit.outbox import (
    UNCONFIRMED_REASON,
    ReportState,
    customer_periods,
    event_timestamp,
    mark,
    pending_by_customer,
    stamp_carried_forward,
    unsafe_to_resend,
)
from aikit.outbox import seal as seal_reports
from aikit.redis_client import make_sync_redis
from aikit.settings import Settings
from aikit.stripe_gateway import BillingGateway, ReportOutcome, ReportStatus, gateway_from_settings

FLUSH_LOCK_ID = 7_214_002
RETRY_DELAYS = (0.5, 1.0, 2.0)  # backoff within one run; what still fails waits for the next run
SEND_WORKERS = 8  # reports go out in parallel across customers, one at a time per customer
STORE_WORKERS = 2  # shards stored in parallel, each lane on its own connection
# Part of the time budget kept for sending (a big backlog must not starve Stripe reports).
SEND_RESERVE_SHARE = 0.25
SEND_RESERVE_MAX_SECONDS = 30.0

CRASH_ENV = "AIKIT_CRASH_AT"
CRASH_EXIT_CODE = 70
CRASH_POINTS = ("after_read", "after_store", "after_ack", "after_seal", "after_send")


def crash_point(name: str) -> None:
    """Fault-injection hook: hard-exit here when AIKIT_CRASH_AT names this point (tests run the flush in a
    subprocess with it set). Unset in production: one environment lookup per batch or report."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(CRASH_EXIT_CODE)


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


def next_stream_id(entry_id: str) -> str:
    """The smallest stream id greater than `entry_id` (XTRIM MINID removes ids below it)."""
    ms, _, seq = entry_id.partition("-")
    if int(seq) >= 2**64 - 1:
        return f"{int(ms) + 1}-0"
    return f"{ms}-{int(seq) + 1}"


def _raw_xrange(response: Any, **_: Any) -> Any:
    return response


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
            # Entries as redis sends them ([id, [name, value, ...]]): no dict per entry on the hot path.
            self.redis.set_response_callback("XRANGE", _raw_xrange)
        self.engine = engine or get_engine(settings.database_url)
        self._owns_gateway = gateway is None
        self.gateway = gateway if gateway is not None else gateway_from_settings(settings)
        self.layout = RedisLayout(settings.redis_key_prefix, settings.redis_usage_shards)
        self.sleep = sleep
        self.clock = clock
        self.use_lock = use_lock
        self.send_workers = max(1, send_workers)
        self._refused: ReportOutcome | None = None  # the 401/403 that stopped this run's sending
        self._refused_lock = threading.Lock()
        self._postgres = self.engine.dialect.name == "postgresql"
        # SQLite has one writer at a time: no point in storing shards in parallel there.
        self.store_workers = max(1, min(store_workers if self._postgres else 1, self.layout.shards))

    @property
    def billable(self) -> bool:
        return self.gateway is not None and self.settings.stripe_metering_enabled

    def close(self) -> None:
        """Close the clients this Flusher created (not the ones passed in)."""
        if self._owns_gateway and self.gateway is not None:
            self.gateway.close()
        if self._owns_redis:
            self.redis.close()

    # -- Redis -> Postgres ------------------------------------------------------------------------------

    def drain(self, summary: FlushSummary, deadline: float) -> None:
        """Move the buffer into Postgres. Shards are split over `store_workers` lanes that store in parallel
        (each on its own connection); within a lane a helper thread reads the next batch while the current
        one is stored, so Redis, Python and Postgres work at the same time. A shard's batches are stored and
        removed strictly in order. Memory: at most three batches per lane."""
        started = self.clock()
        self._measure_lag(summary)
        lanes = self.store_workers
        stop = threading.Event()
        parts = [FlushSummary() for _ in range(lanes)]
        failures: list[BaseException] = []

        def lane(j: int) -> None:
            try:
                self._drain_lane(list(range(j, self.layout.shards, lanes)), parts[j], deadline, stop)
            except BaseException as exc:
                failures.append(exc)
                stop.set()

        if lanes == 1:
            lane(0)
        else:
            threads = [threading.Thread(target=lane, args=(j,), name=f"flush-lane-{j}", daemon=True)
                       for j in range(lanes)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        for part in parts:
            summary.events_read += part.events_read
            summary.rows_inserted += part.rows_inserted
            summary.malformed += part.malformed
            summary.stopped_early = summary.stopped_early or part.stopped_early
        summary.drain_seconds = round(self.clock() - started, 3)
        if failures:
            raise failures[0]

    def _drain_lane(self, shards: list[int], part: FlushSummary, deadline: float, stop: threading.Event) -> None:
        ahead: queue.Queue[Batch | BaseException | None] = queue.Queue(maxsize=1)
        halt = threading.Event()
        reader = threading.Thread(target=self._read_ahead, args=(shards, ahead, halt), daemon=True,
                                  name="flush-reader")
        reader.start()
        try:
            while not stop.is_set():
                item = ahead.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                crash_point("after_read")
                if self.clock() >= deadline:
                    part.stopped_early = True
                    break
                self._store_batch(item, part)
        finally:
            halt.set()
            while reader.is_alive():  # unblock a reader waiting to hand over a batch
                with suppress(queue.Empty):
                    ahead.get(timeout=0.05)
            reader.join()

    def _measure_lag(self, summary: FlushSummary) -> None:
        oldest: float | None = None
        for shard in range(self.layout.shards):
            first = self.redis.xrange(self.layout.stream(shard), count=1)
            if first:
                ms = int(first[0][0].split("-")[0]) / 1000
                oldest = ms if oldest is None else min(oldest, ms)
        summary.flush_lag_seconds = round(max(0.0, time.time() - oldest), 3) if oldest else 0.0
        emit(FLUSH_LAG, summary.flush_lag_seconds, unit="Seconds")

    def _read_ahead(self, shards: list[int], out: queue.Queue[Batch | BaseException | None],
                    halt: threading.Event) -> None:
        try:
            for batch in self._batches(shards):
                while not halt.is_set():
                    try:
                        out.put(batch, timeout=0.05)
                        break
                    except queue.Full:
                        continue
                if halt.is_set():
                    return
            out.put(None)
        except BaseException as exc:  # handed to the storing thread, which raises it
            out.put(exc)

    def _batches(self, shards: list[int]) -> Iterator[Batch]:
        """Each shard's stream from its head, in contiguous batches: each read starts right after the previous
        batch (exclusive), never at an acknowledgement, so reading ahead cannot skip an entry. A shard ends at
        its first short batch: entries arriving meanwhile wait for the next run."""
        size = self.settings.flush_batch_size
        for shard in shards:
            stream = self.layout.stream(shard)
            start = "-"
            while True:
                entries = self.redis.xrange(stream, min=start, count=size)
                if not entries:
                    break
                batch = decode_batch(shard, entries, metering_on=self.billable, copy=self._postgres,
                                     full=len(entries) >= size, book=self.settings.price_book)
                del entries  # the raw entries are the bulk of a batch's memory: not kept while it waits
                yield batch
                if not batch.full:
                    break
                start = "(" + batch.last_id

    def _store_batch(self, batch: Batch, part: FlushSummary) -> None:
        window = self.settings.stripe_report_window_seconds
        meter = report_meter(self.settings)
        if batch.valid:
            with self.engine.begin() as conn:
                if self._postgres:
                    inserted = store_copy(conn, batch.copy_rows, window_seconds=window, meter=meter)
                else:
                    inserted = store_events(conn, batch.events, billable=self.billable, window_seconds=window,
                                            meter=meter)
            part.rows_inserted += inserted
        crash_point("after_store")
        # Only now, with the rows committed, may the entries leave Redis.
        self._ack(batch)
        crash_point("after_ack")
        part.events_read += batch.size
        part.malformed += len(batch.malformed_ids)

    def _ack(self, batch: Batch) -> None:
        stream = self.layout.stream(batch.shard)
        prefix = self.layout.pending_prefix(batch.shard)
        if not batch.malformed_ids:
            by_key: dict[str, list[str]] = defaultdict(list)
            for (k, d, m), amounts in batch.deltas.items():
                fields = by_key[prefix + k]
                for suffix, amount in zip(PENDING_COUNTERS, amounts, strict=True):
                    fields += (f"{d}|{m}|{suffix}", str(amount))
            keys, args = [stream], [batch.first_id, next_stream_id(batch.last_id)]
            for key in sorted(by_key):
                keys.append(key)
                args += (str(len(by_key[key]) // 2), *by_key[key])
            if int(ACK_FAST.run(self.redis, keys, args)) >= 0:
                return
        # Malformed entries to keep aside, or a concurrent flush removed part of the batch already.
        if batch.malformed_ids:
            logger.error("malformed_usage_entries", extra={
                "shard": batch.shard, "count": len(batch.malformed_ids),
                "kept_in": self.layout.tag(batch.shard) + ":malformed"})
        ACK_THROUGH.run(
            self.redis,
            [stream, self.layout.tag(batch.shard) + ":malformed", *sorted(prefix + k for k in batch.key_ids)],
            [prefix, batch.last_id, next_stream_id(batch.last_id), *batch.malformed_ids],
        )

    # -- Postgres -> Stripe -----------------------------------------------------------------------------

    def seal(self, summary: FlushSummary, now: dt.datetime) -> None:
        """Fix the value of every report whose window has ended (aikit.outbox.seal)."""
        summary.reports_sealed += seal_reports(self.engine, now)
        crash_point("after_seal")

    def send(self, summary: FlushSummary, deadline: float) -> None:
        if not self.billable:
            return  # metering off: sealed reports wait until it is on again
        by_customer = pending_by_customer(self.engine)
        if not by_customer:
            return
        workers = min(self.send_workers, len(by_customer))
        self._refused = None
        # One thread per customer at a time: never two calls for the same customer in flight.
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flush-send") as pool:
            results = list(pool.map(lambda rows: self._send_customer(rows, deadline), by_customer.values()))
        for part in results:
            for name, value in part.items():
                setattr(summary, name, getattr(summary, name) + value)
        if self._refused is not None:
            summary.sending_stopped = True
            summary.errors.append(f"stripe refused the API key, sending stopped: {_describe(self._refused)}")
        if summary.reports_left_pending and self.clock() >= deadline:
            summary.stopped_early = True

    def _stop_sending(self, outcome: ReportOutcome) -> None:
        """A 401/403 says the key is wrong, revoked or lacks permissions, not that a report is: every report
        stays pending (none parked, no first attempt recorded), the run sends nothing more, and it alarms."""
        with self._refused_lock:
            first = self._refused is None
            self._refused = self._refused or outcome
        if first:
            emit(STRIPE_AUTH_FAILURES)
            logger.error("stripe_sending_stopped", extra={
                "http_status": outcome.http_status, "code": outcome.error_code,
                "reason": "Stripe refused the API key (check STRIPE_SECRET_KEY and its permissions); "
                          "reports stay pending and go out once the key works", "detail": outcome.message})

    def _send_customer(self, rows: list[Any], deadline: float) -> dict[str, int]:
        assert self.gateway is not None
        counts = {"stripe_calls": 0, "reports_sent": 0, "reports_already_recorded": 0, "reports_parked": 0,
                  "reports_left_pending": 0, "reports_carried_forward": 0}
        periods = customer_periods(self.engine, rows)
        for i, row in enumerate(rows):
            if self._refused is not None:
                counts["reports_left_pending"] += len(rows) - i
                break
            if unsafe_to_resend(row, dt.datetime.now(dt.UTC)):
                # Stripe may have forgotten the identifier of an unseen first send: a resend could bill twice.
                emit(PARKED_BATCHES)
                logger.error("meter_report_parked", extra={"report_id": row.id, "customer_id": row.customer_id,
                                                            "value": int(row.value), "reason": UNCONFIRMED_REASON})
                mark(self.engine, row.id, state=ReportState.PARKED, error=UNCONFIRMED_REASON)
                counts["reports_parked"] += 1
                continue
            stamp_carried_forward(self.engine, row, periods, self.settings.stripe_finalization_grace_seconds)
            outcome: ReportOutcome | None = None
            calls = 0
            for delay in (0.0, *RETRY_DELAYS):
                wait = delay * random.uniform(0.8, 1.2)  # jitter: runs do not retry in lockstep
                if self.clock() + wait >= deadline:
                    break
                if wait:
                    self.sleep(wait)
                calls += 1
                counts["stripe_calls"] += 1
                outcome = self.gateway.report_meter_event(
                    identifier=row.id, customer_id=row.customer_id, value=int(row.value),
                    timestamp=event_timestamp(row, dt.datetime.now(dt.UTC)), meter=row.meter)
                if outcome.status is not ReportStatus.RETRYABLE:
                    break
                emit(STRIPE_ERRORS, kind=outcome.error_code or "retryable")
            if outcome is not None and outcome.status is ReportStatus.UNAUTHORIZED:
                # Not an attempt Stripe could have recorded: the identifier-memory clock does not start.
                mark(self.engine, row.id, attempts=calls - 1, error=_describe(outcome))
                self._stop_sending(outcome)
                counts["reports_left_pending"] += len(rows) - i
                break
            if outcome is None or outcome.status is ReportStatus.RETRYABLE:
                # Same identifier next run. Stop this customer here: keeps its reports in order.
                mark(self.engine, row.id, attempts=calls, error=_describe(outcome))
                counts["reports_left_pending"] += len(rows) - i
                break
            if outcome.status is ReportStatus.PERMANENT:
                emit(STRIPE_ERRORS, kind=outcome.error_code or "permanent")
                emit(PARKED_BATCHES)
                logger.error("meter_report_parked", extra={"report_id": row.id, "customer_id": row.customer_id,
                                                            "value": int(row.value), "reason": _describe(outcome)})
                mark(self.engine, row.id, state=ReportState.PARKED, attempts=calls, error=_describe(outcome))
                counts["reports_parked"] += 1
                continue
            crash_point("after_send")
            mark(self.engine, row.id, state=ReportState.SENT, attempts=calls, sent=True)
            key = "reports_sent" if outcome.status is ReportStatus.ACCEPTED else "reports_already_recorded"
            counts[key] += 1
            counts["reports_carried_forward"] += row.carried_forward_to is not None
        return counts

    # -- one run ----------------------------------------------------------------------------------------

    def run(self, *, now: dt.datetime | None = None, time_budget: float | None = None) -> FlushSummary:
        """One flush. `now` only decides which windows are sealed (tests pass a later time to seal the current
        window); event timestamps always come from the usage itself and the real clock."""
        started = self.clock()
        budget = time_budget if time_budget is not None else self.settings.flush_time_budget_seconds
        deadline = started + budget
        drain_deadline = deadline - min(SEND_RESERVE_MAX_SECONDS, budget * SEND_RESERVE_SHARE)
        summary = FlushSummary()
        try:
            with self._exclusive() as acquired:
                if not acquired:
                    summary.skipped = True
                    return summary
                try:
                    self.drain(summary, drain_deadline)
                except Exception as exc:
                    # Redis down or a bad batch: what already reached Postgres (the request path's fallback
                    # writes included) still gets sealed and sent.
                    logger.exception("flush_drain_failed")
                    summary.errors.append(f"drain: {type(exc).__name__}: {exc}")
                current = now or dt.datetime.now(dt.UTC)
                self.seal(summary, current)
                self.send(summary, deadline)
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
        with flush_lock(self.engine) as acquired:
            yield acquired


def _describe(outcome: ReportOutcome | None) -> str:
    if outcome is None:
        return "out of time before the first attempt"
    return f"{outcome.status.name.lower()}: {outcome.error_code or ''} {outcome.message or ''}".strip()


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
    flusher = Flusher(settings)
    try:
        return flusher.run(**kwargs)
    finally:
        flusher.close()
