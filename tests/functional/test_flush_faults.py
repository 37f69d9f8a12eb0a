"""The flush under faults: a process killed at every step, Redis down or wiped, two flushes at once (with and
without the advisory lock), and every Stripe failure FakeStripe can inject. Each ends with the exact check:
FakeStripe's per-customer totals == billable tokens metered per customer, every request stored once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from aikit.api.app import create_app
from aikit.faults import CRASH_ENV, CRASH_EXIT_CODE, CRASH_POINTS
from aikit.flush import FlushSummary
from aikit.send import RETRY_DELAYS
from tests.fakes.stripe_server import METER_EVENT_PATH, FakeStripe
from tests.support.billing import Billing, past_window_start, settings_env
from tests.support.db import empty_database
from tests.support.servers import redis_cluster, throwaway_redis

# A flush in its own process, with the settings from the environment (and AIKIT_CRASH_AT when set).
CHILD = """
import datetime as dt, json, os
from aikit.flush import Flusher
from aikit.settings import get_settings
settings = get_settings()
flusher = Flusher(settings, use_lock=os.environ.get("TEST_FLUSH_LOCK") != "0")
now = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=settings.stripe_report_window_seconds)
print(json.dumps(flusher.run(now=now).as_dict()))
"""

FAULTS = ("500", "503", "429", "timeout", "accept_then_500", "accept_then_drop")


def start_flush_process(h: Billing, cwd: Path, *, crash_at: str | None = None, lock: bool = True
                        ) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    env.update(settings_env(h.settings), TEST_FLUSH_LOCK="1" if lock else "0")
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.Popen([sys.executable, "-c", CHILD], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def spread(h: Billing, customers: int, per_key: int, *, keys_per_customer: int = 2) -> list[str]:
    made = [h.customer() for _ in range(customers)]
    # Stamped inside one closed window, so a run that crosses a window boundary still seals one
    # report per customer.
    window_start = past_window_start(1)
    for n, customer in enumerate(made):
        for k in range(keys_per_customer):
            h.record(h.key(customer), customer, per_key, ts=window_start + n, seed=n * 7 + k)
    return made


# -------------------------------------------------------------------------------- the process dies


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_process_killed_at_any_point_still_bills_exactly_once(
        billing: Billing, fake: FakeStripe, point: str, tmp_path: Path) -> None:
    spread(billing, 3, 90)  # 540 events: eleven batches of 50 or more

    code, _, err = finish(start_flush_process(billing, tmp_path, crash_at=point))

    assert code == CRASH_EXIT_CODE, err
    stored = billing.stored()
    buffered = sum(billing.redis().xlen(billing.layout.stream(s)) for s in range(billing.layout.shards))
    if point == "after_read":
        assert stored == {} and buffered == 540
    elif point == "after_store":
        assert 0 < len(stored) < 540 and buffered == 540  # stored, not yet removed from Redis
    elif point == "after_ack":
        assert 0 < len(stored) < 540 and len(stored) + buffered == 540
    else:
        assert len(stored) == 540 and buffered == 0
    billing.assert_pending_matches_buffer()
    if point == "after_seal":
        assert {r.status for r in billing.reports()} == {"pending"} and fake.meter_events == []
    if point == "after_send":  # Stripe took at least one event the dead flush never recorded as sent
        recorded = {e.identifier for e in fake.meter_events}
        assert recorded and all(r.status == "pending" for r in billing.reports() if r.id in recorded)

    summary = billing.flush()

    assert summary.ok, summary.errors
    if point == "after_send":
        assert summary.reports_already_recorded >= 1  # Stripe's "already exists": counted once
    billing.assert_exact()
    assert fake.concurrency_violations == 0


def test_redis_restarted_empty_after_a_crash_between_store_and_ack(
        flush_db: str, redis_prefix: str, fake: FakeStripe, tmp_path: Path) -> None:
    empty_database(flush_db)
    with throwaway_redis() as server:
        h = Billing.create(flush_db, redis_prefix, fake, redis_url=server.url)
        spread(h, 2, 100)
        code, _, err = finish(start_flush_process(h, tmp_path, crash_at="after_store"))
        assert code == CRASH_EXIT_CODE, err
        stored = h.stored()
        assert 0 < len(stored) < 400
        server.kill()  # no persistence: what was only in Redis is gone
        server.start()
        h.forget(set(h.requests) - set(stored))

        summary = h.flush()

        assert summary.ok, summary.errors
        assert summary.events_read == 0
        h.assert_exact()  # what reached Postgres is billed exactly once


# ------------------------------------------------------------------------------------- Redis faults


def test_usage_recorded_while_redis_is_down_is_billed_exactly_once(
        flush_db: str, redis_prefix: str, fake: FakeStripe) -> None:
    empty_database(flush_db)
    with throwaway_redis() as server:
        h = Billing.create(flush_db, redis_prefix, fake, redis_url=server.url)
        customer = h.customer()
        key = h.key(customer)
        with TestClient(create_app(runtime=h.runtime)) as client:
            buffered = {h.chat(client, key, 2 + i) for i in range(4)}
            assert h.flush(seal_all=False).rows_inserted == 4
            server.kill()
            direct = {h.chat(client, key, 3 + i) for i in range(5)}  # the meter falls back to Postgres
        assert set(h.stored()) == buffered | direct  # same request ids, written once

        down = h.flush()  # Redis still down: the drain fails, Postgres usage is sealed and sent anyway
        assert not down.ok and "drain" in down.errors[0]
        assert down.reports_sent >= 1
        server.start()
        up = h.flush()
        assert up.ok and up.stripe_calls == 0
        h.assert_exact()


def test_wiped_buffer_bills_exactly_what_reached_postgres(
        flush_db: str, redis_prefix: str, fake: FakeStripe) -> None:
    empty_database(flush_db)
    with throwaway_redis() as server:
        h = Billing.create(flush_db, redis_prefix, fake, redis_url=server.url)
        customer = h.customer()
        key = h.key(customer)
        h.record(key, customer, 30)
        assert h.flush().rows_inserted == 30
        lost = set(h.requests)
        h.record(key, customer, 20, seed=5)
        lost = set(h.requests) - lost
        redis.Redis.from_url(server.url).flushall()  # the buffer is gone before any flush saw it
        h.record(key, customer, 10, seed=9)
        h.forget(lost)

        summary = h.flush()

        assert summary.ok and summary.rows_inserted == 10
        h.assert_exact()


# --------------------------------------------------------------------------------- two flushes at once


def test_a_batch_removed_twice_moves_the_pending_counters_once(billing: Billing) -> None:
    customer = billing.customer()
    key = billing.key(customer)
    billing.record(key, customer, 120)
    flusher = billing.flusher(store_workers=1)
    shard = billing.layout.shard_of(key.api_key_id)
    first, second = [batch for batch, _ in zip(flusher.drainer.batches([shard]), range(2), strict=False)]
    part = FlushSummary()

    flusher.drainer.store_batch(first, part)  # the usual path
    flusher.drainer.store_batch(first, part)  # a second flush that read the same batch: nothing left to remove
    billing.assert_pending_matches_buffer()
    flusher.drainer.store_batch(second, part)
    flusher.drainer.store_batch(first, part)
    billing.assert_pending_matches_buffer()
    flusher.close()
    assert part.rows_inserted == 100
    billing.flush()
    billing.assert_exact()



def run_together(*flushes: Any) -> list[FlushSummary]:
    barrier = threading.Barrier(len(flushes))

    def go(flush: Any) -> FlushSummary:
        barrier.wait()
        result: FlushSummary = flush()
        return result

    with ThreadPoolExecutor(len(flushes)) as pool:
        return list(pool.map(go, flushes))


def test_two_flushes_at_once_with_the_lock(billing: Billing, fake: FakeStripe) -> None:
    spread(billing, 4, 100)
    fake.latency = 0.02

    results = run_together(billing.flush, billing.flush)

    assert all(r.ok for r in results), [r.errors for r in results]
    assert sum(r.rows_inserted for r in results) == 800
    assert sum(r.reports_sent for r in results) == 4
    billing.assert_exact()
    assert fake.concurrency_violations == 0


def test_two_flushes_at_once_without_the_lock_idempotency_alone_is_enough(
        billing: Billing, fake: FakeStripe) -> None:
    spread(billing, 4, 150)
    fake.latency = 0.02
    fake.strict_concurrency = True  # a second call for a customer in flight gets a 429, as live Stripe

    results = run_together(*[lambda: billing.flush(use_lock=False)] * 2)

    assert all(r.ok for r in results), [r.errors for r in results]  # no deadlock, no error
    assert sum(r.events_read for r in results) >= 1200  # both read; each row stored once all the same
    assert sum(r.rows_inserted for r in results) == 1200
    billing.flush()  # whatever a 429 left pending
    billing.assert_exact()


def test_two_flush_processes_at_once_without_the_lock(billing: Billing, fake: FakeStripe, tmp_path: Path) -> None:
    spread(billing, 3, 200)
    fake.latency = 0.02

    procs = [start_flush_process(billing, tmp_path, lock=False) for _ in range(2)]
    outcomes = [finish(p) for p in procs]

    for code, out, err in outcomes:
        assert code == 0, err
        assert json.loads(out.strip().splitlines()[-1])["ok"]
    billing.flush()
    billing.assert_exact()


# --------------------------------------------------------------------------------------- Stripe faults


@pytest.mark.parametrize("kind", FAULTS)
def test_stripe_fault_is_retried_with_backoff_within_the_run(billing: Billing, fake: FakeStripe, kind: str) -> None:
    victim, *_ = spread(billing, 3, 10)
    fake.inject(kind, count=2, customer=victim)

    summary = billing.flush()

    assert summary.ok and summary.reports_left_pending == 0 and summary.reports_parked == 0
    accepted_first = kind.startswith("accept_then")
    # Accepted-then-lost: the resend is refused as a duplicate, which counts as recorded.
    assert summary.reports_already_recorded == (1 if accepted_first else 0)
    assert summary.reports_sent + summary.reports_already_recorded == 3
    assert summary.stripe_calls == 3 + (1 if accepted_first else 2)
    assert len(billing.sleeps) == (1 if accepted_first else 2)
    assert billing.sleeps == sorted(billing.sleeps) and billing.sleeps[0] >= RETRY_DELAYS[0] * 0.8
    [report] = [r for r in billing.reports() if r.customer_id == victim]
    assert [e.identifier for e in fake.meter_events if e.customer == victim] == [report.id]
    billing.assert_exact()
    assert fake.concurrency_violations == 0


@pytest.mark.parametrize("kind", FAULTS)
def test_stripe_fault_outlasting_the_run_is_resent_next_run_with_the_same_identifier(
        billing: Billing, fake: FakeStripe, kind: str) -> None:
    victim, other = spread(billing, 2, 10)
    fake.inject(kind, customer=victim)  # then every retry of this run fails too
    fake.inject("503", count=len(RETRY_DELAYS), customer=victim)

    first = billing.flush()

    assert first.ok, first.errors  # not an error: the report waits for the next run
    assert first.reports_left_pending == 1 and first.reports_sent == 1
    [report] = [r for r in billing.reports() if r.customer_id == victim]
    assert report.status == "pending" and report.attempts == 1 + len(RETRY_DELAYS)
    assert report.last_error and report.last_error.startswith("retryable")
    accepted_first = kind.startswith("accept_then")
    assert len([e for e in fake.meter_events if e.customer == victim]) == (1 if accepted_first else 0)

    second = billing.flush()

    assert second.ok and second.stripe_calls == 1
    assert (second.reports_already_recorded, second.reports_sent) == ((1, 0) if accepted_first else (0, 1))
    assert [e.identifier for e in fake.meter_events if e.customer == victim] == [report.id]
    assert fake.meter_totals()[other] > 0
    billing.assert_exact()


def test_parallel_sends_never_overlap_for_one_customer(billing: Billing, fake: FakeStripe) -> None:
    customers = [billing.customer() for _ in range(8)]
    for n, customer in enumerate(customers):
        key = billing.key(customer)
        for windows_ago in (1, 2, 3):  # three reports per customer, sent one after the other
            billing.record(key, customer, 4, ts=past_window_start(windows_ago) + n, seed=n + windows_ago)
    fake.strict_concurrency = True
    fake.latency = 0.03
    fake.rate_limit = 1000  # live mode's meter-event budget: this test is about overlap, not test mode's 25/s

    summary = billing.flush(seal_all=False, send_workers=4)

    assert summary.ok and summary.reports_sent == summary.stripe_calls == 24
    assert fake.concurrency_violations == 0
    assert fake.calls[METER_EVENT_PATH] == 24
    billing.assert_exact()


@pytest.mark.cluster
def test_on_a_redis_cluster_with_concurrent_flushes_and_a_malformed_entry(
        flush_db: str, redis_prefix: str, fake: FakeStripe) -> None:
    """ElastiCache Serverless is cluster-only: both removal scripts, routed by hash slot, and the fallback
    path for a batch another flush removed first."""
    empty_database(flush_db)
    with redis_cluster() as url:
        h = Billing.create(flush_db, redis_prefix, fake, redis_url=url, redis_cluster=True)
        spread(h, 3, 120)
        client = h.redis()
        client.xadd(h.layout.stream(1), {"r": "req_broken", "k": "key_x", "i": "nope"})
        fake.latency = 0.01

        results = run_together(*[lambda: h.flush(use_lock=False)] * 2)

        assert all(r.ok for r in results), [r.errors for r in results]
        assert sum(r.rows_inserted for r in results) == 720
        assert sum(r.malformed for r in results) >= 1
        assert [f["r"] for _, f in client.xrange(h.layout.tag(1) + ":malformed")] == ["req_broken"]
        client.close()
        h.flush()
        h.assert_exact()
