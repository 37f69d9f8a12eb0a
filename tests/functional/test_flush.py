"""The flush end to end: real Redis and Postgres, FakeStripe through the real stripe SDK.

Every test ends with `Billing.assert_exact()`: FakeStripe's per-customer totals equal the billable tokens
metered per customer exactly, api_key_usage holds every request exactly once, every meter event is one sent
outbox row (same identifier, same value, timestamp inside its window), the rollups equal the rows, and the
Redis buffer and pending counters are empty.

The harness (Billing, billing_settings, ...) is tests/support/billing.py; its fixtures (billing, fake, flush_db)
are in tests/functional/conftest.py.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from aikit.api.app import create_app
from aikit.db.engine import get_engine
from aikit.db.migrate import upgrade
from aikit.db.models import ApiKeyUsage, MeterReport
from aikit.observability import PARKED_BATCHES, flush_metrics
from aikit.outbox import requeue_parked
from tests.fakes.stripe_server import METER_EVENT_PATH, FakeStripe
from tests.support.billing import (
    DAY,
    WINDOW,
    Billing,
    past_window_start,
)
from tests.support.db import empty_database
from tests.support.emf import emf_values

# ----------------------------------------------------------------------------------------------- tests


def test_stripe_calls_grow_with_customers_not_requests(billing: Billing, fake: FakeStripe) -> None:
    customers = [billing.customer() for _ in range(3)]
    start = past_window_start()
    for n, customer in enumerate(customers):
        for k in range(2):  # two keys per customer, one reporting window
            key = billing.key(customer)
            billing.record(key, customer, 2000 // 6 + (n == 0 and k == 0) * 2, ts=start + 10 + n * 7 + k,
                           seed=n * 10 + k)
    assert len(billing.requests) == 2000

    summary = billing.flush(seal_all=False)  # the window has ended on its own

    assert summary.ok, summary.errors
    assert summary.events_read == summary.rows_inserted == 2000
    assert summary.reports_sealed == summary.reports_sent == summary.stripe_calls == 3
    assert fake.calls[METER_EVENT_PATH] == 3
    billing.assert_exact()
    again = billing.flush()
    assert (again.events_read, again.stripe_calls, again.reports_sealed) == (0, 0, 0)
    assert fake.calls[METER_EVENT_PATH] == 3


def test_request_path_usage_is_billed_exactly_once(billing: Billing, fake: FakeStripe) -> None:
    alice, bob = billing.customer(), billing.customer()
    keys = [billing.key(alice), billing.key(alice), billing.key(bob)]
    no_customer = billing.key(None)
    with TestClient(create_app(runtime=billing.runtime)) as client:
        for i in range(30):
            billing.chat(client, keys[i % 3], 1 + i % 5)
    billing.record(no_customer, None, 25)  # keys without a customer (metered while Stripe was off)

    summary = billing.flush()

    assert summary.ok, summary.errors
    assert summary.rows_inserted == 55
    assert fake.concurrency_violations == 0
    billing.assert_exact()
    stored = billing.stored()
    with billing.engine.connect() as conn:
        no_customer_rows = set(conn.execute(select(ApiKeyUsage.request_id)
                                            .where(ApiKeyUsage.api_key_id == no_customer.api_key_id)).scalars())
    assert len(no_customer_rows) == 25
    assert all(not stored[r][1] for r in no_customer_rows)  # stored, never billable
    assert sum(1 for _, billable in stored.values() if billable) == 30


def test_event_timestamps_stay_inside_the_usage_window(billing: Billing, fake: FakeStripe) -> None:
    customer = billing.customer()
    key = billing.key(customer)
    starts = [past_window_start(1), past_window_start(2 * DAY // WINDOW), past_window_start(34 * DAY // WINDOW)]
    for n, start in enumerate(starts):
        billing.record(key, customer, 5, ts=start + 17 + n, seed=n)

    summary = billing.flush(seal_all=False)

    assert summary.reports_sent == summary.stripe_calls == 3
    billing.assert_exact()
    stamps = sorted(e.timestamp for e in fake.meter_events)
    assert stamps == sorted(start + 17 + n for n, start in enumerate(starts))  # the usage's own time


def test_backlog_older_than_35_days_is_parked_with_stripes_reason(
        billing: Billing, fake: FakeStripe, capsys: pytest.CaptureFixture[str]) -> None:
    customer = billing.customer()
    key = billing.key(customer)
    old = billing.record(key, customer, 3, ts=time.time() - 36 * DAY, billable=False)
    billing.record(key, customer, 4, ts=past_window_start() + 5)
    flush_metrics()
    capsys.readouterr()

    summary = billing.flush()

    flush_metrics()
    assert emf_values(capsys.readouterr().out, PARKED_BATCHES) == [1.0]
    assert summary.reports_parked == 1 and summary.reports_sent == 1
    [parked] = [r for r in billing.reports() if r.status == "parked"]
    assert parked.value == old
    assert "timestamp_too_far_in_past" in (parked.last_error or "")
    billing.assert_exact()  # the old usage is stored, not billed
    assert billing.flush().stripe_calls == 0  # parked stays parked


def test_permanent_rejection_parks_one_customer_and_bills_the_others(
        billing: Billing, fake: FakeStripe, capsys: pytest.CaptureFixture[str]) -> None:
    fake.rules["customer"] = "sync"  # refused at once (live Stripe may instead accept and report it later)
    good = [billing.customer() for _ in range(3)]
    unknown = billing.customer(in_stripe=False)
    for n, customer in enumerate([*good, unknown]):
        billing.record(billing.key(customer), customer, 10, seed=n, billable=customer != unknown)
    flush_metrics()
    capsys.readouterr()

    summary = billing.flush()

    flush_metrics()
    assert emf_values(capsys.readouterr().out, PARKED_BATCHES) == [1.0]
    assert summary.ok and summary.reports_parked == 1 and summary.reports_sent == 3
    [parked] = [r for r in billing.reports() if r.status == "parked"]
    assert parked.customer_id == unknown
    assert "No such customer" in (parked.last_error or "")
    billing.assert_exact()

    # Fixed by a human: the customer exists now; the parked report goes out once, same identifier.
    fake.add_customer(customer_id=unknown)
    assert requeue_parked(billing.settings, customer_id=unknown) == 1
    billing.metered[unknown] += parked.value
    assert billing.flush().reports_sent == 1
    assert [e.identifier for e in fake.meter_events if e.customer == unknown] == [parked.id]
    billing.assert_exact()


def test_inactive_meter_parks_every_report_until_requeued(billing: Billing, fake: FakeStripe) -> None:
    customers = [billing.customer() for _ in range(2)]
    for n, customer in enumerate(customers):
        billing.record(billing.key(customer), customer, 6, seed=n, billable=False)
    [meter] = fake.meters.values()
    meter["status"] = "inactive"

    summary = billing.flush()

    assert summary.reports_parked == 2 and summary.reports_sent == 0
    assert all("No active meter" in (r.last_error or "") for r in billing.reports())
    billing.assert_exact()
    meter["status"] = "active"
    assert requeue_parked(billing.settings) == 2
    for r in billing.reports():
        billing.metered[r.customer_id] += r.value
    assert billing.flush().reports_sent == 2
    billing.assert_exact()


def test_metering_off_stores_usage_sends_nothing_and_is_not_back_billed(
        flush_db: str, redis_prefix: str, fake: FakeStripe) -> None:
    empty_database(flush_db)
    off = Billing.create(flush_db, redis_prefix, fake, stripe_metering_enabled=False)
    customer = off.customer()
    key = off.key(customer)
    off.record(key, customer, 12, billable=False)

    summary = off.flush()

    assert summary.ok and summary.rows_inserted == 12 and summary.stripe_calls == 0
    assert fake.calls[METER_EVENT_PATH] == 0
    assert off.reports() == []
    assert all(not billable for _, billable in off.stored().values())

    # Switched on: only usage flushed from now on is billed; the rows stored while off stay unbilled.
    on = Billing.create(flush_db, redis_prefix, fake)
    on.customers, on.keys, on.requests = off.customers, off.keys, off.requests
    on.record(key, customer, 7, seed=3)
    summary = on.flush()
    assert summary.rows_inserted == 7 and summary.reports_sent == 1
    on.assert_exact()
    assert sum(1 for _, billable in on.stored().values() if not billable) == 12


def test_drain_over_its_time_budget_stops_cleanly_and_the_next_run_continues(billing: Billing) -> None:
    customer = billing.customer()
    for n in range(4):
        billing.record(billing.key(customer), customer, 150, seed=n)
    ticks = iter(range(10**6))

    def clock() -> float:  # every look at the clock costs a second
        return float(next(ticks))

    first = billing.flush(time_budget=8, clock=clock, store_workers=1)

    assert first.ok and first.stopped_early
    assert 0 < first.events_read < 600
    assert len(billing.stored()) == first.rows_inserted == first.events_read
    second = billing.flush()
    assert second.ok and not second.stopped_early
    assert first.events_read + second.events_read == 600
    billing.assert_exact()


def test_sending_over_its_time_budget_stops_cleanly_and_the_next_run_continues(
        billing: Billing, fake: FakeStripe) -> None:
    customers = [billing.customer() for _ in range(6)]
    for n, customer in enumerate(customers):
        billing.record(billing.key(customer), customer, 3, seed=n)

    # 0.3 s per call (under the 0.5 s client timeout) against a 1.0 s budget: some calls fit, six never do.
    fake.latency = 0.3
    first = billing.flush(time_budget=1.0, send_workers=1)

    assert first.ok and first.stopped_early
    assert first.rows_inserted == 18
    assert 0 < first.reports_sent < 6 and first.reports_left_pending == 6 - first.reports_sent
    fake.latency = 0
    second = billing.flush()
    # A call cut off by the deadline may still have landed: Stripe then answers "already exists".
    assert second.reports_sent + second.reports_already_recorded == 6 - first.reports_sent
    billing.assert_exact()


def test_malformed_buffer_entries_are_kept_aside_and_the_rest_is_flushed(billing: Billing) -> None:
    customer = billing.customer()
    key = billing.key(customer)
    billing.record(key, customer, 5)
    shard = billing.layout.shard_of(key.api_key_id)
    stream = billing.layout.stream(shard)
    client = billing.redis()
    client.xadd(stream, {"r": "req_bad1", "k": key.api_key_id, "c": customer, "m": "echo-1", "i": "x",
                         "o": "1", "x": "0", "t": str(time.time()), "d": "2026-01-01"})
    client.xadd(stream, {"oops": "1"})
    client.xadd(stream, {"r": "req_bad2\tinjected", "k": key.api_key_id, "c": customer, "m": "echo-1",
                         "i": "1", "o": "1", "x": "0", "t": str(time.time()), "d": "2026-01-01"})
    # As RECORD would have counted the third one (it has every counter field): it must leave them once.
    for name, amount in (("t", 2), ("r", 1), ("i", 1), ("o", 1)):
        client.hincrby(billing.layout.pending(key.api_key_id), f"2026-01-01|echo-1|{name}", amount)
    billing.record(key, customer, 5, seed=9)

    summary = billing.flush()

    assert summary.ok, summary.errors
    assert summary.malformed == 3 and summary.rows_inserted == 10
    kept = client.xrange(billing.layout.tag(shard) + ":malformed")
    assert [fields.get("r") for _, fields in kept] == ["req_bad1", None, "req_bad2\tinjected"]
    assert all(fields["id"] for _, fields in kept)  # the original entry id, for a human
    client.close()
    billing.assert_exact()  # pending counters empty: the valid entries' and the third one's, once each


def test_embedded_mode_sqlite_and_in_memory_redis(tmp_path: Any, fake: FakeStripe) -> None:
    url = f"sqlite:///{tmp_path / 'aikit.db'}"
    upgrade(url)
    h = Billing.create(url, f"mem{uuid.uuid4().hex[:8]}", fake, redis_url="memory://")
    customers = [h.customer() for _ in range(2)]
    for n, customer in enumerate(customers):
        h.record(h.key(customer), customer, 40 + 80 * (n == 0), seed=n)  # 120: batches add to one report

    summary = h.flush()

    assert summary.ok, summary.errors
    # The embedded meter wrote every event to SQLite as it was recorded; the flush seals and sends the reports.
    assert summary.events_read == summary.rows_inserted == 0 and summary.reports_sent == 2
    assert h.flush().reports_sent == 0
    h.assert_exact(buffer_empty=False)
    get_engine(url).dispose()


def test_a_report_unconfirmed_for_a_day_is_parked_not_resent(billing: Billing, fake: FakeStripe) -> None:
    """Stripe remembers identifiers for at least 24 h only: past that a resend could bill twice, so the report
    waits for a human (reconcile, then requeue)."""
    customer = billing.customer()
    billing.record(billing.key(customer), customer, 4)
    fake.inject("500", count=4)  # the first try and every retry of this run fail
    first = billing.flush()
    assert first.reports_left_pending == 1 and first.reports_sent == 0
    [report] = billing.reports()
    assert report.first_attempt_at is not None and report.attempts == 4
    with billing.engine.begin() as conn:  # a day of failed runs later
        conn.execute(update(MeterReport).values(
            first_attempt_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=24)))
    calls_before = fake.calls["/v1/billing/meter_events"]

    second = billing.flush()

    assert second.reports_parked == 1 and second.stripe_calls == 0
    assert fake.calls["/v1/billing/meter_events"] == calls_before
    [report] = billing.reports()
    assert report.status == "parked" and "identifier memory" in (report.last_error or "")
    assert requeue_parked(billing.settings, customer_id=customer) == 1
    assert billing.flush().reports_sent == 1
    billing.assert_exact()
