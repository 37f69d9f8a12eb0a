"""Each customer's Stripe billing periods, learned from webhooks, for cutting and stamping usage reports.

Stripe invoices metered usage per subscription billing period, and takes late usage into a period only until
its invoice finalizes (STRIPE_FINALIZATION_GRACE_SECONDS after the period ends, 1 h by default). So the flush
must know where each customer's periods begin and end. They come from:

* subscription events: since API 2025-03-31.basil on `items.data[].current_period_start/end`, before that on
  the subscription itself; an ended subscription's last period ends at `ended_at`;
* invoice events: `lines.data[].period` of the subscription's own (non-proration) lines; a renewal invoice
  bills metered usage in arrears, so its line period is the period just ended.

One row per (subscription, period start). Webhooks arrive in any order: a row's end is only replaced by an
event at least as new as the one that set it. When periods of a customer overlap (a billing cycle reset
mid-period, a plan change) the one that begins later cuts the earlier one short: usage is never in two.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import NamedTuple

from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from aikit.db.models import BillingPeriod, as_utc

SOURCE_SUBSCRIPTION = "subscription"
SOURCE_INVOICE = "invoice"


class Period(NamedTuple):
    start: dt.datetime
    end: dt.datetime

    def contains(self, ts: dt.datetime) -> bool:
        return self.start <= ts < self.end


def record_period(
    session: Session, *, customer_id: str, subscription_id: str, start: int, end: int, source: str,
    event_created: int,
) -> bool:
    """Store [start, end) of one subscription's period (Unix seconds); True when it is new or its end moved.

    Runs inside the webhook's transaction. A period whose end is not after its start is ignored."""
    if end <= start:
        return False
    before = session.execute(
        select(BillingPeriod.period_end).where(BillingPeriod.subscription_id == subscription_id,
                                               BillingPeriod.period_start == _ts(start))
    ).scalar_one_or_none()
    values = {
        "subscription_id": subscription_id,
        "period_start": _ts(start),
        "period_end": _ts(end),
        "customer_id": customer_id,
        "source": source,
        "event_created": event_created,
        "updated_at": dt.datetime.now(dt.UTC),
    }
    newer = BillingPeriod.event_created <= event_created
    changed = {k: values[k] for k in ("period_end", "customer_id", "source", "event_created", "updated_at")}
    stmt: postgresql.Insert | sqlite.Insert
    if session.get_bind().dialect.name == "postgresql":
        stmt = postgresql.insert(BillingPeriod).values(**values)
        stmt = stmt.on_conflict_do_update(index_elements=["subscription_id", "period_start"], set_=changed,
                                          where=newer)
    else:
        stmt = sqlite.insert(BillingPeriod).values(**values)
        stmt = stmt.on_conflict_do_update(index_elements=["subscription_id", "period_start"], set_=changed,
                                          where=newer)
    updated = bool(getattr(session.execute(stmt), "rowcount", 0))
    return updated and (before is None or as_utc(before) != _ts(end))


def periods_for(conn: Connection | Session, customer_id: str, start: dt.datetime,
                end: dt.datetime) -> list[Period]:
    """The customer's known billing periods that overlap [start, end), oldest first, without overlaps."""
    rows = conn.execute(
        select(BillingPeriod.period_start, BillingPeriod.period_end)
        .where(BillingPeriod.customer_id == customer_id, BillingPeriod.period_end > start)
        .order_by(BillingPeriod.period_start, BillingPeriod.period_end)
    ).all()
    return [p for p in _without_overlaps((as_utc(s), as_utc(e)) for s, e in rows) if p.start < end]


def period_containing(conn: Connection | Session, customer_id: str, ts: dt.datetime) -> Period | None:
    """The customer's billing period that `ts` falls in, or None when no known period covers it."""
    for period in periods_for(conn, customer_id, ts, ts + dt.timedelta(microseconds=1)):
        if period.contains(ts):
            return period
    return None


def finalized(period: Period, now: dt.datetime, grace_seconds: int) -> bool:
    """Whether the invoice of `period` has finalized: usage stamped inside it is no longer invoiced."""
    return now >= period.end + dt.timedelta(seconds=grace_seconds)


def carry_forward(ts: dt.datetime, periods: list[Period], now: dt.datetime,
                  grace_seconds: int) -> dt.datetime | None:
    """Where to stamp usage timestamped `ts` so that it is still invoiced, or None to keep `ts`.

    Usage inside a period whose invoice finalized would be accepted by Stripe and never invoiced: it goes into
    the period running now instead (stamped `now`, whole seconds). Kept as is when no known period holds `ts`,
    its invoice is still open, or no period runs now (nothing could invoice it later either)."""
    own = next((p for p in periods if p.contains(ts)), None)
    if own is None or not finalized(own, now, grace_seconds):
        return None
    current = next((p for p in periods if p.contains(now)), None)
    if current is None:
        return None
    return max(current.start, now.replace(microsecond=0))


def period_edges(conn: Connection | Session, customer_id: str, start: dt.datetime,
                 end: dt.datetime) -> list[dt.datetime]:
    """Starts and ends of the customer's periods strictly inside (start, end), sorted: where a reporting window
    of that customer is cut."""
    rows = conn.execute(
        select(BillingPeriod.period_start, BillingPeriod.period_end)
        .where(BillingPeriod.customer_id == customer_id, BillingPeriod.period_end > start,
               BillingPeriod.period_start < end)
    ).all()
    return sorted({as_utc(e) for row in rows for e in row if start < as_utc(e) < end})


def cut_window(start: dt.datetime, end: dt.datetime, ts: dt.datetime,
               edges: list[dt.datetime]) -> tuple[dt.datetime, dt.datetime]:
    """The part of the reporting window [start, end) that holds `ts`, cut at the period edges inside it."""
    lo = max((e for e in edges if start < e <= ts), default=start)
    hi = min((e for e in edges if ts < e < end), default=end)
    return lo, hi


def _without_overlaps(rows: Iterable[tuple[dt.datetime, dt.datetime]]) -> list[Period]:
    out: list[Period] = []
    for start, end in rows:
        if out and out[-1].start == start:
            continue  # two subscriptions' periods beginning together: keep the first (shortest) one
        if out and start < out[-1].end:
            out[-1] = Period(out[-1].start, start)  # a period that begins later cuts the earlier one short
        out.append(Period(start, end))
    return out


def _ts(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)
