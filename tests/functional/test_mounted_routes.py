"""Routes of your own, mounted with create_app(routers=...) (AIKIT_ROUTERS does the same from the environment):
auth by default like the built-in routes, `llm.chat(..., track_tokens=True)` / `llm.stream` / `MeteredLLM`
metered to the calling key, and every metered call admitted through the one path /v1/chat/completions uses
(requests counted once per HTTP request, each call reserving against the monthly quota, released on failure).
Real Redis and Postgres; the app under TestClient or uvicorn."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import aclosing
from typing import Any

import httpx
import pytest
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

import aikit.runtime
from aikit import llm
from aikit.api.app import create_app
from aikit.api.deps import BilledDep, MeteredLLM, public
from aikit.errors import UnknownApiKey
from aikit.keys import IssuedKey
from aikit.llm import CallerRequired
from aikit.llm.context import current_request
from aikit.runtime import Runtime
from aikit.settings import Settings
from tests.fakes.llm_servers import FakeOpenAI, openai_server
from tests.support.api import bearer, issue_key
from tests.support.redis import entries, held, quota_counter
from tests.support.servers import serve_app
from tests.support.settings import ADMIN_TOKEN, make_settings

# ----------------------------------------------------------------------------------- the user's routers

router = APIRouter()


@router.post("/v1/twice")
async def twice(body: dict[str, Any]) -> dict[str, Any]:
    """Two metered calls, the seed's line as written."""
    first = await llm.chat(messages=[{"role": "user", "content": body["text"]}], track_tokens=True)
    second = await llm.chat(messages=[{"role": "user", "content": first.content}], track_tokens=True)
    return {"tokens": [first.usage.total_tokens, second.usage.total_tokens]}


@router.post("/v1/together")
async def together(body: dict[str, Any]) -> dict[str, Any]:
    """Two metered calls at once: the request is still counted once."""
    results = await asyncio.gather(*[llm.chat(messages=[{"role": "user", "content": body["text"]}],
                                              track_tokens=True) for _ in range(2)])
    return {"tokens": [r.usage.total_tokens for r in results]}


@router.post("/v1/streamed")
async def streamed(body: dict[str, Any]) -> dict[str, Any]:
    text = ""
    async with aclosing(llm.stream(messages=[{"role": "user", "content": body["text"]}], track_tokens=True)) as s:
        async for event in s:
            if isinstance(event, llm.TextDelta):
                text += event.text
    return {"text": text}


@router.post("/v1/dependency")
async def dependency(body: dict[str, Any], model: MeteredLLM, billing: BilledDep) -> dict[str, Any]:
    result = await model.chat(messages=[{"role": "user", "content": body["text"]}])
    return {"tokens": result.usage.total_tokens, "key": billing.key.api_key_id}


@router.get("/v1/plain")
async def plain() -> dict[str, str]:
    """No LLM call at all: still needs a key, and is counted once against requests per minute/day."""
    return {"ok": "yes"}


@router.post("/v1/unmetered")
async def unmetered(body: dict[str, Any]) -> dict[str, Any]:
    result = await llm.chat(messages=[{"role": "user", "content": body["text"]}])  # track_tokens=False
    return {"tokens": result.usage.total_tokens}


@router.post("/v1/own-headers")
async def own_headers(body: dict[str, Any]) -> JSONResponse:
    """A metered call answered with headers of the route's own, one of them a rate-limit header's name."""
    result = await llm.chat(messages=[{"role": "user", "content": body["text"]}], track_tokens=True)
    return JSONResponse({"tokens": result.usage.total_tokens},
                        headers={"Cache-Control": "no-store", "X-Mine": "kept", "X-RateLimit-Limit-Tokens": "mine"})


open_router = public(APIRouter())


@open_router.get("/v1/open/status")
async def status() -> dict[str, object]:
    scope = current_request.get()
    return {"status": "ok", "billed": scope is not None and scope.gate is not None}


@open_router.post("/v1/open/metered")
async def open_metered(body: dict[str, Any]) -> dict[str, Any]:
    """A public route that makes a metered call: the call needs a key all the same."""
    result = await llm.chat(messages=[{"role": "user", "content": body["text"]}], track_tokens=True)
    return {"tokens": result.usage.total_tokens}


# -------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def app_client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime=runtime, routers=[router, open_router])) as c:
        yield c


async def remaining(runtime: Runtime, key: IssuedKey) -> dict[str, int | None]:
    info = runtime.keys.lookup(key.api_key)
    assert info is not None
    try:
        return await runtime.limiter.remaining(info)
    finally:
        await runtime.aclose()


# -------------------------------------------------------------------------------------------- metering


def test_two_calls_in_a_route_are_each_metered_to_the_caller(app_client: TestClient, runtime: Runtime,
                                                             settings: Settings) -> None:
    key = issue_key(settings, rpm=100, rpd=1000, monthly_tokens=100_000)
    r = app_client.post("/v1/twice", json={"text": "one two three"}, headers=bearer(key))
    assert r.status_code == 200, r.text
    # echo: 3 in + 4 out ("echo: one two three"), then 4 in + 5 out.
    assert r.json() == {"tokens": [7, 9]}
    request_id = r.headers["X-Request-Id"]
    found = entries(runtime, key.api_key_id)
    assert [(e["r"], e["i"], e["o"]) for e in found] == [(request_id, "3", "4"), (f"{request_id}.2", "4", "5")]
    # Counted once for the HTTP request; the quota header is the one after both calls' reservations.
    assert r.headers["X-RateLimit-Remaining-Requests"] == "99"
    assert held(runtime, key) == {}
    assert asyncio.run(remaining(runtime, key))["tokens"] == 100_000 - 16


def test_streams_concurrent_calls_and_the_dependency_form_are_metered(
        app_client: TestClient, runtime: Runtime, settings: Settings) -> None:
    key = issue_key(settings, rpm=100, rpd=1000, monthly_tokens=100_000)
    s = app_client.post("/v1/streamed", json={"text": "alpha beta"}, headers=bearer(key))
    assert s.status_code == 200 and s.json() == {"text": "echo: alpha beta"}
    t = app_client.post("/v1/together", json={"text": "x y"}, headers=bearer(key))
    assert t.status_code == 200 and t.json() == {"tokens": [5, 5]}
    d = app_client.post("/v1/dependency", json={"text": "one"}, headers=bearer(key))
    assert d.status_code == 200 and d.json() == {"tokens": 3, "key": key.api_key_id}
    u = app_client.post("/v1/unmetered", json={"text": "not billed"}, headers=bearer(key))
    assert u.status_code == 200
    found = entries(runtime, key.api_key_id)
    assert sorted(int(e["i"]) + int(e["o"]) for e in found) == [3, 5, 5, 5]
    assert len({e["r"] for e in found}) == 4
    # Four requests so far, each counted once (the two concurrent calls of /v1/together and the request
    # without a metered call included): this fifth one leaves 95.
    again = app_client.post("/v1/dependency", json={"text": "one"}, headers=bearer(key))
    assert again.headers["X-RateLimit-Remaining-Requests"] == str(100 - 5)


def test_a_routes_own_response_headers_are_kept_beside_the_rate_limit_headers(
        app_client: TestClient, runtime: Runtime, settings: Settings) -> None:
    key = issue_key(settings, rpm=100, rpd=1000, monthly_tokens=100_000)
    r = app_client.post("/v1/own-headers", json={"text": "one"}, headers=bearer(key))
    assert r.status_code == 200 and r.json() == {"tokens": 3}
    names = [name.lower() for name, _ in r.headers.multi_items()]
    assert len(names) == len(set(names))  # every header once
    assert r.headers["cache-control"] == "no-store" and r.headers["x-mine"] == "kept"
    assert r.headers["x-ratelimit-limit-tokens"] == "mine"  # the route's own value wins
    assert r.headers["x-ratelimit-limit-requests"] == "100"
    assert r.headers["x-ratelimit-remaining-requests"] == "99"
    assert [e["r"] for e in entries(runtime, key.api_key_id)] == [r.headers["x-request-id"]]


def test_a_mounted_route_cannot_take_a_built_in_routes_path(runtime: Runtime, key: IssuedKey) -> None:
    """The built-in routes are matched first, whatever the app was built from: a user's route on the same path
    and method is never reached (the OpenAPI still lists it, as FastAPI lists duplicates)."""
    shadowing = APIRouter()

    @shadowing.post("/v1/chat/completions")
    async def not_chat() -> dict[str, str]:
        return {"answered_by": "the user's route"}

    @shadowing.get("/healthz")
    async def not_health() -> dict[str, str]:
        return {"answered_by": "the user's route"}

    with TestClient(create_app(runtime=runtime, routers=[shadowing])) as client:
        chat = client.post("/v1/chat/completions", headers=bearer(key),
                           json={"model": "echo-1", "messages": [{"role": "user", "content": "hi"}]})
        health = client.get("/healthz")
    assert chat.status_code == 200
    assert chat.json()["object"] == "chat.completion"
    assert health.status_code == 200
    assert health.json() != {"answered_by": "the user's route"}


def test_every_mounted_route_needs_a_key_like_the_built_in_ones(
        app_client: TestClient, settings: Settings) -> None:
    key = issue_key(settings)
    for method, path in (("GET", "/v1/plain"), ("POST", "/v1/twice"), ("POST", "/v1/dependency")):
        missing = app_client.request(method, path, json={"text": "x"})
        assert (missing.status_code, missing.json()["error"]["code"]) == (401, "missing_api_key")
        bad = app_client.request(method, path, json={"text": "x"}, headers={"Authorization": "Bearer ak_nope"})
        assert (bad.status_code, bad.json()["error"]["code"]) == (401, "invalid_api_key")
    revoke = app_client.post(f"/v1/admin/keys/{key.api_key_id}/revoke",
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert revoke.status_code == 200
    gone = app_client.post("/v1/twice", json={"text": "x"}, headers=bearer(key))
    assert (gone.status_code, gone.json()["error"]["code"]) == (401, "revoked_api_key")


def test_no_active_subscription_is_402_and_guessing_keys_is_429(pg_url: str, redis_prefix: str) -> None:
    settings = make_settings(pg_url, redis_prefix, stripe_secret_key="sk_test_x", auth_failures_per_minute=3)
    unpaid = issue_key(settings, customer_id="cus_" + uuid.uuid4().hex[:14])
    with TestClient(create_app(runtime=Runtime(settings), routers=[router])) as c:
        r = c.post("/v1/twice", json={"text": "x"}, headers=bearer(unpaid))
        assert (r.status_code, r.json()["error"]["code"]) == (402, "subscription_inactive")
        assert c.get("/v1/plain", headers=bearer(unpaid)).status_code == 402
        codes = [c.get("/v1/plain", headers={"Authorization": f"Bearer ak_guess{i}"}).status_code for i in range(5)]
        assert codes == [401, 401, 401, 429, 429]


def test_a_public_router_opts_out_but_its_metered_calls_still_need_a_key(
        app_client: TestClient, runtime: Runtime, settings: Settings) -> None:
    assert app_client.get("/v1/open/status").json() == {"status": "ok", "billed": False}
    r = app_client.post("/v1/open/metered", json={"text": "a b"})
    assert (r.status_code, r.json()["error"]["code"]) == (401, "missing_api_key")  # never a 500
    key = issue_key(settings, rpm=100, rpd=1000)
    ok = app_client.post("/v1/open/metered", json={"text": "a b"}, headers=bearer(key))
    assert ok.status_code == 200 and ok.json() == {"tokens": 2 + 3}
    assert [e["r"] for e in entries(runtime, key.api_key_id)] == [ok.headers["X-Request-Id"]]
    # The billing state of one request never reaches the next one, even in the same task.
    assert app_client.get("/v1/open/status").json()["billed"] is False


@pytest.mark.anyio
async def test_state_does_not_leak_between_requests_served_in_one_task(runtime: Runtime,
                                                                       settings: Settings) -> None:
    key = issue_key(settings)
    app = create_app(runtime=runtime, routers=[router, open_router])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        assert (await http.post("/v1/twice", json={"text": "x"}, headers=bearer(key))).status_code == 200
        # httpx runs the app in this very task: without a per-request scope the caller would carry over.
        assert (await http.post("/v1/open/metered", json={"text": "x"})).status_code == 401
        assert current_request.get() is None
    await runtime.aclose()


# ------------------------------------------------------------------------------------------------ limits


def test_requests_are_counted_once_and_refused_at_the_first_metered_call(
        app_client: TestClient, runtime: Runtime, settings: Settings) -> None:
    key = issue_key(settings, rpm=3, rpd=100)
    assert [app_client.post("/v1/twice", json={"text": "x"}, headers=bearer(key)).status_code
            for _ in range(2)] == [200, 200]
    # A route without metered calls is counted once too (after it answered: it is never refused).
    assert app_client.get("/v1/plain", headers=bearer(key)).status_code == 200
    r = app_client.post("/v1/twice", json={"text": "x"}, headers=bearer(key))
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert "requests per minute" in r.json()["error"]["message"]
    assert r.headers["X-RateLimit-Limit-Requests"] == "3"
    assert r.headers["X-RateLimit-Remaining-Requests"] == "0"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert len(entries(runtime, key.api_key_id)) == 4  # two requests of two calls; the refused one none


def test_each_call_is_admitted_against_the_quota(app_client: TestClient, runtime: Runtime,
                                                 settings: Settings) -> None:
    # The first call (3 + 4 tokens) starts with 9 left (reserving its worst case meanwhile); once it settled 7
    # of 9 are used and the second call still starts (2 left): the overshoot is at most that one call.
    key = issue_key(settings, rpm=100, rpd=100, monthly_tokens=9)
    r = app_client.post("/v1/twice", json={"text": "one two three"}, headers=bearer(key))
    assert r.status_code == 200
    again = app_client.post("/v1/twice", json={"text": "one two three"}, headers=bearer(key))
    assert again.status_code == 429
    assert "monthly token quota" in again.json()["error"]["message"]
    assert again.headers["X-RateLimit-Remaining-Tokens"] == "0"
    assert held(runtime, key) == {}
    # A quota refused in the middle of a request: the first call was served and metered, the second refused.
    key2 = issue_key(settings, rpm=100, rpd=100, monthly_tokens=5)
    mid = app_client.post("/v1/twice", json={"text": "one two three"}, headers=bearer(key2))
    assert mid.status_code == 429
    assert [int(e["i"]) + int(e["o"]) for e in entries(runtime, key2.api_key_id)] == [7]
    assert held(runtime, key2) == {}


def test_a_provider_failure_in_a_mounted_route_releases_the_reservation(
        pg_url: str, redis_prefix: str) -> None:
    with openai_server() as upstream:
        settings = make_settings(pg_url, redis_prefix, llm_provider="openai", openai_base_url=upstream.base_url,
                                 openai_api_key=FakeOpenAI.api_key)
        runtime = Runtime(settings)
        key = issue_key(settings, rpm=100, rpd=100, monthly_tokens=100_000)
        upstream.inject("500")
        with TestClient(create_app(runtime=runtime, routers=[router])) as c:
            r = c.post("/v1/twice", json={"text": "hi"}, headers=bearer(key))
            assert r.status_code == 502
            assert r.json()["error"]["code"] == "provider_error"
            assert held(runtime, key) == {}
            assert entries(runtime, key.api_key_id) == []
            assert c.post("/v1/twice", json={"text": "hi"}, headers=bearer(key)).status_code == 200
        assert [e["i"] for e in entries(runtime, key.api_key_id)] == ["42", "42"]


def test_user_routes_and_chat_completions_share_the_limits(app_client: TestClient, settings: Settings) -> None:
    key = issue_key(settings, rpm=2, rpd=100)
    assert app_client.post("/v1/twice", json={"text": "x"}, headers=bearer(key)).status_code == 200
    chat = {"messages": [{"role": "user", "content": "x"}]}
    assert app_client.post("/v1/chat/completions", json=chat, headers=bearer(key)).status_code == 200
    assert app_client.post("/v1/chat/completions", json=chat, headers=bearer(key)).status_code == 429
    assert app_client.post("/v1/twice", json={"text": "x"}, headers=bearer(key)).status_code == 429


# -------------------------------------------------------------------------------- outside a request


@pytest.mark.anyio
async def test_track_tokens_outside_a_request_is_a_clear_error(runtime: Runtime,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aikit.runtime, "_runtime", runtime)  # what `from aikit import llm` uses out of a request
    with pytest.raises(CallerRequired, match="outside an authenticated request"):
        await llm.chat([{"role": "user", "content": "x"}], track_tokens=True)
    with pytest.raises(CallerRequired, match="outside an authenticated request"):
        await runtime.llm.chat([{"role": "user", "content": "x"}], track_tokens=True)
    with pytest.raises(CallerRequired, match="AIKIT_ROUTERS"):
        llm.stream([{"role": "user", "content": "x"}], track_tokens=True)


@pytest.mark.anyio
async def test_the_standalone_meter_counts_into_the_limiters_quota_counter(runtime: Runtime,
                                                                          settings: Settings) -> None:
    """`LLM(provider, meter=RedisMeter(...))` with a caller that carries no quota period: the meter looks it
    up, so the usage lands in the very counter the limiter refuses on."""
    key = issue_key(settings, rpm=100, rpd=100, monthly_tokens=60)
    with TestClient(create_app(runtime=runtime, routers=[router])) as c:  # seeds the key's quota counter
        assert c.post("/v1/twice", json={"text": "x"}, headers=bearer(key)).status_code == 200
    assert quota_counter(runtime, key) == (1 + 2) + (2 + 3)
    standalone = llm.LLM(runtime.llm.provider, meter=runtime.meter)
    await standalone.chat([{"role": "user", "content": " ".join(["w"] * 30)}], track_tokens=True,
                          caller=llm.Caller(key.api_key_id))
    assert quota_counter(runtime, key) == 8 + (30 + 31)
    with TestClient(create_app(runtime=runtime, routers=[router])) as c:
        refused = c.post("/v1/twice", json={"text": "x"}, headers=bearer(key))
        assert refused.status_code == 429 and "monthly token quota" in refused.text
    with pytest.raises(UnknownApiKey, match="key_nobody"):
        await standalone.chat([{"role": "user", "content": "x"}], track_tokens=True,
                              caller=llm.Caller("key_nobody"))
    await runtime.aclose()


def test_runtime_keeps_no_per_key_side_channel(runtime: Runtime) -> None:
    assert not hasattr(runtime, "quota_periods")


# --------------------------------------------------------------------------------------- real server


def test_a_mounted_route_under_uvicorn_with_parallel_clients(runtime: Runtime, settings: Settings) -> None:
    key = issue_key(settings, rpm=1000, rpd=1000, monthly_tokens=1_000_000)

    async def burst(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=20) as http:
            return await asyncio.gather(*[http.post("/v1/twice", json={"text": "w " * (i + 1)}, headers=bearer(key))
                                          for i in range(30)])

    with serve_app(create_app(runtime=runtime, routers=[router])) as base:
        responses = asyncio.run(burst(base))
    assert [r.status_code for r in responses] == [200] * 30
    metered = sum(int(e["i"]) + int(e["o"]) for e in entries(runtime, key.api_key_id))
    assert metered == sum(sum(r.json()["tokens"]) for r in responses)
    assert len(entries(runtime, key.api_key_id)) == 60
