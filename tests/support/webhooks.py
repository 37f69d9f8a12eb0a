"""Signed Stripe events posted to the webhook route (the event bodies come from tests.fakes.stripe_events).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import stripe
from fastapi.testclient import TestClient

WEBHOOK_SECRET = "whsec_hostile_" + uuid.uuid4().hex


MONTH = 30 * 86400


def sign(payload: str, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    return stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=timestamp)


def envelope(type_: str, obj: dict[str, Any], created: int) -> dict[str, Any]:
    return {"id": "evt_" + uuid.uuid4().hex[:20], "object": "event", "api_version": "2025-03-31.basil",
            "created": created, "type": type_, "livemode": False, "data": {"object": obj}}


def subscription_event(type_: str, sub_id: str, customer: str, status: str, created: int) -> dict[str, Any]:
    obj = {"id": sub_id, "object": "subscription", "customer": customer, "status": status,
           "items": {"object": "list", "data": [{"id": "si_" + uuid.uuid4().hex[:14], "object": "subscription_item",
                                                 "current_period_start": created,
                                                 "current_period_end": created + MONTH}]}}
    return envelope(type_, obj, created)


def invoice_paid_event(customer: str, sub_id: str, created: int) -> dict[str, Any]:
    obj = {"id": "in_" + uuid.uuid4().hex[:14], "object": "invoice", "customer": customer, "created": created,
           "parent": {"type": "subscription_details", "subscription_details": {"subscription": sub_id}},
           "lines": {"object": "list", "data": [{"object": "line_item",
                                                 "period": {"start": created, "end": created + MONTH}}]}}
    return envelope("invoice.paid", obj, created)


def post_webhook(http: httpx.Client | TestClient, event: dict[str, Any]) -> httpx.Response:
    payload = json.dumps(event)
    return http.post("/v1/webhooks/stripe", content=payload.encode(),
                     headers={"Content-Type": "application/json", "Stripe-Signature": sign(payload)})


def subscribe(client: TestClient | httpx.Client, customer_id: str, status: str = "active",
              type_: str = "customer.subscription.created", sub_id: str | None = None) -> str:
    sub_id = sub_id or "sub_" + uuid.uuid4().hex[:14]
    event = subscription_event(type_, sub_id, customer_id, status, int(time.time()))
    r = post_webhook(client, event)
    assert r.status_code == 200, r.text
    return sub_id
