"""Fixtures of the functional tests: the billing harness (tests/support/billing.py) on one database per module,
emptied per test; a fresh local Stripe per test; fake AWS credentials for the local Bedrock imitation; a mocked
Secrets Manager; the API as a proxy in front of the local fake OpenAI (tests/support/proxy.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import stripe
from moto import mock_aws

from aikit import aws_secrets
from aikit.keys import IssuedKey
from aikit.settings import Settings
from tests.fakes.llm_servers import FakeOpenAI, openai_server
from tests.fakes.stripe_server import FakeStripe
from tests.support.api import issue_key
from tests.support.billing import Billing, started_fake
from tests.support.db import empty_database, module_database
from tests.support.proxy import UPSTREAM_TIMEOUT, proxy_settings_for


@pytest.fixture(scope="module")
def flush_db() -> Iterator[str]:
    yield from module_database()


@pytest.fixture
def fake(request: pytest.FixtureRequest) -> Iterator[FakeStripe]:
    """A fresh FakeStripe; its "timeout" fault stalls FAKE_STRIPE_TIMEOUT_SECONDS of the test module (0.8 s by
    default, above the harness client's 0.5 s)."""
    yield from started_fake(getattr(request.module, "FAKE_STRIPE_TIMEOUT_SECONDS", 0.8))


@pytest.fixture
def stripe_sdk(fake: FakeStripe) -> Iterator[stripe.StripeClient]:
    """A plain stripe SDK client of the fake, for arranging state directly."""
    transport = stripe.RequestsClient()
    yield stripe.StripeClient(fake.api_key, base_addresses=fake.base_addresses, http_client=transport)
    transport.close()


@pytest.fixture
def billing(flush_db: str, redis_prefix: str, fake: FakeStripe) -> Billing:
    empty_database(flush_db)
    return Billing.create(flush_db, redis_prefix, fake)


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials so boto3 signs requests to the local Bedrock imitation (never a real endpoint)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def slow_openai() -> Iterator[FakeOpenAI]:
    """The local fake OpenAI; its "slow" fault outlasts the proxy's upstream timeout."""
    with openai_server(slow_seconds=3 * UPSTREAM_TIMEOUT) as srv:
        yield srv


@pytest.fixture
def proxy_settings(pg_url: str, redis_prefix: str, slow_openai: FakeOpenAI) -> Settings:
    return proxy_settings_for(pg_url, redis_prefix, slow_openai)


@pytest.fixture
def proxy_key(proxy_settings: Settings) -> IssuedKey:
    # A token quota, so every admitted call holds a reservation until it is metered or released.
    return issue_key(proxy_settings, rpm=1000, rpd=10_000, monthly_tokens=1_000_000)


@pytest.fixture
def secretsmanager(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A Secrets Manager client on moto's in-memory AWS; aikit's secret cache is empty before and after."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    aws_secrets.clear_cache()
    with mock_aws():
        yield boto3.client("secretsmanager", region_name="us-east-1")
    aws_secrets.clear_cache()
