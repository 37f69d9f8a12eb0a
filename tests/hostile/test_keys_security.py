"""API keys against a hostile caller: one key never sees or spends another's usage, guessing keys is rate
limited, revoked and deactivated keys stop working, keys are stored and compared as hashes, and no secret
reaches a log line."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import io
import logging
import secrets
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from sqlalchemy.orm import Session

import aikit.api.deps
import aikit.keys
from aikit.db.models import ApiKey, Base, User
from aikit.flush import Flusher
from aikit.keys import IssuedKey
from tests.support.api import bearer, full_app, issue_key
from tests.support.api import chat as _chat
from tests.support.hostile import Env, assert_clean, billing_env
from tests.support.settings import ADMIN_TOKEN
from tests.support.webhooks import deliver, subscribe, subscription_event

CHAT = {"model": "echo-1", "messages": [{"role": "user", "content": "one two three"}]}  # 3 in + 4 out
chat = functools.partial(_chat, content="one two three")


@pytest.fixture
def env(pg_url: str, redis_prefix: str) -> Iterator[tuple[Env, TestClient]]:
    with billing_env(pg_url, redis_prefix, key_cache_ttl_seconds=0) as pair:
        yield pair


def subscribed_key(env: Env, client: TestClient, **limits: Any) -> IssuedKey:
    email = f"other-{uuid.uuid4().hex[:8]}@example.com"
    customer = env.fake.add_customer(email=email)
    key = issue_key(env.settings, email=email, customer_id=customer, **limits)
    subscribe(client, customer)
    return key


def usage(client: TestClient, key: str, **params: str) -> Any:
    r = client.get("/v1/usage", params=params, headers=bearer(key))
    assert r.status_code == 200, r.text
    return r.json()


# --- isolation -----------------------------------------------------------------------------------------


def test_a_key_sees_only_its_own_usage_before_and_after_the_flush(env: tuple[Env, TestClient]) -> None:
    e, client = env
    other = subscribed_key(e, client, rpm=1000, rpd=1000, monthly_tokens=1000)
    for _ in range(3):
        assert chat(client, e.key.api_key).status_code == 200
    assert chat(client, other.api_key).status_code == 200
    # Pending (Redis) usage, then flushed (Postgres) usage: each key sees its own, whatever it asks for.
    for _ in ("pending", "flushed"):
        mine = usage(client, e.key.api_key, api_key_id=other.api_key_id, customer_id="cus_someone_else")
        theirs = usage(client, other.api_key)
        assert (mine["tokens_used"], mine["requests"]) == (21, 3)
        assert (theirs["tokens_used"], theirs["requests"]) == (7, 1)
        summary = Flusher(e.settings, sleep=lambda _: None).run(now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        assert summary.ok, summary.errors
    # The admin API is not reachable with an API key.
    for path in ("/v1/admin/usage", "/v1/admin/usage.csv", "/v1/admin/keys"):
        r = client.get(path, params={"api_key_id": other.api_key_id}, headers=bearer(e.key.api_key))
        assert r.status_code == 401, (path, r.text)


def test_quotas_and_rate_limits_are_per_key(env: tuple[Env, TestClient]) -> None:
    e, client = env
    small = subscribed_key(e, client, rpm=2, rpd=1000, monthly_tokens=1000)
    tiny_quota = subscribed_key(e, client, rpm=1000, rpd=1000, monthly_tokens=7)
    assert [chat(client, small.api_key).status_code for _ in range(3)] == [200, 200, 429]
    assert chat(client, tiny_quota.api_key, max_tokens=4).status_code == 200
    assert chat(client, tiny_quota.api_key, max_tokens=4).status_code == 429
    # Neither exhausted limit touches another key.
    assert [chat(client, e.key.api_key).status_code for _ in range(5)] == [200] * 5
    assert usage(client, e.key.api_key)["tokens_used"] == 5 * 7
    assert usage(client, tiny_quota.api_key)["tokens_used"] == 7
    assert usage(client, small.api_key)["tokens_used"] == 2 * 7


# --- guessing ------------------------------------------------------------------------------------------


def test_guessing_keys_is_rate_limited_per_client_address(env: tuple[Env, TestClient]) -> None:
    e, _ = env
    app = full_app(e.runtime)
    limit = e.settings.auth_failures_per_minute
    if time.time() % 60 > 50:  # the count is per clock minute: start the burst inside one
        time.sleep(61 - time.time() % 60)
    with TestClient(app, client=("203.0.113.7", 4000)) as guesser, \
            TestClient(app, client=("198.51.100.9", 4000)) as bystander:
        codes = [chat(guesser, "ak_" + secrets.token_urlsafe(32)).status_code for _ in range(limit + 5)]
        assert codes[:limit] == [401] * limit
        assert set(codes[limit:]) == {429}
        blocked = chat(guesser, "ak_" + secrets.token_urlsafe(32))
        assert blocked.status_code == 429 and blocked.headers["Retry-After"].isdigit()
        assert blocked.json()["error"]["code"] == "too_many_auth_failures"
        # Another address is not affected, valid keys included.
        assert chat(bystander, "ak_" + secrets.token_urlsafe(32)).status_code == 401
        assert chat(bystander, e.key.api_key).status_code == 200


# --- revoked and deactivated keys ----------------------------------------------------------------------


def test_a_revoked_key_fails_everywhere(env: tuple[Env, TestClient]) -> None:
    e, client = env
    assert chat(client, e.key.api_key).status_code == 200
    r = client.post(f"/v1/admin/keys/{e.key.api_key_id}/revoke", headers=bearer(ADMIN_TOKEN))
    assert r.status_code == 200
    for method, path, body in (("POST", "/v1/chat/completions", CHAT),
                               ("POST", "/v1/chat/completions", {**CHAT, "stream": True}),
                               ("GET", "/v1/usage", None), ("POST", "/v1/billing/checkout", None),
                               ("POST", "/v1/billing/portal", None)):
        r = client.request(method, path, json=body, headers=bearer(e.key.api_key))
        assert r.status_code == 401, (path, r.status_code, r.text)
        assert r.json()["error"]["code"] == "revoked_api_key"
        assert_clean(r, e.secrets)


def test_a_deactivated_subscription_gets_402_on_chat(env: tuple[Env, TestClient]) -> None:
    e, client = env
    other = subscribed_key(e, client)
    assert chat(client, other.api_key).status_code == 200
    with Session(e.runtime.engine) as session:
        customer = session.scalars(select(User.stripe_customer_id)
                                   .join(ApiKey, ApiKey.user_id == User.id)
                                   .where(ApiKey.id == other.api_key_id)).one()
        sub_id = session.execute(text("SELECT id FROM subscriptions WHERE customer_id = :c"),
                                 {"c": customer}).scalar_one()
    deleted = subscription_event("customer.subscription.deleted", sub_id, str(customer), "canceled",
                                 int(dt.datetime.now(dt.UTC).timestamp()) + 5)
    assert deliver(client, deleted).json()["outcome"] == "applied"
    for extra in ({}, {"stream": True}):
        r = chat(client, other.api_key, **extra)
        assert r.status_code == 402, r.text
        assert r.json()["error"]["code"] == "subscription_inactive"
    assert chat(client, e.key.api_key).status_code == 200  # other customers are untouched


# --- storage and comparison ----------------------------------------------------------------------------


def test_keys_are_stored_as_sha256_and_the_secret_is_nowhere_in_the_database(env: tuple[Env, TestClient]
                                                                             ) -> None:
    e, client = env
    assert chat(client, e.key.api_key).status_code == 200
    with Session(e.runtime.engine) as session:
        row = session.get(ApiKey, e.key.api_key_id)
        assert row is not None
        assert row.key_hash == hashlib.sha256(e.key.api_key.encode()).hexdigest()
        assert row.prefix == e.key.api_key[:len(row.prefix)] and len(row.prefix) <= 12
        body = e.key.api_key[len(row.prefix):]
        for table in Base.metadata.sorted_tables:
            for values in session.execute(table.select()).all():
                dump = repr(tuple(values))
                assert e.key.api_key not in dump and body not in dump, f"secret stored in {table.name}"
    # The per-process cache is keyed by the hash too.
    assert all(e.key.api_key not in str(k) for k in e.runtime.keys._entries)


def test_key_and_admin_token_checks_go_through_compare_digest(env: tuple[Env, TestClient],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    e, client = env
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(aikit.keys.hmac, "compare_digest", spy)
    assert aikit.api.deps.hmac.compare_digest is spy  # the same stdlib module
    e.runtime.keys.clear()
    assert chat(client, e.key.api_key).status_code == 200
    digest = hashlib.sha256(e.key.api_key.encode()).hexdigest()
    assert any(digest in (a, b) for a, b in calls), "the key lookup did not compare hashes in constant time"
    assert all(e.key.api_key not in (a, b) for a, b in calls), "the raw key was compared"
    calls.clear()
    assert client.get("/v1/admin/keys", headers=bearer("not-the-token")).status_code == 401
    assert calls, "the admin token was not compared with compare_digest"


# --- logs ----------------------------------------------------------------------------------------------


class RawRecord(logging.Formatter):
    """The whole record: message, arguments, extra fields and exception text (before any redaction)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.name} {record.getMessage()} {record.__dict__} {super().format(record)}"


@pytest.fixture
def all_logs() -> Iterator[io.StringIO]:
    """Every log record of every logger, at every level, as the handlers would format it."""
    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    handler.setFormatter(RawRecord())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("aikit", "uvicorn", "httpx", "stripe")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield sink
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for lg in loggers:
            lg.removeHandler(handler)


def test_no_secret_reaches_the_logs(env: tuple[Env, TestClient], capsys: pytest.CaptureFixture[str],
                                    all_logs: io.StringIO) -> None:
    """Checked twice: in what was written (stdout/stderr: the app's redacted JSON lines) and in the raw records
    of every logger, so no code even hands a secret to a logger (redaction is the safety net, not the plan)."""
    e, client = env
    guess = "ak_" + secrets.token_urlsafe(32)
    created = client.post("/v1/admin/keys", json={"email": f"log-{uuid.uuid4().hex[:6]}@example.com"},
                          headers=bearer(ADMIN_TOKEN))
    assert created.status_code == 201
    new_key = created.json()["api_key"]
    flow = [
        chat(client, e.key.api_key),
        chat(client, e.key.api_key, stream=True, stream_options={"include_usage": True}),
        chat(client, guess),
        chat(client, new_key),  # no customer: 402, logged or not
        client.get("/v1/usage", headers=bearer(e.key.api_key)),
        client.get("/v1/admin/keys", headers=bearer(ADMIN_TOKEN + "x")),
        client.get("/v1/admin/keys", headers={"Authorization": f"Basic {ADMIN_TOKEN}"}),
        client.post("/v1/billing/checkout", headers=bearer(e.key.api_key)),
        client.post("/v1/billing/portal", headers=bearer(e.key.api_key)),
        client.post("/v1/webhooks/stripe", content=b'{"id": "evt_x"}',
                    headers={"Stripe-Signature": f"t=1,v1={e.settings.stripe_webhook_secret}"}),
        client.post("/v1/chat/completions", content=f'{{"api_key": "{e.key.api_key}"'.encode(),
                    headers={**bearer(e.key.api_key), "Content-Type": "application/json"}),
    ]
    assert [r.status_code for r in flow] == [200, 200, 401, 402, 200, 401, 401, 200, 200, 400, 422]
    e.fake.inject("500", count=1)  # a Stripe failure gets logged too
    summary = Flusher(e.settings, sleep=lambda _: None).run(now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    assert summary.events_read >= 2 and summary.stripe_calls >= 2
    out, err = capsys.readouterr()
    logged = out + err + all_logs.getvalue()
    assert "webhook_rejected" in logged or "invalid" in logged  # the capture did see the app's logs
    for secret in (e.key.api_key, new_key, guess, ADMIN_TOKEN, e.fake.api_key, e.settings.stripe_webhook_secret):
        assert secret not in logged, f"secret {secret[:6]}... found in the logs"
