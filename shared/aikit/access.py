"""Who may call the API right now, from the subscription state the webhooks keep."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from aikit.db.models import Subscription, as_utc
from aikit.settings import Settings

ACTIVE_STATUSES = frozenset({"active", "trialing"})


class Access(StrEnum):
    FULL = "full"
    FREE_TIER = "free_tier"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class AccessDecision:
    access: Access
    reason: str


def decide_access(
    subscriptions: list[Subscription], settings: Settings, now: dt.datetime
) -> AccessDecision:
    """Full access with an active/trialing subscription, or past_due within the grace period."""
    if not settings.stripe_enabled:
        return AccessDecision(Access.FULL, "billing not configured")
    grace = dt.timedelta(days=settings.past_due_grace_days)
    had_any = False
    for sub in subscriptions:
        had_any = True
        if sub.deleted:
            continue
        if sub.status in ACTIVE_STATUSES:
            return AccessDecision(Access.FULL, f"subscription {sub.status}")
        since = as_utc(sub.past_due_since)
        if sub.status == "past_due" and since is not None and now - since < grace:
            return AccessDecision(Access.FULL, "subscription past_due, within grace period")
    if had_any and settings.on_subscription_deleted == "free_tier":
        return AccessDecision(Access.FREE_TIER, "no active subscription: free tier")
    return AccessDecision(Access.NONE, "no active subscription" if had_any else "no subscription")


def access_for_customer(
    session: Session, customer_id: str | None, settings: Settings, now: dt.datetime | None = None
) -> AccessDecision:
    if not settings.stripe_enabled:
        return AccessDecision(Access.FULL, "billing not configured")
    if customer_id is None:
        return AccessDecision(Access.NONE, "no Stripe customer")
    subs = list(session.scalars(select(Subscription).where(Subscription.customer_id == customer_id)))
    return decide_access(subs, settings, now or dt.datetime.now(dt.UTC))
