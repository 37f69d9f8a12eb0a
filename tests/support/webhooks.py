"""Stripe events for the webhook route: building them (on the fixture objects of tests.fakes.stripe_events),
signing them with the test webhook secret, and delivering them."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import stripe
from fastapi.testclient import TestClient

from tests.fakes import stripe_events
from tests.fakes.stripe_events import Shape

WEBHOOK_SECRET = "whsec_test_" + uuid.uuid4().hex
DAY = 86400
MONTH = 30 * DAY


def sign(payload: str, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """A Stripe-Signature header for `payload`."""
    return str(stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=timestamp))


# --- events ---------------------------------------------------------------------------------------------


def envelope(type_: str, obj: dict[str, Any], created: int, event_id: str | None = None,
             shape: Shape = "basil") -> dict[str, Any]:
    return stripe_events.event(shape, type_, obj, created=created, event_id=event_id)


def sub_event(sub_id: str, customer: str, status: str, created: int,
              type_: str = "customer.subscription.updated", period_start: int | None = None,
              shape: Shape = "basil", ended_at: int | None = None, period_end: int | None = None) -> dict[str, Any]:
    """A subscription event on Stripe's fixture object, in the basil (default) or the older shape; the period
    starts at `period_start` (else `created`) and ends at `period_end` (else a month later)."""
    start = period_start if period_start is not None else created
    end = period_end if period_end is not None else start + MONTH
    obj = stripe_events.subscription(shape, sub_id=sub_id, customer=customer, status=status, period_start=start,
                                     period_end=end, ended_at=ended_at)
    return envelope(type_, obj, created, shape=shape)


def invoice_event(type_: str, customer: str, created: int, *, sub_id: str | None = "sub_x",
                  lines: list[tuple[int, int]] | None = None, shape: Shape = "basil",
                  billing_reason: str = "subscription_cycle", **fields: Any) -> dict[str, Any]:
    fields = {"currency": "usd", "amount_due": 2500, "attempt_count": 1, "next_payment_attempt": None,
              "hosted_invoice_url": "https://invoice.stripe.test/i/1", **fields}
    obj = stripe_events.invoice(shape, customer=customer, sub_id=sub_id, billing_reason=billing_reason,
                                created=created, lines=lines, **fields)
    return envelope(type_, obj, created, shape=shape)


def subscription_event(type_: str, sub_id: str, customer: str, status: str, created: int) -> dict[str, Any]:
    """A minimal subscription event: only the fields the webhook reads."""
    obj = {"id": sub_id, "object": "subscription", "customer": customer, "status": status,
           "items": {"object": "list", "data": [{"id": "si_" + uuid.uuid4().hex[:14], "object": "subscription_item",
                                                 "current_period_start": created,
                                                 "current_period_end": created + MONTH}]}}
    return envelope(type_, obj, created)


def invoice_paid_event(customer: str, sub_id: str, created: int) -> dict[str, Any]:
    """A minimal invoice.paid event: only the fields the webhook reads."""
    obj = {"id": "in_" + uuid.uuid4().hex[:14], "object": "invoice", "customer": customer, "created": created,
           "parent": {"type": "subscription_details", "subscription_details": {"subscription": sub_id}},
           "lines": {"object": "list", "data": [{"object": "line_item",
                                                 "period": {"start": created, "end": created + MONTH}}]}}
    return envelope("invoice.paid", obj, created)


# --- delivering them ---------------------------------------------------------------------------------------


def deliver(client: TestClient | httpx.Client, event: dict[str, Any] | None = None, *,
            payload: str | bytes | None = None, header: str | bytes | None = "sign") -> httpx.Response:
    """POST `event` (or the raw `payload`) to the webhook route; `header` is the Stripe-Signature header: "sign"
    signs the body with WEBHOOK_SECRET, None sends none."""
    body = payload if payload is not None else json.dumps(event)
    raw = body.encode() if isinstance(body, str) else body
    headers: dict[str, str | bytes] = {"Content-Type": "application/json"}
    if header == "sign":
        headers["Stripe-Signature"] = sign(raw.decode("utf-8", "replace") if isinstance(body, bytes) else body)
    elif header is not None:
        headers["Stripe-Signature"] = header
    return client.post("/v1/webhooks/stripe", content=raw, headers=headers)


def applied(client: TestClient | httpx.Client, event: dict[str, Any]) -> str:
    """Delivers `event`, which must be accepted; its outcome ("applied", "stale", "ignored", ...)."""
    r = deliver(client, event)
    assert r.status_code == 200, r.text
    outcome: str = r.json()["outcome"]
    return outcome


def subscribe(client: TestClient | httpx.Client, customer_id: str, status: str = "active",
              type_: str = "customer.subscription.created", sub_id: str | None = None) -> str:
    sub_id = sub_id or "sub_" + uuid.uuid4().hex[:14]
    event = subscription_event(type_, sub_id, customer_id, status, int(time.time()))
    r = deliver(client, event)
    assert r.status_code == 200, r.text
    return sub_id
