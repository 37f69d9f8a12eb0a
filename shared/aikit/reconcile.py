"""`aikit reconcile [--since DATE]`: does Stripe hold exactly what Postgres says was billed?

Per customer and UTC day, from `since` (default: 35 days ago, as far back as Stripe takes meter events) to today:
- usage:    billable api_key_usage tokens (rows flushed while metering was on, with a customer);
- reported: meter_reports of any status (the outbox must hold every billable token exactly once);
- sent:     meter_reports marked sent;
- stripe:   Stripe's meter event summaries (`meter_event_summaries`, grouped by UTC day).
Drift, which makes `.ok` false: stripe != sent (double billing, events sent by something else, or events Stripe
refused after accepting them, such as an unknown customer that live Stripe reports asynchronously), and
usage != reported (a billable row outside the outbox). Usage not sent yet (open/pending reports) or parked
(refused for good, see aikit.flush) is listed under `unsent`, not as drift: it is known and alarmed on.
It also checks the usage_daily rollups against the api_key_usage rows (same key, day, model: requests and
token sums) over the range.

A report counts on the day of the timestamp its meter event carries (inside its window). Assumes the reporting
window divides a day (the default 300 s does); otherwise a window spanning midnight shows as drift between
two neighbouring days. Stripe's summaries lag a few minutes behind accepted events: run it for days that have
ended, or expect fresh drift on today's figures to clear on its own.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, func, select

from aikit.db.engine import get_engine
from aikit.db.models import ApiKeyUsage, MeterReport, UsageDaily, as_utc
from aikit.flush import event_timestamp
from aikit.settings import Settings
from aikit.stripe_gateway import BillingError, BillingGateway, gateway_from_settings

LOOKBACK_DAYS = 35  # Stripe refuses meter events older than this: nothing older can be there
DAY = 86400
ROLLUP_FIELDS = ("requests", "input_tokens", "output_tokens", "cached_tokens", "tokens")


@dataclass
class CustomerDay:
    customer_id: str
    day: dt.date
    usage: int = 0
    reported: int = 0
    sent: int = 0
    unsent: dict[str, int] = field(default_factory=dict)  # status -> tokens (open, pending, parked)
    stripe: int | None = None  # None: Stripe not checked


@dataclass
class ReconcileReport:
    since: dt.date
    until: dt.date
    stripe_checked: bool
    days: list[CustomerDay] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)
    rollup_drift: list[dict[str, Any]] = field(default_factory=list)
    # Reports sent into a later billing period because their own period's invoice had finalized (aikit.flush):
    # billed, but on a later invoice than the usage. Listed, not drift.
    carried_forward: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.drift or self.rollup_drift or self.errors)

    def unsent(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for day in self.days:
            for status, value in day.unsent.items():
                totals[status] += value
        return dict(totals)

    def customers(self) -> dict[str, dict[str, int | None]]:
        """Totals over the range per customer."""
        out: dict[str, dict[str, int | None]] = {}
        for day in self.days:
            entry = out.setdefault(day.customer_id, {"usage": 0, "sent": 0, "stripe": None})
            entry["usage"] = (entry["usage"] or 0) + day.usage
            entry["sent"] = (entry["sent"] or 0) + day.sent
            if day.stripe is not None:
                entry["stripe"] = (entry["stripe"] or 0) + day.stripe
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "stripe_checked": self.stripe_checked,
            "customer_days_checked": len(self.days),
            "drift": self.drift,
            "rollup_drift": self.rollup_drift,
            "carried_forward": self.carried_forward,
            "unsent": self.unsent(),
            "customers": self.customers(),
            "errors": self.errors,
        }


def reconcile(settings: Settings, *, since: dt.date | None = None, until: dt.date | None = None,
              gateway: BillingGateway | None = None, engine: Engine | None = None) -> ReconcileReport:
    today = dt.datetime.now(dt.UTC).date()
    until = until or today
    since = since or until - dt.timedelta(days=LOOKBACK_DAYS)
    own_gateway = gateway is None
    gateway = gateway if gateway is not None else gateway_from_settings(settings)
    engine = engine or get_engine(settings.database_url)
    report = ReconcileReport(since=since, until=until, stripe_checked=gateway is not None)
    try:
        days = _postgres_days(engine, since, until, report.carried_forward)
        if gateway is not None:
            _stripe_days(gateway, settings.stripe_meter_event_name, days, since, until, report)
        report.days = sorted(days.values(), key=lambda d: (d.customer_id, d.day))
        for d in report.days:
            if d.usage != d.reported:
                report.drift.append(_drift("usage_vs_reports", d, expected=d.usage, actual=d.reported))
            if d.stripe is not None and d.stripe != d.sent:
                report.drift.append(_drift("stripe_vs_sent", d, expected=d.sent, actual=d.stripe))
        report.rollup_drift = _rollup_drift(engine, since, until)
    except Exception as exc:  # a report, not a stack trace: the CLI prints it and exits 1
        report.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        if own_gateway and gateway is not None:
            gateway.close()
    return report


def _drift(check: str, d: CustomerDay, *, expected: int, actual: int) -> dict[str, Any]:
    return {"check": check, "customer_id": d.customer_id, "day": d.day.isoformat(), "expected": expected,
            "actual": actual, "difference": actual - expected}


def _bounds(since: dt.date, until: dt.date) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime.combine(since, dt.time(), dt.UTC)
    return start, dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), dt.UTC)


def _postgres_days(engine: Engine, since: dt.date, until: dt.date,
                   carried: list[dict[str, Any]]) -> dict[tuple[str, dt.date], CustomerDay]:
    days: dict[tuple[str, dt.date], CustomerDay] = {}

    def day_of(customer: str, day: dt.date) -> CustomerDay:
        found = days.get((customer, day))
        if found is None:
            found = days[(customer, day)] = CustomerDay(customer, day)
        return found

    start, end = _bounds(since, until)
    now = dt.datetime.now(dt.UTC)
    with engine.connect() as conn:
        usage = conn.execute(
            select(ApiKeyUsage.customer_id, ApiKeyUsage.date, func.sum(ApiKeyUsage.tokens))
            .where(ApiKeyUsage.billable.is_(True), ApiKeyUsage.customer_id.is_not(None),
                   ApiKeyUsage.date >= since, ApiKeyUsage.date <= until)
            .group_by(ApiKeyUsage.customer_id, ApiKeyUsage.date)
        )
        for customer, day, tokens in usage:
            day_of(str(customer), _as_date(day)).usage += int(tokens or 0)
        # A window may start up to a day before `since` and still carry a timestamp inside the range.
        reports = conn.execute(
            select(MeterReport.id, MeterReport.customer_id, MeterReport.status, MeterReport.value,
                   MeterReport.window_start, MeterReport.window_end, MeterReport.last_usage_ts, MeterReport.sent_at,
                   MeterReport.carried_forward_from, MeterReport.carried_forward_to)
            .where(MeterReport.window_start >= start - dt.timedelta(days=1), MeterReport.window_start < end)
        )
        for row in reports:
            value = int(row.value)
            # The usage's own day (the outbox check) and the day its meter event carries (what Stripe holds):
            # two different days only for a report carried forward into a later period.
            origin = row.carried_forward_from
            day = _day(as_utc(origin).timestamp() if origin is not None else event_timestamp(row, row.sent_at or now))
            sent_day = _day(event_timestamp(row, row.sent_at or now))
            if origin is not None and since <= sent_day <= until:
                carried.append({"report_id": row.id, "customer_id": row.customer_id, "value": value,
                                "status": row.status, "from": origin.isoformat(),
                                "to": row.carried_forward_to.isoformat()})
            if since <= day <= until:
                entry = day_of(row.customer_id, day)
                entry.reported += value
                if row.status != "sent":
                    entry.unsent[row.status] = entry.unsent.get(row.status, 0) + value
            if row.status == "sent" and since <= sent_day <= until:
                day_of(row.customer_id, sent_day).sent += value
    return days


def _stripe_days(gateway: BillingGateway, event_name: str, days: dict[tuple[str, dt.date], CustomerDay],
                 since: dt.date, until: dt.date, report: ReconcileReport) -> None:
    start, end = _bounds(since, until)
    for customer in sorted({c for c, _ in days}):
        try:
            summaries = gateway.meter_event_summaries(
                event_name=event_name, customer_id=customer, start_time=int(start.timestamp()),
                end_time=int(end.timestamp()))
        except BillingError as exc:
            if exc.code == "resource_missing" and exc.status in (400, 404) and "customer" in str(exc).lower():
                summaries = []  # Stripe has no such customer, so it holds nothing for it
            else:
                raise
        held = {dt.datetime.fromtimestamp(s, dt.UTC).date(): value for s, _, value in summaries}
        for day in {d for c, d in days if c == customer} | {d for d, v in held.items() if v}:
            if not since <= day <= until:
                continue
            entry = days.get((customer, day))
            if entry is None:
                entry = days[(customer, day)] = CustomerDay(customer, day)
            entry.stripe = held.get(day, 0)
    for entry in days.values():
        if entry.stripe is None:
            entry.stripe = 0


def _rollup_drift(engine: Engine, since: dt.date, until: dt.date) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        from_rows = {
            (kid, _as_date(day), model): tuple(int(v or 0) for v in sums)
            for kid, day, model, *sums in conn.execute(
                select(ApiKeyUsage.api_key_id, ApiKeyUsage.date, ApiKeyUsage.model, func.count(),
                       func.sum(ApiKeyUsage.input_tokens), func.sum(ApiKeyUsage.output_tokens),
                       func.sum(ApiKeyUsage.cached_tokens), func.sum(ApiKeyUsage.tokens))
                .where(ApiKeyUsage.date >= since, ApiKeyUsage.date <= until)
                .group_by(ApiKeyUsage.api_key_id, ApiKeyUsage.date, ApiKeyUsage.model)
            )
        }
        rollups = {
            (kid, _as_date(day), model): tuple(int(v or 0) for v in sums)
            for kid, day, model, *sums in conn.execute(
                select(UsageDaily.api_key_id, UsageDaily.date, UsageDaily.model, UsageDaily.requests,
                       UsageDaily.input_tokens, UsageDaily.output_tokens, UsageDaily.cached_tokens,
                       UsageDaily.tokens)
                .where(UsageDaily.date >= since, UsageDaily.date <= until)
            )
        }
    drift = []
    zero = (0,) * len(ROLLUP_FIELDS)
    for key in sorted(from_rows.keys() | rollups.keys()):
        rows, rolled = from_rows.get(key, zero), rollups.get(key, zero)
        if rows != rolled:
            kid, day, model = key
            drift.append({"api_key_id": kid, "date": day.isoformat(), "model": model,
                          "rows": dict(zip(ROLLUP_FIELDS, rows, strict=True)),
                          "rollup": dict(zip(ROLLUP_FIELDS, rolled, strict=True))})
    return drift


def _day(ts: float) -> dt.date:
    return dt.datetime.fromtimestamp(ts, dt.UTC).date()


def _as_date(value: Any) -> dt.date:
    return value if isinstance(value, dt.date) else dt.date.fromisoformat(str(value))
