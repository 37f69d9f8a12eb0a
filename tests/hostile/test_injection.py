"""SQL and Redis key injection: hostile strings through every parameter that reaches a query or a key name.
Each gets a 4xx or a harmless 200, the tables stay intact, and Redis holds no key outside the app's prefix
(checked on a redis-server of this test's own, so nothing else writes there)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import text

from tests.support.api import bearer
from tests.support.hostile import Env, assert_clean, billing_env
from tests.support.servers import RedisProcess, throwaway_redis
from tests.support.settings import ADMIN_TOKEN
from tests.support.webhooks import deliver, subscription_event

HOSTILE = [
    "'", '"', "`", "\\", "'; DROP TABLE api_keys; --", "\" OR 1=1 --", "' OR '1'='1", "1; SELECT pg_sleep(5)",
    "{", "}", "{s0}", "}{", "*", "?", "[a-z]", "key_*", "cus_*", "%", "_", "%00", "\x00", "a\x00b",
    "\n", "line\r\nX-Injected: 1", "\t", "ключ", "🔥💸", "\u202eevil", "\ufeff",
    "\uff43\uff55\uff53\uff3f\uff11",  # fullwidth "cus_1"
    "../../etc/passwd", "$(rm -rf /)", "${jndi:ldap://x}", "<script>alert(1)</script>", "=cmd|' /C calc'!A0",
    " ", "", "a" * 10_000, "é" * 300,
]
ADMIN = bearer(ADMIN_TOKEN)


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisProcess]:
    with throwaway_redis() as proc:
        yield proc


PREFIXES: set[str] = set()  # every app prefix this module's tests gave the shared redis-server


@pytest.fixture
def env(pg_url: str, redis_prefix: str, own_redis: RedisProcess) -> Iterator[tuple[Env, TestClient]]:
    PREFIXES.add(redis_prefix)
    with billing_env(pg_url, redis_prefix, redis_url=own_redis.url) as pair:
        yield pair


def tables(e: Env) -> set[str]:
    with e.runtime.engine.connect() as conn:
        return set(conn.execute(text("SELECT table_name FROM information_schema.tables "
                                     "WHERE table_schema = 'public'")).scalars())


def call(client: TestClient, method: str, url: str, **kwargs: Any) -> httpx.Response | None:
    """The answer, or None when the HTTP client itself refuses to send it (e.g. a newline in a header)."""
    try:
        return client.request(method, url, **kwargs)
    except (httpx.LocalProtocolError, UnicodeEncodeError, ValueError):
        return None


def check(e: Env, r: httpx.Response | None, allowed: set[int], what: str) -> None:
    if r is None:
        return
    assert r.status_code in allowed, f"{what}: {r.status_code} {r.text[:300]}"
    assert_clean(r, e.secrets)


def webhook_check(e: Env, r: httpx.Response, what: str) -> None:
    # Signed events with ids our columns cannot hold are malformed (400), never a handler failure (500).
    check(e, r, {200, 400}, what)


@pytest.mark.parametrize("bad", HOSTILE, ids=lambda s: repr(s)[:30])
def test_hostile_strings_everywhere(env: tuple[Env, TestClient], bad: str) -> None:
    e, client = env
    before = tables(e)
    key = bearer(e.key.api_key)
    chat = {"model": "echo-1", "messages": [{"role": "user", "content": "hi"}]}
    q = quote(bad, safe="")

    # Chat: the model reaches Redis hash fields and SQL rows; user/content reach neither.
    check(e, call(client, "POST", "/v1/chat/completions", json={**chat, "model": bad}, headers=key),
          {200, 422}, "model")
    check(e, call(client, "POST", "/v1/chat/completions", json={**chat, "user": bad}, headers=key),
          {200, 422}, "user")
    check(e, call(client, "POST", "/v1/chat/completions",
                  json={**chat, "messages": [{"role": "user", "content": bad}]}, headers=key), {200, 422}, "content")
    check(e, call(client, "POST", "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {bad}"}),
          {401, 429}, "api key")

    # Admin: keys by email, customer id and name; key ids in paths.
    for field in ("email", "customer_id"):
        body = {"email": f"inj-{uuid.uuid4().hex[:8]}@example.com", field: bad}
        check(e, call(client, "POST", "/v1/admin/keys", json=body, headers=ADMIN), {422, 409}, field)
    r = call(client, "POST", "/v1/admin/keys", json={"email": f"inj-{uuid.uuid4().hex[:8]}@example.com",
                                                     "name": bad}, headers=ADMIN)
    check(e, r, {201, 422}, "name")
    if r is not None and r.status_code == 201:  # stored as data, exactly
        listed = client.get("/v1/admin/keys", params={"email": ""}, headers=ADMIN).json()["data"]
        assert any(k["api_key_id"] == r.json()["api_key_id"] and k["name"] == bad for k in listed)
    check(e, call(client, "GET", f"/v1/admin/keys?email={q}", headers=ADMIN), {200, 422}, "email filter")
    check(e, call(client, "POST", f"/v1/admin/keys/{q}/revoke", headers=ADMIN), {404, 405, 422}, "key id path")

    # Usage: the period parameters, the admin filters (the key id becomes a Redis key name when it exists).
    for param in ("period", "start", "end"):
        check(e, call(client, "GET", f"/v1/usage?{param}={q}", headers=key), {422}, param)
    for path in ("/v1/admin/usage", "/v1/admin/usage.csv"):
        check(e, call(client, "GET", f"{path}?customer_id={q}", headers=ADMIN), {200, 422}, "customer filter")
        check(e, call(client, "GET", f"{path}?api_key_id={q}", headers=ADMIN), {404, 422}, "key filter")
        check(e, call(client, "GET", f"{path}?customer_id=cus_x&start={q}&end={q}", headers=ADMIN), {422}, "dates")

    # Billing: the admin acts for an email.
    check(e, call(client, "POST", "/v1/billing/checkout", json={"email": bad}, headers=ADMIN), {422, 404}, "email")

    # Webhooks: signed events carrying hostile ids (as if Stripe sent them) are data, or refused. A value the
    # columns cannot hold (NUL, too long) is the handler's documented 5xx "Stripe will retry", nothing kept.
    event = subscription_event("customer.subscription.updated", bad, bad, bad, int(time.time()))
    webhook_check(e, deliver(client, event), "subscription event ids")
    event = subscription_event("customer.subscription.updated", "sub_" + uuid.uuid4().hex[:10], bad, "active",
                               int(time.time()))
    event["id"] = bad
    webhook_check(e, deliver(client, event), "event id")

    # Nothing was dropped or rewritten, and the subscribed key still works.
    assert tables(e) == before
    with e.runtime.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM api_keys WHERE id = :k"),
                            {"k": e.key.api_key_id}).scalar_one() == 1
    assert client.post("/v1/chat/completions", json=chat, headers=key).status_code == 200


def test_no_redis_key_outside_the_prefix(env: tuple[Env, TestClient], own_redis: RedisProcess) -> None:
    """After hostile model names and key ids, every Redis key still starts with an app prefix (this module's
    tests share the server, each with a prefix of its own)."""
    e, client = env
    key = bearer(e.key.api_key)
    for bad in ("../../x", "a:b", "echo-1:*", "@/+.-:", "x" * 128):
        r = client.post("/v1/chat/completions", headers=key,
                        json={"model": bad, "messages": [{"role": "user", "content": bad}]})
        assert r.status_code in (200, 422)
    for bad in HOSTILE:
        client.get("/v1/admin/usage", params={"api_key_id": bad[:40]}, headers=ADMIN)
        client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {json.dumps(bad)[:150]}"},
                    json={"messages": [{"role": "user", "content": "x"}]})
    store = redis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        names = list(store.scan_iter(count=1000))
    finally:
        store.close()
    assert names, "the app wrote nothing to Redis: the test proves nothing"
    assert any(n.startswith(e.settings.redis_key_prefix + ":") for n in names)
    stray = [n for n in names if n.split(":", 1)[0] not in PREFIXES]
    assert not stray, f"Redis keys outside the prefix: {stray[:10]}"
