"""Stripe webhook events for tests, in the shapes Stripe's API reference documents (full objects, not a
hand-picked subset, so code under test meets every field a real delivery carries):

* "basil": the shape since API 2025-03-31.basil: a subscription's billing period on
  `items.data[].current_period_start/end`, an invoice's subscription at `parent.subscription_details`, its
  lines' subscription at `lines.data[].parent.subscription_item_details`;
* "acacia": the older shape: the period on the subscription itself (its items have none), `invoice.subscription`,
  `lines.data[].subscription` and `.type == "subscription"`.

The templates below are our own, written field by field from the API reference (subscription, invoice, invoice
line item and event objects of each version); every builder starts from a fresh copy and sets what the test is about.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any, Literal

Shape = Literal["basil", "acacia"]
SHAPES: tuple[Shape, ...] = ("basil", "acacia")
API_VERSIONS: dict[Shape, str] = {"basil": "2025-03-31.basil", "acacia": "2025-01-27.acacia"}
_T = 1_764_547_200  # a placeholder time; builders overwrite the times a test is about


def _price() -> dict[str, Any]:
    return {
        "id": "price_template", "object": "price", "active": True, "billing_scheme": "per_unit", "created": _T,
        "currency": "usd", "custom_unit_amount": None, "livemode": False, "lookup_key": "aikit_api_tokens",
        "metadata": {}, "nickname": None, "product": "prod_template",
        "recurring": {"interval": "month", "interval_count": 1, "meter": "mtr_template", "trial_period_days": None,
                      "usage_type": "metered"},
        "tax_behavior": "unspecified", "tiers_mode": None, "transform_quantity": None, "type": "recurring",
        "unit_amount": None, "unit_amount_decimal": "0.0002",
    }


def _plan() -> dict[str, Any]:
    return {
        "id": "price_template", "object": "plan", "active": True, "amount": None, "amount_decimal": "0.0002",
        "billing_scheme": "per_unit", "created": _T, "currency": "usd", "interval": "month", "interval_count": 1,
        "livemode": False, "metadata": {}, "meter": "mtr_template", "nickname": None, "product": "prod_template",
        "tiers_mode": None, "transform_usage": None, "trial_period_days": None, "usage_type": "metered",
    }


def _subscription_template(shape: Shape) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": "si_template", "object": "subscription_item", "billing_thresholds": None, "created": _T,
        "discounts": [], "metadata": {}, "plan": _plan(), "price": _price(), "quantity": None,
        "subscription": "sub_template", "tax_rates": [],
    }
    sub: dict[str, Any] = {
        "id": "sub_template", "object": "subscription", "application": None, "application_fee_percent": None,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
        "billing_cycle_anchor": _T, "billing_cycle_anchor_config": None, "billing_thresholds": None,
        "cancel_at": None, "cancel_at_period_end": False, "canceled_at": None,
        "cancellation_details": {"comment": None, "feedback": None, "reason": None},
        "collection_method": "charge_automatically", "created": _T, "currency": "usd", "customer": "cus_template",
        "days_until_due": None, "default_payment_method": "pm_template", "default_source": None,
        "default_tax_rates": [], "description": None, "discounts": [], "ended_at": None,
        "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
        "items": {"object": "list", "data": [item], "has_more": False, "total_count": 1,
                  "url": "/v1/subscription_items?subscription=sub_template"},
        "latest_invoice": None, "livemode": False, "metadata": {}, "next_pending_invoice_item_invoice": None,
        "on_behalf_of": None, "pause_collection": None,
        "payment_settings": {"payment_method_options": None, "payment_method_types": None,
                             "save_default_payment_method": "off"},
        "pending_invoice_item_interval": None, "pending_setup_intent": None, "pending_update": None,
        "schedule": None, "start_date": _T, "status": "active", "test_clock": None, "transfer_data": None,
        "trial_end": None, "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
        "trial_start": None,
    }
    if shape == "basil":
        item.update(current_period_start=_T, current_period_end=_T)
        sub.update(billing_mode={"type": "classic"}, customer_account=None)
    else:
        sub.update(current_period_start=_T, current_period_end=_T, discount=None)
    return sub


def _line_template(shape: Shape) -> dict[str, Any]:
    line: dict[str, Any] = {
        "id": "il_template", "object": "line_item", "amount": 0, "currency": "usd",
        "description": "API tokens", "discount_amounts": [], "discountable": True, "discounts": [],
        "invoice": "in_template", "livemode": False, "metadata": {}, "period": {"start": _T, "end": _T},
        "pretax_credit_amounts": [], "quantity": 0, "subscription": None,
    }
    if shape == "basil":
        line.update(parent=None, pricing={"price_details": {"price": "price_template", "product": "prod_template"},
                                          "type": "price_details", "unit_amount_decimal": "0.0002"},
                    quantity_decimal="0", subtotal=0, taxes=[])
    else:
        line.update(amount_excluding_tax=0, invoice_item=None, plan=_plan(), price=_price(), proration=False,
                    proration_details={"credited_items": None}, tax_amounts=[], tax_rates=[], type="subscription",
                    unit_amount_excluding_tax="0")
    return line


def _invoice_template(shape: Shape) -> dict[str, Any]:
    inv: dict[str, Any] = {
        "id": "in_template", "object": "invoice", "account_country": "US", "account_name": "aikit tests",
        "account_tax_ids": None, "amount_due": 0, "amount_paid": 0, "amount_remaining": 0, "amount_shipping": 0,
        "application": None, "attempt_count": 1, "attempted": True, "auto_advance": False,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None, "provider": None,
                          "status": None},
        "automatically_finalizes_at": None, "billing_reason": "subscription_cycle",
        "collection_method": "charge_automatically", "created": _T, "currency": "usd", "custom_fields": None,
        "customer": "cus_template", "customer_address": None, "customer_email": "payer@example.com",
        "customer_name": None, "customer_phone": None, "customer_shipping": None, "customer_tax_exempt": "none",
        "customer_tax_ids": [], "default_payment_method": None, "default_source": None, "default_tax_rates": [],
        "description": None, "discounts": [], "due_date": None, "effective_at": _T, "ending_balance": 0,
        "footer": None, "from_invoice": None, "hosted_invoice_url": "https://invoice.stripe.com/i/template",
        "invoice_pdf": "https://pay.stripe.com/invoice/template/pdf", "issuer": {"type": "self"},
        "last_finalization_error": None, "latest_revision": None,
        "lines": {"object": "list", "data": [_line_template(shape)], "has_more": False, "total_count": 1,
                  "url": "/v1/invoices/in_template/lines"},
        "livemode": False, "metadata": {}, "next_payment_attempt": None, "number": "TEMPLATE-0001",
        "on_behalf_of": None, "payment_settings": {"default_mandate": None, "payment_method_options": None,
                                                  "payment_method_types": None},
        "period_end": _T, "period_start": _T, "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0, "receipt_number": None, "rendering": None, "shipping_cost": None,
        "shipping_details": None, "starting_balance": 0, "statement_descriptor": None, "status": "paid",
        "status_transitions": {"finalized_at": _T, "marked_uncollectible_at": None, "paid_at": _T,
                               "voided_at": None},
        "subtotal": 0, "subtotal_excluding_tax": 0, "test_clock": None, "total": 0, "total_discount_amounts": [],
        "total_excluding_tax": 0, "total_pretax_credit_amounts": [], "webhooks_delivered_at": _T,
    }
    if shape == "basil":
        inv.update(amount_overpaid=0, customer_account=None, parent=None, total_taxes=[])
    else:
        inv.update(application_fee_amount=None, charge=None, discount=None, paid=True, paid_out_of_band=False,
                   payment_intent=None, quote=None, subscription=None, subscription_details=None, tax=None,
                   total_tax_amounts=[], transfer_data=None)
    return inv


def _event_template() -> dict[str, Any]:
    return {"id": "evt_template", "object": "event", "api_version": None, "created": _T, "data": {"object": {}},
            "livemode": False, "pending_webhooks": 1, "request": {"id": None, "idempotency_key": None},
            "type": "customer.subscription.updated"}


def fixture(shape: Shape, kind: Literal["subscription", "invoice", "event"]) -> dict[str, Any]:
    """A fresh copy of the template object."""
    if kind == "subscription":
        return _subscription_template(shape)
    if kind == "invoice":
        return _invoice_template(shape)
    return copy.deepcopy(_event_template())


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


