"""GET /v1/usage and the admin usage report/CSV, against real Postgres and Redis, through TestClient.

"Flushed" usage is written with the real `store_events` (what the flush does); "pending" usage with the real
meter (`runtime.meter.record`) or the chat endpoint, and moved across with the real Flusher.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import random
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from aikit.api.app import create_app
from aikit.db.engine import get_engine
from aikit.keys import IssuedKey
from aikit.metering.base import UsageEvent
from aikit.metering.redis_meter import priced_event
from aikit.metering.sql_sink import store_events
from aikit.runtime import Runtime
from aikit.settings import Settings
from tests.support.api import bearer, issue_key
from tests.support.settings import ADMIN_TOKEN, REDIS_URL, make_settings

# USD per million tokens; cached input at the input rate (no cached_input given).
PRICES = {"gpt-a": {"input": 500, "output": 1500}, "gpt-b": {"input": 250, "output": 2000}}
DOCUMENTED_KEYS = ["tokens_used", "requests", "period_start", "period_end", "rate_limit_remaining"]
DAY = 86400


# --- helpers -------------------------------------------------------------------------------------------


def today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def noon(day: dt.date) -> float:
    return dt.datetime(day.year, day.month, day.day, 12, tzinfo=dt.UTC).timestamp()


def event(key: str, model: str, inp: int, out: int, *, ts: float | None = None, cached: int = 0,
          customer: str | None = None, request_id: str | None = None) -> UsageEvent:
    return UsageEvent(request_id=request_id or "req_" + uuid.uuid4().hex, api_key_id=key,
                      customer_id=customer, model=model, input_tokens=inp, output_tokens=out,
                      cached_tokens=cached, ts=noon(today()) if ts is None else ts)


def store_flushed(settings: Settings, events: list[UsageEvent]) -> int:
    # Priced as the meter prices them when it records them (the flushed rows carry that cost).
    priced = [priced_event(e, settings.price_book) for e in events]
    with get_engine(settings.database_url).begin() as conn:
        return store_events(conn, priced, billable=False, window_seconds=300)


def record_pending(settings: Settings, events: list[UsageEvent]) -> None:
    """Through the real meter, in a runtime of its own (its async Redis client belongs to this loop)."""

    async def go() -> None:
        rt = Runtime(settings)
        try:
            for e in events:
                await rt.meter.record(e.api_key_id, e.tokens, e.customer_id, request_id=e.request_id,
                                      model=e.model, input_tokens=e.input_tokens,
                                      output_tokens=e.output_tokens, cached_tokens=e.cached_tokens, ts=e.ts)
        finally:
            await rt.aclose()

    anyio.run(go)


def flush(settings: Settings) -> None:
    from aikit.flush import Flusher  # here: only the tests that flush depend on the flush module

    summary = Flusher(settings, gateway=None).run()
    assert summary.ok, summary.errors


def pending_hash(runtime: Runtime, key_id: str) -> dict[str, str]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return client.hgetall(runtime.layout.pending(key_id))  # type: ignore[return-value]
    finally:
        client.close()


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def totals(events: list[UsageEvent]) -> dict[str, int]:
    return {"requests": len(events), "input_tokens": sum(e.input_tokens for e in events),
            "output_tokens": sum(e.output_tokens for e in events),
            "cached_tokens": sum(e.cached_tokens for e in events), "tokens": sum(e.tokens for e in events)}


@pytest.fixture
def settings(pg_url: str, redis_prefix: str) -> Settings:
    return make_settings(pg_url, redis_prefix, price_table=PRICES)


@pytest.fixture
def uclient(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime=runtime)) as c:
        yield c


# --- the key's own view --------------------------------------------------------------------------------


def test_shape_and_values_flushed_plus_pending(settings: Settings, uclient: TestClient) -> None:
    key = issue_key(settings, rpm=50, rpd=4000, monthly_tokens=1_000_000)
    kid = key.api_key_id
    flushed = [event(kid, "gpt-a", 1000, 200, cached=300), event(kid, "gpt-a", 10, 5),
               event(kid, "mystery-1", 40, 60)]
    pending = [event(kid, "gpt-a", 7, 3), event(kid, "gpt-b", 2000, 1000, cached=100)]
    last_month = today().replace(day=1) - dt.timedelta(days=1)
    old = [event(kid, "gpt-a", 999, 999, ts=noon(last_month))]
    assert store_flushed(settings, flushed + old) == 4
    record_pending(settings, pending)

    r = uclient.get("/v1/usage", headers=bearer(key))
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body)[:5] == DOCUMENTED_KEYS
    first, last = today().replace(day=1), (today().replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    last -= dt.timedelta(days=1)
    everything = flushed + pending
    assert body["tokens_used"] == 1200 + 15 + 100 + 10 + 3000 == sum(e.tokens for e in everything)
    assert body["requests"] == 5
    assert body["period_start"] == f"{first.isoformat()}T00:00:00Z"
    assert body["period_end"] == f"{last.isoformat()}T23:59:59Z"
    assert body["rate_limit_remaining"] == {"per_minute": 50, "per_day": 4000}
    assert (body["input_tokens"], body["output_tokens"], body["cached_tokens"]) == (3057, 1268, 400)
    assert body["partial"] is False
    assert body["unpriced_models"] == ["mystery-1"]
    # gpt-a: 1017 in, 208 out; gpt-b: 2000 in, 1000 out (USD per 1k tokens).
    cost_a = 1017 * 0.5 / 1000 + 208 * 1.5 / 1000
    cost_b = 2000 * 0.25 / 1000 + 1000 * 2.0 / 1000
    assert body["estimated_cost_usd"] == pytest.approx(cost_a + cost_b, abs=1e-9)
    by_model = {m["model"]: m for m in body["by_model"]}
    assert {k: v for k, v in by_model["gpt-a"].items() if k != "by_type"} == {
        "model": "gpt-a", "requests": 3, "input_tokens": 1017, "output_tokens": 208, "cached_tokens": 300,
        "tokens": 1225, "estimated_cost_usd": round(cost_a, 6), "cost": "0.820500000000"}
    assert by_model["gpt-a"]["by_type"] == {
        "input": {"tokens": 717, "rate_per_million": "500", "cost": "0.358500000000"},
        "cached_input": {"tokens": 300, "rate_per_million": "500", "cost": "0.150000000000"},
        "output": {"tokens": 208, "rate_per_million": "1500", "cost": "0.312000000000"}}
    assert body["cost"] == "3.320500000000" and body["currency"] == "usd"
    assert by_model["gpt-b"]["tokens"] == 3000
    assert by_model["mystery-1"]["estimated_cost_usd"] is None
    assert body["by_day"] == [{"date": today().isoformat(), **totals(everything)}]


def test_chat_usage_then_flush_counts_each_request_once(settings: Settings, runtime: Runtime,
                                                        uclient: TestClient) -> None:
    key = issue_key(settings, rpm=50, rpd=4000, monthly_tokens=100_000)
    used = 0
    for words in ("one two three", "four five", "six"):
        r = uclient.post("/v1/chat/completions", headers=bearer(key),
                         json={"model": "gpt-a", "messages": [{"role": "user", "content": words}]})
        assert r.status_code == 200, r.text
        used += r.json()["usage"]["total_tokens"]

    before = uclient.get("/v1/usage", headers=bearer(key)).json()
    assert (before["tokens_used"], before["requests"]) == (used, 3)
    assert before["rate_limit_remaining"] == {"per_minute": 47, "per_day": 3997}
    assert before["monthly_tokens_remaining"] == 100_000 - used

    flush(settings)  # the real flush: rows + rollups committed, then subtracted from pending
    assert all(int(v) == 0 for v in pending_hash(runtime, key.api_key_id).values())  # nothing left pending
    after = uclient.get("/v1/usage", headers=bearer(key)).json()
    assert (after["tokens_used"], after["requests"]) == (used, 3)

    r = uclient.post("/v1/chat/completions", headers=bearer(key),
                     json={"model": "gpt-a", "messages": [{"role": "user", "content": "seven eight"}]})
    used += r.json()["usage"]["total_tokens"]
    mixed = uclient.get("/v1/usage", headers=bearer(key)).json()
    assert (mixed["tokens_used"], mixed["requests"]) == (used, 4)
    assert [(m["model"], m["requests"]) for m in mixed["by_model"]] == [("gpt-a", 4)]
    assert mixed["rate_limit_remaining"]["per_minute"] == 46


def test_partial_flush_of_the_same_day_and_model_is_not_double_counted(settings: Settings,
                                                                        uclient: TestClient) -> None:
    key = issue_key(settings)
    kid = key.api_key_id
    first = [event(kid, "gpt-a", i + 1, 2 * i + 1) for i in range(7)]
    record_pending(settings, first)
    flush(settings)
    second = [event(kid, "gpt-a", 100 + i, 1) for i in range(5)]
    record_pending(settings, second)
    with get_engine(settings.database_url).connect() as conn:
        flushed_requests = conn.execute(text("SELECT requests FROM usage_daily WHERE api_key_id = :k"),
                                        {"k": kid}).scalar_one()
    assert flushed_requests == 7
    body = uclient.get("/v1/usage", headers=bearer(key)).json()
    assert body["by_day"] == [{"date": today().isoformat(), **totals(first + second)}]
    assert (body["tokens_used"], body["requests"]) == (totals(first + second)["tokens"], 12)


def test_last_30_days(settings: Settings, uclient: TestClient) -> None:
    key = issue_key(settings)
    kid = key.api_key_id
    t = today()
    inside = [event(kid, "gpt-a", 1, 1, ts=noon(t)), event(kid, "gpt-a", 2, 2, ts=noon(t - dt.timedelta(29)))]
    outside = [event(kid, "gpt-a", 50, 50, ts=noon(t - dt.timedelta(30)))]
    store_flushed(settings, [inside[1], *outside])
    record_pending(settings, [inside[0], event(kid, "gpt-b", 9, 9, ts=noon(t - dt.timedelta(31)))])
    body = uclient.get("/v1/usage", params={"period": "last_30_days"}, headers=bearer(key)).json()
    assert body["period_start"] == f"{(t - dt.timedelta(29)).isoformat()}T00:00:00Z"
    assert body["period_end"] == f"{t.isoformat()}T23:59:59Z"
    assert (body["tokens_used"], body["requests"]) == (6, 2)
    assert [d["date"] for d in body["by_day"]] == [(t - dt.timedelta(29)).isoformat(), t.isoformat()]


def test_explicit_range_is_inclusive_on_both_ends(settings: Settings, uclient: TestClient) -> None:
    key = issue_key(settings)
    kid = key.api_key_id
    d = dt.date(2023, 3, 1)
    days = {d - dt.timedelta(1): 1000, d: 1, dt.date(2023, 3, 15): 10, dt.date(2023, 3, 31): 100,
            dt.date(2023, 4, 1): 10_000}
    store_flushed(settings, [event(kid, "gpt-a", n, 0, ts=noon(day)) for day, n in days.items()])
    # Unflushed usage on an old day (a flush that lagged) is filtered by the same dates.
    record_pending(settings, [event(kid, "gpt-a", 3, 0, ts=noon(dt.date(2023, 3, 31))),
                              event(kid, "gpt-a", 7, 0, ts=noon(dt.date(2023, 4, 1)))])
    r = uclient.get("/v1/usage", params={"start": "2023-03-01", "end": "2023-03-31"}, headers=bearer(key))
    body = r.json()
    assert r.status_code == 200, r.text
    assert (body["tokens_used"], body["requests"]) == (114, 4)
    assert (body["period_start"], body["period_end"]) == ("2023-03-01T00:00:00Z", "2023-03-31T23:59:59Z")
    assert body["by_day"][-1] == {"date": "2023-03-31", "requests": 2, "input_tokens": 103,
                                  "output_tokens": 0, "cached_tokens": 0, "tokens": 103}
    one_day = uclient.get("/v1/usage", params={"start": "2023-04-01", "end": "2023-04-01"},
                          headers=bearer(key)).json()
    assert one_day["tokens_used"] == 10_007


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"period": "last_week"}, "period"),
        ({"period": ""}, "period"),
        ({"start": "2024-13-01", "end": "2024-12-31"}, "start"),
        ({"start": "2024-02-30", "end": "2024-03-01"}, "start"),
        ({"start": "2024-01-01", "end": "2024/01/31"}, "end"),
        ({"start": "20240101", "end": "2024-01-31"}, "start"),
        ({"start": "2024-03-01", "end": "2024-02-29"}, "end"),
        ({"start": "2024-01-01", "end": "2025-01-01"}, "end"),  # 367 days
        ({"period": "current_month", "start": "2024-01-01", "end": "2024-01-31"}, "period"),
        ({"period": "last_30_days", "end": "2024-01-31"}, "period"),
        ({"start": "2024-01-01"}, "end"),
        ({"end": "2024-01-01"}, "start"),
        ({"start": "x" * 41, "end": "2024-01-01"}, "start"),
    ],
)
def test_bad_periods_are_422_naming_the_parameter(uclient: TestClient, api_key: IssuedKey,
                                                   params: dict[str, str], param: str) -> None:
    for path, headers in (("/v1/usage", bearer(api_key)), ("/v1/admin/usage", ADMIN),
                          ("/v1/admin/usage.csv", ADMIN)):
        query = dict(params) if path == "/v1/usage" else {**params, "api_key_id": api_key.api_key_id}
        r = uclient.get(path, params=query, headers=headers)
        assert r.status_code == 422, (path, r.text)
        error = r.json()["error"]
        assert error["param"] == param
        assert param in error["message"]
        assert error["type"] == "invalid_request_error"


def test_a_full_leap_year_is_allowed(uclient: TestClient, api_key: IssuedKey) -> None:
    r = uclient.get("/v1/usage", params={"start": "2024-01-01", "end": "2024-12-31"}, headers=bearer(api_key))
    assert r.status_code == 200, r.text
    assert r.json()["tokens_used"] == 0


def test_authentication(settings: Settings, uclient: TestClient) -> None:
    key = issue_key(settings)
    assert uclient.get("/v1/usage").status_code == 401
    assert uclient.get("/v1/usage", headers=bearer("ak_not-a-real-key")).status_code == 401
    assert uclient.get("/v1/usage", headers=bearer(key)).status_code == 200
    r = uclient.post(f"/v1/admin/keys/{key.api_key_id}/revoke", headers=ADMIN)
    assert r.status_code == 200, r.text
    r = uclient.get("/v1/usage", headers=bearer(key))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "revoked_api_key"


def test_a_key_sees_only_its_own_usage(settings: Settings, uclient: TestClient) -> None:
    mine, other = issue_key(settings), issue_key(settings)
    store_flushed(settings, [event(mine.api_key_id, "gpt-a", 1, 2),
                             event(other.api_key_id, "gpt-a", 100, 200)])
    record_pending(settings, [event(mine.api_key_id, "gpt-b", 3, 4),
                              event(other.api_key_id, "gpt-b", 300, 400)])
    a = uclient.get("/v1/usage", headers=bearer(mine)).json()
    b = uclient.get("/v1/usage", headers=bearer(other)).json()
    assert (a["tokens_used"], a["requests"]) == (10, 2)
    assert (b["tokens_used"], b["requests"]) == (1000, 2)
    # Query parameters cannot widen the view.
    c = uclient.get("/v1/usage", params={"api_key_id": other.api_key_id}, headers=bearer(mine)).json()
    assert c["tokens_used"] == 10


def test_redis_down_answers_from_postgres_marked_partial(pg_url: str, redis_prefix: str) -> None:
    settings = make_settings(pg_url, redis_prefix, redis_url="redis://127.0.0.1:1/0",
                             redis_timeout_seconds=0.2)
    key = issue_key(settings)
    store_flushed(settings, [event(key.api_key_id, "gpt-a", 5, 6)])
    with TestClient(create_app(runtime=Runtime(settings))) as c:
        r = c.get("/v1/usage", headers=bearer(key))
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["tokens_used"], body["requests"], body["partial"]) == (11, 1, True)
        assert body["rate_limit_remaining"] == {"per_minute": None, "per_day": None}
        assert body["monthly_tokens_remaining"] is None
        admin = c.get("/v1/admin/usage", params={"api_key_id": key.api_key_id}, headers=ADMIN)
        assert admin.status_code == 200, admin.text
        assert (admin.json()["tokens"], admin.json()["partial"]) == (11, True)
        exported = c.get("/v1/admin/usage.csv", params={"api_key_id": key.api_key_id}, headers=ADMIN)
        assert exported.headers["x-usage-partial"] == "true"


def test_database_down_is_a_503_not_a_500(settings: Settings, runtime: Runtime, uclient: TestClient) -> None:
    key = issue_key(settings)
    assert uclient.get("/v1/usage", headers=bearer(key)).status_code == 200  # the key is now in the cache
    # From here on the runtime's engine points at a port where no database listens.
    runtime.__dict__["engine"] = create_engine("postgresql+pg8000://postgres@127.0.0.1:1/none",
                                               connect_args={"timeout": 2})
    r = uclient.get("/v1/usage", headers=bearer(key))
    assert (r.status_code, r.json()["error"]["code"], r.headers["retry-after"]) == (503, "usage_unavailable", "5")
    r = uclient.get("/v1/admin/usage", params={"api_key_id": key.api_key_id}, headers=ADMIN)
    assert (r.status_code, r.json()["error"]["code"]) == (503, "usage_unavailable")


# --- admin ---------------------------------------------------------------------------------------------


def _customer_setup(settings: Settings) -> dict[str, Any]:
    cus_a, cus_b = f"cus_A{uuid.uuid4().hex[:10]}", f"cus_B{uuid.uuid4().hex[:10]}"
    email = f"{uuid.uuid4().hex[:8]}@example.com"
    a1 = issue_key(settings, email=email, customer_id=cus_a)
    a2 = issue_key(settings, email=email, customer_id=cus_a)
    b1 = issue_key(settings, customer_id=cus_b)
    d1, d2 = dt.date(2024, 11, 3), dt.date(2024, 11, 20)
    flushed = [event(a1.api_key_id, "gpt-a", 100, 10, ts=noon(d1), customer=cus_a),
               event(a1.api_key_id, "gpt-b", 200, 20, ts=noon(d2), customer=cus_a),
               event(a2.api_key_id, "gpt-a", 300, 30, ts=noon(d1), customer=cus_a),
               event(b1.api_key_id, "gpt-a", 5000, 500, ts=noon(d1), customer=cus_b)]
    pending = [event(a1.api_key_id, "gpt-a", 1, 1, ts=noon(d1), customer=cus_a),
               event(a2.api_key_id, "+plus", 2, 2, ts=noon(d2), customer=cus_a),
               event(b1.api_key_id, "gpt-a", 7, 7, ts=noon(d2), customer=cus_b)]
    store_flushed(settings, flushed)
    record_pending(settings, pending)
    return {"cus_a": cus_a, "cus_b": cus_b, "a1": a1, "a2": a2, "b1": b1, "flushed": flushed,
            "pending": pending}


NOV = {"start": "2024-11-01", "end": "2024-11-30"}


def test_admin_usage_per_customer_and_per_key(settings: Settings, uclient: TestClient) -> None:
    s = _customer_setup(settings)
    a1, a2 = s["a1"].api_key_id, s["a2"].api_key_id
    mine = [e for e in s["flushed"] + s["pending"] if e.customer_id == s["cus_a"]]

    r = uclient.get("/v1/admin/usage", params={"customer_id": s["cus_a"], **NOV}, headers=ADMIN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert {k: body[k] for k in ("requests", "input_tokens", "output_tokens", "cached_tokens", "tokens")} \
        == totals(mine)
    assert body["tokens_used"] == totals(mine)["tokens"]
    assert (body["period_start"], body["period_end"]) == ("2024-11-01T00:00:00Z", "2024-11-30T23:59:59Z")
    assert [c["customer_id"] for c in body["by_customer"]] == [s["cus_a"]]
    assert body["by_customer"][0]["tokens"] == totals(mine)["tokens"]
    by_key = {k["api_key_id"]: k for k in body["by_key"]}
    assert set(by_key) == {a1, a2}
    assert (by_key[a1]["tokens"], by_key[a1]["customer_id"]) == (110 + 220 + 2, s["cus_a"])
    assert by_key[a2]["tokens"] == 330 + 4
    assert body["unpriced_models"] == ["+plus"]
    assert body["estimated_cost_usd"] == pytest.approx(
        (401 * 0.5 + 41 * 1.5) / 1000 + (200 * 0.25 + 20 * 2.0) / 1000, abs=1e-9)
    assert body["partial"] is False

    r = uclient.get("/v1/admin/usage", params={"api_key_id": s["b1"].api_key_id, **NOV}, headers=ADMIN)
    body = r.json()
    assert (body["tokens"], body["requests"]) == (5514, 2)
    assert [k["api_key_id"] for k in body["by_key"]] == [s["b1"].api_key_id]
    assert body["by_customer"][0]["customer_id"] == s["cus_b"]

    # Outside the range nothing shows; the default period (this month) does not include November 2024.
    r = uclient.get("/v1/admin/usage", params={"customer_id": s["cus_a"], "start": "2024-11-04",
                                               "end": "2024-11-19"}, headers=ADMIN)
    assert r.json()["tokens"] == 0
    if today().strftime("%Y-%m") != "2024-11":
        assert uclient.get("/v1/admin/usage", params={"customer_id": s["cus_a"]}, headers=ADMIN).json()[
            "tokens"] == 0


def test_admin_usage_refuses_bad_requests(uclient: TestClient, api_key: IssuedKey) -> None:
    assert uclient.get("/v1/admin/usage", params={"api_key_id": api_key.api_key_id}).status_code == 401
    r = uclient.get("/v1/admin/usage", params={"api_key_id": api_key.api_key_id}, headers=bearer(api_key))
    assert r.status_code == 401
    r = uclient.get("/v1/admin/usage", headers=ADMIN)
    assert (r.status_code, r.json()["error"]["param"]) == (422, "customer_id")
    r = uclient.get("/v1/admin/usage", params={"customer_id": "cus_x", "api_key_id": api_key.api_key_id},
                    headers=ADMIN)
    assert (r.status_code, r.json()["error"]["param"]) == (422, "api_key_id")
    r = uclient.get("/v1/admin/usage", params={"api_key_id": "key_doesnotexist"}, headers=ADMIN)
    assert r.status_code == 404
    r = uclient.get("/v1/admin/usage", params={"api_key_id": "k" * 41}, headers=ADMIN)
    assert (r.status_code, r.json()["error"]["param"]) == (422, "api_key_id")
    r = uclient.get("/v1/admin/usage", params={"customer_id": "cus_nobody"}, headers=ADMIN)
    assert (r.status_code, r.json()["tokens"], r.json()["by_key"]) == (200, 0, [])


def test_admin_csv_export(settings: Settings, uclient: TestClient) -> None:
    s = _customer_setup(settings)
    a1, a2 = s["a1"].api_key_id, s["a2"].api_key_id
    r = uclient.get("/v1/admin/usage.csv", params={"customer_id": s["cus_a"], **NOV}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    assert 'filename="usage_2024-11-01_2024-11-30.csv"' in r.headers["content-disposition"]
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0] == ["date", "api_key_id", "customer_id", "model", "requests", "input_tokens",
                       "output_tokens", "cached_tokens", "tokens", "cost", "currency"]
    cus = s["cus_a"]
    expected = sorted([  # cost: tokens x PRICES per million, exact
        ["2024-11-03", a1, cus, "gpt-a", "2", "101", "11", "0", "112", "0.067000000000", "usd"],  # flushed + pending
        ["2024-11-03", a2, cus, "gpt-a", "1", "300", "30", "0", "330", "0.195000000000", "usd"],
        ["2024-11-20", a1, cus, "gpt-b", "1", "200", "20", "0", "220", "0.090000000000", "usd"],
        ["2024-11-20", a2, cus, "'+plus", "1", "2", "2", "0", "4", "0.000000000000", "usd"],  # unpriced; no formula
    ], key=lambda row: (row[0], row[1], row[3]))
    assert rows[1:] == expected
    assert r.headers["x-usage-partial"] == "false"

    per_key = uclient.get("/v1/admin/usage.csv", params={"api_key_id": s["b1"].api_key_id, **NOV},
                          headers=ADMIN)
    lines = per_key.text.strip().splitlines()
    assert len(lines) == 3
    assert all(s["cus_b"] in line for line in lines[1:])


# --- rollups agree with the rows -----------------------------------------------------------------------


def test_random_batches_with_replays_keep_rollups_equal_to_rows(settings: Settings,
                                                                uclient: TestClient) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    customers = [f"cus_R{uuid.uuid4().hex[:10]}" for _ in range(3)]
    keys = [issue_key(settings, customer_id=c) for c in customers]
    models = ["gpt-a", "gpt-b", "m/x@1"]
    base = noon(dt.date(2024, 6, 10))
    pool: list[UsageEvent] = []
    for _ in range(600):
        n = rng.randrange(len(keys))
        inp, out = rng.randrange(0, 5000), rng.randrange(0, 2000)
        # Timestamps straddle several UTC midnights, so day boundaries are exercised.
        pool.append(event(keys[n].api_key_id, rng.choice(models), inp, out, cached=rng.randrange(0, inp + 1),
                          ts=base + rng.uniform(-3 * DAY, 3 * DAY), customer=customers[n]))

    def batches(n: int) -> list[list[UsageEvent]]:
        out = []
        for _ in range(n):
            batch = rng.sample(pool, rng.randrange(1, 60))
            batch += rng.sample(batch, rng.randrange(0, len(batch) + 1))  # replays inside the batch
            rng.shuffle(batch)
            out.append(batch)
        return out

    for batch in batches(25):
        store_flushed(settings, batch)
    # Concurrent writers replaying overlapping batches, as two flushes racing would.
    errors: list[BaseException] = []
    plans = [batches(6) for _ in range(3)]

    def writer(plan: list[list[UsageEvent]]) -> None:
        try:
            for batch in plan:
                store_flushed(settings, batch)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    store_flushed(settings, pool)  # finally everything, most of it a replay

    ids = [k.api_key_id for k in keys]
    with get_engine(settings.database_url).connect() as conn:
        rows = {tuple(r[:3]): tuple(r[3:]) for r in conn.execute(text(
            "SELECT api_key_id, date, model, count(*), sum(input_tokens), sum(output_tokens), "
            "sum(cached_tokens), sum(tokens) FROM api_key_usage WHERE api_key_id = ANY(:ids) "
            "GROUP BY api_key_id, date, model"), {"ids": ids})}
        rollups = {tuple(r[:3]): tuple(r[3:]) for r in conn.execute(text(
            "SELECT api_key_id, date, model, requests, input_tokens, output_tokens, cached_tokens, tokens "
            "FROM usage_daily WHERE api_key_id = ANY(:ids)"), {"ids": ids})}
    assert rollups == rows, f"seed={seed}"

    expected: dict[tuple[str, dt.date, str], list[int]] = {}
    for e in pool:
        day = dt.datetime.fromtimestamp(e.ts, dt.UTC).date()
        acc = expected.setdefault((e.api_key_id, day, e.model), [0, 0, 0, 0, 0])
        for i, v in enumerate((1, e.input_tokens, e.output_tokens, e.cached_tokens, e.tokens)):
            acc[i] += v
    assert {k: tuple(v) for k, v in expected.items()} == rollups, f"seed={seed}"

    # And the endpoint reads the same numbers.
    k0 = keys[0]
    body = uclient.get("/v1/usage", params={"start": "2024-06-01", "end": "2024-06-30"},
                       headers=bearer(k0)).json()
    mine = [e for e in pool if e.api_key_id == k0.api_key_id]
    assert (body["tokens_used"], body["requests"]) == (sum(e.tokens for e in mine), len(mine)), f"seed={seed}"


# --- Redis Cluster (ElastiCache Serverless is cluster-only) --------------------------------------------


@pytest.mark.cluster
def test_usage_reads_pending_hashes_across_cluster_slots(pg_url: str) -> None:
    from tests.support.servers import redis_cluster

    with redis_cluster() as url:
        settings = make_settings(pg_url, f"t{uuid.uuid4().hex[:12]}", redis_url=url, redis_cluster=True,
                                 redis_usage_shards=16, price_table=PRICES)
        cus = f"cus_C{uuid.uuid4().hex[:10]}"
        email = f"{uuid.uuid4().hex[:8]}@example.com"
        keys = [issue_key(settings, email=email, customer_id=cus) for _ in range(6)]
        runtime = Runtime(settings)
        assert len({runtime.layout.shard_of(k.api_key_id) for k in keys}) > 1  # several slots, one pipeline
        events = [event(k.api_key_id, "gpt-a", 10 * (i + 1), i + 1, customer=cus) for i, k in enumerate(keys)]
        record_pending(settings, events)
        store_flushed(settings, [event(keys[0].api_key_id, "gpt-a", 1000, 0, customer=cus)])
        with TestClient(create_app(runtime=runtime)) as c:
            own = c.get("/v1/usage", headers=bearer(keys[2])).json()
            assert (own["tokens_used"], own["requests"], own["partial"]) == (33, 1, False)
            admin = c.get("/v1/admin/usage", params={"customer_id": cus}, headers=ADMIN).json()
            assert admin["tokens"] == sum(e.tokens for e in events) + 1000
            assert len(admin["by_key"]) == 6
            assert admin["partial"] is False
