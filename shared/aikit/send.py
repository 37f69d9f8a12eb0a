"""The send: sealed meter reports (the outbox, aikit.outbox) -> Stripe billing meter events.

Money rules:
- A Stripe report's identifier is its outbox row id, fixed before the first attempt; every retry, in this run
  or a later one, re-sends it. Stripe's "An event already exists with identifier" means an earlier send
  landed: success. So a crash anywhere, two flushes at once, or an answer lost on the wire bills once.
- At most one call per customer at a time (Stripe's per-customer concurrency rule), and a customer's reports go
  in order: the first one left pending keeps the rest pending too.
- The event timestamp lies inside the usage's window (so it lands in the invoice of that period) and never in
  the future (aikit.outbox.event_timestamp).
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
- Metering off: nothing is sent; sealed reports wait until it is on again.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

from sqlalchemy import Engine

from aikit.faults import crash_point
from aikit.observability import PARKED_BATCHES, STRIPE_AUTH_FAILURES, STRIPE_ERRORS, emit, logger
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
from aikit.periods import Period
from aikit.settings import Settings
from aikit.stripe_gateway import BillingGateway, ReportOutcome, ReportStatus

RETRY_DELAYS = (0.5, 1.0, 2.0)  # backoff within one run; what still fails waits for the next run
SEND_WORKERS = 8  # reports go out in parallel across customers, one at a time per customer


@dataclass(frozen=True)
class RetryPolicy:
    """When a report is tried in this run: at once, then after each delay (jittered, so runs do not retry in
    lockstep), never starting an attempt past the deadline."""

    sleep: Callable[[float], None]
    clock: Callable[[], float]
    delays: tuple[float, ...] = RETRY_DELAYS
    jitter: tuple[float, float] = (0.8, 1.2)

    def attempts(self, deadline: float) -> Iterator[None]:
        """Yields before each attempt; the caller stops early on an answer worth keeping."""
        for delay in (0.0, *self.delays):
            wait = delay * random.uniform(*self.jitter)
            if self.clock() + wait >= deadline:
                return
            if wait:
                self.sleep(wait)
            yield


@dataclass
class _CustomerCounts:
    """One customer's part of a send."""

    stripe_calls: int = 0
    reports_sent: int = 0
    reports_already_recorded: int = 0
    reports_parked: int = 0
    reports_left_pending: int = 0
    reports_carried_forward: int = 0


@dataclass
class SendResult(_CustomerCounts):
    """What a send did (aikit.flush adds it into the run's FlushSummary): its customers' counts summed, and how
    it ended."""

    stopped_early: bool = False  # the time budget ran out; the rest goes next run
    sending_stopped: bool = False  # Stripe refused the key (401/403): nothing more was sent, nothing parked
    errors: list[str] = field(default_factory=list)

    def add(self, part: _CustomerCounts) -> None:
        for counter in fields(_CustomerCounts):
            setattr(self, counter.name, getattr(self, counter.name) + getattr(part, counter.name))


def describe(outcome: ReportOutcome | None) -> str:
    if outcome is None:
        return "out of time before the first attempt"
    return f"{outcome.status.name.lower()}: {outcome.error_code or ''} {outcome.message or ''}".strip()


class Sender:
    def __init__(self, settings: Settings, engine: Engine, gateway: BillingGateway | None, *, metering_on: bool,
                 retry: RetryPolicy, workers: int = SEND_WORKERS) -> None:
        self.settings = settings
        self.engine = engine
        self.gateway = gateway
        self.metering_on = metering_on
        self.retry = retry
        self.workers = max(1, workers)
        self._refused: ReportOutcome | None = None  # the 401/403 that stopped this run's sending
        self._refused_lock = threading.Lock()

    def send(self, deadline: float) -> SendResult:
        result = SendResult()
        if not self.metering_on:
            return result  # metering off: sealed reports wait until it is on again
        by_customer = pending_by_customer(self.engine)
        if not by_customer:
            return result
        workers = min(self.workers, len(by_customer))
        self._refused = None
        # One thread per customer at a time: never two calls for the same customer in flight.
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flush-send") as pool:
            parts = list(pool.map(lambda rows: self._send_customer(rows, deadline), by_customer.values()))
        for part in parts:
            result.add(part)
        if self._refused is not None:
            result.sending_stopped = True
            result.errors.append(f"stripe refused the API key, sending stopped: {describe(self._refused)}")
        if result.reports_left_pending and self.retry.clock() >= deadline:
            result.stopped_early = True
        return result

    def _send_customer(self, rows: list[Any], deadline: float) -> _CustomerCounts:
        counts = _CustomerCounts()
        periods = customer_periods(self.engine, rows)
        for i, row in enumerate(rows):
            if self._refused is not None or not self._send_report(row, periods, deadline, counts):
                # Same identifiers next run. Stop this customer here: keeps its reports in order.
                counts.reports_left_pending += len(rows) - i
                break
        return counts

    def _send_report(self, row: Any, periods: list[Period], deadline: float, counts: _CustomerCounts) -> bool:
        """Settle one report; False when it stays pending (and with it the customer's later ones)."""
        if unsafe_to_resend(row, dt.datetime.now(dt.UTC)):
            # Stripe may have forgotten the identifier of an unseen first send: a resend could bill twice.
            self._park(row, UNCONFIRMED_REASON, counts)
            return True
        stamp_carried_forward(self.engine, row, periods, self.settings.stripe_finalization_grace_seconds)
        outcome, calls = self._call_stripe(row, deadline, counts)
        if outcome is not None and outcome.status is ReportStatus.UNAUTHORIZED:
            # Not an attempt Stripe could have recorded: the identifier-memory clock does not start.
            mark(self.engine, row.id, attempts=calls - 1, error=describe(outcome))
            self._stop_sending(outcome)
            return False
        if outcome is None or outcome.status is ReportStatus.RETRYABLE:
            mark(self.engine, row.id, attempts=calls, error=describe(outcome))
            return False
        if outcome.status is ReportStatus.PERMANENT:
            emit(STRIPE_ERRORS, kind=outcome.error_code or "permanent")
            self._park(row, describe(outcome), counts, attempts=calls)
            return True
        crash_point("after_send")
        mark(self.engine, row.id, state=ReportState.SENT, attempts=calls, sent=True)
        if outcome.status is ReportStatus.ACCEPTED:
            counts.reports_sent += 1
        else:
            counts.reports_already_recorded += 1
        counts.reports_carried_forward += row.carried_forward_to is not None
        return True

    def _call_stripe(self, row: Any, deadline: float, counts: _CustomerCounts) -> tuple[ReportOutcome | None, int]:
        """The report's attempts in this run (RetryPolicy): its last answer (None: no time for a first one) and
        how many calls it took."""
        assert self.gateway is not None
        outcome: ReportOutcome | None = None
        calls = 0
        for _ in self.retry.attempts(deadline):
            calls += 1
            counts.stripe_calls += 1
            outcome = self.gateway.report_meter_event(
                identifier=row.id, customer_id=row.customer_id, value=int(row.value),
                timestamp=event_timestamp(row, dt.datetime.now(dt.UTC)), meter=row.meter)
            if outcome.status is not ReportStatus.RETRYABLE:
                break
            emit(STRIPE_ERRORS, kind=outcome.error_code or "retryable")
        return outcome, calls

    def _park(self, row: Any, reason: str, counts: _CustomerCounts, *, attempts: int = 0) -> None:
        """The one way a report is parked: it needs a human (`aikit reconcile`, `aikit requeue-parked`)."""
        emit(PARKED_BATCHES)
        logger.error("meter_report_parked", extra={"report_id": row.id, "customer_id": row.customer_id,
                                                    "value": int(row.value), "reason": reason})
        mark(self.engine, row.id, state=ReportState.PARKED, attempts=attempts, error=reason)
        counts.reports_parked += 1

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
