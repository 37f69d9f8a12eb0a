"""Redis failing under the request path: a throwaway redis-server is killed (SIGKILL) or frozen (SIGSTOP, so
every command times out) while requests keep coming.

What must hold: requests are still answered; their usage goes straight to Postgres under the same request
id (row, daily rollup, Stripe outbox); when Redis comes back and a flush runs nothing is counted twice, even
when Redis executes the frozen commands late; the limiter follows RATE_LIMIT_FAIL_MODE.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from aikit.api.app import create_app
from aikit.flush import Flusher
from aikit.metering.base import UsageEvent, new_request_id
from aikit.runtime import Runtime
from tests.support.api import chat
from tests.support.db import migrated_database
from tests.support.redis import pending_tokens
from tests.support.redis_faults import (
    LONG_AGO,
    TIMEOUT,
    TOKENS,
    fault_settings,
    new_paying_key,
    outage,
    outbox_total,
    rollup,
    serve_requests,
    usage_rows,
)
from tests.support.servers import RedisProcess, free_port, serve_app


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


@pytest.mark.parametrize("kind", ["kill", "stop"])
def test_usage_goes_to_postgres_while_redis_is_down_and_is_counted_once(
        pg_url: str, redis_proc: RedisProcess, kind: str) -> None:
    settings = fault_settings(pg_url, redis_proc)
    runtime = Runtime(settings)
    key, customer = new_paying_key(settings)
    with TestClient(create_app(runtime=runtime)) as client:
        before = serve_requests(client, key, 3)  # buffered in Redis
        assert pending_tokens(runtime, key.api_key_id) == 3 * TOKENS
        assert usage_rows(runtime, key) == {}

        with outage(redis_proc, kind):
            started = time.monotonic()
            during = serve_requests(client, key, 3)
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
        after = serve_requests(client, key, 2)

    summary = Flusher(settings).run(now=LONG_AGO)
    assert summary.ok, summary.errors
    everything = before + during + after
    assert len(set(everything)) == 8
    assert usage_rows(runtime, key) == {rid: (TOKENS, True) for rid in everything}
    assert summary.rows_inserted == len(before) + len(after)
    assert rollup(runtime, key) == (8, 8 * TOKENS)
    assert outbox_total(runtime, customer) == 8 * TOKENS
    assert pending_tokens(runtime, key.api_key_id) == 0
    again = Flusher(settings).run(now=LONG_AGO)
    assert again.ok and again.rows_inserted == 0
    assert rollup(runtime, key) == (8, 8 * TOKENS)


def test_redis_killed_and_restarted_under_concurrent_traffic(pg_url: str, redis_proc: RedisProcess) -> None:
    """Requests in flight when Redis dies (some admitted by Redis, metered by Postgres) and when it returns:
    every request is answered and, after a flush, stored exactly once."""
    settings = fault_settings(pg_url, redis_proc)
    runtime = Runtime(settings)
    key, customer = new_paying_key(settings)
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
    assert pending_tokens(runtime, key.api_key_id) == 0


@pytest.mark.parametrize("kind", ["kill", "stop"])
def test_fail_open_serves_requests_while_redis_is_down(pg_url: str, redis_proc: RedisProcess, kind: str) -> None:
    settings = fault_settings(pg_url, redis_proc, rate_limit_fail_mode="open")
    runtime = Runtime(settings)
    key, _ = new_paying_key(settings, rpd=1)  # the limit cannot be checked: open means served anyway
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
    key, customer = new_paying_key(settings)
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
    key, customer = new_paying_key(settings)
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
    assert pending_tokens(runtime, key.api_key_id) == 2 * TOKENS

    summary = Flusher(settings).run(now=LONG_AGO)
    assert summary.ok and summary.events_read == 2 and summary.rows_inserted == 1
    assert usage_rows(runtime, key) == {r.request_id: (TOKENS, True) for r in (warm, late)}
    assert rollup(runtime, key) == (2, 2 * TOKENS)
    assert outbox_total(runtime, customer) == 2 * TOKENS
    assert pending_tokens(runtime, key.api_key_id) == 0
