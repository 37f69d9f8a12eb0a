"""The flush end to end: real Redis and Postgres, FakeStripe through the real stripe SDK.

Every test ends with `Billing.assert_exact()`: FakeStripe's per-customer totals equal the billable tokens
metered per customer exactly, api_key_usage holds every request exactly once, every meter event is one sent
outbox row (same identifier, same value, timestamp inside its window), the rollups equal the rows, and the
Redis buffer and pending counters are empty.

The helpers here (Billing, billing_settings, flush_db, ...) are shared with test_flush_faults.py,
test_reconcile.py and test_flush_handler.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from redis.cluster import RedisCluster
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from aikit.api.app import create_app
from aikit.db.engine import get_engine
from aikit.db.migrate import upgrade
from aikit.db.models import ApiKeyUsage, MeterReport, Subscription, UsageDaily
from aikit.flush import Flusher, FlushSummary
from aikit.keys import IssuedKey
from aikit.metering.layout import RedisLayout
from aikit.observability import PARKED_BATCHES, flush_metrics
from aikit.outbox import requeue_parked
from aikit.runtime import Runtime
from aikit.settings import Settings
from aikit.stripe_gateway import StripeGateway
from tests.conftest import issue_key, make_settings, migrated_database
from tests.fakes.stripe_server import METER_EVENT_PATH, FakeStripe

EVENT = "api_tokens"
WINDOW = 300
DAY = 86400
TABLES = ("meter_reports", "usage_daily", "api_key_usage", "subscriptions", "api_keys", "users", "stripe_events")


# --------------------------------------------------------------------------------------------- harness


def billing_settings(database_url: str, prefix: str, fake: FakeStripe, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "stripe_secret_key": fake.api_key,
        "stripe_api_base": fake.url,
        "stripe_meter_event_name": EVENT,
        "stripe_timeout_seconds": 0.5,  # FakeStripe's "timeout" fault stalls longer than this
        "stripe_max_network_retries": 0,
        "stripe_report_window_seconds": WINDOW,
        "redis_usage_shards": 4,
        "flush_batch_size": 50,
        # A loaded machine must not turn a slow RECORD into a Postgres fallback write: counts would shift.
        "redis_timeout_seconds": 5.0,
    }
    values.update(overrides)
    return make_settings(database_url, prefix, **values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The same settings as environment variables, for a flush in another process."""
    names = ("database_url", "redis_url", "redis_key_prefix", "redis_usage_shards", "redis_timeout_seconds",
             "stripe_secret_key", "stripe_api_base", "stripe_meter_event_name", "stripe_timeout_seconds",
             "stripe_max_network_retries", "stripe_report_window_seconds", "flush_batch_size")
    env = {name.upper(): str(getattr(settings, name)) for name in names if getattr(settings, name) is not None}
    env["STRIPE_METERING_ENABLED"] = "true" if settings.stripe_metering_enabled else "false"
    return env


def past_window_start(windows_ago: int = 1) -> int:
    """Start of a reporting window that has already ended."""
    return (int(time.time()) // WINDOW - windows_ago) * WINDOW


def emf_values(out: str, name: str) -> list[float]:
    """Values of one metric in the EMF records printed to stdout."""
    values: list[float] = []
    for line in out.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "_aws" in record and name in record:
            value = record[name]
            values.extend(value if isinstance(value, list) else [value])
    return values


@dataclass
class Billing:
    settings: Settings
    fake: FakeStripe
    runtime: Runtime
    sleeps: list[float] = field(default_factory=list)
    customers: list[str] = field(default_factory=list)
    keys: list[IssuedKey] = field(default_factory=list)
    metered: Counter[str] = field(default_factory=Counter)  # billable tokens per customer: Stripe's due
    requests: dict[str, int] = field(default_factory=dict)  # request_id -> tokens, each must be stored once
    customer_of: dict[str, str | None] = field(default_factory=dict)  # request_id or api_key_id -> customer

    @classmethod
    def create(cls, database_url: str, prefix: str, fake: FakeStripe, **overrides: Any) -> Billing:
        settings = billing_settings(database_url, prefix, fake, **overrides)
        if not fake.meters:
            gateway = StripeGateway(settings)
            gateway.ensure_setup(event_name=EVENT)
            gateway.close()
        return cls(settings, fake, Runtime(settings))

    @property
    def engine(self) -> Any:
        return get_engine(self.settings.database_url)

    @property
    def layout(self) -> RedisLayout:
        return RedisLayout(self.settings.redis_key_prefix, self.settings.redis_usage_shards)

    def redis(self) -> Any:
        if self.settings.redis_cluster:
            return RedisCluster.from_url(self.settings.redis_url, decode_responses=True)
        return redis.Redis.from_url(self.settings.redis_url, decode_responses=True)

    def customer(self, *, in_stripe: bool = True) -> str:
        customer = self.fake.add_customer() if in_stripe else f"cus_unknown_{uuid.uuid4().hex[:10]}"
        self.customers.append(customer)
        return customer

    def key(self, customer: str | None) -> IssuedKey:
        email = f"{customer or uuid.uuid4().hex[:12]}@example.com"  # one user per customer
        issued = issue_key(self.settings, email=email, customer_id=customer, rpm=100_000, rpd=1_000_000,
                           monthly_tokens=10**12)
        if customer is not None:
            with Session(self.engine) as session:
                if session.get(Subscription, "sub_" + customer) is None:
                    session.add(Subscription(id="sub_" + customer, customer_id=customer, status="active"))
                session.commit()
        self.keys.append(issued)
        self.customer_of[issued.api_key_id] = customer
        return issued

    def record(self, key: IssuedKey, customer: str | None, n: int = 1, *, ts: float | None = None,
               billable: bool = True, seed: int = 0) -> int:
        """n usage events through the request path's meter (RECORD, or its Postgres fallback); returns
        their tokens. `billable`: whether the flush that stores them will bill them."""
        specs = [(10 + (seed + j) % 17, 5 + (seed + j) % 11) for j in range(n)]

        async def go() -> list[Any]:
            done = []
            for chunk in range(0, n, 100):
                done += await asyncio.gather(*[
                    self.runtime.meter.record(key.api_key_id, i + o, customer, input_tokens=i, output_tokens=o,
                                              cached_tokens=i // 3, model="echo-1", ts=ts)
                    for i, o in specs[chunk:chunk + 100]])
            await self.runtime.aclose()
            return done

        total = 0
        for event in asyncio.run(go()):
            self.requests[event.request_id] = event.tokens
            self.customer_of[event.request_id] = customer
            total += event.tokens
        if billable and customer is not None:
            self.metered[customer] += total
        return total

    def chat(self, client: TestClient, key: IssuedKey, words: int, *, billable: bool = True) -> str:
        """One chat completion through the API; returns its request id."""
        r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key.api_key}"},
                        json={"model": "echo-1", "messages": [{"role": "user", "content": "w " * words}]})
        assert r.status_code == 200, r.text
        tokens = r.json()["usage"]["total_tokens"]
        request_id = r.headers["X-Request-Id"]
        self.requests[request_id] = tokens
        customer = self.customer_of[request_id] = self.customer_of[key.api_key_id]
        if billable and customer is not None:
            self.metered[customer] += tokens
        return request_id

    def forget(self, request_ids: set[str]) -> None:
        """Requests lost on purpose (a wiped buffer): no longer expected anywhere."""
        for request_id in request_ids:
            tokens = self.requests.pop(request_id)
            customer = self.customer_of[request_id]
            if customer is not None:
                self.metered[customer] -= tokens

    def flusher(self, **kwargs: Any) -> Flusher:
        kwargs.setdefault("sleep", self.sleeps.append)
        return Flusher(self.settings, **kwargs)

    def flush(self, *, seal_all: bool = True, time_budget: float | None = None, **kwargs: Any) -> FlushSummary:
        """One flush; seal_all pretends a window later so the current window is reported too."""
        now = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=WINDOW) if seal_all else None
        flusher = self.flusher(**kwargs)
        try:
            return flusher.run(now=now, time_budget=time_budget)
        finally:
            flusher.close()

    def reports(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(MeterReport).order_by(MeterReport.window_start)))

    def stored(self) -> dict[str, tuple[int, bool]]:
        with self.engine.connect() as conn:
            return {r: (t, b) for r, t, b in conn.execute(
                select(ApiKeyUsage.request_id, ApiKeyUsage.tokens, ApiKeyUsage.billable))}

    def assert_pending_matches_buffer(self) -> None:
        """The live pending counters hold exactly the entries still buffered (none counted twice or lost)."""
        client = self.redis()
        try:
            buffered: Counter[str] = Counter()
            for shard in range(self.layout.shards):
                for _, fields in client.xrange(self.layout.stream(shard)):
                    buffered[fields["k"]] += int(fields["i"]) + int(fields["o"])
            pending = {k.api_key_id: sum(int(v) for f, v in client.hgetall(self.layout.pending(k.api_key_id)).items()
                                         if f.endswith("|t")) for k in self.keys}
        finally:
            client.close()
        assert pending == {k.api_key_id: buffered[k.api_key_id] for k in self.keys}

    def assert_exact(self, *, buffer_empty: bool = True) -> None:
        totals = self.fake.meter_totals(EVENT)
        assert set(totals) <= set(self.customers), "someone not in this test was billed"
        assert {c: totals.get(c, 0) for c in self.customers} == {c: self.metered[c] for c in self.customers}
        # api_key_usage: every request exactly once (request_id is unique), with its tokens.
        stored = self.stored()
        assert {r: t for r, (t, _) in stored.items()} == self.requests
        with self.engine.connect() as conn:
            count = conn.execute(select(func.count()).select_from(ApiKeyUsage)).scalar_one()
            reports = {r.id: r for r in conn.execute(select(MeterReport))}
            rows = {(k, d, m): (n, i, o, x, t) for k, d, m, n, i, o, x, t in conn.execute(
                select(ApiKeyUsage.api_key_id, ApiKeyUsage.date, ApiKeyUsage.model, func.count(),
                       func.sum(ApiKeyUsage.input_tokens), func.sum(ApiKeyUsage.output_tokens),
                       func.sum(ApiKeyUsage.cached_tokens), func.sum(ApiKeyUsage.tokens))
                .group_by(ApiKeyUsage.api_key_id, ApiKeyUsage.date, ApiKeyUsage.model))}
            rollups = {(k, d, m): (n, i, o, x, t) for k, d, m, n, i, o, x, t in conn.execute(
                select(UsageDaily.api_key_id, UsageDaily.date, UsageDaily.model, UsageDaily.requests,
                       UsageDaily.input_tokens, UsageDaily.output_tokens, UsageDaily.cached_tokens,
                       UsageDaily.tokens))}
        assert count == len(self.requests)
        assert rollups == rows
        # Each meter event is one sent report: same identifier and value, timestamp inside its window.
        now = time.time()
        for event in self.fake.meter_events:
            report = reports[event.identifier]
            assert report.status == "sent"
            assert report.value == event.value
            if report.carried_forward_to is None:
                assert report.window_start.timestamp() <= event.timestamp < report.window_end.timestamp()
            else:  # sent into a later period: its own period's invoice had finalized
                assert event.timestamp == int(report.carried_forward_to.timestamp())
            assert event.timestamp <= now
        assert len({e.identifier for e in self.fake.meter_events}) == len(self.fake.meter_events)
        sent = sum(r.value for r in reports.values() if r.status == "sent")
        assert sent == sum(totals.values())
        if buffer_empty:
            client = self.redis()
            try:
                for shard in range(self.layout.shards):
                    assert client.xlen(self.layout.stream(shard)) == 0
                for key in self.keys:
                    assert client.hgetall(self.layout.pending(key.api_key_id)) == {}
            finally:
                client.close()


def module_database() -> Iterator[str]:
    """One migrated database per test module; each test empties it first (cheaper than one per test)."""
    with migrated_database("flush") as url:
        yield url


def started_fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        server.timeout_seconds = 0.8  # the client gives up after 0.5 s
        yield server


def empty_database(url: str) -> None:
    with get_engine(url).begin() as conn:
        for table in TABLES:
            conn.execute(text(f"DELETE FROM {table}"))


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
