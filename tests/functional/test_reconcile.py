"""`aikit reconcile`: Postgres (billable rows, sent reports, rollups) against FakeStripe's meter event summaries,
per customer and UTC day, through the real stripe SDK; a clean state, and injected drift of each kind."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
import stripe
from sqlalchemy import text

from aikit import cli
from aikit.reconcile import reconcile
from aikit.settings import get_settings
from tests.fakes.stripe_server import FakeStripe
from tests.support.billing import DAY, EVENT, Billing, past_window_start, settings_env


def day_of(ts: float) -> dt.date:
    return dt.datetime.fromtimestamp(ts, dt.UTC).date()


def billed_history(h: Billing) -> tuple[list[str], list[int]]:
    """Two customers with usage on three days (two and one day ago, and today), flushed and sent."""
    customers = [h.customer(), h.customer()]
    stamps = [past_window_start(2 * DAY // 300) + 7, past_window_start(DAY // 300) + 11, past_window_start() + 13]
    for n, customer in enumerate(customers):
        key = h.key(customer)
        for m, ts in enumerate(stamps):
            h.record(key, customer, 5 + m, ts=ts + n, seed=n + m)
    h.record(h.key(None), None, 4, ts=stamps[1])  # not billable: not part of the comparison
    summary = h.flush(seal_all=False)
    assert summary.ok and summary.reports_sent == 6
    h.assert_exact()
    return customers, stamps


def sdk(fake: FakeStripe) -> stripe.StripeClient:
    return stripe.StripeClient(fake.api_key, base_addresses=fake.base_addresses)  # type: ignore[arg-type]


def test_a_clean_state_reconciles(billing: Billing) -> None:
    customers, _ = billed_history(billing)

    report = reconcile(billing.settings)

    assert report.ok, report.as_dict()
    out = report.as_dict()
    assert out["stripe_checked"] and out["drift"] == [] and out["rollup_drift"] == []
    assert out["customers"] == {c: {"tokens": {"usage": billing.metered[c], "sent": billing.metered[c],
                                               "stripe": billing.metered[c]}} for c in customers}
    assert out["customer_days_checked"] == 6
    assert json.loads(json.dumps(out)) == out  # printable as it is


def test_usage_not_sent_yet_is_listed_not_drift(billing: Billing) -> None:
    customer = billing.customer()
    billing.record(billing.key(customer), customer, 6, ts=time.time())
    assert billing.flush(seal_all=False).reports_sent == 0  # the window is still open

    report = reconcile(billing.settings)

    assert report.ok, report.as_dict()
    assert report.as_dict()["unsent"] == {"open": billing.metered[customer]}


def test_an_event_sent_straight_to_stripe_is_drift(billing: Billing, fake: FakeStripe) -> None:
    customers, stamps = billed_history(billing)
    sdk(fake).v1.billing.meter_events.create(params={
        "event_name": EVENT, "payload": {"stripe_customer_id": customers[1], "value": "123"},
        "identifier": "manual-extra-1", "timestamp": int(stamps[1])})

    report = reconcile(billing.settings)

    assert not report.ok
    assert report.drift == [{"check": "stripe_vs_sent", "customer_id": customers[1],
                             "day": day_of(stamps[1]).isoformat(), "meter": "tokens",
                             "expected": report.drift[0]["expected"],
                             "actual": report.drift[0]["expected"] + 123, "difference": 123}]
    assert report.rollup_drift == []
    # Outside the range it is not looked at.
    assert reconcile(billing.settings, since=day_of(stamps[2])).ok


def test_an_event_stripe_took_but_does_not_count_is_drift(billing: Billing, fake: FakeStripe) -> None:
    # Live Stripe checks the customer asynchronously: the event is accepted, later refused, never billed.
    fake.validate_customers = False
    unknown = billing.customer(in_stripe=False)
    billing.record(billing.key(unknown), unknown, 5, ts=past_window_start() + 3)
    assert billing.flush(seal_all=False).reports_sent == 1
    billing.assert_exact()

    report = reconcile(billing.settings)

    assert not report.ok
    sent = billing.metered[unknown]
    assert [(d["check"], d["customer_id"], d["expected"], d["actual"]) for d in report.drift] == [
        ("stripe_vs_sent", unknown, sent, 0)]


def test_billable_usage_outside_the_outbox_is_drift(billing: Billing) -> None:
    customers, stamps = billed_history(billing)
    with billing.engine.begin() as conn:  # a row that no report carries (and its rollup, so only that shows)
        conn.execute(text(
            "INSERT INTO api_key_usage (request_id, api_key_id, customer_id, date, ts, model, input_tokens, "
            "output_tokens, cached_tokens, tokens, billable) SELECT 'req_stray', api_key_id, customer_id, date, ts, "
            "model, 1, 1, 0, 2, true FROM api_key_usage WHERE customer_id = :c ORDER BY ts DESC LIMIT 1"),
            {"c": customers[1]})
        conn.execute(text("UPDATE usage_daily SET requests = requests + 1, input_tokens = input_tokens + 1, "
                          "output_tokens = output_tokens + 1, tokens = tokens + 2 WHERE customer_id = :c "
                          "AND date = :d"), {"c": customers[1], "d": day_of(stamps[2])})

    report = reconcile(billing.settings)

    assert [(d["check"], d["customer_id"], d["difference"]) for d in report.drift] == [
        ("usage_vs_reports", customers[1], -2)]
    assert report.rollup_drift == [] and not report.ok


def test_rollups_that_disagree_with_the_rows_are_drift(billing: Billing) -> None:
    billed_history(billing)
    key = billing.keys[0].api_key_id
    with billing.engine.begin() as conn:
        day = conn.execute(text("SELECT min(date) FROM usage_daily WHERE api_key_id = :k"), {"k": key}).scalar_one()
        conn.execute(text("UPDATE usage_daily SET output_tokens = output_tokens + 3, tokens = tokens + 3 "
                          "WHERE api_key_id = :k AND date = :d"), {"k": key, "d": day})

    report = reconcile(billing.settings)

    assert not report.ok and report.drift == []
    [drift] = report.rollup_drift
    assert (drift["api_key_id"], drift["date"], drift["model"]) == (key, day.isoformat(), "echo-1")
    assert drift["rollup"]["tokens"] - drift["rows"]["tokens"] == 3
    assert drift["rollup"]["requests"] == drift["rows"]["requests"]
    assert reconcile(billing.settings, since=day + dt.timedelta(days=1)).ok


def test_parked_usage_of_a_customer_stripe_does_not_know_is_listed_not_drift(billing: Billing) -> None:
    billing.fake.rules["customer"] = "sync"  # refused at once (live Stripe may instead report it later)
    unknown = billing.customer(in_stripe=False)
    billing.record(billing.key(unknown), unknown, 5, ts=past_window_start() + 3, billable=False)
    assert billing.flush(seal_all=False).reports_parked == 1

    report = reconcile(billing.settings)

    assert report.ok, report.as_dict()
    assert report.as_dict()["unsent"] == {"parked": sum(billing.requests.values())}


def test_without_stripe_only_postgres_is_checked(billing: Billing) -> None:
    billed_history(billing)
    offline = billing.settings.model_copy(update={"stripe_secret_key": None})

    report = reconcile(offline)

    assert report.ok and not report.stripe_checked
    assert all(c["tokens"]["stripe"] is None for c in report.as_dict()["customers"].values())


def test_cli_reconcile_prints_the_report_and_exits_1_on_drift(
        billing: Billing, fake: FakeStripe, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    customers, stamps = billed_history(billing)
    for name, value in settings_env(billing.settings).items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        since = day_of(stamps[0]).isoformat()
        capsys.readouterr()
        assert cli.main(["reconcile", "--since", since]) == 0
        clean = json.loads(capsys.readouterr().out)
        assert clean["ok"] and clean["since"] == since

        sdk(fake).v1.billing.meter_events.create(params={
            "event_name": EVENT, "payload": {"stripe_customer_id": customers[0], "value": "9"},
            "identifier": "manual-extra-2", "timestamp": int(stamps[0])})
        assert cli.main(["reconcile", "--since", since]) == 1
        drifted = json.loads(capsys.readouterr().out)
        assert not drifted["ok"]
        assert [(d["customer_id"], d["difference"]) for d in drifted["drift"]] == [(customers[0], 9)]
    finally:
        get_settings.cache_clear()
