"""`aikit reconcile [--since DATE]`: does Stripe hold exactly what Postgres says was billed?

Per customer, UTC day and meter, from `since` (default: 35 days ago, as far back as Stripe takes meter events) to
today. The meter is "tokens" (STRIPE_METER_EVENT_NAME, values in tokens) or, with a price table, "cost"
(STRIPE_COST_EVENT_NAME, values in 1e-12 currency units; each figure is also shown as money, and the day's
billable tokens beside it):
- usage:    billable api_key_usage tokens, or their cost for the cost meter (rows flushed while metering was on,
            with a customer), for the meter usage is billed on now (`report_meter`);
- reported: meter_reports of any status (the outbox must hold every billable token exactly once);
- sent:     meter_reports marked sent;
- stripe:   Stripe's meter event summaries (`meter_event_summaries`, grouped by UTC day).
Drift, which makes `.ok` false: stripe != sent (double billing, events sent by something else, or events Stripe
refused after accepting them, such as an unknown customer that live Stripe reports asynchronously), and
usage != reported (a billable row outside the outbox). Usage not sent yet (open/pending reports) or parked
(refused for good, see aikit.outbox) is listed under `unsent`, not as drift: it is known and alarmed on.
It also checks the usage_daily rollups against the api_key_usage rows (same key, day, model: requests and
token sums) over the range.

A report counts on the day of the timestamp its meter event carries (inside its window). Assumes the reporting
window divides a day (the default 300 s does); otherwise a window spanning midnight shows as drift between
two neighbouring days. Stripe's summaries lag a few minutes behind accepted events: run it for days that have
ended, or expect fresh drift on today's figures to clear on its own. After switching the price table on or off,
the days before the switch were billed on the other meter: reconcile them from the matching settings.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, func, select

from aikit.db.engine import get_engine
from aikit.db.models import ApiKeyUsage, MeterReport, UsageDaily, as_utc
from aikit.errors import BillingError
from aikit.metering.sql_sink import METER_COST, METER_TOKENS, report_meter
from aikit.outbox import ReportState, event_timestamp
from aikit.pricing import format_money
from aikit.settings import Settings
from aikit.stripe_gateway import BillingGateway, gateway_from_settings

_LOOKBACK_DAYS = 35  # Stripe refuses meter events older than this: nothing older can be there
DAY = 86400
_ROLLUP_FIELDS = ("requests", "input_tokens", "output_tokens", "cached_tokens", "tokens")


@dataclass
class _CustomerDay:
    customer_id: str
    day: dt.date
    meter: str = METER_TOKENS
    usage: int = 0
    reported: int = 0
    sent: int = 0
    unsent: dict[str, int] = field(default_factory=dict)  # status -> tokens (open, pending, parked)
    stripe: int | None = None  # None: Stripe not checked
    tokens: int = 0  # billable tokens of the day (the usage of the token meter; shown beside money)

    def money(self, value: int | None) -> str | None:
        return None if value is None or self.meter != METER_COST else format_money(value)


@dataclass
class _ReconcileReport:
    since: dt.date
    until: dt.date
    stripe_checked: bool
    days: list[_CustomerDay] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)
    rollup_drift: list[dict[str, Any]] = field(default_factory=list)
    # Reports sent into a later billing period because their own period's invoice had finalized (aikit.send):
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

    def customers(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Totals over the range per customer and meter; the cost meter's also as money, with its tokens."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for day in self.days:
            entry = out.setdefault(day.customer_id, {}).setdefault(day.meter, {"usage": 0, "sent": 0, "stripe": None})
            entry["usage"] += day.usage
            entry["sent"] += day.sent
            if day.stripe is not None:
                entry["stripe"] = (entry["stripe"] or 0) + day.stripe
            if day.meter == METER_COST:
                entry["tokens"] = entry.get("tokens", 0) + day.tokens
        for meters in out.values():
            cost = meters.get(METER_COST)
            if cost is not None:
                for name in ("usage", "sent", "stripe"):
                    cost[f"{name}_money"] = None if cost[name] is None else format_money(cost[name])
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
              gateway: BillingGateway | None = None, engine: Engine | None = None) -> _ReconcileReport:
    today = dt.datetime.now(dt.UTC).date()
    until = until or today
    since = since or until - dt.timedelta(days=_LOOKBACK_DAYS)
    own_gateway = gateway is None
    gateway = gateway if gateway is not None else gateway_from_settings(settings)
    engine = engine or get_engine(settings.database_url)
    report = _ReconcileReport(since=since, until=until, stripe_checked=gateway is not None)
    event_names = {METER_TOKENS: settings.stripe_meter_event_name, METER_COST: settings.stripe_cost_event_name}
    try:
        days = _postgres_days(engine, since, until, report_meter(settings), report.carried_forward)
        if gateway is not None:
            for meter in sorted({m for _, _, m in days} | {report_meter(settings)}):
                _stripe_days(gateway, meter, event_names[meter], days, since, until)
        report.days = sorted(days.values(), key=lambda d: (d.customer_id, d.day, d.meter))
        for d in report.days:
            if d.usage != d.reported:
                report.drift.append(_drift("usage_vs_reports", d, expected=d.usage, actual=d.reported))
            if d.stripe is not None and not _held_equal(d.meter, d.stripe, d.sent):
                report.drift.append(_drift("stripe_vs_sent", d, expected=d.sent, actual=d.stripe))
        report.rollup_drift = _rollup_drift(engine, since, until)
    except Exception as exc:  # a report, not a stack trace: the CLI prints it and exits 1
        report.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        if own_gateway and gateway is not None:
            gateway.close()
    return report


def _held_equal(meter: str, stripe: int, sent: int) -> bool:
    """Stripe aggregates meter values in double precision: above 2**53 (about $9,007 a day in the cost meter's
    1e-12 USD) its sum can be off by its rounding, a relative 2**-52 (under a millionth of a cent at $1M).
    Anything larger is drift; tokens compare exactly."""
    if meter != METER_COST:
        return stripe == sent
    return abs(stripe - sent) <= max(sent, stripe) // 2**50


def _drift(check: str, d: _CustomerDay, *, expected: int, actual: int) -> dict[str, Any]:
    found = {"check": check, "customer_id": d.customer_id, "day": d.day.isoformat(), "meter": d.meter,
             "expected": expected, "actual": actual, "difference": actual - expected}
    if d.meter == METER_COST:
        found.update(expected_money=d.money(expected), actual_money=d.money(actual),
                     difference_money=d.money(actual - expected), tokens=d.tokens)
    return found


def _bounds(since: dt.date, until: dt.date) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime.combine(since, dt.time(), dt.UTC)
    return start, dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), dt.UTC)


_Days = dict[tuple[str, dt.date, str], _CustomerDay]


def _postgres_days(engine: Engine, since: dt.date, until: dt.date, billed_on: str,
                   carried: list[dict[str, Any]]) -> _Days:
    """`billed_on`: the meter billable rows are reported on now; their usage is counted for it. Reports carried
    forward into a later period are added to `carried`."""
    days: _Days = {}

    def day_of(customer: str, day: dt.date, meter: str) -> _CustomerDay:
        found = days.get((customer, day, meter))
        if found is None:
            found = days[(customer, day, meter)] = _CustomerDay(customer, day, meter)
        return found

    start, end = _bounds(since, until)
    now = dt.datetime.now(dt.UTC)
    with engine.connect() as conn:
        usage = conn.execute(
            select(ApiKeyUsage.customer_id, ApiKeyUsage.date, func.sum(ApiKeyUsage.tokens),
                   func.sum(ApiKeyUsage.cost))
            .where(ApiKeyUsage.billable.is_(True), ApiKeyUsage.customer_id.is_not(None),
                   ApiKeyUsage.date >= since, ApiKeyUsage.date <= until)
            .group_by(ApiKeyUsage.customer_id, ApiKeyUsage.date)
        )
        for customer, day, tokens, cost in usage:
            entry = day_of(str(customer), _as_date(day), billed_on)
            entry.tokens += int(tokens or 0)
            entry.usage += int((cost if billed_on == METER_COST else tokens) or 0)
        # A window may start up to a day before `since` and still carry a timestamp inside the range.
        reports = conn.execute(
            select(MeterReport.id, MeterReport.customer_id, MeterReport.status, MeterReport.value,
                   MeterReport.window_start, MeterReport.window_end, MeterReport.last_usage_ts, MeterReport.sent_at,
                   MeterReport.carried_forward_from, MeterReport.carried_forward_to, MeterReport.meter)
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
                carried.append({"report_id": row.id, "customer_id": row.customer_id, "meter": row.meter, "value": value,
                                "status": row.status, "from": origin.isoformat(),
                                "to": row.carried_forward_to.isoformat()})
            if since <= day <= until:
                entry = day_of(row.customer_id, day, row.meter)
                entry.reported += value
                if row.status != ReportState.SENT:
                    entry.unsent[row.status] = entry.unsent.get(row.status, 0) + value
            if row.status == ReportState.SENT and since <= sent_day <= until:
                day_of(row.customer_id, sent_day, row.meter).sent += value
    return days


def _stripe_days(gateway: BillingGateway, meter: str, event_name: str, days: _Days, since: dt.date,
                 until: dt.date) -> None:
    start, end = _bounds(since, until)
    for customer in sorted({c for c, _, _ in days}):
        try:
            summaries = gateway.meter_event_summaries(
                event_name=event_name, customer_id=customer, start_time=int(start.timestamp()),
                end_time=int(end.timestamp()))
        except BillingError as exc:
            missing = exc.stripe_code == "resource_missing" and exc.stripe_status in (400, 404)
            if missing and "customer" in str(exc).lower():
                summaries = []  # Stripe has no such customer, so it holds nothing for it
            else:
                raise
        held = {dt.datetime.fromtimestamp(s, dt.UTC).date(): value for s, _, value in summaries}
        for day in {d for c, d, m in days if c == customer and m == meter} | {d for d, v in held.items() if v}:
            if not since <= day <= until:
                continue
            entry = days.get((customer, day, meter))
            if entry is None:
                entry = days[(customer, day, meter)] = _CustomerDay(customer, day, meter)
            entry.stripe = held.get(day, 0)
    for entry in days.values():
        if entry.stripe is None and entry.meter == meter:
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
    zero = (0,) * len(_ROLLUP_FIELDS)
    for key in sorted(from_rows.keys() | rollups.keys()):
        rows, rolled = from_rows.get(key, zero), rollups.get(key, zero)
        if rows != rolled:
            kid, day, model = key
            drift.append({"api_key_id": kid, "date": day.isoformat(), "model": model,
                          "rows": dict(zip(_ROLLUP_FIELDS, rows, strict=True)),
                          "rollup": dict(zip(_ROLLUP_FIELDS, rolled, strict=True))})
    return drift


def _day(ts: float) -> dt.date:
    return dt.datetime.fromtimestamp(ts, dt.UTC).date()


def _as_date(value: Any) -> dt.date:
    return value if isinstance(value, dt.date) else dt.date.fromisoformat(str(value))
