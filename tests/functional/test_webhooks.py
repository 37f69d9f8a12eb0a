"""Stripe webhooks end to end: signed payloads through TestClient to the real route, on the real Postgres,
then the API's answer for the affected key."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ses.models import ses_backends
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from aikit.access import Access
from aikit.api.app import create_app
from aikit.api.routes.webhooks import create_webhook_app
from aikit.db.engine import get_engine
from aikit.db.models import MeterEventError, StripeEvent, Subscription, User
from aikit.keys import IssuedKey, KeyInfo, hash_key, load_key_info
from aikit.outbox import requeue_parked
from aikit.runtime import Runtime
from aikit.settings import Settings
from aikit.webhooks import MAX_BODY_BYTES, Outcome, parse_event, process_event
from tests.fakes import stripe_events
from tests.fakes.stripe_events import Shape, new_id
from tests.fakes.stripe_server import FakeStripe
from tests.support.api import chat, issue_key
from tests.support.aws_lambda import LambdaContext
from tests.support.billing import Billing, past_window_start
from tests.support.emf import emf_records
from tests.support.servers import serve_app
from tests.support.settings import make_settings
from tests.support.webhooks import WEBHOOK_SECRET, applied, deliver, envelope, invoice_event, sign, sub_event

DAY = 86400
MONTH = 30 * DAY
REGION = "us-east-1"
SENDER = "billing@example.com"


# --- building and delivering events --------------------------------------------------------------------


def now() -> int:
    return int(time.time())


# --- app, settings, state ------------------------------------------------------------------------------


def webhook_settings(pg_url: str, redis_prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "stripe_secret_key": "sk_test_webhooks",
        "stripe_webhook_secret": WEBHOOK_SECRET,
        "stripe_api_base": "http://127.0.0.1:9",  # never called: webhooks and the request path need no Stripe
        **overrides,
    }
    return make_settings(pg_url, redis_prefix, **values)


@pytest.fixture
def wh_settings(pg_url: str, redis_prefix: str) -> Settings:
    return webhook_settings(pg_url, redis_prefix)


@pytest.fixture
def wh_runtime(wh_settings: Settings) -> Runtime:
    return Runtime(wh_settings)


@pytest.fixture
def wh_client(wh_runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime=wh_runtime)) as c:
        yield c


@pytest.fixture
def customer() -> str:
    return new_id("cus")


@pytest.fixture
def key(wh_settings: Settings, customer: str) -> IssuedKey:
    return issue_key(wh_settings, customer_id=customer, rpm=1000, rpd=100_000, monthly_tokens=10_000_000)


def session(settings: Settings) -> Session:
    return Session(get_engine(settings.database_url), expire_on_commit=False)


def sub_row(settings: Settings, sub_id: str) -> Subscription | None:
    with session(settings) as s:
        return s.get(Subscription, sub_id)


def event_row(settings: Settings, event_id: str) -> StripeEvent | None:
    with session(settings) as s:
        return s.get(StripeEvent, event_id)


def user_row(settings: Settings, user_id: str) -> User:
    with session(settings) as s:
        user = s.get(User, user_id)
        assert user is not None
        return user


def key_info(settings: Settings, issued: IssuedKey) -> KeyInfo:
    with session(settings) as s:
        info = load_key_info(s, settings, hash_key(issued.api_key))
    assert info is not None
    return info


def ts(value: dt.datetime | None) -> int | None:
    if value is None:
        return None
    return int((value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp())


# --- configuration -------------------------------------------------------------------------------------


def test_no_webhook_secret_answers_503(pg_url: str, redis_prefix: str) -> None:
    settings = webhook_settings(pg_url, redis_prefix, stripe_webhook_secret=None)
    with TestClient(create_app(runtime=Runtime(settings))) as client:
        event = sub_event(new_id("sub"), new_id("cus"), "active", now())
        r = deliver(client, event)
    assert r.status_code == 503
    assert r.json()["error"]["message"].startswith("webhooks not configured")
    assert event_row(settings, event["id"]) is None


# --- the subscription lifecycle ------------------------------------------------------------------------


def test_created_stores_the_subscription_and_opens_the_api(
    wh_client: TestClient, wh_settings: Settings, key: IssuedKey, customer: str
) -> None:
    r = chat(wh_client, key)
    assert r.status_code == 402 and "no subscription" in r.json()["error"]["message"]

    sub_id, created = new_id("sub"), now() - 5
    event = sub_event(sub_id, customer, "active", created, "customer.subscription.created", period_start=created)
    r = deliver(wh_client, event)
    assert r.status_code == 200
    assert r.json() == {"received": True, "id": event["id"], "type": "customer.subscription.created",
                        "outcome": "applied"}

    row = sub_row(wh_settings, sub_id)
    assert row is not None
    assert (row.customer_id, row.status, row.deleted, row.last_event_created) == (customer, "active", False, created)
    assert (ts(row.current_period_start), ts(row.current_period_end)) == (created, created + MONTH)
    assert row.past_due_since is None
    recorded = event_row(wh_settings, event["id"])
    assert recorded is not None
    assert (recorded.type, recorded.created, recorded.outcome) == ("customer.subscription.created", created,
                                                                   "applied")
    # The same process sees the change at once: the webhook cleared the key cache.
    assert chat(wh_client, key).status_code == 200


def test_deleted_turns_the_api_off(wh_client: TestClient, wh_settings: Settings, key: IssuedKey,
                                   customer: str) -> None:
    sub_id = new_id("sub")
    assert applied(wh_client, sub_event(sub_id, customer, "active", now() - 60,
                                        "customer.subscription.created")) == "applied"
    assert chat(wh_client, key).status_code == 200
    assert applied(wh_client, sub_event(sub_id, customer, "canceled", now() - 30,
                                        "customer.subscription.deleted")) == "applied"
    row = sub_row(wh_settings, sub_id)
    assert row is not None and row.deleted and row.status == "canceled"
    r = chat(wh_client, key)
    assert r.status_code == 402
    assert r.json()["error"]["code"] == "subscription_inactive"


def test_deleted_gives_the_free_tier_when_so_configured(pg_url: str, redis_prefix: str) -> None:
    settings = webhook_settings(pg_url, redis_prefix, on_subscription_deleted="free_tier", free_tier_rpm=2)
    customer = new_id("cus")
    issued = issue_key(settings, customer_id=customer, rpm=1000, rpd=100_000)
    with TestClient(create_app(runtime=Runtime(settings))) as client:
        sub_id = new_id("sub")
        applied(client, sub_event(sub_id, customer, "active", now() - 60, "customer.subscription.created"))
        applied(client, sub_event(sub_id, customer, "canceled", now() - 30, "customer.subscription.deleted"))
        info = key_info(settings, issued)
        assert info.access is Access.FREE_TIER and info.rpm == 2
        assert [chat(client, issued).status_code for _ in range(3)] == [200, 200, 429]


@pytest.mark.parametrize(
    ("status", "code"),
    [("active", 200), ("trialing", 200), ("unpaid", 402), ("canceled", 402), ("incomplete", 402),
     ("incomplete_expired", 402), ("paused", 402)],
)
def test_access_follows_the_subscription_status(wh_client: TestClient, key: IssuedKey, customer: str,
                                                status: str, code: int) -> None:
    applied(wh_client, sub_event(new_id("sub"), customer, status, now() - 10))
    assert chat(wh_client, key).status_code == code


def test_past_due_keeps_access_within_the_grace_period(
    wh_client: TestClient, wh_settings: Settings, key: IssuedKey, customer: str
) -> None:
    sub_id = new_id("sub")
    applied(wh_client, sub_event(sub_id, customer, "active", now() - 3 * DAY, "customer.subscription.created"))
    entered = now() - 2 * DAY
    applied(wh_client, sub_event(sub_id, customer, "past_due", entered))
    row = sub_row(wh_settings, sub_id)
    assert row is not None and ts(row.past_due_since) == entered
    assert key_info(wh_settings, key).access is Access.FULL
    assert chat(wh_client, key).status_code == 200

    # Staying past_due keeps the original start of the grace period.
    applied(wh_client, sub_event(sub_id, customer, "past_due", now() - DAY))
    row = sub_row(wh_settings, sub_id)
    assert row is not None and ts(row.past_due_since) == entered

    applied(wh_client, sub_event(sub_id, customer, "active", now() - 10))
    row = sub_row(wh_settings, sub_id)
    assert row is not None and row.past_due_since is None and row.status == "active"


def test_past_due_beyond_the_grace_period_locks_out(wh_client: TestClient, wh_settings: Settings,
                                                    key: IssuedKey, customer: str) -> None:
    grace = wh_settings.past_due_grace_days
    applied(wh_client, sub_event(new_id("sub"), customer, "past_due", now() - (grace + 1) * DAY))
    r = chat(wh_client, key)
    assert r.status_code == 402


# --- idempotency ---------------------------------------------------------------------------------------


def test_a_redelivered_event_changes_nothing(wh_client: TestClient, wh_settings: Settings,
                                             customer: str) -> None:
    sub_id = new_id("sub")
    first = sub_event(sub_id, customer, "active", now() - 20, "customer.subscription.created")
    assert applied(wh_client, first) == "applied"
    assert applied(wh_client, sub_event(sub_id, customer, "past_due", now() - 10)) == "applied"
    # A newer `created` on the redelivery would win if the event were applied again: it must not be.
    redelivery = dict(first, created=now())
    payload = json.dumps(redelivery)
    r = deliver(wh_client, payload=payload)
    assert r.status_code == 200 and r.json()["outcome"] == "duplicate"
    row = sub_row(wh_settings, sub_id)
    assert row is not None and row.status == "past_due"
    recorded = event_row(wh_settings, first["id"])
    assert recorded is not None and recorded.outcome == "applied"
    with session(wh_settings) as s:
        assert s.scalar(select(func.count()).select_from(StripeEvent)
                        .where(StripeEvent.id == first["id"])) == 1


def test_unknown_event_types_are_recorded_as_ignored(wh_client: TestClient, wh_settings: Settings) -> None:
    event = envelope("customer.created", {"id": new_id("cus"), "object": "customer"}, now())
    r = deliver(wh_client, event)
    assert r.status_code == 200 and r.json()["outcome"] == "ignored"
    recorded = event_row(wh_settings, event["id"])
    assert recorded is not None and recorded.outcome == "ignored"
    assert deliver(wh_client, event).json()["outcome"] == "duplicate"


# --- order ---------------------------------------------------------------------------------------------


def deliver_in_order(client: TestClient, events: list[dict[str, Any]], reverse: bool) -> list[str]:
    return [applied(client, e) for e in (reversed(events) if reverse else events)]


@pytest.mark.parametrize("reverse", [False, True], ids=["in_order", "reversed"])
def test_stale_update_after_deleted_does_not_give_access_back(
    wh_client: TestClient, wh_settings: Settings, key: IssuedKey, customer: str, reverse: bool
) -> None:
    sub_id = new_id("sub")
    applied(wh_client, sub_event(sub_id, customer, "active", now() - 100, "customer.subscription.created"))
    update = sub_event(sub_id, customer, "active", now() - 50)
    delete = sub_event(sub_id, customer, "canceled", now() - 40, "customer.subscription.deleted")
    outcomes = deliver_in_order(wh_client, [update, delete], reverse)
    assert outcomes == (["applied", "stale"] if reverse else ["applied", "applied"])
    row = sub_row(wh_settings, sub_id)
    assert row is not None and row.deleted and row.status == "canceled"
    assert row.last_event_created == delete["created"]
    assert chat(wh_client, key).status_code == 402


def test_deleted_stays_deleted_even_if_a_later_update_arrives(
    wh_client: TestClient, wh_settings: Settings, key: IssuedKey, customer: str
) -> None:
    sub_id = new_id("sub")
    applied(wh_client, sub_event(sub_id, customer, "canceled", now() - 40, "customer.subscription.deleted"))
    assert applied(wh_client, sub_event(sub_id, customer, "active", now() - 10)) == "stale"
    row = sub_row(wh_settings, sub_id)
    assert row is not None and row.deleted and row.status == "canceled"
    assert chat(wh_client, key).status_code == 402


@pytest.mark.parametrize("reverse", [False, True], ids=["in_order", "reversed"])
def test_stale_past_due_after_recovery_does_not_lock_the_payer_out(
    wh_client: TestClient, wh_settings: Settings, key: IssuedKey, customer: str, reverse: bool
) -> None:
    # The past_due began long before the grace period: were it applied last, access would be off.
    sub_id = new_id("sub")
    past_due = sub_event(sub_id, customer, "past_due", now() - 10 * DAY)
    recovered = sub_event(sub_id, customer, "active", now() - 9 * DAY)
    outcomes = deliver_in_order(wh_client, [past_due, recovered], reverse)
    assert outcomes == (["applied", "stale"] if reverse else ["applied", "applied"])
    row = sub_row(wh_settings, sub_id)
    assert row is not None and row.status == "active" and row.past_due_since is None
    assert row.last_event_created == recovered["created"]
    assert chat(wh_client, key).status_code == 200


@pytest.mark.parametrize("reverse", [False, True], ids=["in_order", "reversed"])
def test_a_tie_prefers_the_terminal_state(wh_client: TestClient, wh_settings: Settings, key: IssuedKey,
                                          customer: str, reverse: bool) -> None:
    sub_id, same_second = new_id("sub"), now() - 30
    events = [sub_event(sub_id, customer, "active", same_second),
              sub_event(sub_id, customer, "canceled", same_second, "customer.subscription.deleted")]
    deliver_in_order(wh_client, events, reverse)
    row = sub_row(wh_settings, sub_id)
    assert row is not None and row.deleted and row.status == "canceled"
    assert chat(wh_client, key).status_code == 402


def test_concurrent_deliveries_of_one_event_apply_it_once(wh_settings: Settings, customer: str) -> None:
    event = parse_event(sub_event(new_id("sub"), customer, "active", now(), "customer.subscription.created"))
    engine = get_engine(wh_settings.database_url)
    outcomes: list[Outcome] = []
    barrier = threading.Barrier(8)

    def run() -> None:
        barrier.wait()
        outcomes.append(process_event(engine, wh_settings, event).outcome)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == sorted([Outcome.APPLIED] + [Outcome.DUPLICATE] * 7)


def test_concurrent_out_of_order_events_for_a_new_subscription_end_at_the_newest(
    wh_settings: Settings, customer: str
) -> None:
    sub_id, base = new_id("sub"), now() - 100
    statuses = ["incomplete", "active", "past_due", "active", "past_due", "active", "unpaid", "active"]
    events = [parse_event(sub_event(sub_id, customer, status, base + i)) for i, status in enumerate(statuses)]
    engine = get_engine(wh_settings.database_url)
    barrier = threading.Barrier(len(events))
    errors: list[BaseException] = []

    def run(ev: Any) -> None:
        barrier.wait()
        try:
            process_event(engine, wh_settings, ev)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(ev,)) for ev in reversed(events)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    row = sub_row(wh_settings, sub_id)
    assert row is not None and row.status == "active" and row.last_event_created == base + len(events) - 1
    with session(wh_settings) as s:
        assert s.scalar(select(func.count()).select_from(StripeEvent)
                        .where(StripeEvent.id.in_([e.id for e in events]))) == len(events)


# --- invoices ------------------------------------------------------------------------------------------


def test_invoice_paid_resets_the_monthly_token_quota(wh_client: TestClient, wh_settings: Settings,
                                                     customer: str) -> None:
    issued = issue_key(wh_settings, customer_id=customer, rpm=1000, rpd=1000, monthly_tokens=7)
    applied(wh_client, sub_event(new_id("sub"), customer, "active", now() - 100, "customer.subscription.created"))
    # One call costs 7 tokens (3 in, 4 out): the quota of 7 is used up after it.
    assert chat(wh_client, issued).status_code == 200
    r = chat(wh_client, issued)
    assert r.status_code == 429 and "monthly token quota" in r.json()["error"]["message"]

    # The new period starts after that call (usage counts in the period its time falls in).
    renewal = now() + 1
    time.sleep(renewal - time.time())
    paid = invoice_event("invoice.paid", customer, renewal, lines=[(renewal - MONTH, renewal)])
    assert applied(wh_client, paid) == "applied"
    assert ts(user_row(wh_settings, issued.user_id).quota_period_start) == renewal
    assert key_info(wh_settings, issued).quota_period_start == renewal
    assert chat(wh_client, issued).status_code == 200


@pytest.mark.parametrize("reverse", [False, True], ids=["in_order", "reversed"])
def test_invoice_paid_never_moves_the_quota_period_back(wh_client: TestClient, wh_settings: Settings,
                                                        key: IssuedKey, customer: str, reverse: bool) -> None:
    first_start = now() - 40 * DAY
    renewal = first_start + MONTH
    first = invoice_event("invoice.paid", customer, first_start, lines=[(first_start, first_start + MONTH)])
    second = invoice_event("invoice.paid", customer, renewal + 3, lines=[(first_start, renewal)])
    outcomes = deliver_in_order(wh_client, [first, second], reverse)
    assert outcomes == (["applied", "stale"] if reverse else ["applied", "applied"])
    assert ts(user_row(wh_settings, key.user_id).quota_period_start) == renewal


def test_invoice_paid_for_other_invoices_or_customers_is_ignored(wh_client: TestClient, wh_settings: Settings,
                                                                 key: IssuedKey, customer: str) -> None:
    one_off = invoice_event("invoice.paid", customer, now(), sub_id=None)
    assert applied(wh_client, one_off) == "ignored"
    stranger = invoice_event("invoice.paid", new_id("cus"), now())
    assert applied(wh_client, stranger) == "ignored"
    assert user_row(wh_settings, key.user_id).quota_period_start is None


@pytest.mark.parametrize("shape", stripe_events.SHAPES)
@pytest.mark.parametrize(("reason", "resets"), [
    ("subscription_create", True), ("subscription_cycle", True), ("subscription_update", False),
    ("subscription_threshold", False), ("manual", False), ("upcoming", False), (None, False),
])
def test_only_an_invoice_that_opens_a_service_period_resets_the_quota(
    wh_client: TestClient, wh_settings: Settings, customer: str, shape: Shape, reason: str | None, resets: bool
) -> None:
    issued = issue_key(wh_settings, customer_id=customer, rpm=1000, rpd=1000, monthly_tokens=7)
    sub_id = new_id("sub")
    applied(wh_client, sub_event(sub_id, customer, "active", now() - 100, "customer.subscription.created",
                                 shape=shape))
    assert chat(wh_client, issued).status_code == 200
    assert chat(wh_client, issued).status_code == 429  # the quota of 7 tokens is used up

    # The new period starts after those calls (usage counts in the period its time falls in).
    paid_at = now() + 1
    # A plan change mid-period bills a proration: paying it must not buy a fresh quota.
    paid = invoice_event("invoice.paid", customer, paid_at, sub_id=sub_id, shape=shape, billing_reason=reason,
                         lines=[(paid_at - MONTH, paid_at)])
    assert applied(wh_client, paid) == ("applied" if resets else "ignored")
    assert (user_row(wh_settings, issued.user_id).quota_period_start is not None) is resets
    assert chat(wh_client, issued).status_code == (200 if resets else 429)


# --- same-second subscription events: Stripe decides ---------------------------------------------------


@pytest.fixture
def stripe_app(billing: Any, fake: FakeStripe) -> Iterator[tuple[TestClient, Settings, str]]:
    """An app whose gateway talks to FakeStripe (where the subscriptions live), and a metered price there."""
    settings = billing.settings.model_copy(update={"stripe_webhook_secret": WEBHOOK_SECRET})
    price_id = next(p["id"] for p in fake.prices.values() if p["lookup_key"] == "aikit_api_tokens")
    with TestClient(create_app(runtime=Runtime(settings))) as client:
        yield client, settings, price_id


@pytest.mark.parametrize(("stripe_status", "access"), [("active", 200), ("past_due", 200), ("incomplete", 402)])
def test_same_second_events_take_the_state_from_stripe(
    stripe_app: tuple[TestClient, Settings, str], fake: FakeStripe, stripe_status: str, access: int
) -> None:
    client, settings, price_id = stripe_app
    customer = fake.add_customer()
    issued = issue_key(settings, customer_id=customer, rpm=1000, rpd=1000, monthly_tokens=10_000)
    sub = fake.add_subscription(customer, price_id, start=now() - 60, status=stripe_status)
    second = now() - 30
    # Same `created` second: `updated(active)` first, then `created(incomplete)` (Stripe does not order them).
    assert applied(client, sub_event(sub["id"], customer, "active", second)) == "applied"
    calls = fake.calls[f"/v1/subscriptions/{sub['id']}"]
    r = deliver(client, sub_event(sub["id"], customer, "incomplete", second, "customer.subscription.created"))
    assert r.status_code == 200 and r.json()["outcome"] == "applied"

    assert fake.calls[f"/v1/subscriptions/{sub['id']}"] == calls + 1  # asked Stripe once
    row = sub_row(settings, sub["id"])
    assert row is not None and row.status == stripe_status
    assert chat(client, issued).status_code == access


def test_events_in_order_do_not_ask_stripe(stripe_app: tuple[TestClient, Settings, str], fake: FakeStripe) -> None:
    client, _, price_id = stripe_app
    customer = fake.add_customer()
    sub = fake.add_subscription(customer, price_id, start=now() - 60)
    applied(client, sub_event(sub["id"], customer, "incomplete", now() - 30, "customer.subscription.created"))
    applied(client, sub_event(sub["id"], customer, "active", now() - 20))
    applied(client, sub_event(sub["id"], customer, "active", now() - 20))  # same second, same state
    assert fake.calls[f"/v1/subscriptions/{sub['id']}"] == 0


def test_same_second_events_while_stripe_fails_are_retried_later(
    stripe_app: tuple[TestClient, Settings, str], fake: FakeStripe
) -> None:
    client, settings, price_id = stripe_app
    customer = fake.add_customer()
    sub = fake.add_subscription(customer, price_id, start=now() - 60)
    second = now() - 30
    applied(client, sub_event(sub["id"], customer, "active", second))
    tie = sub_event(sub["id"], customer, "incomplete", second, "customer.subscription.created")
    fake.inject("500", path_prefix="/v1/subscriptions/")
    r = deliver(client, tie)
    assert r.status_code == 500 and r.json()["error"]["code"] == "webhook_failed"
    assert "Stripe will retry" in r.json()["error"]["message"] and sub["id"] not in r.text  # details: logs only
    assert event_row(settings, tie["id"]) is None  # not recorded: Stripe's retry runs it again
    row = sub_row(settings, sub["id"])
    assert row is not None and row.status == "active"
    assert applied(client, tie) == "applied"  # Stripe's retry, with Stripe reachable again
    row = sub_row(settings, sub["id"])
    assert row is not None and row.status == "active"


# --- Stripe's asynchronous rejections: thin events from an event destination --------------------------


DESTINATION_SECRET = "whsec_destination_functional"


@contextlib.contextmanager
def destination_app(billing: Billing, fake: FakeStripe) -> Iterator[Settings]:
    """The API served over real HTTP as FakeStripe's event destination; its gateway reads FakeStripe."""
    settings = billing.settings.model_copy(update={"stripe_webhook_secret": WEBHOOK_SECRET,
                                                   "stripe_event_destination_secret": DESTINATION_SECRET})
    with serve_app(create_app(runtime=Runtime(settings))) as base:
        fake.event_destination(f"{base}/v1/webhooks/stripe", DESTINATION_SECRET)
        yield settings


def error_rows(settings: Settings, fake: FakeStripe) -> list[MeterEventError]:
    """The rejections stored from the error reports this test's FakeStripe made (the database is shared)."""
    with session(settings) as s:
        return list(s.scalars(select(MeterEventError).where(MeterEventError.event_id.in_(list(fake.events_v2)))
                              .order_by(MeterEventError.id)))


def report_of(billing: Billing, customer: str) -> list[Any]:
    return [r for r in billing.reports() if r.customer_id == customer]


def test_an_asynchronous_rejection_marks_the_report_rejected_once(
    billing: Billing, fake: FakeStripe, capsys: pytest.CaptureFixture[str]
) -> None:
    from aikit.observability import METER_EVENTS_REJECTED, flush_metrics

    ghost, good = billing.customer(in_stripe=False), billing.customer()  # ghost: a customer Stripe lacks
    billing.record(billing.key(ghost), ghost, 4, billable=False)
    billing.record(billing.key(good), good, 4)
    summary = billing.flush()
    assert summary.reports_sent == 2  # Stripe answered 200 to both: "received", not "billable"
    flush_metrics()
    capsys.readouterr()

    with destination_app(billing, fake) as settings:
        [(event_id, status)] = fake.deliver_events()
        assert status == 200
        [ghost_report] = report_of(billing, ghost)
        assert ghost_report.status == "rejected"
        assert "meter_event_customer_not_found" in ghost_report.last_error and ghost in ghost_report.last_error
        assert [r.status for r in report_of(billing, good)] == ["sent"]
        [error] = error_rows(settings, fake)
        assert (error.event_id, error.code, error.identifier, error.report_id, error.matched_by) == (
            event_id, "meter_event_customer_not_found", ghost_report.id, ghost_report.id, "identifier")
        recorded = event_row(settings, event_id)
        assert recorded is not None and recorded.outcome == "applied"
        # Stripe delivers it again (at least once): nothing more happens, and Stripe is not asked again.
        fetches = fake.calls[f"/v2/core/events/{event_id}"]
        body = json.dumps(fake.thin_payload(event_id))
        again = httpx.post(f"{fake_destination(fake)}", content=body,
                           headers={"Stripe-Signature": sign(body, DESTINATION_SECRET),
                                    "Content-Type": "application/json"})
        assert again.status_code == 200 and again.json()["outcome"] == "duplicate"
        assert fake.calls[f"/v2/core/events/{event_id}"] == fetches
        assert len(error_rows(settings, fake)) == 1
    flush_metrics()
    records = emf_records(capsys.readouterr().out)
    assert metric_values(records, METER_EVENTS_REJECTED, code="meter_event_customer_not_found") == 1
    # Stripe counts only the good customer's usage; aikit no longer calls the rejected report sent.
    assert fake.meter_totals() == {good: billing.metered[good]}
    assert sum(r.value for r in billing.reports() if r.status == "sent") == billing.metered[good]
    # `aikit requeue-parked` takes rejected reports too, once the cause is fixed.
    assert requeue_parked(billing.settings, customer_id=ghost) == 1
    assert [r.status for r in report_of(billing, ghost)] == ["pending"]


def fake_destination(fake: FakeStripe) -> str:
    assert fake._destination is not None and isinstance(fake._destination[0], str)
    return fake._destination[0]


@pytest.mark.parametrize("problem", ["archived_meter", "no_meter"])
def test_meter_level_rejections_name_the_reports(billing: Billing, fake: FakeStripe, problem: str) -> None:
    customer = billing.customer()
    billing.record(billing.key(customer), customer, 3)
    fake.rules["meter"] = "async"
    [meter] = fake.meters.values()
    if problem == "archived_meter":
        meter["status"] = "inactive"
    else:
        fake.meters.clear()  # no meter with this event_name at all
    assert billing.flush().reports_sent == 1

    with destination_app(billing, fake) as settings:
        assert [status for _, status in fake.deliver_events()] == [200]
        [report] = billing.reports()
        assert report.status == "rejected" and problem in report.last_error
        [error] = error_rows(settings, fake)
        assert (error.code, error.matched_by, error.report_id) == (problem, "identifier", report.id)
        assert error.meter_id == (meter["id"] if problem == "archived_meter" else None)


def test_unsampled_rejections_are_matched_by_customer_and_window(billing: Billing, fake: FakeStripe) -> None:
    fake.max_sample_errors = 1  # Stripe names only a sample of the rejected events
    ghost = billing.customer(in_stripe=False)
    key = billing.key(ghost)
    for windows_ago in (1, 2, 3):
        billing.record(key, ghost, 2, ts=past_window_start(windows_ago) + 5, billable=False)
    assert billing.flush().reports_sent == 3

    with destination_app(billing, fake) as settings:
        fake.deliver_events()
        assert {r.status for r in billing.reports()} == {"rejected"}
        assert sorted(e.matched_by for e in error_rows(settings, fake)) == ["identifier", "window", "window"]
        assert all("validation window" in r.last_error for r in billing.reports()
                   if r.id not in {e.identifier for e in error_rows(settings, fake)})


def test_an_ambiguous_window_marks_only_what_stripe_named(billing: Billing, fake: FakeStripe) -> None:
    fake.max_sample_errors = 1
    first, second, third = (billing.customer() for _ in range(3))
    billing.record(billing.key(first), first, 2)
    assert billing.flush().reports_sent == 1  # accepted and counted
    fake.rules["meter"] = "async"
    [meter] = fake.meters.values()
    meter["status"] = "inactive"  # from now on every event is rejected later (archived_meter)
    billing.record(billing.key(second), second, 2)
    billing.record(billing.key(third), third, 2)
    assert billing.flush().reports_sent == 2

    with destination_app(billing, fake) as settings:
        fake.deliver_events()
        statuses = {r.customer_id: r.status for r in billing.reports()}
        # One of the two was named; the other could be either it or the first customer's accepted report, so
        # neither is marked (the error is stored unmatched and counted).
        assert statuses[first] == "sent"
        assert sorted([statuses[second], statuses[third]]) == ["rejected", "sent"]
        assert sorted(e.matched_by for e in error_rows(settings, fake)) == ["identifier", "none"]


def test_other_thin_events_are_recorded_and_ignored(billing: Billing, fake: FakeStripe) -> None:
    with destination_app(billing, fake) as settings:
        body = json.dumps(stripe_events.thin_event("v1.billing.meter.created", meter_id="mtr_123"))
        r = httpx.post(fake_destination(fake), content=body,
                       headers={"Stripe-Signature": sign(body, DESTINATION_SECRET)})
        assert r.status_code == 200 and r.json()["outcome"] == "ignored"
        assert fake.calls.get("/v2/core/events/" + json.loads(body)["id"], 0) == 0
        recorded = event_row(settings, json.loads(body)["id"])
        assert recorded is not None and recorded.outcome == "ignored"


def test_an_error_report_stripe_cannot_serve_is_retried(billing: Billing, fake: FakeStripe) -> None:
    ghost = billing.customer(in_stripe=False)
    billing.record(billing.key(ghost), ghost, 2, billable=False)
    billing.flush()
    with destination_app(billing, fake) as settings:
        fake.inject("500", path_prefix="/v2/core/events/")
        [(event_id, status)] = fake.deliver_events()
        assert status == 500  # fetching the full event failed: nothing kept, Stripe delivers it again
        assert event_row(settings, event_id) is None and error_rows(settings, fake) == []
        assert [r.status for r in billing.reports()] == ["sent"]
        assert fake.deliver_events() == [(event_id, 200)]
        assert [r.status for r in billing.reports()] == ["rejected"]


def test_without_a_stripe_key_an_error_report_waits(billing: Billing, fake: FakeStripe, pg_url: str,
                                                    redis_prefix: str) -> None:
    settings = webhook_settings(billing.settings.database_url, redis_prefix, stripe_secret_key=None,
                                stripe_event_destination_secret=DESTINATION_SECRET)
    body = json.dumps(stripe_events.thin_event("v1.billing.meter.error_report_triggered", meter_id="mtr_1"))
    with TestClient(create_app(runtime=Runtime(settings))) as client:
        r = client.post("/v1/webhooks/stripe", content=body,
                        headers={"Stripe-Signature": sign(body, DESTINATION_SECRET)})
    assert r.status_code == 500 and "STRIPE_SECRET_KEY" in r.json()["error"]["message"]
    assert event_row(settings, json.loads(body)["id"]) is None


@pytest.fixture
def ses(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        yield boto3.client("ses", region_name=REGION)


def sent_messages() -> list[Any]:
    return list(ses_backends[DEFAULT_ACCOUNT_ID][REGION].sent_messages)


@pytest.fixture
def ses_client(ses: Any, pg_url: str, redis_prefix: str) -> Iterator[tuple[TestClient, Settings]]:
    settings = webhook_settings(pg_url, redis_prefix, email_backend="ses", email_from=SENDER)
    with TestClient(create_app(runtime=Runtime(settings))) as client:
        yield client, settings


def test_payment_failed_emails_the_customer_once_through_ses(
    ses: Any, ses_client: tuple[TestClient, Settings]
) -> None:
    ses.verify_email_identity(EmailAddress=SENDER)
    client, settings = ses_client
    customer = new_id("cus")
    issued = issue_key(settings, customer_id=customer)
    retry_at = now() + 3 * DAY
    failed = invoice_event("invoice.payment_failed", customer, now() - 5, attempt_count=2,
                           next_payment_attempt=retry_at)
    assert applied(client, failed) == "applied"
    assert applied(client, failed) == "duplicate"
    messages = sent_messages()
    assert len(messages) == 1
    assert ses.get_send_quota()["SentLast24Hours"] == 1
    message = messages[0]
    assert message.source == SENDER
    assert message.destinations["ToAddresses"] == [user_row(settings, issued.user_id).email]
    assert "attempt 2" in message.body
    assert dt.datetime.fromtimestamp(retry_at, dt.UTC).strftime("%Y-%m-%d") in message.body
    recorded = event_row(settings, failed["id"])
    assert recorded is not None and recorded.outcome == "applied"


def test_payment_failed_after_recovery_sends_nothing(ses: Any, ses_client: tuple[TestClient, Settings]) -> None:
    ses.verify_email_identity(EmailAddress=SENDER)
    client, settings = ses_client
    customer, sub_id = new_id("cus"), new_id("sub")
    issue_key(settings, customer_id=customer)
    applied(client, sub_event(sub_id, customer, "active", now() - 10))
    late = invoice_event("invoice.payment_failed", customer, now() - 100, sub_id=sub_id)
    assert applied(client, late) == "stale"
    assert sent_messages() == []


def test_payment_failed_for_an_unknown_customer_is_ignored(ses: Any,
                                                           ses_client: tuple[TestClient, Settings]) -> None:
    ses.verify_email_identity(EmailAddress=SENDER)
    client, _ = ses_client
    assert applied(client, invoice_event("invoice.payment_failed", new_id("cus"), now())) == "ignored"
    assert sent_messages() == []


def test_a_failing_mail_service_does_not_fail_the_webhook(ses: Any,
                                                           ses_client: tuple[TestClient, Settings]) -> None:
    # The sender identity is not verified, so SES refuses the message.
    client, settings = ses_client
    customer = new_id("cus")
    issue_key(settings, customer_id=customer)
    failed = invoice_event("invoice.payment_failed", customer, now())
    assert applied(client, failed) == "applied"
    assert applied(client, failed) == "duplicate"
    assert sent_messages() == []


def test_payment_failed_with_the_log_backend(wh_client: TestClient, wh_settings: Settings, key: IssuedKey,
                                             customer: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    failed = invoice_event("invoice.payment_failed", customer, now(), attempt_count=3)
    assert applied(wh_client, failed) == "applied"
    assert applied(wh_client, failed) == "duplicate"
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    emails = [line for line in lines if line.get("message") == "email"]
    assert len(emails) == 1
    assert emails[0]["to"] == user_row(wh_settings, key.user_id).email
    assert "attempt 3" in emails[0]["body"]


# --- refused deliveries --------------------------------------------------------------------------------


def refused_cases() -> list[str]:
    return ["missing", "wrong_secret", "stale", "tampered", "malformed_json", "not_an_object", "oversized",
            "garbage_header"]


@pytest.mark.parametrize("case", refused_cases())
def test_unverified_deliveries_are_refused_and_change_nothing(wh_client: TestClient, wh_settings: Settings,
                                                              customer: str, case: str) -> None:
    sub_id = new_id("sub")
    event = sub_event(sub_id, customer, "active", now(), "customer.subscription.created")
    payload = json.dumps(event)
    expected = 400
    if case == "missing":
        r = deliver(wh_client, payload=payload, header=None)
    elif case == "wrong_secret":
        r = deliver(wh_client, payload=payload, header=sign(payload, "whsec_someone_else"))
    elif case == "stale":
        r = deliver(wh_client, payload=payload, header=sign(payload, timestamp=now() - 600))
    elif case == "tampered":
        header = sign(payload)
        r = deliver(wh_client, payload=payload.replace('"active"', '"trialing"'), header=header)
    elif case == "malformed_json":
        bad = payload[:-5]
        r = deliver(wh_client, payload=bad, header=sign(bad))
    elif case == "not_an_object":
        r = deliver(wh_client, payload="[1, 2]", header=sign("[1, 2]"))
    elif case == "oversized":
        big = json.dumps(dict(event, padding="x" * MAX_BODY_BYTES))
        r = deliver(wh_client, payload=big, header=sign(big))
        expected = 413
    else:
        r = deliver(wh_client, payload=payload, header="t=abc,v1=nothex")
    assert r.status_code == expected, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["code"].startswith("webhook_")
    assert event_row(wh_settings, event["id"]) is None
    assert sub_row(wh_settings, sub_id) is None


def test_signed_event_without_a_customer_is_refused(wh_client: TestClient, wh_settings: Settings) -> None:
    sub_id = new_id("sub")
    event = sub_event(sub_id, "cus_x", "active", now())
    del event["data"]["object"]["customer"]
    r = deliver(wh_client, event)
    assert r.status_code == 400
    assert "customer" in r.json()["error"]["message"]
    assert event_row(wh_settings, event["id"]) is None
    assert sub_row(wh_settings, sub_id) is None


@pytest.fixture
def failing_subscription_writes(wh_settings: Settings) -> Iterator[str]:
    """A real database failure: a trigger refuses writes of subscriptions whose id starts with sub_fail."""
    engine = get_engine(wh_settings.database_url)
    with engine.begin() as conn:
        conn.execute(text("""
            CREATE OR REPLACE FUNCTION aikit_test_refuse() RETURNS trigger AS $$
            BEGIN
              IF NEW.id LIKE 'sub_fail%' THEN RAISE EXCEPTION 'injected failure'; END IF;
              RETURN NEW;
            END $$ LANGUAGE plpgsql"""))
        conn.execute(text("CREATE TRIGGER aikit_test_refuse BEFORE INSERT OR UPDATE ON subscriptions "
                          "FOR EACH ROW EXECUTE FUNCTION aikit_test_refuse()"))
    yield "sub_fail"
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER aikit_test_refuse ON subscriptions"))
        conn.execute(text("DROP FUNCTION aikit_test_refuse()"))


def test_a_failing_handler_answers_5xx_and_keeps_nothing(wh_client: TestClient, wh_settings: Settings,
                                                         failing_subscription_writes: str) -> None:
    # The event claim is written first, then the subscription write fails in Postgres. Both must be rolled
    # back so Stripe's retry starts clean.
    sub_id = new_id(failing_subscription_writes)
    event = sub_event(sub_id, new_id("cus"), "active", now(), "customer.subscription.created")
    for _ in range(2):  # Stripe's retry meets the same failure, not a "duplicate"
        r = deliver(wh_client, event)
        assert r.status_code == 500
        body = r.json()["error"]
        assert body["code"] == "webhook_failed" and "Stripe will retry" in body["message"]
        assert "Traceback" not in r.text
        assert event_row(wh_settings, event["id"]) is None
        assert sub_row(wh_settings, sub_id) is None
    # The service is not left broken: the next event is applied.
    assert applied(wh_client, sub_event(new_id("sub"), new_id("cus"), "active", now())) == "applied"


def test_ids_our_columns_cannot_hold_are_malformed_events(wh_client: TestClient, wh_settings: Settings) -> None:
    sub_id = new_id("sub")
    for customer in ("cus_" + "x" * 300, "cus_\x00nul"):
        event = sub_event(sub_id, customer, "active", now(), "customer.subscription.created")
        r = deliver(wh_client, event)
        assert r.status_code == 400
        assert "not a Stripe id" in r.json()["error"]["message"]
        assert event_row(wh_settings, event["id"]) is None
    assert sub_row(wh_settings, sub_id) is None


# --- the webhook Lambda's app --------------------------------------------------------------------------


def test_webhook_only_app_serves_the_webhook_and_nothing_else(wh_runtime: Runtime, wh_settings: Settings,
                                                              customer: str) -> None:
    with TestClient(create_webhook_app(wh_runtime)) as client:
        sub_id = new_id("sub")
        assert applied(client, sub_event(sub_id, customer, "active", now())) == "applied"
        assert client.post("/v1/chat/completions", json={}).status_code == 404
        assert client.get("/docs").status_code == 404
    row = sub_row(wh_settings, sub_id)
    assert row is not None and row.status == "active"


webhook_context = functools.partial(LambdaContext, "aikit-webhook", memory_limit_in_mb=256,
                                    aws_request_id="c0ffee00-0000-4000-8000-000000000000")


def http_api_event(payload: str, signature: str) -> dict[str, Any]:
    """An API Gateway HTTP API (payload 2.0) event, as `sam local generate-event apigateway http-api-proxy`."""
    path = "/v1/webhooks/stripe"
    return {
        "version": "2.0", "routeKey": f"POST {path}", "rawPath": path, "rawQueryString": "",
        "headers": {"content-type": "application/json; charset=utf-8", "stripe-signature": signature,
                    "host": "abc123.execute-api.us-east-1.amazonaws.com", "user-agent": "Stripe/1.0"},
        "requestContext": {
            "accountId": "123456789012", "apiId": "abc123", "domainName": "abc123.execute-api.us-east-1.amazonaws.com",
            "domainPrefix": "abc123", "requestId": "req-webhook-1", "routeKey": f"POST {path}", "stage": "$default",
            "time": "27/Nov/2026:11:00:00 +0000", "timeEpoch": 1_795_000_000_000,
            "http": {"method": "POST", "path": path, "protocol": "HTTP/1.1", "sourceIp": "3.18.12.63",
                     "userAgent": "Stripe/1.0"},
        },
        "body": payload, "isBase64Encoded": False,
    }


def test_the_webhook_lambda_handler(monkeypatch: pytest.MonkeyPatch, pg_url: str, redis_prefix: str) -> None:
    import importlib.util
    from pathlib import Path

    import aikit.runtime
    from aikit.settings import get_settings

    for name, value in {"DATABASE_URL": pg_url, "REDIS_URL": "redis://127.0.0.1:6379/0",
                        "REDIS_KEY_PREFIX": redis_prefix, "STRIPE_SECRET_KEY": "sk_test_lambda",
                        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(aikit.runtime, "_runtime", None)
    get_settings.cache_clear()
    try:
        path = Path(__file__).resolve().parents[2] / "functions" / "webhook" / "app.py"
        spec = importlib.util.spec_from_file_location("webhook_lambda_app", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)

        customer, sub_id = new_id("cus"), new_id("sub")
        payload = json.dumps(sub_event(sub_id, customer, "active", now(), "customer.subscription.created"))
        answer = module.handler(http_api_event(payload, sign(payload)), webhook_context())
        assert answer["statusCode"] == 200, answer
        assert json.loads(answer["body"])["outcome"] == "applied"
        again = module.handler(http_api_event(payload, sign(payload)), webhook_context())
        assert json.loads(again["body"])["outcome"] == "duplicate"
        refused = module.handler(http_api_event(payload, sign(payload, "whsec_other")), webhook_context())
        assert refused["statusCode"] == 400
        settings = get_settings()
        row = sub_row(settings, sub_id)
        assert row is not None and row.status == "active" and row.customer_id == customer
    finally:
        get_settings.cache_clear()


def metric_values(records: list[dict[str, Any]], name: str, **dimensions: str) -> float:
    total = 0.0
    for record in records:
        if name not in record or any(record.get(k) != v for k, v in dimensions.items()):
            continue
        value = record[name]
        total += sum(value) if isinstance(value, list) else value
    return total


def test_metrics_count_outcomes_and_signature_failures(wh_client: TestClient, customer: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from aikit.observability import WEBHOOK_EVENTS, WEBHOOK_SIGNATURE_FAILURES, flush_metrics

    flush_metrics()
    capsys.readouterr()
    event = sub_event(new_id("sub"), customer, "active", now(), "customer.subscription.created")
    applied(wh_client, event)
    applied(wh_client, event)
    payload = json.dumps(event)
    assert deliver(wh_client, payload=payload, header=sign(payload, "whsec_other")).status_code == 400
    flush_metrics()
    records = emf_records(capsys.readouterr().out)
    kind = "customer.subscription.created"
    assert metric_values(records, WEBHOOK_EVENTS, type=kind, outcome="applied") == 1
    assert metric_values(records, WEBHOOK_EVENTS, type=kind, outcome="duplicate") == 1
    assert metric_values(records, WEBHOOK_SIGNATURE_FAILURES, reason="bad_signature") == 1
