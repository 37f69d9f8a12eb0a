"""Self-service billing: a Stripe Checkout session to subscribe, a Billing Portal session to manage it.

A failed Stripe call raises the gateway's `BillingError` unchanged (Stripe's status and code on it)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from aikit.db.models import User
from aikit.errors import AlreadySubscribed, BillingUnavailable, NoCustomer, UnknownUser
from aikit.settings import Settings

if TYPE_CHECKING:  # the Stripe SDK is imported when billing is used, not on the API's cold start
    from aikit.stripe_gateway import BillingGateway

# Checkout URLs carry the session id in their path (https://checkout.stripe.com/c/pay/cs_test_...#...).
_SESSION_ID = re.compile(r"/(cs_(?:test|live)_[A-Za-z0-9]+)")

# Subscriptions that still bill (or will again): a second one on the same price would double the invoice.
BILLING_STATUSES = frozenset({"active", "trialing", "past_due"})


@dataclass(frozen=True, slots=True)
class CheckoutSession:
    url: str
    id: str | None


def user_id_for_email(engine: Engine, email: str) -> str:
    with Session(engine) as session:
        user_id = session.scalars(select(User.id).where(User.email == email)).first()
    if user_id is None:
        raise UnknownUser(f"no user with email {email}")
    return user_id


def _require_gateway(gateway: BillingGateway | None) -> BillingGateway:
    if gateway is None:
        raise BillingUnavailable("billing is not configured: set STRIPE_SECRET_KEY")
    return gateway


def ensure_customer(engine: Engine, gateway: BillingGateway, user_id: str) -> tuple[str, bool]:
    """The user's Stripe customer id, created and stored if missing; True when created now.

    The user row stays locked while Stripe is called, so two concurrent checkouts cannot create two
    customers for one user.
    """
    with Session(engine) as session, session.begin():
        user = session.scalars(select(User).where(User.id == user_id).with_for_update()).first()
        if user is None:
            raise UnknownUser(f"no user {user_id}")
        if user.stripe_customer_id:
            return user.stripe_customer_id, False
        customer_id = gateway.create_customer(email=user.email, metadata={"aikit_user_id": user.id})
        user.stripe_customer_id = customer_id
    return customer_id, True


def start_checkout(
    engine: Engine, settings: Settings, gateway: BillingGateway | None, user_id: str
) -> tuple[CheckoutSession, bool]:
    """A subscription Checkout session for the metered price; True when a customer was created for it."""
    gateway = _require_gateway(gateway)
    price_id = settings.stripe_metered_price_id
    if not price_id:
        raise BillingUnavailable(
            "billing is not configured: set STRIPE_METERED_PRICE_ID (`aikit stripe setup` prints it)"
        )
    customer_id, created = ensure_customer(engine, gateway, user_id)
    if not created:
        _refuse_second_subscription(settings, gateway, customer_id, price_id)
    url = gateway.create_checkout_session(
        customer_id=customer_id,
        price_id=price_id,
        success_url=settings.stripe_success_url,
        cancel_url=settings.stripe_cancel_url,
    )
    match = _SESSION_ID.search(url)
    return CheckoutSession(url=url, id=match.group(1) if match else None), created


def _refuse_second_subscription(settings: Settings, gateway: BillingGateway, customer_id: str,
                                price_id: str) -> None:
    """AlreadySubscribed (with a Billing Portal link to manage it) when the customer has a subscription on the
    metered price that bills. Stripe is asked, not our table: a subscription whose webhook has not arrived
    yet counts too."""
    subscriptions = gateway.list_subscriptions(customer_id, price_id=price_id)
    billing = [s for s in subscriptions if s.get("status") in BILLING_STATUSES]
    if not billing:
        return
    portal = gateway.create_portal_session(customer_id=customer_id, return_url=settings.stripe_portal_return_url)
    raise AlreadySubscribed(
        f"already subscribed (subscription {billing[0].get('id')} is {billing[0].get('status')}): manage it in "
        f"the billing portal instead: {portal}",
        portal,
    )


def open_portal(engine: Engine, settings: Settings, gateway: BillingGateway | None, user_id: str) -> str:
    gateway = _require_gateway(gateway)
    with Session(engine) as session:
        user = session.get(User, user_id)
        if user is None:
            raise UnknownUser(f"no user {user_id}")
        customer_id = user.stripe_customer_id
    if not customer_id:
        raise NoCustomer("no Stripe customer yet: subscribe first (POST /v1/billing/checkout)")
    return gateway.create_portal_session(customer_id=customer_id, return_url=settings.stripe_portal_return_url)
