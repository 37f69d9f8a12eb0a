"""The request path end to end: auth, limits, metering, through the real openai SDK and TestClient."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, text

from aikit.api.app import create_app
from aikit.db.models import ApiKeyUsage
from aikit.flush import Flusher
from aikit.keys import IssuedKey
from aikit.metering.base import UsageEvent, new_request_id
from aikit.metering.sql_sink import store_events
from aikit.runtime import Runtime
from aikit.settings import Settings
from tests.support.api import chat, issue_key, parallel_chats, read_sdk_stream
from tests.support.db import ADMIN_URL
from tests.support.redis import pending_tokens
from tests.support.servers import serve_app
from tests.support.settings import ADMIN_TOKEN, REDIS_URL, make_settings


def stored_tokens(runtime: Runtime, api_key_id: str) -> int:
    with runtime.engine.connect() as conn:
        total = conn.execute(select(func.coalesce(func.sum(ApiKeyUsage.tokens), 0))
                             .where(ApiKeyUsage.api_key_id == api_key_id)).scalar_one()
    return int(total)


def test_openai_sdk_non_streaming_usage_is_what_is_metered(runtime: Runtime, api_key: IssuedKey) -> None:
    with serve_app(create_app(runtime=runtime)) as base:
        sdk = openai.OpenAI(api_key=api_key.api_key, base_url=base + "/v1", max_retries=0)
        reply = sdk.chat.completions.create(model="echo-1", messages=[{"role": "user", "content": "one two three"}])
    assert reply.choices[0].message.content == "echo: one two three"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 4)
    assert pending_tokens(runtime, api_key.api_key_id) == reply.usage.total_tokens == 7
    summary = Flusher(runtime.settings).run()
    assert summary.ok and summary.rows_inserted == 1
    assert stored_tokens(runtime, api_key.api_key_id) == 7
    assert pending_tokens(runtime, api_key.api_key_id) == 0


def test_openai_sdk_streaming_with_usage(runtime: Runtime, api_key: IssuedKey) -> None:
    with serve_app(create_app(runtime=runtime)) as base:
        sdk = openai.OpenAI(api_key=api_key.api_key, base_url=base + "/v1", max_retries=0)
        stream = sdk.chat.completions.create(
            model="echo-1", messages=[{"role": "user", "content": "alpha beta gamma delta"}],
            stream=True, stream_options={"include_usage": True})
        text, usage = read_sdk_stream(stream)
    assert text == "echo: alpha beta gamma delta"
    assert usage is not None and usage.total_tokens == 4 + 5
    assert pending_tokens(runtime, api_key.api_key_id) == usage.total_tokens


def test_async_openai_sdk_many_concurrent_requests_all_metered(runtime: Runtime, api_key: IssuedKey) -> None:
    async def drive(base: str) -> int:
        sdk = openai.AsyncOpenAI(api_key=api_key.api_key, base_url=base + "/v1", max_retries=0)
        replies = await asyncio.gather(*[
            sdk.chat.completions.create(model="echo-1", messages=[{"role": "user", "content": "w " * (i + 1)}])
            for i in range(40)])
        await sdk.close()
        return sum(r.usage.total_tokens for r in replies if r.usage)

    with serve_app(create_app(runtime=runtime)) as base:
        total = asyncio.run(drive(base))
    assert pending_tokens(runtime, api_key.api_key_id) == total
    assert Flusher(runtime.settings).run().rows_inserted == 40
    assert stored_tokens(runtime, api_key.api_key_id) == total


@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, "missing_api_key"), ({"Authorization": "Bearer ak_nope"}, "invalid_api_key"),
     ({"Authorization": "Basic abc"}, "missing_api_key")],
)
def test_bad_keys_get_401(client: TestClient, headers: dict[str, str], code: str) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == code


def test_revoked_key_stops_working_within_the_cache_ttl(pg_url: str, redis_prefix: str) -> None:
    settings = make_settings(pg_url, redis_prefix, key_cache_ttl_seconds=0.5)
    other_instance = Runtime(settings)  # a second Lambda container with its own cache
    key = issue_key(settings)
    with TestClient(create_app(runtime=Runtime(settings))) as admin, \
            TestClient(create_app(runtime=other_instance)) as other:
        assert chat(other, key.api_key).status_code == 200
        r = admin.post(f"/v1/admin/keys/{key.api_key_id}/revoke", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status_code == 200
        time.sleep(0.6)
        r = chat(other, key.api_key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "revoked_api_key"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "model": "a b|c"}, "model"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ],
)
def test_malformed_bodies_get_422_naming_the_field(client: TestClient, api_key: IssuedKey,
                                                   body: dict[str, Any], field: str) -> None:
    r = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {api_key.api_key}"})
    assert r.status_code == 422
    assert r.json()["error"]["param"] == field
    assert field in r.json()["error"]["message"]


def test_non_json_body_gets_422(client: TestClient, api_key: IssuedKey) -> None:
    r = client.post("/v1/chat/completions", content=b"{not json",
                    headers={"Authorization": f"Bearer {api_key.api_key}", "Content-Type": "application/json"})
    assert r.status_code == 422
    assert "JSON" in r.json()["error"]["message"]


def test_requests_per_minute_limit_answers_429_with_headers(client: TestClient, settings: Settings) -> None:
    key = issue_key(settings, rpm=3, rpd=100)
    codes = [chat(client, key.api_key).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = chat(client, key.api_key)
    assert r.status_code == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert r.headers["X-RateLimit-Limit-Requests"] == "3"
    assert r.headers["X-RateLimit-Remaining-Requests"] == "0"
    assert "requests per minute" in r.json()["error"]["message"]


def test_requests_per_day_limit(client: TestClient, settings: Settings) -> None:
    key = issue_key(settings, rpm=100, rpd=2)
    assert [chat(client, key.api_key).status_code for _ in range(3)] == [200, 200, 429]


def test_parallel_requests_cannot_overspend_the_token_quota(runtime: Runtime, settings: Settings) -> None:
    # Each call costs 3 input + 4 output = 7 tokens and reserves max_tokens=4 + prompt; quota 20 tokens.
    key = issue_key(settings, rpm=1000, rpd=1000, monthly_tokens=20)

    with serve_app(create_app(runtime=runtime)) as base:
        codes = parallel_chats(base, key, 30)
    ok = codes.count(200)
    assert set(codes) <= {200, 429}
    # 20 tokens of quota: at most three 7-token calls may start (the third overshoots by at most one call).
    assert 1 <= ok <= 3
    assert pending_tokens(runtime, key.api_key_id) == 7 * ok
    with TestClient(create_app(runtime=runtime)) as c:
        r = chat(c, key.api_key)
        assert r.status_code == 429 and "monthly token quota" in r.json()["error"]["message"]


def test_rejected_requests_are_not_metered(client: TestClient, runtime: Runtime, settings: Settings) -> None:
    key = issue_key(settings, rpm=1, rpd=100)
    assert chat(client, key.api_key).status_code == 200
    assert chat(client, key.api_key).status_code == 429
    assert pending_tokens(runtime, key.api_key_id) == 3 + 4


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_guessing_keys_is_rate_limited_per_address(pg_url: str, redis_prefix: str) -> None:
    settings = make_settings(pg_url, redis_prefix, auth_failures_per_minute=5)
    good = issue_key(settings)
    with TestClient(create_app(runtime=Runtime(settings))) as c:
        assert chat(c, good.api_key).status_code == 200  # known to this instance before the guessing starts
        codes = [chat(c, f"ak_guess{i}").status_code for i in range(7)]
        assert codes == [401] * 5 + [429] * 2
        r = chat(c, "ak_guess-again")
        assert r.status_code == 429 and r.headers["Retry-After"] == "60"
        # The block is per address and shared by instances: a new instance refuses unknown keys from it too...
        with TestClient(create_app(runtime=Runtime(settings))) as fresh:
            assert chat(fresh, "ak_guess-elsewhere").status_code == 429
            # ...but never a valid key (a shared NAT or proxy), even one this instance has not seen yet.
            assert chat(fresh, good.api_key).status_code == 200
        assert chat(c, good.api_key).status_code == 200


def test_quota_survives_a_redis_wipe(runtime: Runtime, settings: Settings) -> None:
    """A Redis that lost its counters must not hand a key its monthly quota again: the counter is seeded
    from the flushed rollups on the first request of the period."""
    key = issue_key(settings, rpm=1000, rpd=1000, monthly_tokens=20)
    with TestClient(create_app(runtime=runtime)) as c:
        assert [chat(c, key.api_key).status_code for _ in range(3)] == [200, 200, 200]  # 21 tokens used
        assert chat(c, key.api_key).status_code == 429
        assert Flusher(settings).run().rows_inserted >= 3
        wipe = redis.Redis.from_url(REDIS_URL)
        for k in wipe.scan_iter(match=f"{settings.redis_key_prefix}:*"):
            wipe.delete(k)
        wipe.close()
        r = chat(c, key.api_key)
        assert r.status_code == 429
        assert "monthly token quota" in r.json()["error"]["message"]


def test_quota_counter_starts_from_usage_the_database_already_holds(runtime: Runtime, settings: Settings) -> None:
    key = issue_key(settings, rpm=1000, rpd=1000, monthly_tokens=20)
    # 15 tokens this month that reached Postgres without passing through this Redis (e.g. the fallback path).
    earlier = UsageEvent(request_id=new_request_id(), api_key_id=key.api_key_id, customer_id=None,
                         model="echo-1", input_tokens=10, output_tokens=5, ts=time.time() - 5)
    with runtime.engine.begin() as conn:
        store_events(conn, [earlier], billable=False, window_seconds=300)
    with TestClient(create_app(runtime=runtime)) as c:
        assert chat(c, key.api_key).status_code == 200  # 15 < 20
        assert chat(c, key.api_key).status_code == 429  # 15 + 7 >= 20


def test_flush_leaves_no_pending_fields_behind(runtime: Runtime, api_key: IssuedKey) -> None:
    with TestClient(create_app(runtime=runtime)) as c:
        for _ in range(3):
            assert chat(c, api_key.api_key).status_code == 200
    assert Flusher(runtime.settings).run().rows_inserted == 3
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    assert client.hgetall(runtime.layout.pending(api_key.api_key_id)) == {}
    client.close()


def test_a_recently_verified_key_keeps_working_while_the_database_is_down(
        fresh_pg_url: str, redis_prefix: str) -> None:
    settings = make_settings(fresh_pg_url, redis_prefix, key_cache_ttl_seconds=0.2)
    key = issue_key(settings)
    with TestClient(create_app(runtime=Runtime(settings))) as c:
        assert chat(c, key.api_key).status_code == 200
        admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:  # the database goes away (its connections are cut too)
            conn.execute(text(f'DROP DATABASE "{fresh_pg_url.rsplit("/", 1)[1]}" WITH (FORCE)'))
        admin.dispose()
        time.sleep(0.3)  # past the cache TTL: a lookup is due and fails
        assert chat(c, key.api_key).status_code == 200  # last known state, usage still metered in Redis
        r = chat(c, "ak_never-seen-before")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "database_unavailable"
