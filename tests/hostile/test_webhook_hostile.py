"""The Stripe webhook endpoint against forged, replayed, oversized and malformed deliveries: each one gets a
400 (413 for size) naming the problem, and the database is exactly as it was."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from aikit.webhooks import MAX_BODY_BYTES, SIGNATURE_TOLERANCE_SECONDS
from tests.fakes import stripe_events
from tests.support.hostile import Env, assert_clean, billing_env
from tests.support.webhooks import WEBHOOK_SECRET, deliver, sign, subscription_event

TABLES = ("stripe_events", "subscriptions", "users", "api_keys", "billing_periods", "meter_event_errors",
          "meter_reports")


@pytest.fixture
def env(pg_url: str, redis_prefix: str) -> Iterator[tuple[Env, TestClient]]:
    with billing_env(pg_url, redis_prefix) as pair:
        yield pair


def snapshot(e: Env) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables a webhook may change."""
    with e.runtime.engine.connect() as conn:
        return {t: sorted(map(tuple, conn.execute(text(f"SELECT * FROM {t}")).all()), key=repr) for t in TABLES}


def cancel_event(e: Env) -> dict[str, Any]:
    """What an attacker would love to forge: the subscribed customer's subscription, deleted."""
    with e.runtime.engine.connect() as conn:
        sub_id = conn.execute(text("SELECT id FROM subscriptions WHERE customer_id = :c"),
                              {"c": e.customer_id}).scalar_one()
    return subscription_event("customer.subscription.deleted", sub_id, e.customer_id, "canceled",
                              int(time.time()) + 60)


def refused(client: TestClient, e: Env, body: bytes, signature: str | bytes | None, status: int = 400) -> str:
    before = snapshot(e)
    r = deliver(client, payload=body, header=signature)
    assert r.status_code == status, r.text
    assert_clean(r, e.secrets)
    assert snapshot(e) == before, "a refused delivery changed the database"
    code: str = r.json()["error"]["code"]
    return code


def test_forged_and_tampered_signatures_are_refused(env: tuple[Env, TestClient]) -> None:
    e, client = env
    payload = json.dumps(cancel_event(e))
    body = payload.encode()
    t = int(time.time())
    assert refused(client, e, body, sign(payload, secret="whsec_guessed")) == "webhook_bad_signature"
    assert refused(client, e, body, None) == "webhook_missing_signature"
    assert refused(client, e, body, "") == "webhook_missing_signature"
    for header in (f"t={t}", f"t={t},v1=", f"t={t},v1={'0' * 64}", "v1=abc", f"t=abc,v1={'a' * 64}",
                   f"t={t},v0={'a' * 64}", "garbage", "t=,v1=,,,", "t=" + "9" * 400,
                   ("\u00e9" * 50).encode(), b"t=1,v1=\xff\xfe"):
        code = refused(client, e, body, header)
        assert code.startswith("webhook_"), header
    # Signed, then changed: a byte of the body, or the same JSON re-serialised.
    good = sign(payload)
    assert refused(client, e, body.replace(b"canceled", b"active__"), good) == "webhook_bad_signature"
    assert refused(client, e, json.dumps(json.loads(payload), indent=1).encode(), good) == "webhook_bad_signature"
    # ...and a valid signature of a different payload.
    assert refused(client, e, body, sign(payload + " ")) == "webhook_bad_signature"


def test_replays_outside_the_tolerance_are_refused(env: tuple[Env, TestClient]) -> None:
    e, client = env
    payload = json.dumps(cancel_event(e))
    old = int(time.time()) - SIGNATURE_TOLERANCE_SECONDS - 5
    assert refused(client, e, payload.encode(), sign(payload, timestamp=old)) == "webhook_stale_signature"
    # (A timestamp in the future is Stripe's clock running ahead, not a replay: only Stripe can sign one.)
    # Inside the window it is applied once; the same delivery replayed changes nothing more.
    first = deliver(client, payload=payload.encode(), header=sign(payload, timestamp=int(time.time()) - 60))
    assert first.status_code == 200 and first.json()["outcome"] == "applied"
    before = snapshot(e)
    again = deliver(client, payload=payload.encode(), header=sign(payload))
    assert again.status_code == 200 and again.json()["outcome"] == "duplicate"
    assert snapshot(e) == before


def test_oversized_bodies_get_413_signed_or_not(env: tuple[Env, TestClient]) -> None:
    e, client = env
    event = cancel_event(e)
    event["data"]["object"]["metadata"] = {"pad": "x" * (MAX_BODY_BYTES + 10)}
    payload = json.dumps(event)
    assert refused(client, e, payload.encode(), sign(payload), status=413) == "webhook_too_large"
    assert refused(client, e, b"{" * (3 * MAX_BODY_BYTES), None, status=413) == "webhook_too_large"


@pytest.mark.parametrize("payload", [
    "", "null", "[]", "[1, 2]", '"evt"', "42", "{", '{"id": "evt_1"', "\ufeff{}", "{}",
    '{"id": "evt_1", "type": "customer.subscription.deleted", "created": 1}',
    '{"id": "evt_1", "type": "customer.subscription.deleted", "created": "yesterday", "data": {"object": {}}}',
    '{"id": 7, "type": "invoice.paid", "created": 1, "data": {"object": {}}}',
    '{"id": "evt_1", "type": "customer.subscription.deleted", "created": 1, "data": []}',
    '{"id": "evt_1", "type": "customer.subscription.deleted", "created": 1, "data": {"object": "sub_1"}}',
    '{"id": "evt_1", "type": "customer.subscription.updated", "created": 1, "data": {"object": {"id": "sub_1"}}}',
    '{"id": "evt_1", "type": "customer.subscription.updated", "created": -5, "data": {"object": {}}}',
    '{"id": "evt_1", "type": "charge.refunded", "created": 9223372036854775808, "data": {"object": {}}}',
    '{"id": "evt_1", "type": "charge.refunded", "created": 1e400, "data": {"object": {}}}',
    '{"id": "' + "e" * 300 + '", "type": "x", "created": 1, "data": {"object": {}}}',
    '{"id": "evt_1", "type": "invoice.paid", "created": 1, "data": {"object": {"customer": 5}}}',
])
def test_signed_but_malformed_events_get_400(env: tuple[Env, TestClient], payload: str) -> None:
    e, client = env
    code = refused(client, e, payload.encode("utf-8"), sign(payload))
    assert code in ("webhook_malformed", "webhook_bad_signature"), code


def test_invalid_utf8_is_refused(env: tuple[Env, TestClient]) -> None:
    e, client = env
    body = b'{"id": "evt_\xff\xfe", "type": "x", "created": 1, "data": {"object": {}}}'
    refused(client, e, body, sign(body.decode("latin-1")))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
event_like = st.fixed_dictionaries(
    {"id": st.one_of(st.just("evt_" + uuid.uuid4().hex), st.text(max_size=300), st.integers()),
     "type": st.sampled_from(["customer.subscription.created", "customer.subscription.updated",
                              "customer.subscription.deleted", "invoice.paid", "invoice.payment_failed",
                              "charge.refunded"]) | st.text(max_size=140),
     "created": st.integers(min_value=-10, max_value=2**70) | st.sampled_from([2**63 - 1, 2**63, 2**64])
                | st.text(max_size=5),
     "data": st.fixed_dictionaries({"object": st.dictionaries(
         st.sampled_from(["id", "customer", "status", "items", "parent", "lines", "created", "period_start",
                          "attempt_count", "next_payment_attempt"]), json_values, max_size=8)}) | json_values})


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(event=event_like)
def test_signed_random_events_never_500_and_never_touch_the_subscribed_customer(
        env: tuple[Env, TestClient], event: dict[str, Any]) -> None:
    e, client = env
    with e.runtime.engine.connect() as conn:
        before = conn.execute(text("SELECT status, deleted FROM subscriptions WHERE customer_id = :c"),
                              {"c": e.customer_id}).all()
    payload = json.dumps(event)
    r = deliver(client, payload=payload.encode(), header=sign(payload))
    assert r.status_code in (200, 400), r.text
    assert_clean(r, e.secrets)
    with e.runtime.engine.connect() as conn:
        after = conn.execute(text("SELECT status, deleted FROM subscriptions WHERE customer_id = :c"),
                             {"c": e.customer_id}).all()
    assert after == before


# --- signed but unusable bodies (issue 15), thin events --------------------------------------------------


def nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


@pytest.mark.parametrize("payload", [
    '{"id": "evt_deep", "type": "customer.subscription.updated", "created": 1, "data": ' + nested(200_000) + "}",
    '{"id": "evt_deep", "type": "invoice.paid", "created": 1, "data": {"object": '
    + nested(100_000, '{"a": ', "}").replace("}", "1}", 1) + "}}",
    nested(300_000),
    '{"object": "v2.core.event", "id": "evt_deep", "related_object": ' + nested(200_000) + "}",
])
def test_signed_deeply_nested_json_is_a_400(env: tuple[Env, TestClient], payload: str) -> None:
    e, client = env
    assert len(payload) < MAX_BODY_BYTES
    assert refused(client, e, payload.encode(), sign(payload)) == "webhook_malformed"


def far(value: Any) -> dict[str, Any]:
    """A subscription for someone else with `value` in every timestamp field."""
    obj = {"id": "sub_far_" + uuid.uuid4().hex[:8], "object": "subscription", "customer": "cus_far", "status":
           "active", "ended_at": value, "items": {"object": "list", "data": [
               {"id": "si_far", "current_period_start": value, "current_period_end": value}]}}
    return subscription_event_obj("customer.subscription.updated", obj)


def subscription_event_obj(type_: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"id": "evt_" + uuid.uuid4().hex, "object": "event", "type": type_, "created": int(time.time()),
            "data": {"object": obj}}


@pytest.mark.parametrize("value", [10**30, -1, 2**63, 253_402_300_800, 1.5, "1790000000", [1], {"t": 1}, True])
def test_out_of_range_or_mistyped_times_never_500(env: tuple[Env, TestClient], value: Any) -> None:
    e, client = env
    for event in (far(value), subscription_event_obj("invoice.paid", {
            "id": "in_far", "object": "invoice", "customer": e.customer_id, "created": value,
            "billing_reason": "subscription_cycle", "period_start": value, "period_end": value,
            "parent": {"type": "subscription_details", "subscription_details": {"subscription": "sub_far"}},
            "lines": {"data": [{"type": "subscription", "subscription": "sub_far", "period": {"start": value,
                                                                                               "end": value}},
                               {"parent": {"type": "subscription_item_details",
                                           "subscription_item_details": {"subscription": value}},
                                "period": {"start": 1, "end": value}}]}})):
        payload = json.dumps(event)
        r = deliver(client, payload=payload.encode(), header=sign(payload))
        assert r.status_code in (200, 400), r.text
        assert_clean(r, e.secrets)


@pytest.fixture
def thin_env(pg_url: str, redis_prefix: str) -> Iterator[tuple[Env, TestClient]]:
    with billing_env(pg_url, redis_prefix, stripe_event_destination_secret=DESTINATION_SECRET) as pair:
        yield pair


DESTINATION_SECRET = "whsec_hostile_destination_" + uuid.uuid4().hex


@pytest.mark.parametrize("body", [
    {"object": "v2.core.event"},
    {"object": "v2.core.event", "id": "evt_1", "type": "v1.billing.meter.error_report_triggered"},
    {"object": "v2.core.event", "id": "evt_1", "type": "v1.billing.meter.error_report_triggered",
     "created": "yesterday"},
    {"object": "v2.core.event", "id": "evt_1", "type": "v1.billing.meter.error_report_triggered",
     "created": 1790000000},
    {"object": "v2.core.event", "id": "evt_1", "type": 7, "created": "2026-11-27T11:00:00.000Z"},
    {"object": "v2.core.event", "id": "e" * 300, "type": "x", "created": "2026-11-27T11:00:00.000Z"},
    {"object": "v2.core.event", "id": "evt_1", "type": "v1.billing.meter.error_report_triggered",
     "created": "2026-11-27T11:00:00.000Z", "related_object": "mtr_1"},
    {"object": "v2.core.event", "id": "evt_1", "type": "v1.billing.meter.error_report_triggered",
     "created": "2026-11-27T11:00:00.000Z", "related_object": {"id": 5}},
])
def test_malformed_thin_events_get_400(thin_env: tuple[Env, TestClient], body: dict[str, Any]) -> None:
    e, client = thin_env
    payload = json.dumps(body)
    assert refused(client, e, payload.encode(), sign(payload, secret=DESTINATION_SECRET)) == "webhook_malformed"


def test_thin_events_need_one_of_our_secrets(thin_env: tuple[Env, TestClient]) -> None:
    e, client = thin_env
    payload = json.dumps(stripe_events.thin_event("v1.billing.meter.error_report_triggered", meter_id="mtr_1"))
    assert refused(client, e, payload.encode(), sign(payload, secret="whsec_guessed")) == "webhook_bad_signature"
    # Signed by Stripe but unknown to Stripe's events API: nothing to apply, however often it comes.
    for secret in (DESTINATION_SECRET, WEBHOOK_SECRET):
        assert refused(client, e, payload.encode(), sign(payload, secret=secret)) == "webhook_unknown_event"


thin_like = st.fixed_dictionaries(
    {"object": st.just("v2.core.event"),
     "id": st.one_of(st.just("evt_test_" + uuid.uuid4().hex), st.text(max_size=300), st.integers()),
     "type": st.sampled_from(["v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found",
                              "v1.billing.meter.created"]) | st.text(max_size=140),
     "created": st.sampled_from(["2026-11-27T11:00:00.000Z", "2026-11-27T11:00:00Z", "", "9999-99-99"])
                | st.integers() | st.text(max_size=40),
     "related_object": st.none() | json_values | st.fixed_dictionaries({"id": json_values}),
     "data": json_values})


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=thin_like)
def test_signed_random_thin_events_never_500(thin_env: tuple[Env, TestClient], body: dict[str, Any]) -> None:
    e, client = thin_env
    before = snapshot(e)
    payload = json.dumps(body)
    r = deliver(client, payload=payload.encode(), header=sign(payload, secret=DESTINATION_SECRET))
    assert r.status_code in (200, 400), r.text
    assert_clean(r, e.secrets)
    after = snapshot(e)
    # Only the event's own record may be added (an ignored type); nothing else changes.
    assert {t: rows for t, rows in after.items() if t != "stripe_events"} == \
        {t: rows for t, rows in before.items() if t != "stripe_events"}
