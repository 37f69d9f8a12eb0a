"""No thundering herd on the request path (issue 16): the key cache refreshes a busy key in the background
before it expires, concurrent lookups of one key share one query, revocation still shows within the TTL, and
the database pool reuses its connections under a steady load. Real Postgres, real Redis, the real app."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session

from aikit import keys
from aikit.api.app import create_app
from aikit.db.engine import get_engine
from aikit.keys import KeyCache, revoke_key
from aikit.runtime import Runtime
from tests.support.api import issue_key
from tests.support.db import ADMIN_URL
from tests.support.settings import make_settings

CONCURRENT = 16
BODY = {"model": "echo-1", "messages": [{"role": "user", "content": "hello there world"}]}


class KeyQueries:
    """Counts the key lookups (the SELECT on api_keys by hash) an engine runs; optionally makes each one slow,
    as a loaded database would, so that concurrent requests surely overlap it."""

    def __init__(self, delay: float = 0.0) -> None:
        self.count = 0
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FROM api_keys" in statement and "key_hash" in statement:
            with self._lock:
                self.count += 1
            if self.delay:
                time.sleep(self.delay)  # in the worker thread running the lookup, never on the event loop


@contextlib.contextmanager
def counting(engine: Engine, delay: float = 0.0) -> Iterator[KeyQueries]:
    queries = KeyQueries(delay)
    event.listen(engine, "before_cursor_execute", queries)
    try:
        yield queries
    finally:
        event.remove(engine, "before_cursor_execute", queries)


async def burst(client: httpx.AsyncClient, key: str, n: int = CONCURRENT) -> list[int]:
    headers = {"Authorization": f"Bearer {key}"}
    replies = await asyncio.gather(*[client.post("/v1/chat/completions", json=BODY, headers=headers)
                                     for _ in range(n)])
    return [r.status_code for r in replies]


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def app_client(runtime: Runtime) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(runtime=runtime)), base_url="http://t")


def test_a_busy_key_is_refreshed_once_in_the_background_before_it_expires(pg_url: str, redis_prefix: str) -> None:
    ttl = 2.0
    settings = make_settings(pg_url, redis_prefix, key_cache_ttl_seconds=ttl)
    runtime = Runtime(settings)
    key = issue_key(settings, rpm=10_000, rpd=100_000, monthly_tokens=10_000_000)

    async def scenario() -> None:
        async with app_client(runtime) as client:
            warmed = time.monotonic()
            assert await burst(client, key.api_key, 1) == [200]
            await asyncio.sleep(warmed + 0.85 * ttl - time.monotonic())  # past the refresh point, before expiry
            with counting(runtime.engine, delay=0.2) as queries:
                assert await burst(client, key.api_key) == [200] * CONCURRENT  # none waits for the refresh
                await asyncio.to_thread(wait_for, lambda: queries.count == 1 and not runtime.keys._flights)
                await asyncio.sleep(warmed + ttl + 0.05 - time.monotonic())  # the first answer has expired now
                assert runtime.keys.cached(key.api_key)[0], "the refreshed answer is in the cache"
                assert await burst(client, key.api_key) == [200] * CONCURRENT
                assert queries.count == 1

    asyncio.run(scenario())


@pytest.mark.parametrize("state", ["never_seen", "expired"])
def test_concurrent_requests_for_an_uncached_key_share_one_lookup(pg_url: str, redis_prefix: str,
                                                                  state: str) -> None:
    settings = make_settings(pg_url, redis_prefix, key_cache_ttl_seconds=0.3)
    runtime = Runtime(settings)
    key = issue_key(settings, rpm=10_000, rpd=100_000, monthly_tokens=10_000_000)

    async def scenario() -> None:
        async with app_client(runtime) as client:
            if state == "expired":
                assert await burst(client, key.api_key, 1) == [200]
                await asyncio.sleep(0.4)
            assert not runtime.keys.cached(key.api_key)[0]
            with counting(runtime.engine, delay=0.2) as queries:
                assert await burst(client, key.api_key) == [200] * CONCURRENT
            assert queries.count == 1

    asyncio.run(scenario())


def test_concurrent_lookups_of_an_unknown_key_share_one_query_and_all_get_none(pg_url: str,
                                                                               redis_prefix: str) -> None:
    settings = make_settings(pg_url, redis_prefix, key_cache_ttl_seconds=5)
    cache = KeyCache(get_engine(pg_url), settings)
    start = threading.Barrier(CONCURRENT)
    answers: list[object] = []

    def one() -> None:
        start.wait()
        answers.append(cache.lookup("ak_not-a-key-anyone-issued"))

    with counting(get_engine(pg_url), delay=0.2) as queries:
        threads = [threading.Thread(target=one) for _ in range(CONCURRENT)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert answers == [None] * CONCURRENT
    assert queries.count == 1


def test_revocation_shows_within_the_ttl_while_the_key_is_busy(pg_url: str, redis_prefix: str) -> None:
    ttl = 0.5
    settings = make_settings(pg_url, redis_prefix, key_cache_ttl_seconds=ttl)
    runtime = Runtime(settings)
    key = issue_key(settings, rpm=100_000, rpd=100_000, monthly_tokens=10_000_000)

    async def scenario() -> list[tuple[float, int]]:
        seen: list[tuple[float, int]] = []
        async with app_client(runtime) as client:
            headers = {"Authorization": f"Bearer {key.api_key}"}
            revoked_at = 0.0
            begun = time.monotonic()
            while time.monotonic() - begun < 3 * ttl:
                if not revoked_at and time.monotonic() - begun > ttl:  # the key is warm and being refreshed
                    await asyncio.to_thread(revoke, pg_url, key.api_key_id)
                    revoked_at = time.monotonic()
                sent = time.monotonic()
                r = await client.post("/v1/chat/completions", json=BODY, headers=headers)
                seen.append((sent - revoked_at if revoked_at else -1.0, r.status_code))
                await asyncio.sleep(0.01)
        return seen

    seen = asyncio.run(scenario())
    assert all(code == 200 for since, code in seen if since < 0)
    late = [code for since, code in seen if since > ttl]
    assert late and all(code == 401 for code in late), seen


def revoke(pg_url: str, api_key_id: str) -> None:
    with Session(get_engine(pg_url)) as session:
        assert revoke_key(session, api_key_id)
        session.commit()


def test_the_pool_reuses_its_connections_under_a_steady_load(pg_url: str, redis_prefix: str) -> None:
    settings = make_settings(pg_url, redis_prefix, key_cache_ttl_seconds=0)  # every lookup queries
    engine = get_engine(pg_url)
    cache = KeyCache(engine, settings)
    key = issue_key(settings)
    opened: list[object] = []

    def steady(rounds: int) -> None:
        def loop() -> None:
            for _ in range(rounds):
                assert cache.lookup(key.api_key) is not None

        threads = [threading.Thread(target=loop) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def on_connect(conn: Any, _record: Any) -> None:
        opened.append(conn)

    steady(5)  # warm: the pool grows to the load
    event.listen(engine, "connect", on_connect)
    try:
        steady(50)
    finally:
        event.remove(engine, "connect", on_connect)
    assert opened == [], f"{len(opened)} connections opened under a steady load"
    assert engine.pool.checkedout() == 0


def test_tls_context_is_built_once_per_engine(monkeypatch: pytest.MonkeyPatch, pg_url: str) -> None:
    built: list[object] = []
    original = ssl.create_default_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counted)
    # An engine of its own (another URL); no sslmode: TLS is tried first, then plain (this server has no TLS).
    engine = get_engine(pg_url + "?application_name=aikit_tls_once")
    try:
        for _ in range(5):
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT 1").scalar() == 1
            engine.pool.dispose()  # the next round opens a new connection
    finally:
        engine.dispose()
    assert len(built) == 1


def test_a_stuck_shared_lookup_does_not_hold_the_other_callers(monkeypatch: pytest.MonkeyPatch, pg_url: str,
                                                               redis_prefix: str) -> None:
    monkeypatch.setattr(keys, "FLIGHT_WAIT_SECONDS", 0.3)
    settings = make_settings(pg_url, redis_prefix, key_cache_ttl_seconds=5)
    engine = get_engine(pg_url)
    cache = KeyCache(engine, settings)
    key = issue_key(settings)
    release = threading.Event()
    stuck: list[bool] = []

    def first_query_hangs(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FROM api_keys" in statement and not stuck:
            stuck.append(True)
            release.wait(10)  # a connection that stopped answering

    answers: dict[str, Any] = {}
    event.listen(engine, "before_cursor_execute", first_query_hangs)
    try:
        leader = threading.Thread(target=lambda: answers.setdefault("leader", cache.lookup(key.api_key)))
        leader.start()
        wait_for(lambda: bool(stuck))
        began = time.monotonic()
        answers["other"] = cache.lookup(key.api_key)  # waits for the stuck lookup a while, then queries itself
        waited = time.monotonic() - began
        release.set()
        leader.join(10)
    finally:
        event.remove(engine, "before_cursor_execute", first_query_hangs)
    assert answers["other"] is not None and answers["other"].api_key_id == key.api_key_id
    assert 0.3 <= waited < 5
    assert answers["leader"] is not None and answers["leader"].api_key_id == key.api_key_id


def test_a_failed_background_refresh_keeps_the_last_known_state_while_the_database_is_down(
        fresh_pg_url: str, redis_prefix: str) -> None:
    ttl = 1.0
    settings = make_settings(fresh_pg_url, redis_prefix, key_cache_ttl_seconds=ttl)
    runtime = Runtime(settings)
    key = issue_key(settings, rpm=10_000, rpd=100_000, monthly_tokens=10_000_000)

    async def scenario() -> None:
        async with app_client(runtime) as client:
            warmed = time.monotonic()
            assert await burst(client, key.api_key, 1) == [200]
            admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:  # the database goes away (its connections are cut too)
                conn.execute(text(f'DROP DATABASE "{fresh_pg_url.rsplit("/", 1)[1]}" WITH (FORCE)'))
            admin.dispose()
            await asyncio.sleep(warmed + 0.85 * ttl - time.monotonic())
            assert await burst(client, key.api_key, 4) == [200] * 4  # the refresh starts, and fails
            await asyncio.to_thread(wait_for, lambda: not runtime.keys._flights)
            await asyncio.sleep(warmed + ttl + 0.05 - time.monotonic())
            assert await burst(client, key.api_key, 4) == [200] * 4  # past the TTL: the last known state
            r = await client.post("/v1/chat/completions", json=BODY,
                                  headers={"Authorization": "Bearer ak_never-seen-before"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable"

    asyncio.run(scenario())


def test_concurrent_first_connections_fall_back_from_tls_together(pg_url: str) -> None:
    # No sslmode: TLS is tried first; this server refuses it, and every connection opened meanwhile must fall
    # back to plain, not only the first to learn it.
    engine = get_engine(pg_url + "?application_name=aikit_tls_race")
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def connect() -> None:
        start.wait()
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT pg_sleep(0.05)")
        except BaseException as exc:
            errors.append(exc)

    try:
        for _ in range(3):
            threads = [threading.Thread(target=connect) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        engine.dispose()
    assert errors == []
