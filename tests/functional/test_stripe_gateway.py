"""aikit's Stripe gateway against the local Stripe imitation, through the real stripe SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import stripe

from aikit.errors import BillingError
from aikit.settings import Settings, load_settings
from aikit.stripe_gateway import (
    DUPLICATE_MESSAGE,
    PRICE_LOOKUP_KEY,
    ReportOutcome,
    ReportStatus,
    SetupResult,
    StripeGateway,
    classify_error,
    gateway_from_settings,
)
from tests.fakes.stripe_server import METER_EVENT_PATH, FakeStripe

EVENT = "api_tokens"
DAY = 86400

FAKE_STRIPE_TIMEOUT_SECONDS = 1.5  # the `fake` fixture's timeout fault stalls this long


@pytest.fixture
def settings(fake: FakeStripe) -> Settings:
    return load_settings(
        stripe_secret_key=fake.api_key,
        stripe_api_base=fake.url,
        stripe_timeout_seconds=0.5,
        stripe_meter_event_name=EVENT,
        stripe_max_network_retries=2,
    )


@pytest.fixture
def gateway(settings: Settings) -> Iterator[StripeGateway]:
    gateway = StripeGateway(settings)
    yield gateway
    gateway.close()


@pytest.fixture
def setup(gateway: StripeGateway) -> SetupResult:
    return gateway.ensure_setup(event_name=EVENT)


@pytest.fixture
def customer(gateway: StripeGateway, setup: SetupResult) -> str:
    return gateway.create_customer(email="ada@example.com", metadata={"aikit_account": "acct_1"})


def report(
    gateway: StripeGateway, customer: str, identifier: str, value: int = 100, ts: int | None = None
) -> ReportOutcome:
    return gateway.report_meter_event(
        identifier=identifier, customer_id=customer, value=value, timestamp=ts or int(time.time())
    )


def test_accepted_event_reaches_the_meter(fake: FakeStripe, gateway: StripeGateway, customer: str) -> None:
    ts = int(time.time()) - 60
    outcome = report(gateway, customer, "evt-1", 1500, ts)

    assert outcome.status is ReportStatus.ACCEPTED
    assert outcome.recorded
    assert fake.meter_totals(EVENT) == {customer: 1500}
    [event] = fake.meter_events
    assert (event.identifier, event.customer, event.value, event.timestamp) == ("evt-1", customer, 1500, ts)


def test_repeated_identifier_is_duplicate_and_counted_once(
    fake: FakeStripe, gateway: StripeGateway, customer: str
) -> None:
    assert report(gateway, customer, "evt-dup", 40).status is ReportStatus.ACCEPTED
    outcome = report(gateway, customer, "evt-dup", 40)

    assert outcome.status is ReportStatus.DUPLICATE
    assert outcome.recorded
    assert outcome.http_status == 400
    assert outcome.message is not None
    assert DUPLICATE_MESSAGE in outcome.message
    assert fake.meter_totals(EVENT) == {customer: 40}


@pytest.mark.parametrize(
    ("kind", "recorded_by_first_send"),
    [
        ("500", False),
        ("503", False),
        ("429", False),
        ("timeout", False),
        ("reset", False),
        ("accept_then_500", True),
        ("accept_then_drop", True),
    ],
)
def test_fault_is_retryable_and_resend_counts_once(
    fake: FakeStripe, gateway: StripeGateway, customer: str, kind: str, recorded_by_first_send: bool
) -> None:
    fake.inject(kind)
    first = report(gateway, customer, f"evt-{kind}", 250)

    assert first.status is ReportStatus.RETRYABLE, first
    assert not first.recorded
    # One attempt only: the SDK must not retry meter events on its own (max_network_retries=0 for them).
    assert fake.calls[METER_EVENT_PATH] == 1
    assert fake.meter_totals(EVENT) == ({customer: 250} if recorded_by_first_send else {})

    again = report(gateway, customer, f"evt-{kind}", 250)

    assert again.status is (ReportStatus.DUPLICATE if recorded_by_first_send else ReportStatus.ACCEPTED)
    assert fake.meter_totals(EVENT) == {customer: 250}
    assert fake.pending_faults == 0


def test_timeout_fault_returns_within_client_timeout(fake: FakeStripe, gateway: StripeGateway, customer: str) -> None:
    fake.inject("timeout")
    started = time.monotonic()
    outcome = report(gateway, customer, "evt-slow")

    assert outcome.status is ReportStatus.RETRYABLE
    assert outcome.error_code == "connection_error"
    assert time.monotonic() - started < fake.timeout_seconds


def test_rate_limit_keeps_its_code(fake: FakeStripe, gateway: StripeGateway, customer: str) -> None:
    fake.inject("429")
    outcome = report(gateway, customer, "evt-429")

    assert (outcome.status, outcome.http_status, outcome.error_code) == (
        ReportStatus.RETRYABLE,
        429,
        "rate_limit",
    )


def test_unknown_customer_is_permanent(fake: FakeStripe, gateway: StripeGateway, setup: SetupResult) -> None:
    fake.rules["customer"] = "sync"  # refused at once (live Stripe may instead accept and report it later)
    outcome = report(gateway, "cus_missing", "evt-x")

    assert outcome.status is ReportStatus.PERMANENT
    assert outcome.error_code == "resource_missing"
    assert outcome.message is not None
    assert "cus_missing" in outcome.message
    assert fake.meter_events == []


@pytest.mark.parametrize("age", [36 * DAY, -10 * 60])
def test_timestamp_outside_window_is_permanent(
    fake: FakeStripe, gateway: StripeGateway, customer: str, age: int
) -> None:
    outcome = report(gateway, customer, "evt-old", ts=int(time.time()) - age)

    assert outcome.status is ReportStatus.PERMANENT
    assert outcome.http_status == 400
    assert fake.meter_events == []


def test_no_active_meter_is_permanent(
    fake: FakeStripe, gateway: StripeGateway, stripe_sdk: stripe.StripeClient, setup: SetupResult, customer: str
) -> None:
    stripe_sdk.v1.billing.meters.deactivate(setup.meter_id)
    outcome = report(gateway, customer, "evt-nometer")

    assert outcome.status is ReportStatus.PERMANENT
    assert outcome.error_code == "resource_missing"


@pytest.mark.parametrize(("key", "status"), [("pk_test_not_secret", 401), ("sk_test_revoked", 401),
                                           ("rk_test_restricted", 403)])
def test_wrong_or_restricted_api_key_is_unauthorized_not_a_refusal_of_the_report(
        fake: FakeStripe, settings: Settings, customer: str, key: str, status: int) -> None:
    fake.refused_keys = {"sk_test_revoked": 401, "rk_test_restricted": 403}
    bad = StripeGateway(settings.model_copy(update={"stripe_secret_key": key}))
    outcome = report(bad, customer, "evt-auth")
    bad.close()

    assert (outcome.status, outcome.http_status) == (ReportStatus.UNAUTHORIZED, status)
    assert not outcome.recorded
    assert fake.meter_events == []


@pytest.mark.parametrize("code", [None, "resource_already_exists"], ids=["message-only", "code-reworded"])
def test_a_repeated_identifier_is_recognised_by_code_or_by_message(
        fake: FakeStripe, gateway: StripeGateway, customer: str, code: str | None) -> None:
    fake.duplicate_code = code  # code: Stripe's code with the text reworded; None: the text only, as today
    assert report(gateway, customer, "evt-dup-shape").status is ReportStatus.ACCEPTED
    again = report(gateway, customer, "evt-dup-shape")

    assert again.status is ReportStatus.DUPLICATE and again.recorded
    assert (DUPLICATE_MESSAGE in (again.message or "")) is (code is None)
    assert fake.meter_totals() == {customer: 100}


def test_bad_input_is_permanent_without_a_call(fake: FakeStripe, gateway: StripeGateway, customer: str) -> None:
    assert report(gateway, customer, "evt-neg", value=-1).status is ReportStatus.PERMANENT
    assert report(gateway, customer, "", value=1).status is ReportStatus.PERMANENT
    assert fake.calls[METER_EVENT_PATH] == 0


def test_sequential_reports_respect_one_call_per_customer(
    fake: FakeStripe, gateway: StripeGateway, customer: str
) -> None:
    for i in range(5):
        assert report(gateway, customer, f"evt-seq-{i}", 1).status is ReportStatus.ACCEPTED
    assert fake.concurrency_violations == 0
    assert fake.meter_totals(EVENT) == {customer: 5}


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (400, {"Stripe-Should-Retry": "true"}, ReportStatus.RETRYABLE),
        (409, {}, ReportStatus.RETRYABLE),
        (502, {"stripe-should-retry": "false"}, ReportStatus.RETRYABLE),
        (400, {"Stripe-Should-Retry": "false"}, ReportStatus.PERMANENT),
        (404, {}, ReportStatus.PERMANENT),
    ],
)
def test_classification_of_sdk_errors(status: int, headers: dict[str, str], expected: ReportStatus) -> None:
    body = {"error": {"type": "invalid_request_error", "message": "boom"}}
    exc = stripe.InvalidRequestError("boom", None, None, None, status, body, headers)

    assert classify_error(exc).status is expected


# --- setup ----------------------------------------------------------------------------------------


def test_ensure_setup_creates_meter_product_price_then_is_idempotent(fake: FakeStripe, gateway: StripeGateway) -> None:
    first = gateway.ensure_setup(event_name=EVENT)
    second = gateway.ensure_setup(event_name=EVENT)

    assert first.created == ["meter", "product", "price"]
    assert second.created == []
    assert (second.meter_id, second.product_id, second.price_id) == (
        first.meter_id,
        first.product_id,
        first.price_id,
    )
    assert (len(fake.meters), len(fake.products), len(fake.prices)) == (1, 1, 1)
    meter = fake.meters[first.meter_id]
    assert meter["event_name"] == EVENT
    assert meter["default_aggregation"] == {"formula": "sum"}
    assert meter["customer_mapping"] == {"event_payload_key": "stripe_customer_id", "type": "by_id"}
    assert meter["value_settings"] == {"event_payload_key": "value"}
    price = fake.prices[first.price_id]
    assert price["product"] == first.product_id
    assert price["currency"] == "usd"
    assert price["lookup_key"] == PRICE_LOOKUP_KEY
    assert price["recurring"]["usage_type"] == "metered"
    assert price["recurring"]["interval"] == "month"
    assert price["recurring"]["meter"] == first.meter_id
    assert float(price["unit_amount_decimal"]) > 0
    assert fake.products[first.product_id]["metadata"] == {"aikit": "api_tokens"}


def test_ensure_setup_reuses_existing_product_and_reactivates_meter(
    fake: FakeStripe, gateway: StripeGateway, stripe_sdk: stripe.StripeClient
) -> None:
    product = stripe_sdk.v1.products.create(params={"name": "API tokens", "metadata": {"aikit": "api_tokens"}})
    first = gateway.ensure_setup(event_name=EVENT)
    assert first.product_id == product.id
    assert first.created == ["meter", "price"]

    stripe_sdk.v1.billing.meters.deactivate(first.meter_id)
    again = gateway.ensure_setup(event_name=EVENT)

    assert again.meter_id == first.meter_id
    assert again.price_id == first.price_id
    assert fake.meters[first.meter_id]["status"] == "active"
    assert len(fake.meters) == 1


def test_ensure_setup_moves_lookup_key_to_a_price_for_a_new_meter(fake: FakeStripe, gateway: StripeGateway) -> None:
    first = gateway.ensure_setup(event_name="old_tokens")
    second = gateway.ensure_setup(event_name=EVENT)

    assert second.meter_id != first.meter_id
    assert second.product_id == first.product_id
    assert second.created == ["meter", "price"]
    assert fake.prices[second.price_id]["lookup_key"] == PRICE_LOOKUP_KEY
    assert fake.prices[first.price_id]["lookup_key"] is None


# --- sessions, subscriptions, reconciliation ------------------------------------------------------


def test_checkout_session_is_subscription_mode_without_quantity(
    fake: FakeStripe, gateway: StripeGateway, setup: SetupResult, customer: str
) -> None:
    url = gateway.create_checkout_session(
        customer_id=customer,
        price_id=setup.price_id,
        success_url="https://app.test/ok",
        cancel_url="https://app.test/cancel",
    )

    assert url.startswith("https://checkout.stripe.test/")
    [session] = fake.checkout_sessions.values()
    assert session["mode"] == "subscription"
    assert session["customer"] == customer
    assert session["_line_items"] == [{"price": setup.price_id}]
    assert (session["success_url"], session["cancel_url"]) == (
        "https://app.test/ok",
        "https://app.test/cancel",
    )


def test_checkout_with_unknown_price_raises_billing_error(gateway: StripeGateway, customer: str) -> None:
    with pytest.raises(BillingError) as caught:
        gateway.create_checkout_session(
            customer_id=customer,
            price_id="price_nope",
            success_url="https://a.test",
            cancel_url="https://a.test",
        )
    assert caught.value.stripe_status == 400
    assert caught.value.stripe_code == "resource_missing"
    assert not caught.value.retryable
    assert "price_nope" in str(caught.value)


def test_portal_session_url(fake: FakeStripe, gateway: StripeGateway, customer: str) -> None:
    url = gateway.create_portal_session(customer_id=customer, return_url="https://app.test/")

    assert url.startswith("https://billing.stripe.test/")
    [session] = fake.portal_sessions.values()
    assert (session["customer"], session["return_url"]) == (customer, "https://app.test/")


def test_retrieve_subscription_has_item_periods(
    fake: FakeStripe, gateway: StripeGateway, stripe_sdk: stripe.StripeClient, setup: SetupResult, customer: str
) -> None:
    created = stripe_sdk.v1.subscriptions.create(params={"customer": customer, "items": [{"price": setup.price_id}]})

    subscription = gateway.retrieve_subscription(created.id)

    assert isinstance(subscription, dict)
    assert subscription["status"] == "active"
    [item] = subscription["items"]["data"]
    assert item["price"]["id"] == setup.price_id
    assert item["current_period_end"] > item["current_period_start"]
    with pytest.raises(BillingError) as caught:
        gateway.retrieve_subscription("sub_missing")
    assert caught.value.stripe_status == 404


def test_meter_event_summaries_per_day(fake: FakeStripe, gateway: StripeGateway, customer: str) -> None:
    now = int(time.time())
    today = now - now % DAY
    other = gateway.create_customer(email="bob@example.com", metadata={})
    sends = [(today - 2 * DAY + 10, 5), (today - 2 * DAY + 500, 7), (today - DAY + 1, 11), (now - 1, 13)]
    for i, (ts, value) in enumerate(sends):
        assert report(gateway, customer, f"evt-sum-{i}", value, ts).status is ReportStatus.ACCEPTED
    assert report(gateway, other, "evt-other", 1000, now - 1).status is ReportStatus.ACCEPTED

    # Unaligned bounds are widened to whole UTC days.
    rows = gateway.meter_event_summaries(
        event_name=EVENT, customer_id=customer, start_time=today - 2 * DAY + 3600, end_time=now
    )

    assert rows == [
        (today - 2 * DAY, today - DAY, 12),
        (today - DAY, today, 11),
        (today, today + DAY, 13),
    ]


def test_meter_event_summaries_follow_pagination(fake: FakeStripe, gateway: StripeGateway, customer: str) -> None:
    now = int(time.time())
    today = now - now % DAY
    assert report(gateway, customer, "evt-page", 9, now - 1).status is ReportStatus.ACCEPTED

    rows = gateway.meter_event_summaries(
        event_name=EVENT, customer_id=customer, start_time=today - 149 * DAY, end_time=today + DAY
    )

    assert len(rows) == 150  # two pages of at most 100
    assert rows[-1] == (today, today + DAY, 9)
    assert sum(value for _, _, value in rows) == 9
    meter_id = next(iter(fake.meters))
    assert fake.calls[f"/v1/billing/meters/{meter_id}/event_summaries"] == 2


def test_meter_event_summaries_unknown_meter_raises(gateway: StripeGateway, customer: str) -> None:
    with pytest.raises(BillingError):
        gateway.meter_event_summaries(event_name="nope", customer_id=customer, start_time=0, end_time=DAY)


def test_gateway_from_settings(fake: FakeStripe, settings: Settings) -> None:
    assert gateway_from_settings(load_settings(stripe_secret_key=None)) is None
    gateway = gateway_from_settings(settings)
    assert isinstance(gateway, StripeGateway)
    gateway.close()
