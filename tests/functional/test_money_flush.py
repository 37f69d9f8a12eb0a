"""Issue 12, the flush's side: money faults injected on real Redis/Postgres and the strict local Stripe.

- a key Stripe refuses (401/403) stops the run's sending: nothing parked, everything pending, one log line,
  the StripeAuthFailures metric (alarm StripeAuthFailuresAlarm);
- a repeated identifier is "already recorded" whether Stripe says so by error code or by its message;
- reporting windows are cut at the customer's billing-period edges (renewal, cancellation), when the usage is
  stored or, for an edge learned later, when the report is sealed, so usage just before the edge is invoiced
  in its own period;
- usage whose period's invoice has finalized is carried forward into the current period (not lost), recorded
  as such, and listed by `aikit reconcile`;
- `requeue-parked` of a report unconfirmed past Stripe's identifier memory never bills twice.

Each test ends with the exact check: Stripe's totals == billable tokens metered == api_key_usage == rollups,
and per invoice period what the strict Stripe will bill.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from aikit.db.models import MeterReport
from aikit.flush import Flusher
from aikit.observability import STRIPE_AUTH_FAILURES, flush_metrics
from aikit.outbox import requeue_parked
from aikit.periods import SOURCE_SUBSCRIPTION, record_period
from aikit.reconcile import reconcile
from aikit.stripe_gateway import StripeGateway
from tests.fakes.stripe_server import FakeStripe, _add_month
from tests.support.billing import EVENT, WINDOW, Billing, past_window_start
from tests.support.emf import emf_values

HOUR = 3600


def flush_as(billing: Billing, **settings: Any) -> Any:
    """One flush that seals every window, with some settings changed (a different Stripe key)."""
    flusher = Flusher(billing.settings.model_copy(update=settings), sleep=billing.sleeps.append)
    try:
        return flusher.run(now=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=WINDOW))
    finally:
        flusher.close()


def log_lines(out: str, message: str) -> list[dict[str, Any]]:
    found = []
    for line in out.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("message") == message:
            found.append(record)
    return found


def price_id(fake: FakeStripe) -> str:
    [price] = [p for p in fake.prices.values() if p["recurring"] and p["recurring"].get("meter")]
    return str(price["id"])


def month_before(end: int) -> int:
    """The start of the monthly period that ends at `end` (FakeStripe's month arithmetic)."""
    for days in range(27, 32):
        if _add_month(end - days * 86400) == end:
            return end - days * 86400
    raise AssertionError(f"no monthly period ends at {end}")


def subscribe_in_stripe(billing: Billing, customer: str, start: int, *, known: bool = True,
              ended_at: int | None = None) -> list[tuple[int, int]]:
    """A subscription in the strict Stripe starting at `start` (its periods as Stripe bills them), and, when
    `known`, the same periods in aikit's billing_periods (what its webhooks would record)."""
    sub = billing.fake.add_subscription(customer, price_id(billing.fake), start=start)
    if ended_at is not None:  # canceled with a final invoice (invoice_now)
        billing.fake.subscriptions[sub["id"]].update(status="canceled", canceled_at=ended_at, ended_at=ended_at,
                                                     _invoice_now=True)
    periods = [(i.period_start, i.period_end) for i in billing.fake.invoices(customer)]
    if known:
        with Session(billing.engine) as session:
            for period_start, period_end in periods:
                record_period(session, customer_id=customer, subscription_id=sub["id"], start=period_start,
                              end=period_end, source=SOURCE_SUBSCRIPTION, event_created=int(time.time()))
            session.commit()
    return periods


@pytest.fixture(autouse=True)
def _no_periods(billing: Billing) -> None:
    with billing.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM billing_periods")


# ------------------------------------------------------------------------------------ a key Stripe refuses


@pytest.mark.parametrize(("status", "key"), [(401, "sk_test_revoked"), (403, "rk_test_restricted")])
def test_a_refused_key_stops_sending_parks_nobody_and_alarms(
        billing: Billing, fake: FakeStripe, capsys: pytest.CaptureFixture[str], status: int, key: str) -> None:
    customers = [billing.customer() for _ in range(4)]
    start = past_window_start(1)
    for n, customer in enumerate(customers):
        billing.record(billing.key(customer), customer, 5, ts=start + n, seed=n)
    fake.refused_keys[key] = status
    flush_metrics()
    capsys.readouterr()

    refused = flush_as(billing, stripe_secret_key=key)

    assert refused.sending_stopped and not refused.ok
    assert (refused.reports_parked, refused.reports_sent, refused.reports_left_pending) == (0, 0, 4)
    assert refused.stripe_calls <= len(customers)  # at most the calls already in flight when the first failed
    assert fake.meter_events == []
    reports = billing.reports()
    assert {r.status for r in reports} == {"pending"}
    # No attempt Stripe could have recorded: the identifier-memory clock has not started.
    assert all(r.first_attempt_at is None and r.attempts == 0 for r in reports)
    flush_metrics()
    out = capsys.readouterr().out
    assert sum(emf_values(out, STRIPE_AUTH_FAILURES)) == 1
    [line] = log_lines(out, "stripe_sending_stopped")
    assert line["http_status"] == status and "STRIPE_SECRET_KEY" in line["reason"]

    fixed = billing.flush()  # the key is fixed: everything goes out, once

    assert fixed.ok and fixed.reports_sent == 4
    billing.assert_exact()


# ------------------------------------------------------------------------ duplicates by code or by text


@pytest.mark.parametrize("code", [None, "resource_already_exists"], ids=["message-only", "code-reworded"])
def test_a_send_that_landed_unseen_is_already_recorded_by_code_or_by_text(
        billing: Billing, fake: FakeStripe, code: str | None) -> None:
    fake.duplicate_code = code
    customer = billing.customer()
    billing.record(billing.key(customer), customer, 6, ts=past_window_start(1))
    fake.inject("accept_then_drop")  # Stripe records the event, the answer is lost: the retry is a repeat

    summary = billing.flush()

    assert summary.ok, summary.errors
    assert (summary.reports_already_recorded, summary.reports_parked, summary.stripe_calls) == (1, 0, 2)
    billing.assert_exact()


# ---------------------------------------------------------------------- windows cut at period edges


@pytest.mark.parametrize("edge_kind", ["renewal", "cancellation"])
def test_usage_just_before_a_period_edge_is_invoiced_in_that_period(
        billing: Billing, fake: FakeStripe, edge_kind: str) -> None:
    # An edge in the middle of a reporting window that has ended, inside Stripe's finalization grace.
    edge = past_window_start(2) + 137
    customer = billing.customer()
    if edge_kind == "renewal":
        periods = subscribe_in_stripe(billing, customer, month_before(edge))
        assert periods[0][1] == edge and periods[1][0] == edge
    else:
        periods = subscribe_in_stripe(billing, customer, month_before(edge) - 86400, ended_at=edge)
        assert periods[-1][1] == edge
    key = billing.key(customer)
    before = billing.record(key, customer, 3, ts=edge - 20, seed=1)
    after = billing.record(key, customer, 4, ts=edge + 20, seed=2)

    summary = billing.flush()

    assert summary.ok, summary.errors
    reports = sorted(billing.reports(), key=lambda r: r.window_start)
    assert [(int(r.window_start.timestamp()), int(r.window_end.timestamp()), r.value) for r in reports] == [
        (edge - 137, edge, before), (edge, edge - 137 + WINDOW, after)]
    stamps = sorted((e.timestamp, e.value) for e in fake.meter_events)
    assert stamps == [(edge - 20, before), (edge + 20, after)]
    invoiced = {span: tokens.get(EVENT, 0) for span, (tokens, _) in fake.will_invoice(customer).items()}
    last_before = next(p for p in periods if p[1] == edge)
    assert invoiced[last_before] == before  # without the cut: 0, all of it stamped after the edge
    if edge_kind == "renewal":
        assert invoiced[periods[1]] == after
    else:  # after a cancellation nothing is invoiced (access ends there); the usage before it is
        assert [(e.value, why) for e, why in fake.uninvoiced(customer)] == [(after, "no_period")]
    billing.assert_exact()


def test_a_cancellation_learned_after_the_usage_was_stored_still_cuts_the_window(
        billing: Billing, fake: FakeStripe) -> None:
    edge = past_window_start(2) + 211
    customer = billing.customer()
    key = billing.key(customer)
    before = billing.record(key, customer, 3, ts=edge - 30, seed=3)
    after = billing.record(key, customer, 2, ts=edge + 10, seed=4)  # calls served before the webhook landed
    flusher = billing.flusher()
    try:  # stored into one open report for the whole window; nothing sealed yet
        assert flusher.run(now=dt.datetime.fromtimestamp(edge - WINDOW, dt.UTC)).reports_sealed == 0
    finally:
        flusher.close()
    [whole] = billing.reports()
    assert (whole.status, whole.value) == ("open", before + after)
    # The cancellation's webhook arrives now: the period ends at the edge, in the middle of that window.
    periods = subscribe_in_stripe(billing, customer, month_before(edge) - 86400, ended_at=edge)

    summary = billing.flush()

    assert summary.ok, summary.errors
    assert summary.reports_sealed == 2 and summary.reports_sent == 2
    reports = sorted(billing.reports(), key=lambda r: r.window_start)
    assert [(r.id == whole.id, int(r.window_start.timestamp()), int(r.window_end.timestamp()), r.value)
            for r in reports] == [(True, edge - 211, edge, before), (False, edge, edge - 211 + WINDOW, after)]
    invoiced = {span: t.get(EVENT, 0) for span, (t, _) in fake.will_invoice(customer).items()}
    assert invoiced[periods[-1]] == before  # without the cut: 0, the whole report stamped after the edge
    billing.assert_exact()


# ------------------------------------------------------------------------------- late usage carried forward


def test_usage_of_a_finalized_period_is_carried_into_the_current_invoice(
        billing: Billing, fake: FakeStripe) -> None:
    # The last period ended two hours ago; its invoice finalized after Stripe's grace (one hour).
    period_end = (int(time.time()) // WINDOW) * WINDOW - 2 * HOUR
    assert billing.settings.stripe_finalization_grace_seconds == fake.finalization_grace == HOUR
    late_ts = period_end - 30 * 60  # usage from before the end, sent only now (an outage, a backlog)
    carried, blind = billing.customer(), billing.customer()
    periods = subscribe_in_stripe(billing, carried, month_before(period_end))
    subscribe_in_stripe(billing, blind, month_before(period_end), known=False)  # aikit knows no periods: as before
    tokens = {c: billing.record(billing.key(c), c, 5, ts=late_ts, seed=n) for n, c in enumerate((carried, blind))}

    summary = billing.flush()

    assert summary.ok, summary.errors
    assert summary.reports_carried_forward == 1
    # Without knowing the periods the report keeps its timestamp: Stripe accepts it and never invoices it.
    assert [(e.value, why) for e, why in fake.uninvoiced(blind)] == [(tokens[blind], "late")]
    assert sum(t.get(EVENT, 0) for t, _ in fake.will_invoice(blind).values()) == 0
    # Carried forward: the current period's invoice holds it.
    assert fake.uninvoiced(carried) == []
    invoiced = {span: t.get(EVENT, 0) for span, (t, _) in fake.will_invoice(carried).items()}
    assert invoiced == {periods[0]: 0, periods[1]: tokens[carried]}
    [report] = [r for r in billing.reports() if r.customer_id == carried]
    assert int(report.carried_forward_from.timestamp()) == late_ts
    assert periods[1][0] <= report.carried_forward_to.timestamp() <= time.time()
    billing.assert_exact()

    gateway = StripeGateway(billing.settings)
    try:
        check = reconcile(billing.settings, gateway=gateway)
    finally:
        gateway.close()
    assert check.ok, (check.drift, check.errors)
    assert [(c["report_id"], c["value"]) for c in check.carried_forward] == [(report.id, tokens[carried])]


@pytest.mark.parametrize(("ended_ago", "carried"), [(30 * 60, False), (HOUR - 2 * 60, True)],
                         ids=["inside-grace", "inside-safety-margin"])
def test_usage_of_a_period_still_open_for_late_usage_stays_in_it_unless_too_close_to_finalizing(
        billing: Billing, fake: FakeStripe, ended_ago: int, carried: bool) -> None:
    period_end = int(time.time()) - ended_ago
    customer = billing.customer()
    periods = subscribe_in_stripe(billing, customer, month_before(period_end))
    tokens = billing.record(billing.key(customer), customer, 4, ts=period_end - 600)

    summary = billing.flush()

    assert summary.ok, summary.errors
    assert summary.reports_carried_forward == int(carried)
    invoiced = {span: t.get(EVENT, 0) for span, (t, _) in fake.will_invoice(customer).items()}
    # Within the grace the ended period's invoice still takes it; a few minutes before it finalizes
    # (CARRY_MARGIN_SECONDS) it goes to the next one rather than risk arriving after finalization.
    assert invoiced == ({periods[0]: 0, periods[1]: tokens} if carried else {periods[0]: tokens, periods[1]: 0})
    assert fake.uninvoiced(customer) == []
    billing.assert_exact()


# -------------------------------------------------------------------- requeue after identifier expiry


@pytest.mark.parametrize("landed", [True, False], ids=["first-send-landed", "nothing-landed"])
def test_requeue_after_stripe_forgot_the_identifier_never_bills_twice(
        billing: Billing, fake: FakeStripe, landed: bool) -> None:
    customer = billing.customer()
    billing.record(billing.key(customer), customer, 4, ts=past_window_start(1))
    if landed:
        fake.inject("accept_then_drop")  # recorded by Stripe, the answer lost ...
        fake.inject("500", count=3)  # ... and every retry of the run fails
    else:
        fake.inject("500", count=4)
    first = billing.flush()
    assert first.reports_left_pending == 1 and len(fake.meter_events) == int(landed)
    # A day later: Stripe has forgotten the identifier, and the report is parked instead of resent.
    fake.advance(25 * HOUR)
    with billing.engine.begin() as conn:
        conn.execute(update(MeterReport).values(first_attempt_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=24)))
    parked = billing.flush()
    assert parked.reports_parked == 1 and parked.stripe_calls == 0

    requeued = requeue_parked(billing.settings, customer_id=customer)

    [report] = billing.reports()
    if landed:  # Stripe's totals hold it: marked sent, not resent
        assert requeued == 0 and report.status == "sent"
    else:
        assert requeued == 1 and report.status == "pending"
    after = billing.flush()
    assert after.ok and after.stripe_calls == int(not landed)
    billing.assert_exact()  # a blind resend would have been accepted (identifier forgotten): billed twice
