"""The local Stripe imitation itself: what the gateway tests do not already pin down."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import stripe

from tests.fakes.stripe_server import METER_EVENT_PATH, FakeStripe, decode_form

EVENT = "api_tokens"
DAY = 86400


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


@pytest.fixture
def http(fake: FakeStripe) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, headers={"Authorization": f"Bearer {fake.api_key}"}, timeout=5) as client:
        yield client


@pytest.fixture
def client(fake: FakeStripe) -> Iterator[stripe.StripeClient]:
    transport = stripe.RequestsClient()
    yield stripe.StripeClient(fake.api_key, base_addresses=fake.base_addresses, http_client=transport)
    transport.close()


@pytest.fixture
def meter_id(client: stripe.StripeClient) -> str:
    meter = client.v1.billing.meters.create(
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


def test_sdk_idempotency_key_option_replays(fake: FakeStripe, client: stripe.StripeClient) -> None:
    a = client.v1.customers.create(params={"email": "a@b.test"}, options={"idempotency_key": "same"})
    b = client.v1.customers.create(params={"email": "a@b.test"}, options={"idempotency_key": "same"})

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
    fake: FakeStripe, http: httpx.Client, client: stripe.StripeClient, meter_id: str, customer: str
) -> None:
    client.v1.billing.meters.deactivate(meter_id)
    response = http.post(METER_EVENT_PATH, data=event_form(customer, "evt-inactive"))

    assert response.status_code == 400
    assert error_of(response)["param"] == "event_name"
    client.v1.billing.meters.reactivate(meter_id)
    assert http.post(METER_EVENT_PATH, data=event_form(customer, "evt-inactive")).status_code == 200


def test_customer_validation_is_switchable(fake: FakeStripe, http: httpx.Client, meter_id: str) -> None:
    refused = http.post(METER_EVENT_PATH, data=event_form("cus_ghost", "evt-g1"))
    assert refused.status_code == 400
    assert error_of(refused)["message"] == "No such customer: 'cus_ghost'"

    fake.validate_customers = False
    assert http.post(METER_EVENT_PATH, data=event_form("cus_ghost", "evt-g2")).status_code == 200
    assert fake.meter_totals() == {"cus_ghost": 10}


def test_concurrent_calls_for_one_customer_are_counted_and_optionally_refused(fake: FakeStripe, customer: str) -> None:
    fake.latency = 0.3

    def send_pair() -> list[int]:
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

    assert send_pair() == [200, 200]
    assert fake.concurrency_violations == 1

    fake.strict_concurrency = True
    assert send_pair() == [200, 429]
    assert fake.concurrency_violations == 2
    assert fake.meter_totals(EVENT) == {customer: 30}


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


def test_lists_paginate_newest_first(client: stripe.StripeClient) -> None:
    ids = [client.v1.products.create(params={"name": f"p{i}"}).id for i in range(5)]
    page = client.v1.products.list(params={"limit": 2})

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
    fake: FakeStripe, client: stripe.StripeClient, http: httpx.Client, meter_id: str, customer: str
) -> None:
    product = client.v1.products.create(params={"name": "Tokens"})
    price = client.v1.prices.create(
        params={
            "product": product.id,
            "currency": "usd",
            "unit_amount": 1,
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter_id},
        }
    )
    created = client.v1.subscriptions.create(params={"customer": customer, "items": [{"price": price.id}]})
    fetched = client.v1.subscriptions.retrieve(created.id)

    item = fetched["items"]["data"][0]
    assert item["price"]["id"] == price.id
    assert item["quantity"] is None
    assert item["current_period_end"] - item["current_period_start"] >= 28 * DAY
    assert fetched.status == "active"
    canceled = client.v1.subscriptions.cancel(created.id)
    assert canceled.status == "canceled"
