"""The Stripe outbox (meter_reports): a report's states and the rules that move it between them.

A report is one customer's usage in one reporting window on one meter. Its `id` is the Stripe identifier, fixed
when the store opens it (aikit.metering.sql_sink), so every send, in any run, is the same event.

- open -> pending: `seal` fixes the value of every report whose window has ended, under REPORT_LOCK (the store
  adds to open reports under the same lock, so a sealed report never grows). A report whose window holds one of
  its customer's billing-period edges learned after the usage was stored is cut there (`_cut_at_period_edges`),
  and one above Stripe's largest value is split (`_split_oversized_reports`): every part's identifier is fixed
  before any of them is sent.
- pending -> sent | parked (or stays pending for a retry): `mark`; never backwards (a concurrent flush may have
  finished it already).
- The event timestamp (`event_timestamp`) lies inside the usage's window and never in the future. A report whose
  own period's invoice has finalized is carried forward into the current period (`stamp_carried_forward`),
  recorded before the send so every retry stamps the same.
- Stripe keeps identifiers for "at least 24 hours": a report first tried IDENTIFIER_SAFE_HOURS ago and still
  unconfirmed is parked instead of resent (`unsafe_to_resend`); `requeue_parked` settles such reports against
  Stripe's totals before putting any back (`settle_unconfirmed`).
- sent (or pending, parked) -> rejected: Stripe reported it invalid after accepting it (aikit.meter_errors);
  `requeue_parked` puts rejected reports back too.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, and_, func, insert, or_, select, update

from aikit.db.engine import get_engine
from aikit.db.models import ApiKeyUsage, BillingPeriod, MeterReport, ReportState, as_utc
from aikit.metering.sql_sink import METER_COST, lock_reports, new_report_id
from aikit.observability import logger
from aikit.periods import Period, carry_forward, cut_window, period_edges, periods_for
from aikit.settings import Settings

if TYPE_CHECKING:  # the Stripe SDK loads only when Stripe is called (aikit.meter_errors imports this module)
    from aikit.stripe_gateway import BillingGateway

__all__ = [
    "CARRY_MARGIN_SECONDS", "IDENTIFIER_SAFE_HOURS", "UNCONFIRMED_PREFIX", "UNCONFIRMED_REASON", "ReportState",
    "carry_forward_to", "customer_periods", "event_timestamp", "mark", "pending_by_customer", "requeue_parked",
    "seal", "settle_unconfirmed", "stamp_carried_forward", "unsafe_to_resend",
]

# Stripe remembers identifiers for at least 24 hours; a report first tried longer ago than this is not resent.
IDENTIFIER_SAFE_HOURS = 23
UNCONFIRMED_PREFIX = "unconfirmed for over"  # last_error of a report parked past Stripe's identifier memory
UNCONFIRMED_REASON = (f"{UNCONFIRMED_PREFIX} {IDENTIFIER_SAFE_HOURS} h, past Stripe's identifier memory: "
                      "check `aikit reconcile`, then `aikit requeue-parked` if Stripe does not have it")
# Carry a report forward this long before its period's invoice finalizes: one arriving a little early on the next
# invoice is still billed, one arriving just after finalization (clock skew, a slow send) never is.
CARRY_MARGIN_SECONDS = 300
# Stripe refuses meter event values of more than 15 significant digits (API 2026-04-22.dahlia: it aggregates in
# double precision). Cost-meter reports are in 1e-12 USD, so a customer's window above $999.99 is one.
_MAX_EVENT_VALUE = 10**15 - 1


# -- pure rules ---------------------------------------------------------------------------------------------


def event_timestamp(row: Any, now: dt.datetime) -> int:
    """Inside the usage's own window (so it lands in the right invoice), never in the future; a report carried
    forward (its period's invoice had finalized) keeps the timestamp chosen for it in a later period."""
    carried = getattr(row, "carried_forward_to", None)
    if carried is not None:
        return int(as_utc(carried).timestamp())
    last = as_utc(row.last_usage_ts).timestamp()
    start = as_utc(row.window_start).timestamp()
    end = as_utc(row.window_end).timestamp() - 1
    return int(min(max(last, start), end, now.timestamp()))


def unsafe_to_resend(row: Any, now: dt.datetime) -> bool:
    """First tried IDENTIFIER_SAFE_HOURS ago or more: Stripe may have forgotten the identifier of a first send
    that landed unseen, so a resend could bill twice."""
    first = row.first_attempt_at
    return first is not None and now - as_utc(first) >= dt.timedelta(hours=IDENTIFIER_SAFE_HOURS)


def carry_forward_to(row: Any, periods: list[Period], now: dt.datetime,
                     finalization_grace_seconds: int) -> dt.datetime | None:
    """Where a report must be stamped instead of its own timestamp, or None to keep it: into the current period
    when its own period's invoice finalizes within CARRY_MARGIN_SECONDS (or already has)."""
    if not periods:
        return None
    grace = max(0, finalization_grace_seconds - CARRY_MARGIN_SECONDS)
    return carry_forward(_stamped(row, now), periods, now, grace)


def _stamped(row: Any, now: dt.datetime) -> dt.datetime:
    return dt.datetime.fromtimestamp(event_timestamp(row, now), dt.UTC)


# -- open -> pending ----------------------------------------------------------------------------------------


def seal(engine: Engine, now: dt.datetime) -> int:
    """Fix the value of every report whose window has ended (its identifier was fixed at creation); cut and
    split in the same transaction. Returns how many reports were sealed, parts included."""
    with engine.begin() as conn:
        lock_reports(conn)  # the store adds to open reports under the same lock
        sealed = list(conn.execute(
            update(MeterReport)
            .where(MeterReport.status == ReportState.OPEN, MeterReport.window_end <= now)
            .values(status=ReportState.PENDING)
            .returning(MeterReport.id, MeterReport.customer_id, MeterReport.window_start,
                       MeterReport.window_end, MeterReport.value)
        ))
        count = len(sealed)
        for report in _straddling(conn, [r.id for r in sealed]):
            count += _cut_at_period_edges(conn, report)
        return count + _split_oversized_reports(conn)


def _straddling(conn: Connection, report_ids: list[str]) -> list[Any]:
    """Those of the reports whose window has one of its customer's period edges strictly inside (one query)."""
    if not report_ids:
        return []
    r, p = MeterReport, BillingPeriod
    inside = or_(and_(p.period_start > r.window_start, p.period_start < r.window_end),
                 and_(p.period_end > r.window_start, p.period_end < r.window_end))
    edge = select(p.subscription_id).where(p.customer_id == r.customer_id, inside).exists()
    found: list[Any] = []
    for i in range(0, len(report_ids), 1000):  # bounded bind parameters (drivers and SQLite cap them)
        found += conn.execute(select(r.id, r.customer_id, r.window_start, r.window_end, r.value, r.meter)
                              .where(r.id.in_(report_ids[i:i + 1000]), edge))
    return found


def _cut_at_period_edges(conn: Connection, report: Any) -> int:
    """Split a report just sealed (never sent) at the customer's period edges inside its window, learned after
    its usage was stored (a cancellation's webhook arriving after the last calls): each part gets its own
    report, identifier and stamp, so usage before the edge is invoiced in its period. Only a report that is
    the only one of its customer in the window and equals its rows exactly; returns how many reports it added."""
    start, end = as_utc(report.window_start), as_utc(report.window_end)
    edges = period_edges(conn, report.customer_id, start, end)
    if not edges:
        return 0
    overlapping = conn.execute(select(func.count()).select_from(MeterReport).where(
        MeterReport.customer_id == report.customer_id, MeterReport.id != report.id, MeterReport.meter == report.meter,
        MeterReport.window_start < end, MeterReport.window_end > start)).scalar_one()
    # The report's unit: tokens, or their cost for the cost meter (aikit.pricing).
    amount = ApiKeyUsage.cost if report.meter == METER_COST else ApiKeyUsage.tokens
    usage = conn.execute(select(ApiKeyUsage.ts, amount).where(
        ApiKeyUsage.customer_id == report.customer_id, ApiKeyUsage.billable.is_(True),
        ApiKeyUsage.ts >= start, ApiKeyUsage.ts < end)).all()
    if overlapping or sum(int(t) for _, t in usage) != int(report.value):
        return 0  # rows and reports do not map one to one here: leave it whole
    parts: dict[tuple[dt.datetime, dt.datetime], list[Any]] = defaultdict(lambda: [0, None])
    for ts, tokens in usage:
        part = parts[cut_window(start, end, as_utc(ts), edges)]
        part[0] += int(tokens)
        part[1] = max(part[1] or as_utc(ts), as_utc(ts))
    if len(parts) < 2:
        return 0
    (first, (value, last)), *rest = sorted(parts.items())
    conn.execute(update(MeterReport).where(MeterReport.id == report.id).values(
        window_start=first[0], window_end=first[1], value=value, last_usage_ts=last))
    for (lo, hi), (value, last) in rest:
        conn.execute(insert(MeterReport).values(
            id=new_report_id(), customer_id=report.customer_id, window_start=lo, window_end=hi, value=value,
            last_usage_ts=last, status=ReportState.PENDING, attempts=0, created_at=dt.datetime.now(dt.UTC),
            meter=report.meter))
    return len(rest)


def _split_oversized_reports(conn: Any) -> int:
    """Split every sealed, never-tried report above _MAX_EVENT_VALUE into reports of at most that value, in the
    sealing transaction (under REPORT_LOCK): the parts' identifiers (`<id>-<n>`) are fixed before any of them
    is sent, and they sum to the sealed value. Returns how many reports were added."""
    oversized = list(conn.execute(
        select(MeterReport.id, MeterReport.customer_id, MeterReport.window_start, MeterReport.window_end,
               MeterReport.value, MeterReport.last_usage_ts, MeterReport.meter)
        .where(MeterReport.status == ReportState.PENDING, MeterReport.value > _MAX_EVENT_VALUE,
               MeterReport.first_attempt_at.is_(None))))
    added = 0
    for row in oversized:
        rest = int(row.value) - _MAX_EVENT_VALUE
        conn.execute(update(MeterReport).where(MeterReport.id == row.id).values(value=_MAX_EVENT_VALUE))
        part = 0
        while rest > 0:
            part += 1
            value = min(rest, _MAX_EVENT_VALUE)
            conn.execute(insert(MeterReport).values(
                id=f"{row.id}-{part}", customer_id=row.customer_id, window_start=row.window_start,
                window_end=row.window_end, value=value, last_usage_ts=row.last_usage_ts,
                status=ReportState.PENDING, attempts=0, created_at=dt.datetime.now(dt.UTC), meter=row.meter))
            rest -= value
            added += 1
    return added


# -- pending -> sent | parked -------------------------------------------------------------------------------


def pending_by_customer(engine: Engine) -> dict[str, list[SimpleNamespace]]:
    """Every pending report, per customer, in the order they must go out (window, then id). The rows are
    mutable: `stamp_carried_forward` moves one before it is sent."""
    with engine.connect() as conn:
        pending = list(conn.execute(
            select(MeterReport.id, MeterReport.customer_id, MeterReport.value, MeterReport.window_start,
                   MeterReport.window_end, MeterReport.last_usage_ts, MeterReport.first_attempt_at,
                   MeterReport.carried_forward_from, MeterReport.carried_forward_to, MeterReport.meter)
            .where(MeterReport.status == ReportState.PENDING)
            .order_by(MeterReport.customer_id, MeterReport.window_start, MeterReport.id)
        ))
    by_customer: dict[str, list[SimpleNamespace]] = defaultdict(list)
    for row in pending:
        by_customer[row.customer_id].append(SimpleNamespace(**row._asdict()))
    return by_customer


def customer_periods(engine: Engine, rows: list[Any]) -> list[Period]:
    """The billing periods known for the customer of `rows`, from the earliest of their windows on."""
    start = min(as_utc(r.window_start) for r in rows)
    with engine.connect() as conn:
        return periods_for(conn, rows[0].customer_id, start, dt.datetime.max.replace(tzinfo=dt.UTC))


def stamp_carried_forward(engine: Engine, row: SimpleNamespace, periods: list[Period],
                          finalization_grace_seconds: int) -> None:
    """The row to send: moved into the current billing period when its own period's invoice finalized
    (STRIPE_FINALIZATION_GRACE_SECONDS past its end), recorded before the send so retries stamp the same."""
    now = dt.datetime.now(dt.UTC)
    to = carry_forward_to(row, periods, now, finalization_grace_seconds)
    if to is None:
        return
    origin = row.carried_forward_from or _stamped(row, now)
    with engine.begin() as conn:
        conn.execute(update(MeterReport).where(MeterReport.id == row.id, MeterReport.status == ReportState.PENDING)
                     .values(carried_forward_from=origin, carried_forward_to=to))
    logger.warning("meter_report_carried_forward", extra={
        "report_id": row.id, "customer_id": row.customer_id, "value": int(row.value),
        "from": as_utc(origin).isoformat(), "to": to.isoformat()})
    row.carried_forward_from, row.carried_forward_to = origin, to


def mark(engine: Engine, report_id: str, *, state: ReportState | None = None, attempts: int = 0,
         error: str | None = None, sent: bool = False) -> None:
    """Record what a send did to a pending report. attempts: Stripe calls made for it in this run
    (MeterReport.attempts counts them all); the first one starts the identifier-memory clock."""
    values: dict[str, Any] = {}
    if state is not None:
        values["status"] = state
    if attempts:
        values["attempts"] = MeterReport.attempts + attempts
        values["first_attempt_at"] = func.coalesce(MeterReport.first_attempt_at, dt.datetime.now(dt.UTC))
    if error is not None:
        values["last_error"] = error[:2000]
    if sent:
        values["sent_at"] = dt.datetime.now(dt.UTC)
    if not values:
        return
    with engine.begin() as conn:
        # Never move a report backwards (a concurrent flush may have finished it already).
        conn.execute(update(MeterReport).where(MeterReport.id == report_id,
                                               MeterReport.status == ReportState.PENDING).values(**values))


# -- parked -> pending --------------------------------------------------------------------------------------


def requeue_parked(settings: Settings, *, customer_id: str | None = None,
                   report_ids: list[str] | None = None, gateway: BillingGateway | None = None) -> int:
    """Put parked reports back in the queue after the cause was fixed (customer created, meter reactivated).
    They keep their identifiers, so one that Stripe did record after all is still counted once. Returns
    how many were requeued; the next flush sends them.

    Reports parked past Stripe's identifier memory are the exception: Stripe may have recorded their first
    send and forgotten the identifier since, so a resend could bill twice. They are checked first against
    Stripe's totals (see `settle_unconfirmed`): held -> marked sent, not held -> requeued, unclear -> left
    parked (logged)."""
    engine = get_engine(settings.database_url)
    keep = settle_unconfirmed(settings, engine, customer_id=customer_id, report_ids=report_ids, gateway=gateway)
    # rejected: by Stripe, after it had accepted the report (aikit.meter_errors)
    stmt = update(MeterReport).where(MeterReport.status.in_((ReportState.PARKED, ReportState.REJECTED)))
    if customer_id is not None:
        stmt = stmt.where(MeterReport.customer_id == customer_id)
    if report_ids is not None:
        stmt = stmt.where(MeterReport.id.in_(report_ids))
    if keep:
        stmt = stmt.where(MeterReport.id.not_in(keep))
    with engine.begin() as conn:
        # A fresh first attempt: Stripe does not hold it (checked above, or the refusal said so).
        return conn.execute(stmt.values(status=ReportState.PENDING, first_attempt_at=None)).rowcount or 0


def settle_unconfirmed(settings: Settings, engine: Engine, *, customer_id: str | None = None,
                       report_ids: list[str] | None = None, gateway: BillingGateway | None = None) -> set[str]:
    """Decide, from Stripe's own totals, the reports parked past Stripe's identifier memory; returns the ids
    that must stay parked (marked sent because Stripe holds them, or unclear).

    Per customer and day (of the timestamp they carry): Stripe's total minus what aikit sent (`aikit
    reconcile`'s stripe_vs_sent) is what Stripe holds beyond the sent reports. 0: Stripe holds none of them,
    resend. Exactly their sum: it holds all of them, mark them sent. Anything else: left for a human."""
    stmt = select(MeterReport.id, MeterReport.customer_id, MeterReport.value, MeterReport.window_start,
                  MeterReport.window_end, MeterReport.last_usage_ts, MeterReport.carried_forward_to,
                  MeterReport.meter).where(
        MeterReport.status == ReportState.PARKED, MeterReport.last_error.startswith(UNCONFIRMED_PREFIX))
    if customer_id is not None:
        stmt = stmt.where(MeterReport.customer_id == customer_id)
    if report_ids is not None:
        stmt = stmt.where(MeterReport.id.in_(report_ids))
    with engine.connect() as conn:
        rows = list(conn.execute(stmt))
    if not rows:
        return set()
    own = gateway is None
    if gateway is None:
        from aikit.stripe_gateway import gateway_from_settings  # the Stripe SDK: only when there is one to ask

        gateway = gateway_from_settings(settings)
    if gateway is None:
        return set()  # no Stripe to ask, and none to send to either
    try:
        return _settle(settings, engine, gateway, rows)
    finally:
        if own:
            gateway.close()


def _settle(settings: Settings, engine: Engine, gateway: BillingGateway, rows: list[Any]) -> set[str]:
    from aikit.reconcile import reconcile  # reconcile imports this module

    groups: dict[tuple[str, dt.date, str], list[Any]] = defaultdict(list)  # per customer, day and meter
    now = dt.datetime.now(dt.UTC)
    for row in rows:
        day_of = dt.datetime.fromtimestamp(event_timestamp(row, now), dt.UTC).date()
        groups[(row.customer_id, day_of, row.meter)].append(row)
    keep: set[str] = set()
    for (customer, day, meter), group in groups.items():
        check = reconcile(settings, since=day, until=day, gateway=gateway, engine=engine)
        held = next((d.stripe - d.sent for d in check.days
                     if d.customer_id == customer and d.day == day and d.meter == meter and d.stripe is not None),
                    None)
        ids = [r.id for r in group]
        if held == 0 and not check.errors:
            continue  # Stripe holds none of them: resend
        keep.update(ids)
        if held == sum(int(r.value) for r in group) and not check.errors:
            with engine.begin() as conn:
                conn.execute(update(MeterReport)
                             .where(MeterReport.id.in_(ids), MeterReport.status == ReportState.PARKED)
                             .values(status=ReportState.SENT, sent_at=now,
                                     last_error="Stripe holds it (checked at requeue against its totals)"))
            logger.warning("meter_reports_confirmed_at_requeue", extra={"customer_id": customer,
                                                                         "day": day.isoformat(), "report_ids": ids})
        else:
            logger.error("meter_reports_left_parked", extra={
                "customer_id": customer, "day": day.isoformat(), "report_ids": ids, "stripe_beyond_sent": held,
                "errors": check.errors, "reason": "Stripe's totals do not tell whether it holds them"})
    return keep
