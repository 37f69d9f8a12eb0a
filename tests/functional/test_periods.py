"""aikit.periods on the real Postgres: what the flush asks (periods_for, period_containing), fed by signed
subscription and invoice webhooks in both of Stripe's shapes, in any order."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from aikit.api.app import create_app
from aikit.db.engine import get_engine
from aikit.db.models import Base, BillingPeriod, Subscription
from aikit.periods import Period, finalized, period_containing, periods_for, record_period
from aikit.runtime import Runtime
from aikit.settings import Settings
from tests.fakes import stripe_events
from tests.fakes.stripe_events import SHAPES, Shape
from tests.support.settings import make_settings
from tests.support.webhooks import WEBHOOK_SECRET, applied, sub_event

DAY = 86400
T0 = 1_790_000_000  # a fixed past instant: periods are history here, not "now"


def at(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


@pytest.fixture
def p_settings(fresh_pg_url: str, redis_prefix: str) -> Settings:
    return make_settings(fresh_pg_url, redis_prefix, stripe_webhook_secret=WEBHOOK_SECRET)


@pytest.fixture
def client(p_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(runtime=Runtime(p_settings))) as c:
        yield c


def known(settings: Settings, customer: str) -> list[Period]:
    with get_engine(settings.database_url).connect() as conn:
        return periods_for(conn, customer, at(0), at(T0 + 400 * DAY))


def test_the_schema_matches_the_models(p_settings: Settings) -> None:
    with get_engine(p_settings.database_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    mine = [d for d in diff if any(t in repr(d) for t in ("billing_periods", "meter_event_errors"))]
    assert mine == []


@pytest.mark.parametrize("shape", SHAPES)
def test_subscription_events_record_their_period_in_both_shapes(client: TestClient, p_settings: Settings,
                                                                 shape: Shape) -> None:
    customer = f"cus_{shape}"
    assert applied(client, sub_event("sub_periods", customer, "active", T0, "customer.subscription.created",
                                     period_end=T0 + 30 * DAY, shape=shape)) == "applied"
    assert applied(client, sub_event("sub_periods", customer, "active", T0 + 30 * DAY, period_start=T0 + 30 * DAY,
                                     period_end=T0 + 61 * DAY, shape=shape)) == "applied"

    assert known(p_settings, customer) == [Period(at(T0), at(T0 + 30 * DAY)),
                                           Period(at(T0 + 30 * DAY), at(T0 + 61 * DAY))]
    with Session(get_engine(p_settings.database_url)) as s:
        row = s.get(Subscription, "sub_periods")
        assert row is not None
        # The older shape has the period on the subscription while its items have none: no longer NULL.
        assert (row.current_period_start, row.current_period_end) == (at(T0 + 30 * DAY), at(T0 + 61 * DAY))
        sources = set(s.scalars(select(BillingPeriod.source)))
    assert sources == {"subscription"}


@pytest.mark.parametrize("shape", SHAPES)
def test_invoice_lines_record_the_period_they_bill_but_not_prorations(client: TestClient, p_settings: Settings,
                                                                      shape: Shape) -> None:
    customer = f"cus_inv_{shape}"
    renewal = T0 + 31 * DAY
    paid = stripe_events.invoice(shape, customer=customer, sub_id="sub_inv", billing_reason="subscription_cycle",
                                 created=renewal, lines=[(T0, renewal)],
                                 proration_lines=[(T0 + 10 * DAY, renewal)])
    applied(client, stripe_events.event(shape, "invoice.paid", paid, created=renewal))
    upcoming = stripe_events.invoice(shape, customer=customer, sub_id="sub_inv", billing_reason="subscription_cycle",
                                     created=renewal + 30 * DAY, lines=[(renewal, renewal + 30 * DAY)])
    assert applied(client, stripe_events.event(shape, "invoice.created", upcoming,
                                               created=renewal + 30 * DAY)) == "applied"
    assert applied(client, stripe_events.event(shape, "invoice.finalized", upcoming,
                                               created=renewal + 30 * DAY + 3600)) == "ignored"  # nothing new

    assert known(p_settings, customer) == [Period(at(T0), at(renewal)), Period(at(renewal), at(renewal + 30 * DAY))]


def test_an_older_event_never_replaces_a_newer_period_end(client: TestClient, p_settings: Settings) -> None:
    customer, end = "cus_order", T0 + 30 * DAY
    canceled = sub_event("sub_periods", customer, "canceled", T0 + 12 * DAY, "customer.subscription.deleted",
                         period_start=T0, period_end=end, ended_at=T0 + 12 * DAY)
    stale = sub_event("sub_periods", customer, "active", T0 + 5 * DAY, period_start=T0, period_end=end)
    assert applied(client, canceled) == "applied"
    assert applied(client, stale) == "stale"  # the subscription state ignores it; so does its period

    assert known(p_settings, customer) == [Period(at(T0), at(T0 + 12 * DAY))]  # cut at ended_at


def test_a_later_period_cuts_an_overlapping_earlier_one(p_settings: Settings) -> None:
    engine = get_engine(p_settings.database_url)
    with Session(engine) as s, s.begin():
        record_period(s, customer_id="cus_cut", subscription_id="sub_a", start=T0, end=T0 + 30 * DAY,
                      source="subscription", event_created=T0)
        # The billing cycle was reset on day 10 (a plan change with a new anchor).
        record_period(s, customer_id="cus_cut", subscription_id="sub_a", start=T0 + 10 * DAY, end=T0 + 40 * DAY,
                      source="subscription", event_created=T0 + 10 * DAY)
        assert not record_period(s, customer_id="cus_cut", subscription_id="sub_a", start=T0, end=T0,
                                 source="invoice", event_created=T0)  # empty: ignored

    with engine.connect() as conn:
        assert periods_for(conn, "cus_cut", at(T0 + 5 * DAY), at(T0 + 6 * DAY)) == [
            Period(at(T0), at(T0 + 10 * DAY))]
        assert periods_for(conn, "cus_cut", at(T0 + 9 * DAY), at(T0 + 11 * DAY)) == [
            Period(at(T0), at(T0 + 10 * DAY)), Period(at(T0 + 10 * DAY), at(T0 + 40 * DAY))]
        assert period_containing(conn, "cus_cut", at(T0 + 10 * DAY)) == Period(at(T0 + 10 * DAY),
                                                                                at(T0 + 40 * DAY))
        assert period_containing(conn, "cus_cut", at(T0 + 10 * DAY - 1)) == Period(at(T0), at(T0 + 10 * DAY))
        assert period_containing(conn, "cus_cut", at(T0 + 40 * DAY)) is None  # not known (yet)
        assert period_containing(conn, "cus_other", at(T0 + DAY)) is None
    with Session(engine) as s:  # a Session works as well as a Connection
        assert period_containing(s, "cus_cut", at(T0)) == Period(at(T0), at(T0 + 10 * DAY))


def test_finalized_after_the_grace_period() -> None:
    period = Period(at(T0), at(T0 + DAY))
    assert not finalized(period, at(T0 + DAY + 3599), 3600)
    assert finalized(period, at(T0 + DAY + 3600), 3600)
    assert finalized(period, at(T0 + DAY), 0)
