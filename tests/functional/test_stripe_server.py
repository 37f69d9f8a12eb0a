"""The local Stripe imitation itself: what the gateway tests do not already pin down."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
import stripe

from tests.fakes.stripe_server import METER_EVENT_PATH, FakeStripe, decode_form
from tests.support.servers import free_port

EVENT = "api_tokens"
DAY = 86400
DESTINATION_SECRET = "whsec_destination_test"


@pytest.fixture
def http(fake: FakeStripe) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, headers={"Authorization": f"Bearer {fake.api_key}"}, timeout=5) as client:
        yield client


@pytest.fixture
def meter_id(stripe_sdk: stripe.StripeClient) -> str:
    meter = stripe_sdk.v1.billing.meters.create(
        params={
            "display_name": "API tokens",
            "event_name": EVENT,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )
    return meter.id


@pytest.fixture
def customer(fake: FakeStripe, meter_id: str) -> str:
    return fake.add_customer(email="ada@example.com")


def event_form(customer: str, identifier: str, value: str = "10", ts: int | None = None) -> dict[str, str]:
    return {
        "event_name": EVENT,
        "payload[stripe_customer_id]": customer,
        "payload[value]": value,
        "identifier": identifier,
        "timestamp": str(ts or int(time.time())),
    }


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert isinstance(error, dict)
    return error


# --- form parsing ---------------------------------------------------------------------------------


def test_decode_form_nested_brackets_and_arrays() -> None:
    raw = (
        "event_name=api_tokens&payload[stripe_customer_id]=cus_1&payload[value]=1500"
        "&line_items[0][price]=price_a&line_items[1][price]=price_b&line_items[1][quantity]=2"
        "&expand[]=data.product&expand[]=data.meter&metadata[note]=a%20b%26c&empty="
    )

    assert decode_form(raw) == {
        "event_name": "api_tokens",
        "payload": {"stripe_customer_id": "cus_1", "value": "1500"},
        "line_items": [{"price": "price_a"}, {"price": "price_b", "quantity": "2"}],
        "expand": ["data.product", "data.meter"],
        "metadata": {"note": "a b&c"},
        "empty": "",
    }


def test_form_body_with_nested_params_creates_price(http: httpx.Client, meter_id: str) -> None:
    product = http.post("/v1/products", data={"name": "Tokens", "metadata[aikit]": "api_tokens"}).json()
    response = http.post(
        "/v1/prices",
        data={
            "product": product["id"],
            "currency": "USD",
            "unit_amount_decimal": "0.0002",
            "recurring[interval]": "month",
            "recurring[usage_type]": "metered",
            "recurring[meter]": meter_id,
            "lookup_key": "k1",
        },
    )

    assert response.status_code == 200, response.text
    price = response.json()
    assert price["recurring"] == {
        "interval": "month",
        "interval_count": 1,
        "meter": meter_id,
        "trial_period_days": None,
        "usage_type": "metered",
    }
    assert (price["currency"], price["unit_amount_decimal"], price["unit_amount"]) == ("usd", "0.0002", None)
    assert product["metadata"] == {"aikit": "api_tokens"}
    listed = http.get("/v1/prices", params={"lookup_keys[0]": "k1"}).json()
    assert [p["id"] for p in listed["data"]] == [price["id"]]


def test_metered_price_needs_a_meter(http: httpx.Client) -> None:
    product = http.post("/v1/products", data={"name": "Tokens"}).json()
    response = http.post(
        "/v1/prices",
        data={
            "product": product["id"],
            "currency": "usd",
            "unit_amount": "1",
            "recurring[interval]": "month",
            "recurring[usage_type]": "metered",
        },
    )

    assert response.status_code == 400
    assert error_of(response)["param"] == "recurring[meter]"


# --- auth -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer pk_test_public", "Basic sk_test_x", "Bearer"])
def test_requests_without_a_secret_key_get_401(fake: FakeStripe, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    response = httpx.post(f"{fake.url}/v1/customers", data={"email": "a@b.test"}, headers=headers)

    assert response.status_code == 401
    assert error_of(response)["type"] == "invalid_request_error"
    assert fake.customers == {}


def test_sdk_sees_authentication_error(fake: FakeStripe) -> None:
    transport = stripe.RequestsClient()
    bad = stripe.StripeClient("rk_live_nope", base_addresses=fake.base_addresses, http_client=transport)
    with pytest.raises(stripe.AuthenticationError):
        bad.v1.customers.create(params={"email": "a@b.test"})
    transport.close()


def test_any_sk_key_is_accepted(fake: FakeStripe) -> None:
    transport = stripe.RequestsClient()
    other = stripe.StripeClient("sk_test_someone_else", base_addresses=fake.base_addresses, http_client=transport)
    assert other.v1.customers.create(params={"email": "a@b.test"}).id.startswith("cus_")
    transport.close()


def test_unknown_route_and_object_are_stripe_shaped_404(http: httpx.Client) -> None:
    route = http.get("/v1/nothing_here")
    assert route.status_code == 404
    assert "Unrecognized request URL" in error_of(route)["message"]

    obj = http.get("/v1/customers/cus_nope")
    assert obj.status_code == 404
    assert error_of(obj) == {
        "type": "invalid_request_error",
        "code": "resource_missing",
        "message": "No such customer: 'cus_nope'",
        "param": "id",
    }


# --- idempotency keys -----------------------------------------------------------------------------


def test_idempotency_key_replays_first_answer_without_executing(fake: FakeStripe, http: httpx.Client) -> None:
    form = {"email": "once@example.com"}
    first = http.post("/v1/customers", data=form, headers={"Idempotency-Key": "key-1"})
    second = http.post("/v1/customers", data=form, headers={"Idempotency-Key": "key-1"})

    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert len(fake.customers) == 1

    reused = http.post("/v1/customers", data={"email": "other@example.com"}, headers={"Idempotency-Key": "key-1"})
    assert reused.status_code == 400
    assert error_of(reused)["type"] == "idempotency_error"


def test_sdk_idempotency_key_option_replays(fake: FakeStripe, stripe_sdk: stripe.StripeClient) -> None:
    a = stripe_sdk.v1.customers.create(params={"email": "a@b.test"}, options={"idempotency_key": "same"})
    b = stripe_sdk.v1.customers.create(params={"email": "a@b.test"}, options={"idempotency_key": "same"})

    assert a.id == b.id
    assert len(fake.customers) == 1


def test_meter_event_idempotency_key_replays_success_not_duplicate(
    fake: FakeStripe, http: httpx.Client, customer: str
) -> None:
    form = event_form(customer, "evt-ik")
    first = http.post(METER_EVENT_PATH, data=form, headers={"Idempotency-Key": "ik-1"})
    replay = http.post(METER_EVENT_PATH, data=form, headers={"Idempotency-Key": "ik-1"})
    fresh = http.post(METER_EVENT_PATH, data=form, headers={"Idempotency-Key": "ik-2"})

    assert (first.status_code, replay.status_code) == (200, 200)
    assert replay.json() == first.json()
    assert fresh.status_code == 400
    assert fresh.headers["Stripe-Should-Retry"] == "false"
    assert error_of(fresh) == {
        "type": "invalid_request_error",
        "message": "An event already exists with identifier evt-ik.",
        "param": "identifier",
    }
    assert fake.meter_totals(EVENT) == {customer: 10}


def test_key_replays_stored_500_from_accept_then_500(fake: FakeStripe, http: httpx.Client, customer: str) -> None:
    fake.inject("accept_then_500")
    form = event_form(customer, "evt-500")
    first = http.post(METER_EVENT_PATH, data=form, headers={"Idempotency-Key": "ik-500"})
    replay = http.post(METER_EVENT_PATH, data=form, headers={"Idempotency-Key": "ik-500"})

    assert (first.status_code, replay.status_code) == (500, 500)
    assert error_of(first)["type"] == "api_error"
    assert "Stripe-Should-Retry" not in first.headers
    assert fake.meter_totals(EVENT) == {customer: 10}


# --- meter event rules ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1.5", "-3", "abc", ""])
def test_meter_event_value_must_be_whole_number(
    fake: FakeStripe, http: httpx.Client, customer: str, value: str
) -> None:
    response = http.post(METER_EVENT_PATH, data=event_form(customer, f"evt-{value}", value))

    assert response.status_code == 400
    assert error_of(response)["param"] == "payload[value]"
    assert fake.meter_events == []


@pytest.mark.parametrize(("offset", "ok"), [(-35 * DAY + 60, True), (-35 * DAY - 60, False), (240, True), (400, False)])
def test_meter_event_timestamp_window(
    fake: FakeStripe, http: httpx.Client, customer: str, offset: int, ok: bool
) -> None:
    response = http.post(METER_EVENT_PATH, data=event_form(customer, "evt-ts", ts=int(time.time()) + offset))

    assert (response.status_code == 200) is ok, response.text
    if not ok:
        assert error_of(response)["param"] == "timestamp"


def test_meter_event_needs_active_meter(
    fake: FakeStripe, http: httpx.Client, stripe_sdk: stripe.StripeClient, meter_id: str, customer: str
) -> None:
    stripe_sdk.v1.billing.meters.deactivate(meter_id)
    response = http.post(METER_EVENT_PATH, data=event_form(customer, "evt-inactive"))

    assert response.status_code == 400
    assert error_of(response)["param"] == "event_name"
    stripe_sdk.v1.billing.meters.reactivate(meter_id)
    assert http.post(METER_EVENT_PATH, data=event_form(customer, "evt-inactive")).status_code == 200


def test_customer_validation_is_switchable(fake: FakeStripe, http: httpx.Client, meter_id: str) -> None:
    fake.rules["customer"] = "sync"
    refused = http.post(METER_EVENT_PATH, data=event_form("cus_ghost", "evt-g1"))
    assert refused.status_code == 400
    assert error_of(refused)["message"] == "No such customer: 'cus_ghost'"

    fake.validate_customers = False  # "off": accepted and counted, as before the check existed
    assert fake.rules["customer"] == "off"
    assert http.post(METER_EVENT_PATH, data=event_form("cus_ghost", "evt-g2")).status_code == 200
    assert fake.meter_totals() == {"cus_ghost": 10}


def send_pair(fake: FakeStripe, customer: str) -> list[int]:
    """Two meter-event calls for one customer, the second sent while the first is in flight."""
    statuses: list[int] = []

    def one(identifier: str) -> None:
        response = httpx.post(
            f"{fake.url}{METER_EVENT_PATH}",
            data=event_form(customer, identifier),
            headers={"Authorization": f"Bearer {fake.api_key}"},
        )
        statuses.append(response.status_code)

    threads = [threading.Thread(target=one, args=(f"evt-c-{time.monotonic_ns()}-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    return sorted(statuses)


def test_one_concurrent_call_per_customer_and_meter_by_default(fake: FakeStripe, customer: str) -> None:
    fake.latency = 0.3
    other = fake.add_customer()

    assert send_pair(fake, customer) == [200, 429]
    assert fake.concurrency_violations == 1
    # Another customer's call at the same time is fine.
    threads = [threading.Thread(target=httpx.post, args=(f"{fake.url}{METER_EVENT_PATH}",),
                                kwargs={"data": event_form(c, f"evt-par-{c}"),
                                        "headers": {"Authorization": f"Bearer {fake.api_key}"}})
               for c in (customer, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake.concurrency_violations == 1
    assert fake.meter_totals(EVENT) == {customer: 20, other: 10}

    fake.strict_concurrency = False  # only counted
    assert send_pair(fake, customer) == [200, 200]
    assert fake.concurrency_violations == 2


def test_the_concurrency_refusal_is_a_stripe_rate_limit_error(fake: FakeStripe, stripe_sdk: stripe.StripeClient,
                                                              customer: str) -> None:
    fake.latency = 0.3
    errors: list[BaseException] = []

    def one(identifier: str) -> None:
        try:
            stripe_sdk.v1.billing.meter_events.create(params={
                "event_name": EVENT, "payload": {"stripe_customer_id": customer, "value": "1"},
                "identifier": identifier})
        except stripe.StripeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(f"evt-sdk-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    [error] = errors
    assert isinstance(error, stripe.RateLimitError)
    assert error.http_status == 429 and error.json_body is not None
    assert error.json_body["error"]["code"] == "rate_limit"
    assert error.headers is not None and error.headers["Stripe-Rate-Limited-Reason"] == "resource-specific"


# --- 24 h identifier memory, the test clock ----------------------------------------------------------------


def test_identifiers_are_remembered_for_24_hours_only(fake: FakeStripe, http: httpx.Client, customer: str) -> None:
    stamp = int(time.time())
    assert http.post(METER_EVENT_PATH, data=event_form(customer, "evt-day", ts=stamp)).status_code == 200
    fake.advance(DAY - 60)
    repeat = http.post(METER_EVENT_PATH, data=event_form(customer, "evt-day", ts=stamp))
    assert repeat.status_code == 400
    assert repeat.headers["Stripe-Should-Retry"] == "false"
    assert error_of(repeat)["message"] == "An event already exists with identifier evt-day."

    fake.advance(120)  # past 24 h: Stripe has forgotten it, and the repeat is billed a second time
    assert http.post(METER_EVENT_PATH, data=event_form(customer, "evt-day", ts=stamp)).status_code == 200
    assert fake.meter_totals(EVENT) == {customer: 20}
    assert [e.identifier for e in fake.meter_events] == ["evt-day", "evt-day"]


def test_idempotency_keys_are_forgotten_after_24_hours(fake: FakeStripe, http: httpx.Client) -> None:
    first = http.post("/v1/customers", data={"email": "a@b.test"}, headers={"Idempotency-Key": "ik-day"})
    fake.advance(DAY - 1)
    replay = http.post("/v1/customers", data={"email": "a@b.test"}, headers={"Idempotency-Key": "ik-day"})
    assert replay.json()["id"] == first.json()["id"] and replay.headers["Idempotent-Replayed"] == "true"
    fake.advance(2)
    fresh = http.post("/v1/customers", data={"email": "a@b.test"}, headers={"Idempotency-Key": "ik-day"})
    assert fresh.json()["id"] != first.json()["id"]
    assert len(fake.customers) == 2


def test_the_test_clock_moves_the_timestamp_window(fake: FakeStripe, http: httpx.Client, customer: str) -> None:
    stamp = int(time.time())
    fake.advance(35 * DAY + 60)  # Stripe's "now" is 35 days on: the usage is too old to record
    response = http.post(METER_EVENT_PATH, data=event_form(customer, "evt-old", ts=stamp))
    assert response.status_code == 400
    assert error_of(response)["code"] == "timestamp_too_far_in_past"
    with pytest.raises(ValueError, match="forward"):
        fake.advance(-1)


# --- asynchronous validation and event destinations ------------------------------------------------------


@pytest.fixture
def inbox(fake: FakeStripe) -> list[tuple[bytes, dict[str, str]]]:
    """A destination that records what Stripe delivers, and answers 200."""
    received: list[tuple[bytes, dict[str, str]]] = []

    def destination(body: bytes, headers: dict[str, str]) -> int:
        received.append((body, headers))
        return 200

    fake.event_destination(destination, DESTINATION_SECRET)
    return received


def test_unknown_customer_is_accepted_then_reported_in_a_thin_event(
    fake: FakeStripe, stripe_sdk: stripe.StripeClient, meter_id: str, inbox: list[tuple[bytes, dict[str, str]]]
) -> None:
    event = stripe_sdk.v1.billing.meter_events.create(params={
        "event_name": EVENT, "payload": {"stripe_customer_id": "cus_ghost", "value": "25"},
        "identifier": "evt-ghost-1", "timestamp": int(time.time())})

    assert event.identifier == "evt-ghost-1"  # a 200: "received", not "billable"
    [record] = fake.meter_events
    assert (record.rejection, record.counted) == ("meter_event_customer_not_found", False)
    assert fake.meter_totals() == {}
    assert [(e.identifier, why) for e, why in fake.uninvoiced()] == [
        ("evt-ghost-1", "rejected:meter_event_customer_not_found")]

    [(event_id, status)] = fake.deliver_events()
    assert status == 200 and fake.undelivered == []
    [(body, headers)] = inbox
    # What a receiver does with stripe-python 16: verify and parse the notification, then fetch the event.
    notification = stripe_sdk.parse_event_notification(body, headers["Stripe-Signature"], DESTINATION_SECRET)
    assert (notification.id, notification.type) == (event_id, "v1.billing.meter.error_report_triggered")
    assert isinstance(notification, stripe.events.V1BillingMeterErrorReportTriggeredEventNotification)
    assert notification.related_object.id == meter_id
    assert "data" not in json.loads(body)  # thin: no data in the delivery
    full = notification.fetch_event()
    assert isinstance(full, stripe.events.V1BillingMeterErrorReportTriggeredEvent)
    [error_type] = full.data.reason.error_types
    assert (error_type.code, error_type.error_count) == ("meter_event_customer_not_found", 1)
    [sample] = error_type.sample_errors
    assert sample.request.identifier == "evt-ghost-1"
    assert "cus_ghost" in sample.error_message
    assert full.data.reason.error_count == 1
    assert full.data.validation_start <= full.data.validation_end
    assert notification.fetch_related_object().id == meter_id
    # Retrieved by id too, as Stripe keeps events for 30 days.
    assert stripe_sdk.v2.core.events.retrieve(event_id).id == event_id


def test_rules_choose_sync_async_or_off(fake: FakeStripe, http: httpx.Client, meter_id: str,
                                        stripe_sdk: stripe.StripeClient) -> None:
    old = int(time.time()) - 36 * DAY
    customer = fake.add_customer()
    fake.rules["timestamp"] = "async"
    assert http.post(METER_EVENT_PATH, data=event_form(customer, "evt-old-1", ts=old)).status_code == 200
    fake.rules["timestamp"] = "off"
    assert http.post(METER_EVENT_PATH, data=event_form(customer, "evt-old-2", ts=old)).status_code == 200
    assert [e.rejection for e in fake.meter_events] == ["timestamp_too_far_in_past", None]
    assert fake.meter_totals() == {customer: 10}

    stripe_sdk.v1.billing.meters.deactivate(meter_id)
    fake.rules["meter"] = "async"
    assert http.post(METER_EVENT_PATH, data=event_form(customer, "evt-archived")).status_code == 200
    assert fake.meter_events[-1].rejection == "archived_meter"
    fake.rules["meter"] = "off"  # counted on the inactive meter
    assert http.post(METER_EVENT_PATH, data=event_form(customer, "evt-inactive-ok")).status_code == 200
    assert fake.meter_events[-1].counted


def test_no_meter_at_all_gives_a_no_meter_found_event(fake: FakeStripe, http: httpx.Client,
                                                      stripe_sdk: stripe.StripeClient, customer: str,
                                                      inbox: list[tuple[bytes, dict[str, str]]]) -> None:
    fake.rules["meter"] = "async"
    form = {**event_form(customer, "evt-nomtr"), "event_name": "no_such_meter"}
    assert http.post(METER_EVENT_PATH, data=form).status_code == 200
    fake.deliver_events()
    [(body, headers)] = inbox
    notification = stripe_sdk.parse_event_notification(body, headers["Stripe-Signature"], DESTINATION_SECRET)
    assert notification.type == "v1.billing.meter.no_meter_found"
    assert "related_object" not in json.loads(body)
    full = notification.fetch_event()
    [error_type] = full.data.reason.error_types
    assert error_type.code == "no_meter"
    assert error_type.sample_errors[0].request.identifier == "evt-nomtr"


def test_one_report_per_meter_with_capped_samples_and_full_counts(
    fake: FakeStripe, http: httpx.Client, stripe_sdk: stripe.StripeClient, customer: str,
    inbox: list[tuple[bytes, dict[str, str]]]
) -> None:
    fake.max_sample_errors = 2
    for i in range(4):
        assert http.post(METER_EVENT_PATH, data=event_form("cus_ghost", f"evt-g{i}")).status_code == 200
    fake.inject("async_reject", customer=customer, code="meter_event_invalid_value")
    assert http.post(METER_EVENT_PATH, data=event_form(customer, "evt-bad")).status_code == 200
    assert http.post(METER_EVENT_PATH, data=event_form(customer, "evt-good")).status_code == 200

    [event_id] = fake.emit_error_reports()
    full = stripe_sdk.v2.core.events.retrieve(event_id)
    by_code = {t["code"]: t for t in full["data"]["reason"]["error_types"]}
    assert by_code["meter_event_customer_not_found"]["error_count"] == 4
    assert len(by_code["meter_event_customer_not_found"]["sample_errors"]) == 2
    assert [s["request"]["identifier"] for s in by_code["meter_event_invalid_value"]["sample_errors"]] == ["evt-bad"]
    assert full["data"]["reason"]["error_count"] == 5
    assert fake.meter_totals() == {customer: 10}
    assert fake.emit_error_reports() == []  # reported once


def test_a_failed_delivery_stays_queued_and_is_delivered_again(fake: FakeStripe, http: httpx.Client,
                                                               meter_id: str) -> None:
    answers = [500, 200]
    received: list[str] = []

    def flaky(body: bytes, headers: dict[str, str]) -> int:
        received.append(json.loads(body)["id"])
        return answers.pop(0)

    fake.event_destination(flaky, DESTINATION_SECRET)
    http.post(METER_EVENT_PATH, data=event_form("cus_ghost", "evt-q"))
    [(event_id, first)] = fake.deliver_events()
    assert first == 500 and fake.undelivered == [event_id]
    assert fake.deliver_events() == [(event_id, 200)]
    assert received == [event_id, event_id] and fake.undelivered == []

    fake.event_destination(f"http://127.0.0.1:{free_port()}/nobody", DESTINATION_SECRET)
    http.post(METER_EVENT_PATH, data=event_form("cus_ghost", "evt-q2"))
    [(second_id, status)] = fake.deliver_events()
    assert status == 0 and fake.undelivered == [second_id]


def test_a_deleted_customer_is_unknown(fake: FakeStripe, http: httpx.Client, customer: str) -> None:
    fake.customers[customer]["deleted"] = True
    assert http.post(METER_EVENT_PATH, data=event_form(customer, "evt-del")).status_code == 200
    assert fake.meter_events[0].rejection == "meter_event_customer_not_found"


# --- limits ------------------------------------------------------------------------------------------------


def test_the_test_mode_rate_limit_is_25_requests_per_second(fake: FakeStripe, http: httpx.Client,
                                                             stripe_sdk: stripe.StripeClient) -> None:
    responses = [http.get("/v1/customers") for _ in range(40)]
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) <= 25 and statuses.count(429) >= 15
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["Stripe-Rate-Limited-Reason"] == "global-rate"
    assert "Retry-After" not in refused.headers
    assert error_of(refused)["code"] == "rate_limit"
    with pytest.raises(stripe.RateLimitError):
        stripe_sdk.v1.customers.list()
    assert fake.rate_limited >= 16
    time.sleep(1.05)
    assert http.get("/v1/customers").status_code == 200


@pytest.mark.parametrize(("field", "length", "ok"), [
    ("identifier", 100, True), ("identifier", 101, False),
    ("event_name", 101, False),
    ("payload[stripe_customer_id]", 5001, False),
])
def test_documented_length_limits(fake: FakeStripe, http: httpx.Client, customer: str, field: str, length: int,
                                  ok: bool) -> None:
    form = event_form(customer, f"evt-len-{field}")
    form[field] = (form[field] + "x" * length)[:length]
    response = http.post(METER_EVENT_PATH, data=form)
    assert (response.status_code == 200) is ok, response.text
    if not ok:
        assert error_of(response)["param"] == field
        assert f"at most {100 if field != 'payload[stripe_customer_id]' else 5000} characters" in \
            error_of(response)["message"]
        assert fake.meter_events == []


# --- billing periods and invoices --------------------------------------------------------------------------


def daily_price(stripe_sdk: stripe.StripeClient, meter_id: str, unit_amount_decimal: str = "0.0025") -> str:
    product = stripe_sdk.v1.products.create(params={"name": "Tokens"})
    return stripe_sdk.v1.prices.create(params={
        "product": product.id, "currency": "usd", "unit_amount_decimal": Decimal(unit_amount_decimal),
        "recurring": {"interval": "day", "usage_type": "metered", "meter": meter_id}}).id


def test_usage_after_finalization_is_accepted_and_never_invoiced(
    fake: FakeStripe, http: httpx.Client, stripe_sdk: stripe.StripeClient, meter_id: str, customer: str
) -> None:
    now = int(time.time())
    start = now - DAY - 1800  # the first daily period ended 30 minutes ago: its invoice is in its grace hour
    fake.add_subscription(customer, daily_price(stripe_sdk, meter_id), start=start)
    first, second = (start, start + DAY), (start + DAY, start + 2 * DAY)

    assert http.post(METER_EVENT_PATH, data=event_form(customer, "evt-p1", "1000", start + 60)).status_code == 200
    assert http.post(METER_EVENT_PATH, data=event_form(customer, "evt-p2", "3000", now - 60)).status_code == 200
    invoices = fake.invoices(customer)
    assert [(i.period_start, i.period_end, i.status) for i in invoices] == [(*first, "open"), (*second, "open")]
    assert fake.will_invoice(customer) == {first: ({EVENT: 1000}, 3), second: ({EVENT: 3000}, 8)}  # 2.5 -> 3

    fake.advance(1800)  # the grace hour is over: the first invoice is final
    late = http.post(METER_EVENT_PATH, data=event_form(customer, "evt-late", "500", start + 120))
    assert late.status_code == 200  # accepted ...
    assert fake.invoices(customer)[0].status == "finalized"
    assert fake.will_invoice(customer)[first] == ({EVENT: 1000}, 3)  # ... and never invoiced
    assert [(e.identifier, why) for e, why in fake.uninvoiced(customer)] == [("evt-late", "late")]
    assert fake.meter_totals() == {customer: 4500}  # the meter still counts it

    fake.advance(DAY)  # periods roll with the clock; the subscription shows the current one
    item = stripe_sdk.v1.subscriptions.list(params={"customer": customer}).data[0]["items"]["data"][0]
    assert (item["current_period_start"], item["current_period_end"]) == (start + 2 * DAY, start + 3 * DAY)
    assert [i.status for i in fake.invoices(customer)] == ["finalized", "finalized", "open"]


def test_a_line_per_metered_item_with_its_own_price(fake: FakeStripe, stripe_sdk: stripe.StripeClient,
                                                    http: httpx.Client, meter_id: str, customer: str) -> None:
    second_meter = stripe_sdk.v1.billing.meters.create(params={
        "display_name": "Cached tokens", "event_name": "cached_tokens", "default_aggregation": {"formula": "sum"}})
    price_a = daily_price(stripe_sdk, meter_id, "0.0002")
    price_b = daily_price(stripe_sdk, second_meter.id, "0.01")
    start = int(time.time()) - 600
    sub = stripe_sdk.v1.subscriptions.create(params={"customer": customer, "items": [{"price": price_a},
                                                                                  {"price": price_b}]})
    assert sub.start_date >= start
    http.post(METER_EVENT_PATH, data=event_form(customer, "evt-a", "12345"))
    http.post(METER_EVENT_PATH, data={**event_form(customer, "evt-b", "250"), "event_name": "cached_tokens"})

    [invoice] = fake.invoices(customer)
    assert {(line.price_id, line.quantity, line.amount) for line in invoice.lines} == {
        (price_a, 12345, 2), (price_b, 250, 3)}  # 2.469 -> 2 cents, 2.5 -> 3 cents
    assert invoice.tokens == {EVENT: 12345, "cached_tokens": 250} and invoice.amount == 5


@pytest.mark.parametrize("invoice_now", [False, True])
def test_a_canceled_subscription_bills_its_last_period_only_with_invoice_now(
    fake: FakeStripe, stripe_sdk: stripe.StripeClient, http: httpx.Client, meter_id: str, customer: str,
    invoice_now: bool
) -> None:
    sub = fake.add_subscription(customer, daily_price(stripe_sdk, meter_id), start=int(time.time()) - 3600)
    http.post(METER_EVENT_PATH, data=event_form(customer, "evt-c", "400", int(time.time()) - 60))
    stripe_sdk.v1.subscriptions.cancel(sub["id"], params={"invoice_now": invoice_now})

    [invoice] = fake.invoices(customer)
    assert invoice.period_end <= int(fake.now())
    assert invoice.status == ("open" if invoice_now else "not_invoiced")
    expected = {(invoice.period_start, invoice.period_end): ({EVENT: 400}, 1)} if invoice_now else {}
    assert fake.will_invoice(customer) == expected
    assert stripe_sdk.v1.subscriptions.list(params={"customer": customer}).data == []  # canceled ones are hidden
    listed = stripe_sdk.v1.subscriptions.list(params={"customer": customer, "status": "all"}).data
    assert [s.id for s in listed] == [sub["id"]]


def test_usage_without_a_subscription_period_is_never_invoiced(fake: FakeStripe, http: httpx.Client,
                                                               stripe_sdk: stripe.StripeClient, meter_id: str,
                                                               customer: str) -> None:
    fake.add_subscription(customer, daily_price(stripe_sdk, meter_id), start=int(time.time()) - 60)
    http.post(METER_EVENT_PATH, data=event_form(customer, "evt-before", "7", int(time.time()) - 3600))
    assert [why for _, why in fake.uninvoiced(customer)] == ["no_period"]
    assert sum(i.amount for i in fake.invoices(customer)) == 0


# --- faults ---------------------------------------------------------------------------------------


def test_faults_are_consumed_in_order_and_filtered(fake: FakeStripe, http: httpx.Client, customer: str) -> None:
    other = fake.add_customer()
    fake.inject("503", count=2)
    fake.inject("429", customer=other)
    fake.inject("500", path_prefix="/v1/customers")

    statuses = [http.post(METER_EVENT_PATH, data=event_form(customer, f"evt-f{i}")).status_code for i in range(3)]
    assert statuses == [503, 503, 200]
    assert http.post(METER_EVENT_PATH, data=event_form(other, "evt-o1")).status_code == 429
    assert http.post(METER_EVENT_PATH, data=event_form(other, "evt-o2")).status_code == 200
    assert http.post("/v1/customers", data={"email": "x@y.test"}).status_code == 500
    assert fake.pending_faults == 0
    assert fake.calls[METER_EVENT_PATH] == 5


def test_dropping_faults_close_the_connection(fake: FakeStripe, http: httpx.Client, customer: str) -> None:
    fake.inject("reset")
    fake.inject("accept_then_drop")
    with pytest.raises(httpx.RemoteProtocolError):
        http.post(METER_EVENT_PATH, data=event_form(customer, "evt-r"))
    with pytest.raises(httpx.RemoteProtocolError):
        http.post(METER_EVENT_PATH, data=event_form(customer, "evt-d"))

    assert [e.identifier for e in fake.meter_events] == ["evt-d"]


def test_timeout_fault_stalls_then_drops_without_recording(fake: FakeStripe, http: httpx.Client, customer: str) -> None:
    fake.timeout_seconds = 1.0
    fake.inject("timeout")
    with pytest.raises(httpx.ReadTimeout):
        http.post(METER_EVENT_PATH, data=event_form(customer, "evt-t"), timeout=0.3)
    assert fake.meter_events == []


def test_inject_rejects_unknown_kind(fake: FakeStripe) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        fake.inject("418")


def test_latency_slows_every_answer(fake: FakeStripe, http: httpx.Client) -> None:
    fake.latency = 0.2
    started = time.monotonic()
    http.get("/v1/customers")

    assert time.monotonic() - started >= 0.2


def test_reset_forgets_everything(fake: FakeStripe, http: httpx.Client, customer: str) -> None:
    http.post(METER_EVENT_PATH, data=event_form(customer, "evt-z"))
    fake.inject("500")
    fake.reset()

    assert (fake.meter_events, fake.customers, fake.meters, fake.pending_faults) == ([], {}, {}, 0)
    assert fake.calls == {}


# --- lists, summaries, sessions, subscriptions ----------------------------------------------------


def test_lists_paginate_newest_first(stripe_sdk: stripe.StripeClient) -> None:
    ids = [stripe_sdk.v1.products.create(params={"name": f"p{i}"}).id for i in range(5)]
    page = stripe_sdk.v1.products.list(params={"limit": 2})

    assert [p.id for p in page.data] == [ids[4], ids[3]]
    assert page.has_more
    assert [p.id for p in page.auto_paging_iter()] == list(reversed(ids))


def test_event_summaries_validate_alignment(http: httpx.Client, meter_id: str, customer: str) -> None:
    now = int(time.time())
    hour = now - now % 3600
    url = f"/v1/billing/meters/{meter_id}/event_summaries"
    http.post(METER_EVENT_PATH, data=event_form(customer, "evt-h", "4", now))

    unaligned = http.get(
        url,
        params={
            "customer": customer,
            "start_time": hour + 60,
            "end_time": hour + DAY,
            "value_grouping_window": "day",
        },
    )
    assert unaligned.status_code == 400
    assert error_of(unaligned)["param"] == "start_time"

    hourly = http.get(
        url,
        params={
            "customer": customer,
            "start_time": hour - 3600,
            "end_time": hour + 3600,
            "value_grouping_window": "hour",
        },
    ).json()
    assert [(s["start_time"], s["aggregated_value"]) for s in hourly["data"]] == [
        (hour - 3600, 0.0),
        (hour, 4.0),
    ]
    assert hourly["data"][0]["object"] == "billing.meter_event_summary"

    whole = http.get(url, params={"customer": customer, "start_time": hour, "end_time": hour + 3600}).json()
    assert [s["aggregated_value"] for s in whole["data"]] == [4.0]


def test_checkout_refuses_quantity_on_metered_price(
    fake: FakeStripe, http: httpx.Client, meter_id: str, customer: str
) -> None:
    product = http.post("/v1/products", data={"name": "Tokens"}).json()
    price = http.post(
        "/v1/prices",
        data={
            "product": product["id"],
            "currency": "usd",
            "unit_amount": "1",
            "recurring[interval]": "month",
            "recurring[usage_type]": "metered",
            "recurring[meter]": meter_id,
        },
    ).json()
    form = {
        "mode": "subscription",
        "customer": customer,
        "line_items[0][price]": price["id"],
        "success_url": "https://a.test/ok",
    }

    with_quantity = http.post("/v1/checkout/sessions", data={**form, "line_items[0][quantity]": "1"})
    assert with_quantity.status_code == 400
    assert error_of(with_quantity)["param"] == "line_items[0][quantity]"

    session = http.post("/v1/checkout/sessions", data=form).json()
    assert session["url"] == f"https://checkout.stripe.test/c/pay/{session['id']}"
    assert session["object"] == "checkout.session"


def test_subscription_shape_and_cancel(
    fake: FakeStripe, stripe_sdk: stripe.StripeClient, http: httpx.Client, meter_id: str, customer: str
) -> None:
    product = stripe_sdk.v1.products.create(params={"name": "Tokens"})
    price = stripe_sdk.v1.prices.create(
        params={
            "product": product.id,
            "currency": "usd",
            "unit_amount": 1,
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter_id},
        }
    )
    created = stripe_sdk.v1.subscriptions.create(params={"customer": customer, "items": [{"price": price.id}]})
    fetched = stripe_sdk.v1.subscriptions.retrieve(created.id)

    item = fetched["items"]["data"][0]
    assert item["price"]["id"] == price.id
    assert item["quantity"] is None
    assert item["current_period_end"] - item["current_period_start"] >= 28 * DAY
    assert fetched.status == "active"
    canceled = stripe_sdk.v1.subscriptions.cancel(created.id)
    assert canceled.status == "canceled"
