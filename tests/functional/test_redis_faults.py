"""Redis failing under the request path: a throwaway redis-server is killed (SIGKILL) or frozen (SIGSTOP, so
every command times out) while requests keep coming.

What must hold: requests are still answered; their usage goes straight to Postgres under the same request
id (row, daily rollup, Stripe outbox); when Redis comes back and a flush runs nothing is counted twice, even
when Redis executes the frozen commands late; the limiter follows RATE_LIMIT_FAIL_MODE.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aikit.api.app import create_app
from aikit.db.engine import get_engine
from aikit.db.models import ApiKeyUsage, MeterReport, Subscription, UsageDaily
from aikit.flush import Flusher
from aikit.keys import IssuedKey
from aikit.metering.base import UsageEvent, new_request_id
from aikit.runtime import Runtime
from aikit.settings import Settings
from tests.conftest import issue_key, make_settings, migrated_database
from tests.servers import RedisProcess, free_port, serve_app

# Flushing "as of" a moment long ago seals no report, so no test here ever calls Stripe.
LONG_AGO = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
TIMEOUT = 0.2  # REDIS_TIMEOUT_SECONDS for these tests
TOKENS = 3 + 4  # echo: "hello there world" -> 3 input words, "echo: hello there world" -> 4 output words


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A database of this module's own: its billable usage and Stripe outbox rows stay out of other tests'
    flushes, and theirs out of ours."""
    with migrated_database("faults") as url:
        yield url


@pytest.fixture
def redis_proc() -> Iterator[RedisProcess]:
    # AOF with fsync on every write: a killed Redis comes back with the usage it had buffered.
    proc = RedisProcess(free_port(), extra=("--appendonly", "yes", "--appendfsync", "always"))
    proc.start()
    try:
        yield proc
    finally:
        proc.cleanup()


def fault_settings(pg_url: str, proc: RedisProcess, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": proc.url,
        "redis_timeout_seconds": TIMEOUT,
        # Billable usage, so the fallback must also fill the Stripe outbox.
        "stripe_secret_key": "sk_test_fault_tests",
        "stripe_api_base": "http://127.0.0.1:9",  # never reached: see LONG_AGO
        **overrides,
    }
    return make_settings(pg_url, "faults", **values)


@contextlib.contextmanager
def outage(proc: RedisProcess, kind: str) -> Iterator[None]:
    """Redis unreachable ("kill": connection refused) or unresponsive ("stop": every command times out)."""
    assert proc.proc is not None
    if kind == "kill":
        proc.kill()
    else:
        os.kill(proc.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if kind == "kill":
            proc.start()  # same port and directory: the AOF is replayed
        else:
            os.kill(proc.proc.pid, signal.SIGCONT)


def chat(client: TestClient, key: IssuedKey) -> httpx.Response:
    return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key.api_key}"},
                       json={"model": "echo-1", "messages": [{"role": "user", "content": "hello there world"}]})


def served(client: TestClient, key: IssuedKey, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        r = chat(client, key)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["total_tokens"] == TOKENS
        ids.append(r.headers["X-Request-Id"])
    return ids


def usage_rows(runtime: Runtime, key: IssuedKey) -> dict[str, tuple[int, bool]]:
    with runtime.engine.connect() as conn:
        rows = conn.execute(select(ApiKeyUsage.request_id, ApiKeyUsage.tokens, ApiKeyUsage.billable)
                            .where(ApiKeyUsage.api_key_id == key.api_key_id)).all()
    return {r.request_id: (r.tokens, r.billable) for r in rows}


def rollup(runtime: Runtime, key: IssuedKey) -> tuple[int, int]:
    with runtime.engine.connect() as conn:
        row = conn.execute(select(func.coalesce(func.sum(UsageDaily.requests), 0),
                                  func.coalesce(func.sum(UsageDaily.tokens), 0))
                           .where(UsageDaily.api_key_id == key.api_key_id)).one()
    return int(row[0]), int(row[1])


def outbox_total(runtime: Runtime, customer: str) -> int:
    with runtime.engine.connect() as conn:
        total = conn.execute(select(func.coalesce(func.sum(MeterReport.value), 0))
                             .where(MeterReport.customer_id == customer)).scalar_one()
    return int(total)


def pending_tokens(settings: Settings, runtime: Runtime, key: IssuedKey) -> int:
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    values = client.hgetall(runtime.layout.pending(key.api_key_id))
    client.close()
    return sum(int(v) for k, v in values.items() if k.endswith("|t"))


def new_key(settings: Settings, **limits: int) -> tuple[IssuedKey, str]:
    """A key of a paying customer (an active subscription, as the webhooks would have stored it)."""
    customer = "cus_" + uuid.uuid4().hex[:14]
    with Session(get_engine(settings.database_url)) as session:
        session.add(Subscription(id="sub_" + uuid.uuid4().hex[:14], customer_id=customer, status="active"))
        session.commit()
    limits = {"rpm": 1000, "rpd": 10_000, "monthly_tokens": 1_000_000, **limits}
    return issue_key(settings, customer_id=customer, **limits), customer


@pytest.mark.parametrize("kind", ["kill", "stop"])
def test_usage_goes_to_postgres_while_redis_is_down_and_is_counted_once(
        pg_url: str, redis_proc: RedisProcess, kind: str) -> None:
    settings = fault_settings(pg_url, redis_proc)
    runtime = Runtime(settings)
    key, customer = new_key(settings)
    with TestClient(create_app(runtime=runtime)) as client:
        before = served(client, key, 3)  # buffered in Redis
        assert pending_tokens(settings, runtime, key) == 3 * TOKENS
        assert usage_rows(runtime, key) == {}

        with outage(redis_proc, kind):
            started = time.monotonic()
            during = served(client, key, 3)
            elapsed = time.monotonic() - started
            # Written straight to Postgres, before any flush: the row under the same request id, the daily
            # rollup and the Stripe outbox.
            rows = usage_rows(runtime, key)
            assert rows == {rid: (TOKENS, True) for rid in during}
            assert rollup(runtime, key) == (3, 3 * TOKENS)
            assert outbox_total(runtime, customer) == 3 * TOKENS
        # Each request waits at most for its two Redis calls (before and after the LLM) to fail, not longer.
        assert elapsed < 3 * (2 * TIMEOUT + 0.5), f"{elapsed:.2f}s for 3 requests while Redis was {kind}"

        # Redis is back (a frozen Redis may now run the commands it had queued: usage recorded twice).
        time.sleep(0.2)
        after = served(client, key, 2)

    summary = Flusher(settings).run(now=LONG_AGO)
    assert summary.ok, summary.errors
    everything = before + during + after
    assert len(set(everything)) == 8
    assert usage_rows(runtime, key) == {rid: (TOKENS, True) for rid in everything}
    assert summary.rows_inserted == len(before) + len(after)
    assert rollup(runtime, key) == (8, 8 * TOKENS)
    assert outbox_total(runtime, customer) == 8 * TOKENS
    assert pending_tokens(settings, runtime, key) == 0
    again = Flusher(settings).run(now=LONG_AGO)
    assert again.ok and again.rows_inserted == 0
    assert rollup(runtime, key) == (8, 8 * TOKENS)


def test_redis_killed_and_restarted_under_concurrent_traffic(pg_url: str, redis_proc: RedisProcess) -> None:
    """Requests in flight when Redis dies (some admitted by Redis, metered by Postgres) and when it returns:
    every request is answered and, after a flush, stored exactly once."""
    settings = fault_settings(pg_url, redis_proc)
    runtime = Runtime(settings)
    key, customer = new_key(settings)
    total, workers = 90, 6

    async def traffic(base: str) -> list[httpx.Response]:
        done: list[httpx.Response] = []
        todo = iter(range(total))
        third, two_thirds = asyncio.Event(), asyncio.Event()

        async def worker(http: httpx.AsyncClient) -> None:
            for _ in todo:
                done.append(await http.post(
                    "/v1/chat/completions", headers={"Authorization": f"Bearer {key.api_key}"},
                    json={"model": "echo-1", "messages": [{"role": "user", "content": "hello there world"}]}))
                if len(done) >= total // 3:
                    third.set()
                if len(done) >= 2 * total // 3:
                    two_thirds.set()

        async def chaos() -> None:
            await third.wait()
            await asyncio.to_thread(redis_proc.kill)
            await two_thirds.wait()
            await asyncio.to_thread(redis_proc.start)

        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            await asyncio.gather(chaos(), *[worker(http) for _ in range(workers)])
        return done

    with serve_app(create_app(runtime=runtime)) as base:
        responses = asyncio.run(traffic(base))
    assert [r.status_code for r in responses] == [200] * total
    ids = {r.headers["X-Request-Id"] for r in responses}
    assert len(ids) == total
    written_directly = set(usage_rows(runtime, key))
    assert written_directly and written_directly < ids  # the outage's share went straight to Postgres

    summary = Flusher(settings).run(now=LONG_AGO)
    assert summary.ok, summary.errors
    assert usage_rows(runtime, key) == {rid: (TOKENS, True) for rid in ids}
    assert summary.rows_inserted == total - len(written_directly)
    assert rollup(runtime, key) == (total, total * TOKENS)
    assert outbox_total(runtime, customer) == total * TOKENS
    assert pending_tokens(settings, runtime, key) == 0


@pytest.mark.parametrize("kind", ["kill", "stop"])
def test_fail_open_serves_requests_while_redis_is_down(pg_url: str, redis_proc: RedisProcess, kind: str) -> None:
    settings = fault_settings(pg_url, redis_proc, rate_limit_fail_mode="open")
    runtime = Runtime(settings)
    key, _ = new_key(settings, rpd=1)  # the limit cannot be checked: open means served anyway
    with TestClient(create_app(runtime=runtime)) as client:
        assert chat(client, key).status_code == 200
        assert chat(client, key).status_code == 429
        with outage(redis_proc, kind):
            codes = [chat(client, key).status_code for _ in range(3)]
        assert codes == [200, 200, 200]
        time.sleep(0.2)
        assert chat(client, key).status_code == 429  # enforced again once Redis answers
    assert len(usage_rows(runtime, key)) == 3


@pytest.mark.parametrize("kind", ["kill", "stop"])
def test_fail_closed_answers_503_with_retry_after_while_redis_is_down(
        pg_url: str, redis_proc: RedisProcess, kind: str) -> None:
    settings = fault_settings(pg_url, redis_proc, rate_limit_fail_mode="closed")
    runtime = Runtime(settings)
    key, customer = new_key(settings)
    with TestClient(create_app(runtime=runtime)) as client:
        assert chat(client, key).status_code == 200
        with outage(redis_proc, kind):
            started = time.monotonic()
            r = chat(client, key)
            elapsed = time.monotonic() - started
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "limiter_unavailable"
        assert int(r.headers["Retry-After"]) > 0
        assert elapsed < TIMEOUT + 1.0
        time.sleep(0.2)
        ok = chat(client, key)
        assert ok.status_code == 200
    # The refused request reached no LLM and was never metered; the other two went through Redis.
    assert usage_rows(runtime, key) == {}
    summary = Flusher(settings).run(now=LONG_AGO)
    assert summary.ok and summary.rows_inserted == 2
    assert rollup(runtime, key) == (2, 2 * TOKENS)
    assert outbox_total(runtime, customer) == 2 * TOKENS


def test_a_record_that_timed_out_but_ran_late_in_redis_is_counted_once(
        pg_url: str, redis_proc: RedisProcess) -> None:
    """The worst timeout: Redis ran the RECORD after the client gave up and wrote the event to Postgres.
    The flush finds it in the stream too; the request id keeps it from being stored twice."""
    settings = fault_settings(pg_url, redis_proc)
    runtime = Runtime(settings)
    key, customer = new_key(settings)
    assert redis_proc.proc is not None
    pid = redis_proc.proc.pid

    def event() -> UsageEvent:
        return UsageEvent(request_id=new_request_id(), api_key_id=key.api_key_id, customer_id=customer,
                          model="echo-1", input_tokens=3, output_tokens=4)

    async def scenario() -> tuple[UsageEvent, UsageEvent]:
        warm = event()
        await runtime.meter.record_event(warm)  # loads the script and leaves an open connection in the pool
        late = event()
        os.kill(pid, signal.SIGSTOP)
        try:
            await runtime.meter.record_event(late)  # EVALSHA is sent, its reply times out: Postgres fallback
        finally:
            os.kill(pid, signal.SIGCONT)
        await runtime.aclose()
        return warm, late

    warm, late = asyncio.run(scenario())
    assert usage_rows(runtime, key) == {late.request_id: (TOKENS, True)}
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    stream = runtime.layout.stream(runtime.layout.shard_of(key.api_key_id))
    deadline = time.monotonic() + 5
    while len(client.xrange(stream)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [f["r"] for _, f in client.xrange(stream)] == [warm.request_id, late.request_id]  # ran late
    client.close()
    assert pending_tokens(settings, runtime, key) == 2 * TOKENS

    summary = Flusher(settings).run(now=LONG_AGO)
    assert summary.ok and summary.events_read == 2 and summary.rows_inserted == 1
    assert usage_rows(runtime, key) == {r.request_id: (TOKENS, True) for r in (warm, late)}
    assert rollup(runtime, key) == (2, 2 * TOKENS)
    assert outbox_total(runtime, customer) == 2 * TOKENS
    assert pending_tokens(settings, runtime, key) == 0
