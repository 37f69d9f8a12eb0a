"""The data model. Postgres in production, SQLite for the embedded first try; Alembic owns the schema."""

from __future__ import annotations

import datetime as dt
import enum
from typing import overload

from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments INTEGER PRIMARY KEY columns.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@overload
def as_utc(value: dt.datetime) -> dt.datetime: ...
@overload
def as_utc(value: None) -> None: ...
def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """A datetime read back from the database, made timezone-aware: SQLite returns them naive (in UTC)."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    # Start of the current quota period (set from the paid invoice); None means the calendar month.
    quota_period_start: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | revoked
    rpm_limit: Mapped[int | None] = mapped_column(Integer)  # None: unlimited
    rpd_limit: Mapped[int | None] = mapped_column(Integer)
    monthly_token_limit: Mapped[int | None] = mapped_column(BigInteger)
    # Models this key may call (JSON list of names or glob patterns); None: every priced model.
    allowed_models: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Subscription(Base):
    __tablename__ = "subscriptions"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(255), index=True)
    status: Mapped[str] = mapped_column(String(32))
    current_period_start: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    current_period_end: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    past_due_since: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # `created` of the newest Stripe event applied; older events never overwrite newer state.
    last_event_created: Mapped[int] = mapped_column(BigInteger, default=0)
    deleted: Mapped[bool] = mapped_column(default=False)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StripeEvent(Base):
    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(128))
    created: Mapped[int] = mapped_column(BigInteger)
    outcome: Mapped[str] = mapped_column(String(32))
    processed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKeyUsage(Base):
    """One row per metered request; `request_id` makes every write idempotent."""

    __tablename__ = "api_key_usage"
    __table_args__ = (
        # Serves the documented per-key, per-day query as an index-only scan.
        Index("ix_api_key_usage_key_date", "api_key_id", "date", "tokens"),
        Index("ix_api_key_usage_customer_ts", "customer_id", "ts"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_id: Mapped[str] = mapped_column(String(40))
    customer_id: Mapped[str | None] = mapped_column(String(255))
    date: Mapped[dt.date] = mapped_column(Date)
    ts: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    model: Mapped[str] = mapped_column(String(128))
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(Integer)
    # Whether this row was added to a Stripe report (False: metering off or no customer when flushed).
    billable: Mapped[bool] = mapped_column(default=True)
    # Cost in 1e-12 currency units at the rates of when it was recorded (aikit.pricing); 0 without a price table.
    cost: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class UsageDaily(Base):
    """Daily rollup per key and model, kept in the same transaction as the rows it sums."""

    __tablename__ = "usage_daily"
    __table_args__ = (Index("ix_usage_daily_customer_date", "customer_id", "date"),)

    api_key_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    date: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    customer_id: Mapped[str | None] = mapped_column(String(255))
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # Σ api_key_usage.cost


class ReportState(enum.StrEnum):
    """MeterReport.status (a String column: SQL compares with the members, which are str). The outbox's own
    vocabulary lives here, beside its column, because the store (aikit.metering.sql_sink) opens reports and
    aikit.outbox builds on the store; aikit.outbox re-exports it as its public name.

    open (still accumulating) -> pending (sealed, value fixed) -> sent | parked; parked -> pending again on
    requeue; sent (or pending, parked) -> rejected when Stripe reports it invalid after accepting it (an
    asynchronous error report, aikit.meter_errors)."""

    OPEN = "open"
    PENDING = "pending"
    SENT = "sent"
    PARKED = "parked"
    REJECTED = "rejected"


_OPEN_ONLY = text(f"status = '{ReportState.OPEN.value}'")


class MeterReport(Base):
    """Outbox of Stripe meter events: one per customer per reporting window.

    `id` is the Stripe `identifier`, fixed when the row is created, so every retry re-sends the same event.
    Status: a ReportState (its rules: aikit.outbox).
    """

    __tablename__ = "meter_reports"
    __table_args__ = (
        Index(
            "uq_meter_reports_open_window",
            "customer_id",
            "window_start",
            "meter",
            unique=True,
            postgresql_where=_OPEN_ONLY,
            sqlite_where=_OPEN_ONLY,
        ),
        Index("ix_meter_reports_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(255))
    window_start: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    window_end: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    value: Mapped[int] = mapped_column(BigInteger, default=0)
    last_usage_ts: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(16), default=ReportState.OPEN.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # When Stripe was first called for it: past Stripe's 24 h identifier memory a resend is no longer safe.
    first_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Set when the usage's own billing period had finalized before it was sent: the timestamp it would have
    # carried (from) and the one sent instead, inside the then current period (to). Stripe invoices it there.
    carried_forward_from: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    carried_forward_to: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Which Stripe meter: "tokens" (STRIPE_METER_EVENT_NAME, value in tokens) or "cost" (STRIPE_COST_EVENT_NAME,
    # value in 1e-12 currency units); see aikit.metering.sql_sink.report_meter.
    meter: Mapped[str] = mapped_column(String(16), default="tokens", server_default="tokens")


class BillingPeriod(Base):
    """A subscription's billing period as Stripe told it (subscription and invoice events); see aikit.periods."""

    __tablename__ = "billing_periods"
    __table_args__ = (Index("ix_billing_periods_customer_end", "customer_id", "period_end"),)

    subscription_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    period_start: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    period_end: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    customer_id: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(16))  # subscription | invoice
    # `created` of the event that set period_end; an older event never replaces it.
    event_created: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MeterEventError(Base):
    """One meter event Stripe rejected asynchronously (an error report's sample, or a window match)."""

    __tablename__ = "meter_event_errors"
    __table_args__ = (Index("ix_meter_event_errors_report", "report_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(255), index=True)  # the Stripe thin event that reported it
    event_type: Mapped[str] = mapped_column(String(128))
    code: Mapped[str] = mapped_column(String(128))
    message: Mapped[str | None] = mapped_column(Text)
    identifier: Mapped[str | None] = mapped_column(String(255))  # as Stripe named it, when it did
    report_id: Mapped[str | None] = mapped_column(String(64))  # the meter report it was matched to
    matched_by: Mapped[str] = mapped_column(String(16))  # identifier | window | none
    meter_id: Mapped[str | None] = mapped_column(String(255))
    validation_start: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    validation_end: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
