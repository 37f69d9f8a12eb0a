"""Hostile-input tests. Shared helpers: an API with billing switched on against FakeStripe, and the leak check
every response must pass (no stack trace, no file path, no secret)."""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import stripe
from fastapi import FastAPI
from fastapi.testclient import TestClient

from aikit.api.app import create_app
from aikit.keys import IssuedKey
from aikit.runtime import Runtime
from aikit.settings import Settings
from aikit.stripe_gateway import StripeGateway
from tests.conftest import ADMIN_TOKEN, issue_key, make_settings
from tests.fakes.stripe_server import FakeStripe

WEBHOOK_SECRET = "whsec_hostile_" + uuid.uuid4().hex
MONTH = 30 * 86400

# What a stack trace or a source location looks like in a body.
LEAK_PATTERNS = (
    re.compile(r"Traceback \(most recent call last\)"),
    re.compile(r'File "[^"]+", line \d+'),
    re.compile(r"(?:/work/|/root/|/home/|/usr/lib/|site-packages|\.venv/)"),
    re.compile(r"[\w.-]*/[\w/.-]+\.py\b"),
    re.compile(r"sqlalchemy\.exc|pg8000|psycopg|redis\.exceptions", re.IGNORECASE),
)


def leaks(text: str, secrets: Iterable[str]) -> list[str]:
    found = [p.pattern for p in LEAK_PATTERNS if p.search(text)]
    found += [f"secret {s[:6]}..." for s in secrets if s and s in text]
    return found


def assert_clean(response: httpx.Response | Any, secrets: Iterable[str]) -> None:
    """No 500, no trace, no path, no secret, in the body or the headers."""
    status = response.status_code
    body = response.text if hasattr(response, "text") else str(response.content)
    headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    assert status != 500, f"500 answer: {body[:500]}"
    problems = leaks(body, secrets) + leaks(headers, secrets)
    assert not problems, f"{status} answer leaks {problems}: {body[:500]}"


def full_app(runtime: Runtime) -> FastAPI:
    """The API with every router, mounting any the app factory does not mount (yet)."""
    from aikit.api.routes import billing, usage, webhooks

    app = create_app(runtime=runtime)
    paths = set(app.openapi()["paths"])
    for module, probe in ((usage, "/v1/usage"), (billing, "/v1/billing/checkout"),
                          (webhooks, "/v1/webhooks/stripe")):
        if probe not in paths:
            app.include_router(module.router)
    app.openapi_schema = None  # built again, with every route, on the next request for it
    return app


# --- signed Stripe events ----------------------------------------------------------------------------


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


# --- an API with billing on ----------------------------------------------------------------------------


@dataclass
class Env:
    settings: Settings
    runtime: Runtime
    fake: FakeStripe
    customer_id: str
    key: IssuedKey  # an active, subscribed key

    @property
    def secrets(self) -> list[str]:
        return [self.key.api_key, ADMIN_TOKEN, self.fake.api_key, WEBHOOK_SECRET]


def subscribe(client: TestClient | httpx.Client, customer_id: str, status: str = "active",
              type_: str = "customer.subscription.created", sub_id: str | None = None) -> str:
    sub_id = sub_id or "sub_" + uuid.uuid4().hex[:14]
    event = subscription_event(type_, sub_id, customer_id, status, int(time.time()))
    r = post_webhook(client, event)
    assert r.status_code == 200, r.text
    return sub_id


def billing_settings(pg_url: str, redis_prefix: str, fake: FakeStripe, **overrides: Any) -> Settings:
    """Settings with Stripe (FakeStripe), webhooks and the metered price configured."""
    settings = make_settings(pg_url, redis_prefix, stripe_secret_key=fake.api_key, stripe_api_base=fake.url,
                             stripe_webhook_secret=WEBHOOK_SECRET, stripe_max_network_retries=0,
                             stripe_timeout_seconds=5, **overrides)
    gateway = StripeGateway(settings)
    price = gateway.ensure_setup(event_name=settings.stripe_meter_event_name).price_id
    gateway.close()
    return make_settings(pg_url, redis_prefix, stripe_secret_key=fake.api_key, stripe_api_base=fake.url,
                         stripe_webhook_secret=WEBHOOK_SECRET, stripe_max_network_retries=0,
                         stripe_timeout_seconds=5, stripe_metered_price_id=price, **overrides)


@contextlib.contextmanager
def billing_env(pg_url: str, redis_prefix: str, **overrides: Any) -> Iterator[tuple[Env, TestClient]]:
    """FakeStripe + an app with every router + one subscribed customer with one key."""
    with FakeStripe() as fake:
        settings = billing_settings(pg_url, redis_prefix, fake, **overrides)
        email = f"hostile-{uuid.uuid4().hex[:8]}@example.com"
        customer = fake.add_customer(email=email)
        key = issue_key(settings, email=email, customer_id=customer, rpm=100_000, rpd=1_000_000,
                        monthly_tokens=100_000_000)
        runtime = Runtime(settings)
        with TestClient(full_app(runtime), raise_server_exceptions=False) as client:
            subscribe(client, customer)
            yield Env(settings, runtime, fake, customer, key), client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
