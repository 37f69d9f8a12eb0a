"""Fixtures of the billing harness (tests/functional/test_flush.py) shared by the flush, reconcile and alarm
tests: one database per module, emptied per test, and a fresh local Stripe per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.stripe_server import FakeStripe
from tests.support.billing import Billing, started_fake
from tests.support.db import empty_database, module_database


@pytest.fixture(scope="module")
def flush_db() -> Iterator[str]:
    yield from module_database()


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    yield from started_fake()


@pytest.fixture
def billing(flush_db: str, redis_prefix: str, fake: FakeStripe) -> Billing:
    empty_database(flush_db)
    return Billing.create(flush_db, redis_prefix, fake)
