"""The billing harness shared by the flush, reconcile, alarm, pricing and money tests: settings with
FakeStripe, the same settings as environment variables, and `Billing`, which drives the API and the flush and
checks that Stripe, the outbox, the rows and the Redis buffer agree exactly (`Billing.assert_exact`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from fastapi.testclient import TestClient
from redis.cluster import RedisCluster
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aikit.db.engine import get_engine
from aikit.db.models import ApiKeyUsage, MeterReport, Subscription, UsageDaily
from aikit.flush import Flusher, FlushSummary
from aikit.keys import IssuedKey
from aikit.metering.layout import RedisLayout
from aikit.runtime import Runtime
from aikit.settings import Settings
from aikit.stripe_gateway import StripeGateway
from tests.fakes.stripe_server import FakeStripe
from tests.support.api import issue_key
from tests.support.settings import make_settings

EVENT = "api_tokens"
WINDOW = 300
DAY = 86400


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


def started_fake(timeout_seconds: float = 0.8) -> Iterator[FakeStripe]:
    """FakeStripe; its "timeout" fault stalls `timeout_seconds` (the harness client gives up after 0.5 s)."""
    with FakeStripe() as server:
        server.timeout_seconds = timeout_seconds
        yield server
