"""Stripe webhooks: verify the signature, then apply each event once, in order, in one transaction.

Rules (each one a plain function below, unit-tested):

* Idempotency: the `stripe_events` row is claimed first, in the same transaction as the state change
  (INSERT ... ON CONFLICT DO NOTHING). A redelivery finds the row and changes nothing; a concurrent delivery
  of the same event waits on that insert and then finds it. A failing handler rolls the claim back too, so
  Stripe's retry runs it again.
* Order: Stripe does not deliver in order. Each subscription row keeps the `created` of the newest event
  applied and is locked (SELECT ... FOR UPDATE, after an insert-or-nothing for a new one) while an event is
  applied.
  Terminal states (deleted, canceled, incomplete_expired) are final in Stripe: an event carrying one is always
  applied, and a non-terminal event never moves a subscription out of one. Otherwise the event with the newer
  `created` wins; at a tie (same second) the later delivery wins. So a tie between a terminal and a
  non-terminal state always ends terminal.
  When order cannot be decided (same `created`, both non-terminal, different status) the state is taken
  from Stripe (the subscription retrieved through the gateway) instead of the delivery order.
* Quota: `invoice.paid` for an invoice that opens a service period (billing_reason subscription_create or
  subscription_cycle) moves the user's quota period start forward only (never back), which resets the
  monthly token counter because its Redis key contains that start. Mid-period invoices (a plan change, a
  threshold, a manual invoice) leave the quota alone.
* Billing periods: every subscription and invoice event records the periods it names (aikit.periods), stale
  ones included (an old period is still history); the flush cuts and stamps reports by them.
* Email: `invoice.payment_failed` emails the customer after the commit, so a redelivery (already recorded)
  never emails twice; a mail failure is logged, not retried (at most once).
* Thin events (API v2 event destinations) arrive at the same endpoint, told apart by the signed body's
  `object` ("v2.core.event"); meter-event error reports go to aikit.meter_errors.
* A signed body we cannot use (not JSON, too deeply nested, wrong types) is a 400 that changes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from aikit import meter_errors
from aikit.access import ACTIVE_STATUSES
from aikit.db.models import StripeEvent, Subscription, User, as_utc
from aikit.emails import Email, Mailer
from aikit.errors import (
    BillingError,
    CannotFetch,
    MalformedObject,
    UnknownEvent,
    WebhookFailed,
    WebhookRejected,
    WebhooksNotConfigured,
)
from aikit.observability import WEBHOOK_EVENTS, WEBHOOK_SIGNATURE_FAILURES, emit, logger
from aikit.periods import SOURCE_INVOICE, SOURCE_SUBSCRIPTION, record_period
from aikit.settings import Settings

if TYPE_CHECKING:  # the Stripe SDK loads when Stripe is called, not on the API function's cold start
    from aikit.stripe_gateway import BillingGateway

MAX_BODY_BYTES = 1024 * 1024  # Stripe events are a few KB; anything near this is not from Stripe
SIGNATURE_TOLERANCE_SECONDS = 300
TERMINAL_STATUSES = frozenset({"canceled", "incomplete_expired"})
# A line period ending at most this long after the invoice was created counts as already begun (clock slack).
_PERIOD_SLACK_SECONDS = 86400

# Timestamps beyond this (year 9999) are no real time; datetime cannot hold them.
_MAX_TIMESTAMP = 253_402_300_799
# billing_reason of the invoices that open a service period; the others are mid-period.
PERIOD_OPENING_REASONS = frozenset({"subscription_create", "subscription_cycle"})
THIN_EVENT_OBJECT = "v2.core.event"

SUBSCRIPTION_CREATED = "customer.subscription.created"
SUBSCRIPTION_UPDATED = "customer.subscription.updated"
SUBSCRIPTION_DELETED = "customer.subscription.deleted"
INVOICE_PAID = "invoice.paid"
INVOICE_PAYMENT_FAILED = "invoice.payment_failed"
INVOICE_CREATED = "invoice.created"
INVOICE_FINALIZED = "invoice.finalized"


class Outcome(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    STALE = "stale"
    IGNORED = "ignored"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    id: str
    type: str
    created: int
    obj: Mapping[str, Any]  # data.object


@dataclass(frozen=True, slots=True)
class PaymentFailedNotice:
    email: str
    customer_id: str
    invoice_id: str | None
    attempt_count: int
    next_payment_attempt: int | None
    amount_due: int | None
    currency: str | None
    hosted_invoice_url: str | None


@dataclass(frozen=True, slots=True)
class WebhookResult:
    event: WebhookEvent
    outcome: Outcome
    detail: str
    notices: tuple[PaymentFailedNotice, ...] = field(default=())


# --- verification --------------------------------------------------------------------------------------


def verify_signature(raw_body: bytes, sig_header: str | None, secrets: list[str]) -> None:
    """Passes when one of our secrets signed these exact bytes recently; WebhookRejected otherwise."""
    if len(raw_body) > MAX_BODY_BYTES:
        raise WebhookRejected(
            f"payload too large (limit {MAX_BODY_BYTES} bytes)", kind="too_large", status=413
        )
    if not sig_header or not sig_header.strip():
        raise WebhookRejected("missing Stripe-Signature header", kind="missing_signature")
    import stripe  # here, not at import: the API function's cold start does not need the SDK

    stale = False
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(raw_body, sig_header, secret, SIGNATURE_TOLERANCE_SECONDS)
            return
        except stripe.SignatureVerificationError as exc:
            stale = stale or "tolerance" in str(exc.user_message or exc)
        except ValueError:  # not UTF-8: no Stripe signature covers it
            raise WebhookRejected("payload is not UTF-8 JSON", kind="malformed") from None
        except (TypeError, AttributeError):  # the SDK trips over non-ASCII signatures in the header
            raise WebhookRejected("Stripe-Signature does not match the payload", kind="bad_signature") from None
    if stale:
        raise WebhookRejected("Stripe-Signature timestamp is outside the tolerance window", kind="stale_signature")
    raise WebhookRejected("Stripe-Signature does not match the payload", kind="bad_signature")


def parse_json_object(raw_body: bytes) -> dict[str, Any]:
    """The signed body as plain dicts; nesting too deep for the parser or anything but an object is a 400."""
    try:
        data = json.loads(raw_body)
    except (ValueError, RecursionError):
        raise WebhookRejected("payload is not a JSON object", kind="malformed") from None
    if not isinstance(data, dict):
        raise WebhookRejected("payload is not a JSON object", kind="malformed")
    return data


def verify_event(raw_body: bytes, sig_header: str | None, secret: str) -> WebhookEvent:
    """The verified snapshot event; WebhookRejected naming what is wrong otherwise."""
    verify_signature(raw_body, sig_header, [secret])
    return parse_event(parse_json_object(raw_body))


def parse_event(data: Any) -> WebhookEvent:
    def bad(what: str) -> WebhookRejected:
        return WebhookRejected(f"malformed event: {what}", kind="malformed")

    if not isinstance(data, dict):
        raise bad("not a JSON object")
    event_id, event_type, created = stripe_id(data.get("id")), data.get("type"), data.get("created")
    if event_id is None:
        raise bad("id must be a string of 1-255 characters")
    if not isinstance(event_type, str) or not 0 < len(event_type) <= 128 or "\x00" in event_type:
        raise bad("type must be a string of 1-128 characters")
    # Bounded: `created` is stored in BIGINT columns, and a larger number is no real time anyway.
    if not isinstance(created, int) or isinstance(created, bool) or not 0 <= created < 2**53:
        raise bad("created must be a Unix timestamp")
    payload = data.get("data")
    obj = payload.get("object") if isinstance(payload, dict) else None
    if not isinstance(obj, dict):
        raise bad("data.object must be an object")
    return WebhookEvent(event_id, event_type, created, obj)

# --- pure rules ----------------------------------------------------------------------------------------


def from_ts(ts: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def is_terminal(status: str, deleted: bool = False) -> bool:
    return deleted or status in TERMINAL_STATUSES


def should_apply(
    stored_created: int | None, stored_terminal: bool, event_created: int, event_terminal: bool
) -> bool:
    """Whether a subscription event may change the stored state (None: nothing stored yet)."""
    if stored_created is None:
        return True
    if stored_terminal and not event_terminal:
        return False  # nothing leaves a terminal state, whatever its timestamp says
    if event_terminal and not stored_terminal:
        return True  # ... and a terminal state is reached whatever order the events came in
    return event_created >= stored_created  # tie: the later delivery wins


def next_past_due_since(
    past_due_since: dt.datetime | None, new_status: str, at: dt.datetime
) -> dt.datetime | None:
    """Set on entering past_due (at the event's time), kept while it stays past_due, cleared on leaving."""
    if new_status != "past_due":
        return None
    return past_due_since if past_due_since is not None else at


def stripe_id(value: Any) -> str | None:
    """A Stripe object id as our columns can store it (1-255 characters, no NUL), else None."""
    if isinstance(value, str) and 0 < len(value) <= 255 and "\x00" not in value:
        return value
    return None


def customer_of(obj: Mapping[str, Any]) -> str | None:
    customer = obj.get("customer")
    if isinstance(customer, dict):  # expanded
        customer = customer.get("id")
    return stripe_id(customer)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def timestamp_or_none(value: Any) -> int | None:
    """A Unix timestamp a datetime can hold, else None."""
    number = _int_or_none(value)
    return number if number is not None and 0 <= number <= _MAX_TIMESTAMP else None


def _dicts(value: Any) -> list[Mapping[str, Any]]:
    """`x.data` of a Stripe list object, keeping only the objects."""
    data = value.get("data") if isinstance(value, dict) else None
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


@dataclass(frozen=True, slots=True)
class SubscriptionFields:
    id: str
    customer_id: str
    status: str
    current_period_start: int | None
    current_period_end: int | None
    ended_at: int | None = None


def subscription_fields(event: WebhookEvent) -> SubscriptionFields:
    return subscription_fields_of(event, event.obj)


def subscription_fields_of(event: WebhookEvent, obj: Mapping[str, Any]) -> SubscriptionFields:
    """The fields we keep of a subscription object (from the event, or as retrieved from Stripe)."""
    sub_id = stripe_id(obj.get("id"))
    if sub_id is None:
        raise MalformedObject(event, "data.object.id is missing or not a Stripe id")
    customer = customer_of(obj)
    if customer is None:
        raise MalformedObject(event, "data.object.customer is missing or not a Stripe id")
    status = obj.get("status")
    if event.type == SUBSCRIPTION_DELETED:
        status = "canceled"
    if not isinstance(status, str) or not 0 < len(status) <= 32:
        raise MalformedObject(event, "data.object.status is missing or too long")
    # Since API 2025-03-31 the billing period lives on the items; older versions had it on the subscription
    # (and items without it).
    items = [i for i in _dicts(obj.get("items")) if timestamp_or_none(i.get("current_period_start")) is not None]
    source: Mapping[str, Any] = items[0] if items else obj
    return SubscriptionFields(
        sub_id,
        customer,
        status,
        timestamp_or_none(source.get("current_period_start")),
        timestamp_or_none(source.get("current_period_end")),
        timestamp_or_none(obj.get("ended_at")),
    )


def invoice_subscription_id(invoice: Mapping[str, Any]) -> str | None:
    parent = invoice.get("parent")
    details = parent.get("subscription_details") if isinstance(parent, dict) else None
    sub = details.get("subscription") if isinstance(details, dict) else None
    if sub is None:
        sub = invoice.get("subscription")  # API versions before 2025-03-31
    if isinstance(sub, dict):
        sub = sub.get("id")
    return stripe_id(sub)


def invoice_line_periods(invoice: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(subscription id, start, end) of the invoice's subscription lines that bill a whole period: not
    prorations, not one-off invoice items. Basil shape: line.parent.subscription_item_details; older:
    line.type == "subscription" with line.subscription and line.proration."""
    fallback = invoice_subscription_id(invoice)
    out = []
    for line in _dicts(invoice.get("lines")):
        raw_parent = line.get("parent")
        parent: Mapping[str, Any] = raw_parent if isinstance(raw_parent, dict) else {}
        details = parent.get("subscription_item_details")
        if isinstance(details, dict) and parent.get("type") == "subscription_item_details":
            sub_id, proration = stripe_id(details.get("subscription")), details.get("proration")
        elif line.get("type") == "subscription":
            sub_id, proration = stripe_id(line.get("subscription")), line.get("proration")
        else:
            continue
        period = line.get("period")
        if proration is True or not isinstance(period, dict):
            continue
        start, end = timestamp_or_none(period.get("start")), timestamp_or_none(period.get("end"))
        sub_id = sub_id or fallback
        if sub_id and start is not None and end is not None and start < end:
            out.append((sub_id, start, end))
    return out


def invoice_period_start(invoice: Mapping[str, Any]) -> int | None:
    """Start of the billing period a paid subscription invoice opens.

    That is the latest line period boundary (start or end) that is not in the future when the invoice was
    made: a first invoice's lines cover [start, end) of the period just begun (-> start); a renewal invoice
    bills metered usage in arrears, its line covering the period just ended (-> its end, the new period's
    start), and licensed prices in advance (-> start of the new period). Falls back to the invoice's own
    period_start/period_end, which look back one period in the same way.
    """
    points: list[int] = []
    for line in _dicts(invoice.get("lines")):
        period = line.get("period")
        if isinstance(period, dict):
            points += [p for p in (timestamp_or_none(period.get("start")), timestamp_or_none(period.get("end")))
                       if p]
    if not points:
        own = (timestamp_or_none(invoice.get("period_start")), timestamp_or_none(invoice.get("period_end")))
        points = [p for p in own if p]
    if not points:
        return None
    created = timestamp_or_none(invoice.get("created"))
    if created is None:
        return min(points)
    begun = [p for p in points if p <= created + _PERIOD_SLACK_SECONDS]
    return max(begun) if begun else min(points)


def payment_failed_email(notice: PaymentFailedNotice) -> Email:
    if notice.next_payment_attempt:
        when = from_ts(notice.next_payment_attempt).strftime("%Y-%m-%d %H:%M UTC")
        retry = f"We will try again on {when}."
    else:
        retry = "No further automatic attempts are scheduled: please update your payment method."
    amount = ""
    if notice.amount_due is not None and notice.currency:
        amount = f" of {notice.amount_due / 100:.2f} {notice.currency.upper()}"
    lines = [
        f"Your payment{amount} for your API subscription failed (attempt {notice.attempt_count}).",
        retry,
    ]
    if notice.hosted_invoice_url:
        lines.append(f"You can pay the invoice here: {notice.hosted_invoice_url}")
    lines.append("API access continues during a short grace period; after that requests are refused.")
    return Email(notice.email, "Payment failed for your API subscription", "\n\n".join(lines))


# --- applying events -----------------------------------------------------------------------------------

_Handled = tuple[Outcome, str, tuple[PaymentFailedNotice, ...]]


@dataclass(frozen=True, slots=True)
class HandlerContext:
    settings: Settings
    gateway: BillingGateway | None  # Stripe, for state the events cannot decide


def _insert_ignore(session: Session, model: type[Any], values: dict[str, Any]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True when this call inserted the row."""
    stmt: postgresql.Insert | sqlite.Insert
    if session.get_bind().dialect.name == "postgresql":
        stmt = postgresql.insert(model).values(**values).on_conflict_do_nothing()
    else:
        stmt = sqlite.insert(model).values(**values).on_conflict_do_nothing()
    return session.execute(stmt.returning(model.id)).first() is not None


def _lock_subscription(session: Session, fields: SubscriptionFields, event: WebhookEvent) -> tuple[
    Subscription, bool
]:
    """The subscription row, locked for this transaction; True when this event created it."""
    stmt = select(Subscription).where(Subscription.id == fields.id).with_for_update()
    row = session.scalars(stmt).first()
    if row is not None:
        return row, False
    # Insert-or-lock: of two concurrent first events one inserts, the other waits here, then locks its row.
    created = _insert_ignore(
        session,
        Subscription,
        {
            "id": fields.id,
            "customer_id": fields.customer_id,
            "status": fields.status,
            "last_event_created": 0,
            "deleted": False,
        },
    )
    row = session.scalars(stmt.execution_options(populate_existing=True)).one()
    return row, created


def _on_subscription(session: Session, ctx: HandlerContext, event: WebhookEvent) -> _Handled:
    fields = subscription_fields(event)
    _record_subscription_period(session, fields, event.created)
    deleting = event.type == SUBSCRIPTION_DELETED
    row, new = _lock_subscription(session, fields, event)
    event_terminal = is_terminal(fields.status, deleting)
    stored_terminal = is_terminal(row.status, row.deleted)
    if not should_apply(None if new else row.last_event_created, stored_terminal, event.created,
                        event_terminal):
        return Outcome.STALE, f"subscription {fields.id}: older than the stored state", ()
    source = "event"
    if not new and undecidable(row, fields, event, event_terminal, stored_terminal):
        fields, source = _state_from_stripe(ctx, event, fields), "stripe"
        _record_subscription_period(session, fields, event.created)
    newer = new or event.created >= row.last_event_created
    row.status = fields.status
    row.deleted = row.deleted or deleting
    row.customer_id = fields.customer_id
    row.past_due_since = next_past_due_since(as_utc(row.past_due_since), fields.status, from_ts(event.created))
    if newer:
        row.current_period_start = (
            from_ts(fields.current_period_start) if fields.current_period_start else row.current_period_start
        )
        row.current_period_end = (
            from_ts(fields.current_period_end) if fields.current_period_end else row.current_period_end
        )
    row.last_event_created = max(row.last_event_created, event.created)
    row.updated_at = dt.datetime.now(dt.UTC)
    detail = f"subscription {fields.id}: {fields.status}"
    return Outcome.APPLIED, detail + (" (state from Stripe: same-second events)" if source == "stripe" else ""), ()


def undecidable(row: Subscription, fields: SubscriptionFields, event: WebhookEvent, event_terminal: bool,
                stored_terminal: bool) -> bool:
    """Same `created` second, both non-terminal, different status: the events cannot say which is newer."""
    return (event.created == row.last_event_created and not event_terminal and not stored_terminal
            and fields.status != row.status)


def _state_from_stripe(ctx: HandlerContext, event: WebhookEvent, fields: SubscriptionFields) -> SubscriptionFields:
    """The subscription as Stripe holds it now. Without a gateway the later delivery wins (logged); a failed
    retrieval fails the event, so Stripe delivers it again."""
    if ctx.gateway is None:
        logger.warning("webhook_same_second_without_stripe", extra={"event_id": event.id, "subscription": fields.id})
        return fields
    try:
        current = ctx.gateway.retrieve_subscription(fields.id)
    except BillingError as exc:
        raise WebhookFailed(f"subscription {fields.id} could not be retrieved: {exc}") from exc
    return subscription_fields_of(event, current)


def _record_subscription_period(session: Session, fields: SubscriptionFields, created: int) -> None:
    start, end = fields.current_period_start, fields.current_period_end
    if start is None or end is None:
        return
    if fields.ended_at is not None and start <= fields.ended_at < end:
        end = fields.ended_at  # ended early: its last period stops there
    record_period(session, customer_id=fields.customer_id, subscription_id=fields.id, start=start, end=end,
                  source=SOURCE_SUBSCRIPTION, event_created=created)


def _record_invoice_periods(session: Session, customer: str, invoice: Mapping[str, Any], created: int) -> int:
    recorded = 0
    for sub_id, start, end in invoice_line_periods(invoice):
        recorded += record_period(session, customer_id=customer, subscription_id=sub_id, start=start, end=end,
                                  source=SOURCE_INVOICE, event_created=created)
    return recorded


def _user_for_customer(session: Session, customer_id: str) -> User | None:
    stmt = select(User).where(User.stripe_customer_id == customer_id).with_for_update()
    return session.scalars(stmt).first()


def _on_invoice_created(session: Session, ctx: HandlerContext, event: WebhookEvent) -> _Handled:
    """invoice.created / invoice.finalized: only the billing periods they name."""
    customer = customer_of(event.obj)
    if customer is None:
        raise MalformedObject(event, "data.object.customer is missing")
    if _record_invoice_periods(session, customer, event.obj, event.created):
        return Outcome.APPLIED, "billing periods recorded", ()
    return Outcome.IGNORED, "no new billing period", ()


def _on_invoice_paid(session: Session, ctx: HandlerContext, event: WebhookEvent) -> _Handled:
    invoice = event.obj
    customer = customer_of(invoice)
    if customer is None:
        raise MalformedObject(event, "data.object.customer is missing")
    if invoice_subscription_id(invoice) is None:
        return Outcome.IGNORED, "not a subscription invoice", ()
    _record_invoice_periods(session, customer, invoice, event.created)
    reason = invoice.get("billing_reason")
    if reason not in PERIOD_OPENING_REASONS:
        # A plan change, threshold or manual invoice: paying it buys no fresh quota.
        return Outcome.IGNORED, f"billing_reason {str(reason)[:40]!r} opens no service period", ()
    start = invoice_period_start(invoice)
    if start is None:
        return Outcome.IGNORED, "invoice has no service period", ()
    user = _user_for_customer(session, customer)
    if user is None:
        return Outcome.IGNORED, f"no user for customer {customer}", ()
    new_start = from_ts(start)
    stored = as_utc(user.quota_period_start)
    if stored is not None and new_start <= stored:
        return Outcome.STALE, f"quota period already starts at {stored.isoformat()}", ()
    user.quota_period_start = new_start
    return Outcome.APPLIED, f"quota period of {user.id} starts {new_start.isoformat()}", ()


def _on_payment_failed(session: Session, ctx: HandlerContext, event: WebhookEvent) -> _Handled:
    invoice = event.obj
    customer = customer_of(invoice)
    if customer is None:
        raise MalformedObject(event, "data.object.customer is missing")
    _record_invoice_periods(session, customer, invoice, event.created)
    user = session.scalars(select(User).where(User.stripe_customer_id == customer)).first()
    if user is None:
        return Outcome.IGNORED, f"no user for customer {customer}", ()
    sub_id = invoice_subscription_id(invoice)
    sub = session.get(Subscription, sub_id) if sub_id else None
    # A late delivery after the payer recovered (a newer event made the subscription active) is old news.
    if (
        sub is not None
        and not sub.deleted
        and sub.status in ACTIVE_STATUSES
        and sub.last_event_created > event.created
    ):
        return Outcome.STALE, f"subscription {sub_id} is active again", ()
    notice = PaymentFailedNotice(
        email=user.email,
        customer_id=customer,
        invoice_id=invoice.get("id") if isinstance(invoice.get("id"), str) else None,
        attempt_count=_int_or_none(invoice.get("attempt_count")) or 1,
        next_payment_attempt=_int_or_none(invoice.get("next_payment_attempt")),
        amount_due=_int_or_none(invoice.get("amount_due")),
        currency=invoice.get("currency") if isinstance(invoice.get("currency"), str) else None,
        hosted_invoice_url=(
            invoice.get("hosted_invoice_url") if isinstance(invoice.get("hosted_invoice_url"), str) else None
        ),
    )
    return Outcome.APPLIED, f"payment failed email to {user.id}", (notice,)


HANDLERS: dict[str, Callable[[Session, HandlerContext, WebhookEvent], _Handled]] = {
    SUBSCRIPTION_CREATED: _on_subscription,
    SUBSCRIPTION_UPDATED: _on_subscription,
    SUBSCRIPTION_DELETED: _on_subscription,
    INVOICE_PAID: _on_invoice_paid,
    INVOICE_PAYMENT_FAILED: _on_payment_failed,
    INVOICE_CREATED: _on_invoice_created,
    INVOICE_FINALIZED: _on_invoice_created,
}


def apply_event(session: Session, settings: Settings, event: WebhookEvent,
                gateway: BillingGateway | None = None) -> WebhookResult:
    """Claim the event id, then apply it. Runs inside the caller's transaction; the caller commits."""
    claimed = _insert_ignore(
        session,
        StripeEvent,
        {"id": event.id, "type": event.type, "created": event.created, "outcome": "processing"},
    )
    if not claimed:
        return WebhookResult(event, Outcome.DUPLICATE, "already processed")
    handler = HANDLERS.get(event.type)
    notices: tuple[PaymentFailedNotice, ...] = ()
    if handler is None:
        outcome, detail = Outcome.IGNORED, f"event type {event.type} is not handled"
    else:
        outcome, detail, notices = handler(session, HandlerContext(settings, gateway), event)
    session.execute(update(StripeEvent).where(StripeEvent.id == event.id).values(outcome=outcome.value))
    return WebhookResult(event, outcome, detail, notices)


def process_event(engine: Engine, settings: Settings, event: WebhookEvent,
                  gateway: BillingGateway | None = None) -> WebhookResult:
    """Apply one verified event in its own transaction (rolled back on any error)."""
    with Session(engine) as session, session.begin():
        return apply_event(session, settings, event, gateway)


def send_notices(mailer: Mailer, notices: tuple[PaymentFailedNotice, ...]) -> int:
    """Email each notice; a failure is logged (the event is already recorded, so no retry). Returns sent."""
    sent = 0
    for notice in notices:
        try:
            mailer.send(payment_failed_email(notice))
            sent += 1
        except Exception:
            logger.exception("payment_failed_email_error", extra={"customer_id": notice.customer_id,
                                                                  "invoice_id": notice.invoice_id})
    return sent


def handle_webhook(
    raw_body: bytes, sig_header: str | None, *, settings: Settings, engine: Engine, mailer: Mailer,
    gateway: BillingGateway | None = None,
) -> WebhookResult:
    """Verify, apply, then email. Raises WebhooksNotConfigured, WebhookRejected or WebhookFailed."""
    secrets = [s for s in (settings.stripe_webhook_secret, settings.stripe_event_destination_secret) if s]
    if not secrets:
        raise WebhooksNotConfigured("webhooks not configured: set STRIPE_WEBHOOK_SECRET")
    try:
        verify_signature(raw_body, sig_header, secrets)
        # Signed, so these exact bytes came from Stripe: parse them into plain dicts.
        data = parse_json_object(raw_body)
        if data.get("object") == THIN_EVENT_OBJECT:
            return _handle_thin_event(data, settings=settings, engine=engine, gateway=gateway)
        event = parse_event(data)
    except WebhookRejected as exc:
        emit(WEBHOOK_SIGNATURE_FAILURES, reason=exc.kind)
        logger.warning("webhook_rejected", extra={"reason": exc.reason})
        raise
    try:
        result = process_event(engine, settings, event, gateway)
    except WebhookRejected as exc:  # signed, but the object lacks what its type needs
        emit(WEBHOOK_EVENTS, type=event.type, outcome=Outcome.ERROR.value)
        logger.warning("webhook_malformed_object", extra={"event_id": event.id, "reason": exc.reason})
        raise
    except Exception as exc:
        emit(WEBHOOK_EVENTS, type=event.type, outcome=Outcome.ERROR.value)
        logger.exception("webhook_handler_error", extra={"event_id": event.id, "type": event.type})
        if isinstance(exc, WebhookFailed):
            raise
        raise WebhookFailed(f"event {event.id} could not be applied; Stripe will retry") from exc
    _log_result(result)
    send_notices(mailer, result.notices)
    return result


def _log_result(result: WebhookResult) -> None:
    event = result.event
    emit(WEBHOOK_EVENTS, type=event.type, outcome=result.outcome.value)
    logger.info(
        "webhook_processed",
        extra={"event_id": event.id, "type": event.type, "outcome": result.outcome.value,
               "detail": result.detail},
    )


# --- thin events (API v2 event destinations) -------------------------------------------------------------


def parse_thin_event(data: Mapping[str, Any]) -> meter_errors.ThinEvent:
    def bad(what: str) -> WebhookRejected:
        return WebhookRejected(f"malformed thin event: {what}", kind="malformed")

    event_id, event_type = stripe_id(data.get("id")), data.get("type")
    if event_id is None:
        raise bad("id must be a string of 1-255 characters")
    if not isinstance(event_type, str) or not 0 < len(event_type) <= 128 or "\x00" in event_type:
        raise bad("type must be a string of 1-128 characters")
    created = meter_errors.parse_time(data.get("created"))
    if created is None:
        raise bad("created must be an RFC 3339 time")
    related = data.get("related_object")
    if related is not None and not (isinstance(related, dict) and stripe_id(related.get("id"))):
        raise bad("related_object must be an object with an id")
    return meter_errors.ThinEvent(event_id, event_type, int(created.timestamp()),
                                  stripe_id(related.get("id")) if related else None)


def _handle_thin_event(data: Mapping[str, Any], *, settings: Settings, engine: Engine,
                       gateway: BillingGateway | None) -> WebhookResult:
    thin = parse_thin_event(data)
    event = WebhookEvent(thin.id, thin.type, thin.created, {})
    try:
        outcome, detail, report = _apply_thin_event(engine, gateway, thin)
    except UnknownEvent as exc:
        raise WebhookRejected(str(exc), kind="unknown_event") from None
    except Exception as exc:
        emit(WEBHOOK_EVENTS, type=thin.type, outcome=Outcome.ERROR.value)
        if isinstance(exc, CannotFetch):
            logger.error("webhook_thin_event_not_fetched", extra={"event_id": thin.id, "reason": str(exc)})
            raise WebhookFailed(f"event {thin.id} could not be fetched from Stripe ({exc}); Stripe will retry") \
                from exc
        logger.exception("webhook_handler_error", extra={"event_id": thin.id, "type": thin.type})
        raise WebhookFailed(f"event {thin.id} could not be applied; Stripe will retry") from exc
    if report is not None:
        meter_errors.count(report)  # after the commit: a redelivery (duplicate) counts nothing again
    result = WebhookResult(event, outcome, detail)
    _log_result(result)
    return result


def _apply_thin_event(engine: Engine, gateway: BillingGateway | None,
                      thin: meter_errors.ThinEvent) -> tuple[Outcome, str, meter_errors.ErrorReport | None]:
    claim = {"id": thin.id, "type": thin.type, "created": thin.created, "outcome": "processing"}
    if thin.type not in meter_errors.EVENT_TYPES:
        with Session(engine) as session, session.begin():
            if not _insert_ignore(session, StripeEvent, {**claim, "outcome": Outcome.IGNORED.value}):
                return Outcome.DUPLICATE, "already processed", None
        return Outcome.IGNORED, f"event type {thin.type} is not handled", None
    with Session(engine) as session:
        if session.get(StripeEvent, thin.id) is not None:
            return Outcome.DUPLICATE, "already processed", None  # no need to ask Stripe again
    report = meter_errors.fetch_report(gateway, thin)
    with Session(engine) as session, session.begin():
        if not _insert_ignore(session, StripeEvent, claim):
            return Outcome.DUPLICATE, "already processed", None
        detail = meter_errors.apply_report(session, report)
        session.execute(update(StripeEvent).where(StripeEvent.id == thin.id)
                        .values(outcome=Outcome.APPLIED.value))
    return Outcome.APPLIED, detail, report
