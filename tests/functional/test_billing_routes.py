"""POST /v1/billing/checkout and /v1/billing/portal against the local Stripe imitation, through the real SDK."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from aikit.api.app import create_app
from aikit.db.engine import get_engine
from aikit.db.models import User
from aikit.keys import IssuedKey, hash_key, load_key_info
from aikit.runtime import Runtime
from aikit.settings import Settings
from aikit.stripe_gateway import StripeGateway
from tests.fakes.stripe_server import FakeStripe
from tests.support.api import bearer, issue_key
from tests.support.settings import ADMIN_TOKEN, make_settings


def stripe_settings(pg_url: str, redis_prefix: str, fake: FakeStripe, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "stripe_secret_key": fake.api_key,
        "stripe_api_base": fake.url,
        "stripe_webhook_secret": "whsec_billing_routes",
        "stripe_max_network_retries": 0,
        "stripe_timeout_seconds": 2.0,
        "stripe_success_url": "https://app.example/billing/done",
        "stripe_cancel_url": "https://app.example/billing/cancelled",
        "stripe_portal_return_url": "https://app.example/account",
        **overrides,
    }
    return make_settings(pg_url, redis_prefix, **values)


@pytest.fixture
def price_id(pg_url: str, redis_prefix: str, fake: FakeStripe) -> str:
    gateway = StripeGateway(stripe_settings(pg_url, redis_prefix, fake))
    return gateway.ensure_setup(event_name="api_tokens").price_id


@pytest.fixture
def b_settings(pg_url: str, redis_prefix: str, fake: FakeStripe, price_id: str) -> Settings:
    return stripe_settings(pg_url, redis_prefix, fake, stripe_metered_price_id=price_id)


def client_for(settings: Settings) -> TestClient:
    return TestClient(create_app(runtime=Runtime(settings)))


@pytest.fixture
def client(b_settings: Settings) -> Iterator[TestClient]:
    with client_for(b_settings) as c:
        yield c


@pytest.fixture
def unbilled_key(b_settings: Settings) -> IssuedKey:
    """A key whose user has no Stripe customer and no subscription (the API itself answers 402)."""
    return issue_key(b_settings)


def stored_customer(settings: Settings, user_id: str) -> str | None:
    with Session(get_engine(settings.database_url)) as s:
        user = s.get(User, user_id)
        assert user is not None
        return user.stripe_customer_id


def checkout(client: TestClient, token: str, json: Any = None) -> httpx.Response:
    return client.post("/v1/billing/checkout", headers=bearer(token), json=json)


def test_checkout_creates_the_customer_once_and_a_subscription_session(
    client: TestClient, b_settings: Settings, fake: FakeStripe, unbilled_key: IssuedKey, price_id: str
) -> None:
    # Not subscribed: the API refuses, but subscribing must work.
    chat = client.post("/v1/chat/completions", headers=bearer(unbilled_key.api_key),
                       json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 402

    r = checkout(client, unbilled_key.api_key)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"url", "id"}
    session = fake.checkout_sessions[body["id"]]
    assert body["url"] == session["url"]
    customer = stored_customer(b_settings, unbilled_key.user_id)
    assert customer is not None and customer in fake.customers
    with Session(get_engine(b_settings.database_url)) as s:
        email = s.get(User, unbilled_key.user_id).email  # type: ignore[union-attr]
    assert fake.customers[customer]["email"] == email
    assert session["customer"] == customer and session["mode"] == "subscription"
    assert session["_line_items"][0]["price"] == price_id
    assert session["success_url"] == "https://app.example/billing/done"
    assert session["cancel_url"] == "https://app.example/billing/cancelled"
    # The key lookup (not served from a stale cache) now carries the customer.
    with Session(get_engine(b_settings.database_url)) as s:
        info = load_key_info(s, b_settings, hash_key(unbilled_key.api_key))
    assert info is not None and info.customer_id == customer

    again = checkout(client, unbilled_key.api_key)
    assert again.status_code == 200
    assert again.json()["id"] != body["id"]
    assert len(fake.customers) == 1
    assert fake.checkout_sessions[again.json()["id"]]["customer"] == customer


def test_checkout_reuses_an_existing_customer(client: TestClient, b_settings: Settings,
                                              fake: FakeStripe) -> None:
    customer = fake.add_customer(email="known@example.com")
    issued = issue_key(b_settings, email="known@example.com", customer_id=customer)
    r = checkout(client, issued.api_key)
    assert r.status_code == 200
    assert fake.checkout_sessions[r.json()["id"]]["customer"] == customer
    assert fake.calls["/v1/customers"] == 0


def test_admin_token_acts_for_the_user_named_by_email(client: TestClient, b_settings: Settings,
                                                      fake: FakeStripe) -> None:
    issued = issue_key(b_settings)
    with Session(get_engine(b_settings.database_url)) as s:
        email = s.get(User, issued.user_id).email  # type: ignore[union-attr]
    r = checkout(client, ADMIN_TOKEN, {"email": email})
    assert r.status_code == 200
    customer = stored_customer(b_settings, issued.user_id)
    assert fake.checkout_sessions[r.json()["id"]]["customer"] == customer

    portal = client.post("/v1/billing/portal", headers=bearer(ADMIN_TOKEN), json={"email": email})
    assert portal.status_code == 200 and portal.json()["url"].startswith("https://billing.stripe.test/")


@pytest.mark.parametrize(
    ("token", "body", "status", "fragment"),
    [
        ("admin", None, 400, "email: required"),
        ("admin", {"email": "nobody@example.com"}, 404, "no user with email"),
        ("admin", {"email": "not-an-email"}, 422, "email"),
        ("admin", {"email": "a@b.example", "extra": 1}, 422, "extra"),
        ("key", {"email": "someone@example.com"}, 400, "only accepted with the admin token"),
        ("bogus", None, 401, "invalid API key"),
        ("none", None, 401, "missing API key"),
    ],
)
def test_checkout_refusals_name_the_problem(client: TestClient, unbilled_key: IssuedKey, fake: FakeStripe,
                                            token: str, body: Any, status: int, fragment: str) -> None:
    headers = {"none": {}, "admin": bearer(ADMIN_TOKEN), "key": bearer(unbilled_key.api_key),
               "bogus": bearer("ak_not_a_real_key")}[token]
    r = client.post("/v1/billing/checkout", headers=headers, json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]
    assert fake.checkout_sessions == {}


def test_revoked_key_cannot_check_out(client: TestClient, unbilled_key: IssuedKey) -> None:
    revoke = client.post(f"/v1/admin/keys/{unbilled_key.api_key_id}/revoke", headers=bearer(ADMIN_TOKEN))
    assert revoke.status_code == 200
    r = checkout(client, unbilled_key.api_key)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]


def test_portal_needs_a_customer_first(client: TestClient, b_settings: Settings, fake: FakeStripe,
                                       unbilled_key: IssuedKey) -> None:
    r = client.post("/v1/billing/portal", headers=bearer(unbilled_key.api_key))
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "no_customer"
    assert fake.portal_sessions == {}

    assert checkout(client, unbilled_key.api_key).status_code == 200
    r = client.post("/v1/billing/portal", headers=bearer(unbilled_key.api_key))
    assert r.status_code == 200
    (session,) = fake.portal_sessions.values()
    assert r.json() == {"url": session["url"]}
    assert session["customer"] == stored_customer(b_settings, unbilled_key.user_id)
    assert session["return_url"] == "https://app.example/account"


def test_without_a_price_id_checkout_answers_503(pg_url: str, redis_prefix: str, fake: FakeStripe) -> None:
    settings = stripe_settings(pg_url, redis_prefix, fake)
    issued = issue_key(settings)
    with client_for(settings) as c:
        r = checkout(c, issued.api_key)
    assert r.status_code == 503
    assert "STRIPE_METERED_PRICE_ID" in r.json()["error"]["message"]
    assert fake.calls["/v1/customers"] == 0


def test_without_stripe_billing_routes_answer_503(pg_url: str, redis_prefix: str) -> None:
    settings = make_settings(pg_url, redis_prefix)
    issued = issue_key(settings)
    with client_for(settings) as c:
        for path in ("/v1/billing/checkout", "/v1/billing/portal"):
            r = c.post(path, headers=bearer(issued.api_key))
            assert r.status_code == 503
            assert "STRIPE_SECRET_KEY" in r.json()["error"]["message"]


def test_a_stripe_failure_answers_502_and_stores_nothing(client: TestClient, b_settings: Settings,
                                                         fake: FakeStripe, unbilled_key: IssuedKey) -> None:
    fake.inject("500", path_prefix="/v1/customers")
    r = checkout(client, unbilled_key.api_key)
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "stripe_error"
    assert "customer creation" in r.json()["error"]["message"]
    assert stored_customer(b_settings, unbilled_key.user_id) is None

    fake.inject("500", path_prefix="/v1/checkout/sessions")
    r = checkout(client, unbilled_key.api_key)
    assert r.status_code == 502 and "checkout session" in r.json()["error"]["message"]
    # The customer made on the way is kept, so the next attempt does not make another.
    customer = stored_customer(b_settings, unbilled_key.user_id)
    assert customer is not None
    assert checkout(client, unbilled_key.api_key).status_code == 200
    assert list(fake.customers) == [customer]


# --- a second subscription -------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "refused"), [("active", True), ("trialing", True), ("past_due", True),
                                                 ("incomplete", False), ("unpaid", False)])
def test_checkout_refuses_a_second_subscription_on_the_metered_price(
    client: TestClient, b_settings: Settings, fake: FakeStripe, price_id: str, status: str, refused: bool
) -> None:
    customer = fake.add_customer(email=f"subscribed-{status}@example.com")
    issued = issue_key(b_settings, email=f"subscribed-{status}@example.com", customer_id=customer)
    sub = fake.add_subscription(customer, price_id, status=status)

    r = checkout(client, issued.api_key)

    if not refused:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "already_subscribed"
    (portal,) = fake.portal_sessions.values()
    assert error["portal_url"] == portal["url"] and portal["url"] in error["message"]
    assert portal["customer"] == customer and portal["return_url"] == "https://app.example/account"
    assert sub["id"] in error["message"] and status in error["message"]
    assert fake.checkout_sessions == {}  # no second Checkout session: the meter is never billed twice


def test_a_canceled_subscription_or_another_price_does_not_block_checkout(
    client: TestClient, b_settings: Settings, fake: FakeStripe, price_id: str
) -> None:
    customer = fake.add_customer(email="returning@example.com")
    issued = issue_key(b_settings, email="returning@example.com", customer_id=customer)
    old = fake.add_subscription(customer, price_id)
    transport = httpx.Client(base_url=fake.url, headers={"Authorization": f"Bearer {fake.api_key}"})
    assert transport.delete(f"/v1/subscriptions/{old['id']}").status_code == 200
    product = transport.post("/v1/products", data={"name": "Support plan"}).json()
    other = transport.post("/v1/prices", data={"product": product["id"], "currency": "usd", "unit_amount": "900",
                                               "recurring[interval]": "month"}).json()
    transport.close()
    fake.add_subscription(customer, other["id"])  # a licensed plan beside the metered price

    r = checkout(client, issued.api_key)
    assert r.status_code == 200, r.text


def test_when_stripe_cannot_list_subscriptions_checkout_answers_502(
    client: TestClient, b_settings: Settings, fake: FakeStripe
) -> None:
    customer = fake.add_customer(email="listfail@example.com")
    issued = issue_key(b_settings, email="listfail@example.com", customer_id=customer)
    fake.inject("500", path_prefix="/v1/subscriptions")
    r = checkout(client, issued.api_key)
    assert r.status_code == 502 and "subscription listing" in r.json()["error"]["message"]
    assert fake.checkout_sessions == {}
