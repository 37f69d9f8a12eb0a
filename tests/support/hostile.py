"""Helpers of the hostile-input tests: an API with billing switched on against FakeStripe, and the leak check
every response must pass (no stack trace, no file path, no secret).
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi.testclient import TestClient

from aikit.keys import IssuedKey
from aikit.runtime import Runtime
from aikit.settings import Settings
from aikit.stripe_gateway import StripeGateway
from tests.fakes.stripe_server import FakeStripe
from tests.support.api import full_app, issue_key
from tests.support.settings import ADMIN_TOKEN, make_settings
from tests.support.webhooks import WEBHOOK_SECRET, subscribe

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


def metered_price_settings(pg_url: str, redis_prefix: str, fake: FakeStripe, **overrides: Any) -> Settings:
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
        settings = metered_price_settings(pg_url, redis_prefix, fake, **overrides)
        email = f"hostile-{uuid.uuid4().hex[:8]}@example.com"
        customer = fake.add_customer(email=email)
        key = issue_key(settings, email=email, customer_id=customer, rpm=100_000, rpd=1_000_000,
                        monthly_tokens=100_000_000)
        runtime = Runtime(settings)
        with TestClient(full_app(runtime), raise_server_exceptions=False) as client:
            subscribe(client, customer)
            yield Env(settings, runtime, fake, customer, key), client
