"""The webhook rules as plain functions: verification, ordering, past_due bookkeeping, invoice periods."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import pytest

from aikit.emails import LogMailer, SesMailer, mailer_from_settings
from aikit.errors import WebhookRejected
from aikit.settings import load_settings
from aikit.webhooks import (
    MAX_BODY_BYTES,
    PaymentFailedNotice,
    WebhookEvent,
    invoice_line_periods,
    invoice_period_start,
    invoice_subscription_id,
    is_terminal,
    next_past_due_since,
    parse_event,
    payment_failed_email,
    should_apply,
    subscription_fields,
    timestamp_or_none,
    verify_event,
)
from tests.fakes import stripe_events
from tests.support.webhooks import WEBHOOK_SECRET, sign

DAY = 86400
MONTH = 30 * DAY
T0 = 1_780_000_000


def event_json(**overrides: Any) -> str:
    event: dict[str, Any] = {
        "id": "evt_1", "object": "event", "type": "customer.subscription.updated", "created": T0,
        "data": {"object": {"id": "sub_1", "object": "subscription", "customer": "cus_1", "status": "active"}},
    }
    event.update(overrides)
    return json.dumps(event)


# --- verification --------------------------------------------------------------------------------------


def test_a_correctly_signed_event_is_parsed() -> None:
    payload = event_json()
    event = verify_event(payload.encode(), sign(payload), WEBHOOK_SECRET)
    assert (event.id, event.type, event.created) == ("evt_1", "customer.subscription.updated", T0)
    assert event.obj["customer"] == "cus_1"


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        (None, "missing_signature"),
        ("", "missing_signature"),
        ("garbage", "bad_signature"),
        ("t=123", "bad_signature"),
    ],
)
def test_missing_or_unparseable_signature_headers(header: str | None, kind: str) -> None:
    with pytest.raises(WebhookRejected) as info:
        verify_event(event_json().encode(), header, WEBHOOK_SECRET)
    assert info.value.kind == kind and info.value.status == 400


def test_signature_with_another_secret_is_refused() -> None:
    payload = event_json()
    with pytest.raises(WebhookRejected) as info:
        verify_event(payload.encode(), sign(payload, "whsec_other"), WEBHOOK_SECRET)
    assert info.value.kind == "bad_signature"
    assert "does not match" in info.value.reason


def test_stale_signature_is_refused() -> None:
    payload = event_json()
    with pytest.raises(WebhookRejected) as info:
        verify_event(payload.encode(), sign(payload, timestamp=int(time.time()) - 301), WEBHOOK_SECRET)
    assert info.value.kind == "stale_signature"


def test_a_signature_just_inside_the_tolerance_is_accepted() -> None:
    payload = event_json()
    assert verify_event(payload.encode(), sign(payload, timestamp=int(time.time()) - 250), WEBHOOK_SECRET).id == "evt_1"


def test_tampered_body_is_refused() -> None:
    payload = event_json()
    header = sign(payload)
    tampered = payload.replace('"active"', '"canceled"')
    with pytest.raises(WebhookRejected) as info:
        verify_event(tampered.encode(), header, WEBHOOK_SECRET)
    assert info.value.kind == "bad_signature"


def test_reserialised_json_is_refused() -> None:
    # The signature covers the exact bytes: parsed-and-dumped JSON with other spacing must not verify.
    payload = event_json()
    header = sign(payload)
    redumped = json.dumps(json.loads(payload), separators=(",", ":"))
    assert redumped != payload
    with pytest.raises(WebhookRejected):
        verify_event(redumped.encode(), header, WEBHOOK_SECRET)


@pytest.mark.parametrize("payload", ["not json", '{"id": "evt_1",', "[]", '"text"', "42"])
def test_signed_payloads_that_are_not_json_objects_are_malformed(payload: str) -> None:
    with pytest.raises(WebhookRejected) as info:
        verify_event(payload.encode(), sign(payload), WEBHOOK_SECRET)
    assert info.value.kind == "malformed" and info.value.status == 400


def test_signed_payload_that_is_not_utf8_is_malformed() -> None:
    raw = b'{"id": "\xff"}'
    header = sign(raw.decode("latin-1"))
    with pytest.raises(WebhookRejected) as info:
        verify_event(raw, header, WEBHOOK_SECRET)
    assert info.value.kind == "malformed" and info.value.status == 400


def test_oversized_body_is_refused_before_verification() -> None:
    payload = event_json(pad="x" * MAX_BODY_BYTES)
    with pytest.raises(WebhookRejected) as info:
        verify_event(payload.encode(), sign(payload), WEBHOOK_SECRET)
    assert info.value.status == 413 and info.value.kind == "too_large"


@pytest.mark.parametrize(
    ("data", "what"),
    [
        ({"type": "x", "created": 1, "data": {"object": {}}}, "id"),
        ({"id": "", "type": "x", "created": 1, "data": {"object": {}}}, "id"),
        ({"id": "e" * 256, "type": "x", "created": 1, "data": {"object": {}}}, "id"),
        ({"id": "evt", "created": 1, "data": {"object": {}}}, "type"),
        ({"id": "evt", "type": "x", "created": "1", "data": {"object": {}}}, "created"),
        ({"id": "evt", "type": "x", "created": True, "data": {"object": {}}}, "created"),
        ({"id": "evt", "type": "x", "created": 1}, "data.object"),
        ({"id": "evt", "type": "x", "created": 1, "data": {"object": []}}, "data.object"),
    ],
)
def test_event_envelope_validation_names_the_field(data: dict[str, Any], what: str) -> None:
    with pytest.raises(WebhookRejected) as info:
        parse_event(data)
    assert what in info.value.reason


# --- ordering ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored_created", "stored_terminal", "event_created", "event_terminal", "expected"),
    [
        (None, False, T0, False, True),  # first event for this subscription
        (None, True, T0, False, True),
        (T0, False, T0 + 1, False, True),  # newer wins
        (T0, False, T0 - 1, False, False),  # older loses: stale past_due after recovery changes nothing
        (T0, False, T0, False, True),  # tie between non-terminal states: the later delivery wins
        (T0, True, T0 - 1, False, False),  # stale `updated` after `deleted`: stays deleted
        (T0, True, T0 + 100, False, False),  # nothing leaves a terminal state, even if newer
        (T0, True, T0, False, False),  # tie: the terminal state is preferred...
        (T0, False, T0, True, True),  # ...in either delivery order
        (T0 + 100, False, T0, True, True),  # an older deletion still ends the subscription
        (T0, True, T0 + 1, True, True),
        (T0, True, T0 - 1, True, False),
    ],
)
def test_should_apply(
    stored_created: int | None, stored_terminal: bool, event_created: int, event_terminal: bool, expected: bool
) -> None:
    assert should_apply(stored_created, stored_terminal, event_created, event_terminal) is expected


def test_terminal_states() -> None:
    assert is_terminal("canceled") and is_terminal("incomplete_expired") and is_terminal("active", deleted=True)
    for status in ("active", "trialing", "past_due", "unpaid", "incomplete", "paused"):
        assert not is_terminal(status)


def test_past_due_since_is_set_on_entry_kept_while_past_due_and_cleared_on_leaving() -> None:
    t1 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    t2 = t1 + dt.timedelta(days=2)
    assert next_past_due_since(None, "past_due", t1) == t1
    assert next_past_due_since(t1, "past_due", t2) == t1
    assert next_past_due_since(t1, "active", t2) is None
    assert next_past_due_since(t1, "unpaid", t2) is None
    assert next_past_due_since(None, "active", t2) is None


# --- object shapes -------------------------------------------------------------------------------------


def sub_event(obj: dict[str, Any], type_: str = "customer.subscription.updated") -> WebhookEvent:
    return WebhookEvent("evt_x", type_, T0, obj)


def test_subscription_fields_read_the_period_from_the_items() -> None:
    obj = {"id": "sub_1", "customer": "cus_1", "status": "trialing",
           "items": {"object": "list", "data": [{"current_period_start": T0, "current_period_end": T0 + MONTH}]}}
    fields = subscription_fields(sub_event(obj))
    assert (fields.id, fields.customer_id, fields.status) == ("sub_1", "cus_1", "trialing")
    assert (fields.current_period_start, fields.current_period_end) == (T0, T0 + MONTH)


def test_subscription_fields_fall_back_to_the_old_shape_and_expanded_customer() -> None:
    obj = {"id": "sub_1", "customer": {"id": "cus_9", "object": "customer"}, "status": "active",
           "current_period_start": T0, "current_period_end": T0 + MONTH}
    fields = subscription_fields(sub_event(obj))
    assert fields.customer_id == "cus_9" and fields.current_period_start == T0


def test_deleted_subscription_is_canceled_whatever_the_object_says() -> None:
    obj = {"id": "sub_1", "customer": "cus_1", "status": "active"}
    assert subscription_fields(sub_event(obj, "customer.subscription.deleted")).status == "canceled"


@pytest.mark.parametrize("missing", ["id", "customer", "status"])
def test_subscription_without_required_fields_is_malformed(missing: str) -> None:
    obj = {"id": "sub_1", "customer": "cus_1", "status": "active"}
    del obj[missing]
    with pytest.raises(WebhookRejected) as info:
        subscription_fields(sub_event(obj))
    assert missing in info.value.reason


def test_invoice_subscription_id_new_and_old_shapes() -> None:
    assert invoice_subscription_id(
        {"parent": {"type": "subscription_details", "subscription_details": {"subscription": "sub_1"}}}
    ) == "sub_1"
    assert invoice_subscription_id({"subscription": "sub_2"}) == "sub_2"
    assert invoice_subscription_id({"parent": None}) is None
    assert invoice_subscription_id({"parent": {"type": "quote_details", "quote_details": {}}}) is None


def line(start: int, end: int) -> dict[str, Any]:
    return {"object": "line_item", "period": {"start": start, "end": end}}


def invoice(created: int, *lines: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"object": "invoice", "created": created, "lines": {"object": "list", "data": list(lines)}, **extra}


def test_first_invoice_opens_the_period_it_covers() -> None:
    assert invoice_period_start(invoice(T0, line(T0, T0 + MONTH))) == T0


def test_renewal_invoice_for_metered_usage_opens_the_period_after_the_one_it_bills() -> None:
    # Metered prices are billed in arrears: the line covers the period that just ended.
    renewal = T0 + MONTH
    assert invoice_period_start(invoice(renewal + 5, line(T0, renewal))) == renewal


def test_renewal_invoice_with_licensed_and_metered_lines() -> None:
    renewal = T0 + MONTH
    paid = invoice(renewal, line(T0, renewal), line(renewal, renewal + MONTH))
    assert invoice_period_start(paid) == renewal


def test_invoice_without_lines_falls_back_to_its_own_period() -> None:
    assert invoice_period_start(invoice(T0 + MONTH, period_start=T0, period_end=T0 + MONTH)) == T0 + MONTH
    assert invoice_period_start(invoice(T0, period_start=T0, period_end=T0)) == T0
    assert invoice_period_start({"object": "invoice"}) is None


def test_payment_failed_email_names_the_attempt_and_the_next_try() -> None:
    notice = PaymentFailedNotice("ada@example.com", "cus_1", "in_1", 2, T0, 1234, "usd", "https://pay.example/i")
    email = payment_failed_email(notice)
    assert email.to == "ada@example.com"
    assert "attempt 2" in email.body and "12.34 USD" in email.body
    assert dt.datetime.fromtimestamp(T0, dt.UTC).strftime("%Y-%m-%d") in email.body
    assert "https://pay.example/i" in email.body
    final = payment_failed_email(PaymentFailedNotice("a@b.c", "cus_1", None, 4, None, None, None, None))
    assert "No further automatic attempts" in final.body


def test_mailer_follows_the_email_backend_setting() -> None:
    assert isinstance(mailer_from_settings(load_settings(_env_file=None)), LogMailer)
    assert isinstance(mailer_from_settings(load_settings(_env_file=None, email_backend="ses")), SesMailer)


# --- both of Stripe's shapes, from its published fixtures -----------------------------------------------


@pytest.mark.parametrize("shape", stripe_events.SHAPES)
def test_subscription_period_in_either_shape(shape: stripe_events.Shape) -> None:
    obj = stripe_events.subscription(shape, sub_id="sub_1", customer="cus_1", status="active",
                                     period_start=T0, period_end=T0 + MONTH, ended_at=T0 + DAY)
    fields = subscription_fields(WebhookEvent("evt_1", "customer.subscription.deleted", T0 + DAY, obj))
    assert (fields.current_period_start, fields.current_period_end, fields.ended_at) == (T0, T0 + MONTH, T0 + DAY)


@pytest.mark.parametrize("shape", stripe_events.SHAPES)
def test_invoice_line_periods_skip_prorations_and_one_off_items(shape: stripe_events.Shape) -> None:
    invoice = stripe_events.invoice(shape, customer="cus_1", sub_id="sub_1", billing_reason="subscription_update",
                                    created=T0 + 5 * DAY, lines=[(T0, T0 + MONTH)],
                                    proration_lines=[(T0 + 5 * DAY, T0 + MONTH)])
    assert invoice_subscription_id(invoice) == "sub_1"
    assert invoice_line_periods(invoice) == [("sub_1", T0, T0 + MONTH)]
    one_off = stripe_events.invoice(shape, customer="cus_1", sub_id=None, billing_reason="manual", created=T0)
    assert invoice_subscription_id(one_off) is None
    assert invoice_line_periods(one_off) == []


@pytest.mark.parametrize("value", [None, -1, 1.5, True, "1790000000", 253_402_300_800, 10**20])
def test_timestamps_a_datetime_cannot_hold_are_none(value: Any) -> None:
    assert timestamp_or_none(value) is None
    assert timestamp_or_none(T0) == T0
