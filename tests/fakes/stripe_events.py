"""Real-shaped Stripe webhook events for tests, built on Stripe's published fixtures (stripe/openapi
`openapi/fixtures3.json`, copied in stripe_fixtures/ with their commit):

* "basil": the shape since API 2025-03-31.basil: a subscription's billing period on
  `items.data[].current_period_start/end`, an invoice's subscription at `parent.subscription_details`, its
  lines' subscription at `lines.data[].parent.subscription_item_details`;
* "acacia": the older shape: the period on the subscription itself (its items have none), `invoice.subscription`,
  `lines.data[].subscription` and `.type == "subscription"`.

Every builder starts from the full fixture object (all of Stripe's fields, in its types) and sets only what the
test is about, so code under test meets the whole object, not a hand-made subset.
"""

from __future__ import annotations

import copy
import functools
import json
import uuid
from pathlib import Path
from typing import Any, Literal

import stripe

Shape = Literal["basil", "acacia"]
SHAPES: tuple[Shape, ...] = ("basil", "acacia")
API_VERSIONS: dict[Shape, str] = {"basil": "2025-03-31.basil", "acacia": "2025-01-27.acacia"}
_FIXTURES = Path(__file__).parent / "stripe_fixtures"


@functools.cache
def _fixtures(shape: Shape) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((_FIXTURES / f"{shape}.json").read_text())
    return data


def fixture(shape: Shape, kind: Literal["subscription", "invoice", "event"]) -> dict[str, Any]:
    """A fresh copy of Stripe's fixture object."""
    return copy.deepcopy(_fixtures(shape)[kind])


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def subscription(
    shape: Shape, *, sub_id: str, customer: str, status: str, period_start: int, period_end: int,
    price_id: str | None = None, ended_at: int | None = None, created: int | None = None,
) -> dict[str, Any]:
    """A subscription object in `shape`, billing one metered price."""
    obj = fixture(shape, "subscription")
    start = created if created is not None else period_start
    obj.update(id=sub_id, customer=customer, status=status, created=start, start_date=start,
               billing_cycle_anchor=period_start, cancel_at=None, cancel_at_period_end=False,
               canceled_at=ended_at, ended_at=ended_at, latest_invoice=None, pending_update=None)
    item = obj["items"]["data"][0]
    item.update(id=new_id("si"), subscription=sub_id, quantity=None)
    if price_id is not None:
        item["price"]["id"] = price_id
    item["price"]["recurring"].update(usage_type="metered", interval="month", interval_count=1)
    obj["items"]["url"] = f"/v1/subscription_items?subscription={sub_id}"
    if shape == "basil":
        item.update(current_period_start=period_start, current_period_end=period_end)
        obj.pop("current_period_start", None)
        obj.pop("current_period_end", None)
    else:
        obj.update(current_period_start=period_start, current_period_end=period_end)
        item.pop("current_period_start", None)
        item.pop("current_period_end", None)
    return obj


def invoice(
    shape: Shape, *, customer: str, sub_id: str | None, billing_reason: str, created: int,
    lines: list[tuple[int, int]] | None = None, proration_lines: list[tuple[int, int]] | None = None,
    invoice_id: str | None = None, **fields: Any,
) -> dict[str, Any]:
    """An invoice object in `shape`; `lines` are the subscription's own lines ([start, end) each),
    `proration_lines` proration lines of the same subscription."""
    obj = fixture(shape, "invoice")
    inv_id = invoice_id or new_id("in")
    periods = lines if lines is not None else [(created, created)]
    obj.update(id=inv_id, customer=customer, created=created, billing_reason=billing_reason, status="paid",
               period_start=min(s for s, _ in periods), period_end=max(e for _, e in periods))
    template = obj["lines"]["data"][0]
    built = [_line(shape, template, inv_id, sub_id, s, e, proration=False) for s, e in periods]
    built += [_line(shape, template, inv_id, sub_id, s, e, proration=True) for s, e in proration_lines or []]
    obj["lines"].update(data=built, url=f"/v1/invoices/{inv_id}/lines")
    if shape == "basil":
        obj["parent"] = ({"type": "subscription_details", "quote_details": None,
                          "subscription_details": {"metadata": {}, "subscription": sub_id}} if sub_id else None)
    else:
        obj["subscription"] = sub_id
        obj["subscription_details"] = {"metadata": {}} if sub_id else None
    obj.update(fields)
    return obj


def _line(shape: Shape, template: dict[str, Any], inv_id: str, sub_id: str | None, start: int, end: int, *,
          proration: bool) -> dict[str, Any]:
    line = copy.deepcopy(template)
    line.update(id=new_id("il"), invoice=inv_id, period={"start": start, "end": end})
    if shape == "basil":
        line["subscription"] = None
        line["parent"] = ({"type": "subscription_item_details", "invoice_item_details": None,
                           "subscription_item_details": {"invoice_item": None, "proration": proration,
                                                         "proration_details": {"credited_items": None},
                                                         "subscription": sub_id, "subscription_item": new_id("si")}}
                          if sub_id else {"type": "invoice_item_details", "subscription_item_details": None,
                                          "invoice_item_details": {"invoice_item": new_id("ii"),
                                                                   "proration": proration, "subscription": None}})
    else:
        line.update(type="subscription" if sub_id else "invoiceitem", subscription=sub_id, proration=proration)
    return line


def event(shape: Shape, type_: str, obj: dict[str, Any], *, created: int,
          event_id: str | None = None) -> dict[str, Any]:
    """A snapshot event (what a webhook endpoint receives) around `obj`."""
    envelope = fixture(shape, "event")
    envelope.update(id=event_id or new_id("evt"), api_version=API_VERSIONS[shape], created=created, type=type_,
                    livemode=False, pending_webhooks=1, data={"object": obj},
                    request={"id": None, "idempotency_key": None})
    return envelope


def thin_event(type_: str, *, event_id: str | None = None, created: str = "2026-11-27T11:00:00.000Z",
               meter_id: str | None = None) -> dict[str, Any]:
    """A thin event (what an event destination receives), as the SDK's EventNotification reads it."""
    body: dict[str, Any] = {"id": event_id or "evt_test_" + uuid.uuid4().hex, "object": "v2.core.event",
                            "type": type_, "created": created, "livemode": False, "context": None, "reason": None}
    if meter_id is not None:
        body["related_object"] = {"id": meter_id, "type": "billing.meter", "url": f"/v1/billing/meters/{meter_id}"}
    return body


def sign(payload: str, secret: str, timestamp: int | None = None) -> str:
    return str(stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=timestamp))
