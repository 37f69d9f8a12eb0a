"""Stripe behind a small interface: meter events, customers, checkout/portal sessions, setup, reconciliation.

`report_meter_event` makes exactly one attempt and classifies the result instead of raising; the flush owns
retries and always re-sends the same meter-event `identifier` (Stripe refuses a repeat, which is how a resend
after an unclear failure stays counted once). Everything else raises `BillingError` on failure.
"""

from __future__ import annotations

import enum
import ssl
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, cast

import httpx
import stripe

from aikit.errors import BillingError
from aikit.settings import Settings

DUPLICATE_MESSAGE = "An event already exists with identifier"
# Stripe documents no error code for a repeated meter-event identifier (the answer seen is a 400 with only the
# message above). `resource_already_exists` is Stripe's documented code for "an object with this ID already
# exists": recognised by code in case Stripe starts sending it, with the message text as the fallback.
DUPLICATE_CODES = frozenset({"resource_already_exists"})
PRICE_LOOKUP_KEY = "aikit_api_tokens"
PRODUCT_NAME = "API tokens"
PRODUCT_METADATA = {"aikit": "api_tokens"}
# Price per token in US cents: 0.0002 cents = $2.00 per million tokens.
DEFAULT_UNIT_AMOUNT_DECIMAL = "0.0002"
DAY = 86400
# The cost meter (aikit.pricing): one meter whose value is a whole number of 1e-12 currency units; its price
# converts that unit into the currency's minor unit exactly. The lookup key names currency and unit, so a
# different currency gets its own price and an existing one is never changed.
COST_PRODUCT_NAME = "API usage"
COST_PRODUCT_METADATA = {"aikit": "api_cost"}


@dataclass(frozen=True, slots=True)
class SetupSpec:
    """What `ensure_setup` makes: a meter for event_name, a product, a metered price on that meter."""

    event_name: str
    lookup_key: str = PRICE_LOOKUP_KEY
    unit_amount_decimal: str = DEFAULT_UNIT_AMOUNT_DECIMAL
    currency: str = "usd"
    product_name: str = PRODUCT_NAME
    product_metadata: Mapping[str, str] = field(default_factory=lambda: dict(PRODUCT_METADATA))
    nickname: str = "API tokens (metered)"


def setup_spec(settings: Settings) -> SetupSpec:
    """The token meter and its price without a price table; with one, the cost meter and its exact price."""
    book = settings.price_book
    if book is None:
        return SetupSpec(event_name=settings.stripe_meter_event_name)
    return SetupSpec(event_name=settings.stripe_cost_event_name, lookup_key=f"aikit_cost_{book.currency}_e-12",
                     unit_amount_decimal=book.minor_unit_amount, currency=book.currency,
                     product_name=COST_PRODUCT_NAME, product_metadata=dict(COST_PRODUCT_METADATA),
                     nickname=f"API usage (metered, 1e-12 {book.currency.upper()} per unit)")


class ReportStatus(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # Stripe already holds an event with this identifier: the first send counted
    RETRYABLE = "retryable"  # send again later with the same identifier
    PERMANENT = "permanent"  # resending will not help (unknown customer, no active meter, bad params)
    # 401/403: the key is wrong, revoked or restricted. Nothing is wrong with the report: stop sending, keep it.
    UNAUTHORIZED = "unauthorized"


@dataclass(frozen=True, slots=True)
class ReportOutcome:
    status: ReportStatus
    error_code: str | None = None
    message: str | None = None
    http_status: int | None = None

    @property
    def recorded(self) -> bool:
        """Stripe holds this usage (now or from an earlier send)."""
        return self.status in (ReportStatus.ACCEPTED, ReportStatus.DUPLICATE)


@dataclass(frozen=True, slots=True)
class SetupResult:
    meter_id: str
    product_id: str
    price_id: str
    created: list[str] = field(default_factory=list)  # which of "meter", "product", "price" this run made


class BillingGateway(ABC):
    @abstractmethod
    def report_meter_event(self, *, identifier: str, customer_id: str, value: int, timestamp: int,
                           meter: str = "tokens") -> ReportOutcome:
        """One attempt; never raises for Stripe or network errors. `meter`: "tokens" or "cost" (the report's
        MeterReport.meter), sent under STRIPE_METER_EVENT_NAME or STRIPE_COST_EVENT_NAME."""

    @abstractmethod
    def create_customer(self, *, email: str, metadata: dict[str, str]) -> str: ...

    @abstractmethod
    def create_checkout_session(self, *, customer_id: str, price_id: str, success_url: str, cancel_url: str) -> str:
        """A subscription Checkout session for a metered price; returns its URL."""

    @abstractmethod
    def create_portal_session(self, *, customer_id: str, return_url: str) -> str: ...

    @abstractmethod
    def meter_event_summaries(
        self, *, event_name: str, customer_id: str, start_time: int, end_time: int
    ) -> list[tuple[int, int, int]]:
        """(day_start, day_end, value) per UTC day, oldest first; the range is widened to whole days."""

    @abstractmethod
    def retrieve_subscription(self, subscription_id: str) -> dict[str, Any]: ...

    @abstractmethod
    def list_subscriptions(self, customer_id: str, *, price_id: str | None = None) -> list[dict[str, Any]]:
        """The customer's subscriptions that are not canceled (on one price when given)."""

    @abstractmethod
    def retrieve_event(self, event_id: str) -> dict[str, Any]:
        """A v2 (thin) event with its data, as GET /v2/core/events/{id} returns it."""

    @abstractmethod
    def ensure_setup(self, *, event_name: str, spec: SetupSpec | None = None) -> SetupResult:
        """Create the meter, product and metered price if missing; safe to run again. `spec` (see
        `setup_spec`) chooses them; without it, the token meter named event_name."""

    def close(self) -> None:  # noqa: B027  # deliberately optional for implementations
        """Release pooled connections; the gateway is unusable afterwards."""


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    # The SDK hands back whatever its HTTP library uses (httpx/requests case-insensitive maps, or a dict).
    if not headers:
        return None
    for key, value in headers.items():
        if key.lower() == name:
            return str(value)
    return None


def classify_error(exc: stripe.StripeError) -> ReportOutcome:
    """Map a failed meter-event call to what the flush should do next."""
    status = exc.http_status
    message = exc.user_message if isinstance(exc.user_message, str) else str(exc)
    if isinstance(exc, stripe.APIConnectionError) or status is None:
        return ReportOutcome(ReportStatus.RETRYABLE, "connection_error", message, status)
    code = _error_code(exc)
    if status in (401, 403) or isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        return ReportOutcome(ReportStatus.UNAUTHORIZED, code or "authentication_error", message, status)
    if status == 400 and (exc.code in DUPLICATE_CODES or DUPLICATE_MESSAGE in message):
        return ReportOutcome(ReportStatus.DUPLICATE, code, message, status)
    should_retry = _header(exc.headers, "stripe-should-retry")
    # A fresh HTTP idempotency key goes with every resend, so 5xx is safe to retry whatever the header says.
    if should_retry == "true" or status in (409, 429) or status >= 500:
        return ReportOutcome(ReportStatus.RETRYABLE, code, message, status)
    return ReportOutcome(ReportStatus.PERMANENT, code, message, status)


def _error_code(exc: stripe.StripeError) -> str | None:
    """Stripe's error code, else its error type (the SDK leaves `.code` unset on some error classes)."""
    if exc.code:
        return exc.code
    body = exc.json_body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        for key in ("code", "type"):
            value = body["error"].get(key)
            if value:
                return str(value)
    return None


def _billing_error(exc: stripe.StripeError, action: str) -> BillingError:
    outcome = classify_error(exc)
    detail = outcome.message or exc.__class__.__name__
    return BillingError(
        f"Stripe {action} failed: {detail}",
        action=action,
        stripe_status=outcome.http_status,
        stripe_code=outcome.error_code,
        retryable=outcome.status is ReportStatus.RETRYABLE,
    )


class _HttpxTransport(stripe.HTTPClient):
    """Synchronous httpx transport for the SDK: a real timeout and pooled connections.

    The SDK's own HTTPXClient passes string bodies as `data=`, which httpx deprecates; its urllib fallback
    has no timeout at all.
    """

    name = "httpx"

    def __init__(self, timeout: float) -> None:
        super().__init__()
        verify = ssl.create_default_context(cafile=stripe.ca_bundle_path)
        self._client = httpx.Client(timeout=timeout, verify=verify)

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[str, int, Mapping[str, str]]:
        content = post_data.encode("utf-8") if isinstance(post_data, str) else post_data
        try:
            response = self._client.request(method.upper(), url, headers=dict(headers or {}), content=content)
        except httpx.HTTPError as exc:
            # should_retry lets the SDK's own retries (when enabled) cover timeouts and dropped connections.
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]  # the SDK leaves it untyped
                f"Network error talking to Stripe: {type(exc).__name__}: {exc}", should_retry=True
            ) from exc
        return response.text, response.status_code, response.headers

    def close(self) -> None:
        self._client.close()


class StripeGateway(BillingGateway):
    def __init__(
        self,
        settings: Settings,
        *,
        unit_amount_decimal: str = DEFAULT_UNIT_AMOUNT_DECIMAL,
        client: stripe.StripeClient | None = None,
    ) -> None:
        transport: _HttpxTransport | None = None
        if client is None:
            if not settings.stripe_secret_key:
                raise BillingError("STRIPE_SECRET_KEY is not set")
            transport = _HttpxTransport(settings.stripe_timeout_seconds)
            client = self._build_client(settings, settings.stripe_secret_key, transport)
        self._client = client
        self._transport = transport
        self._event_name = settings.stripe_meter_event_name
        self._event_names = {"tokens": settings.stripe_meter_event_name, "cost": settings.stripe_cost_event_name}
        self._unit_amount_decimal = unit_amount_decimal

    @staticmethod
    def _build_client(settings: Settings, secret_key: str, transport: _HttpxTransport) -> stripe.StripeClient:
        base = (settings.stripe_api_base or "").rstrip("/")
        return stripe.StripeClient(
            secret_key,
            # Tests point every base address at one local Stripe imitation.
            base_addresses={"api": base, "meter_events": base, "connect": base, "files": base} if base else None,
            max_network_retries=settings.stripe_max_network_retries,
            http_client=transport,
        )

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # --- usage ---------------------------------------------------------------------------------------

    def report_meter_event(self, *, identifier: str, customer_id: str, value: int, timestamp: int,
                           meter: str = "tokens") -> ReportOutcome:
        event_name = self._event_names.get(meter)
        if not identifier or not customer_id or value < 0 or event_name is None:
            return ReportOutcome(
                ReportStatus.PERMANENT,
                "invalid_input",
                "identifier and customer_id must be set, value must be >= 0 and meter tokens or cost",
            )
        try:
            self._client.v1.billing.meter_events.create(
                params={
                    "event_name": event_name,
                    "payload": {"stripe_customer_id": customer_id, "value": str(int(value))},
                    "identifier": identifier,
                    "timestamp": int(timestamp),
                },
                # No SDK retries: the caller re-sends with the same identifier and backs off itself.
                options={"max_network_retries": 0},
            )
        except stripe.StripeError as exc:
            return classify_error(exc)
        return ReportOutcome(ReportStatus.ACCEPTED)

    # --- customers and sessions ----------------------------------------------------------------------

    def create_customer(self, *, email: str, metadata: dict[str, str]) -> str:
        try:
            customer = self._client.v1.customers.create(params={"email": email, "metadata": metadata})
        except stripe.StripeError as exc:
            raise _billing_error(exc, "customer creation") from exc
        return customer.id

    def create_checkout_session(self, *, customer_id: str, price_id: str, success_url: str, cancel_url: str) -> str:
        try:
            session = self._client.v1.checkout.sessions.create(
                params={
                    "mode": "subscription",
                    "customer": customer_id,
                    # Metered prices take no quantity: usage comes from meter events.
                    "line_items": [{"price": price_id}],
                    "success_url": success_url,
                    "cancel_url": cancel_url,
                }
            )
        except stripe.StripeError as exc:
            raise _billing_error(exc, "checkout session creation") from exc
        if not session.url:
            raise BillingError("Stripe returned a checkout session without a URL")
        return session.url

    def create_portal_session(self, *, customer_id: str, return_url: str) -> str:
        try:
            session = self._client.v1.billing_portal.sessions.create(
                params={"customer": customer_id, "return_url": return_url}
            )
        except stripe.StripeError as exc:
            raise _billing_error(exc, "billing portal session creation") from exc
        return session.url

    def retrieve_subscription(self, subscription_id: str) -> dict[str, Any]:
        try:
            subscription = self._client.v1.subscriptions.retrieve(subscription_id)
        except stripe.StripeError as exc:
            raise _billing_error(exc, "subscription retrieval") from exc
        return subscription.to_dict()

    def list_subscriptions(self, customer_id: str, *, price_id: str | None = None) -> list[dict[str, Any]]:
        params: stripe.params.SubscriptionListParams = {"customer": customer_id, "limit": 100}
        if price_id:
            params["price"] = price_id
        try:
            page = self._client.v1.subscriptions.list(params=params)
            return [s.to_dict() for s in page.auto_paging_iter()]
        except stripe.StripeError as exc:
            raise _billing_error(exc, "subscription listing") from exc

    def retrieve_event(self, event_id: str) -> dict[str, Any]:
        try:
            event = self._client.v2.core.events.retrieve(event_id)
        except stripe.StripeError as exc:
            raise _billing_error(exc, "event retrieval") from exc
        return event.to_dict()

    # --- reconciliation ------------------------------------------------------------------------------

    def meter_event_summaries(
        self, *, event_name: str, customer_id: str, start_time: int, end_time: int
    ) -> list[tuple[int, int, int]]:
        # Stripe wants day-aligned bounds for daily grouping: widen to whole UTC days.
        start = start_time - start_time % DAY
        end = end_time if end_time % DAY == 0 else end_time - end_time % DAY + DAY
        if end <= start:
            return []
        try:
            meter = self._find_meter(event_name)
            if meter is None:
                raise BillingError(f"no billing meter with event_name {event_name!r}", stripe_status=404)
            page = self._client.v1.billing.meters.event_summaries.list(
                meter.id,
                params={
                    "customer": customer_id,
                    "start_time": start,
                    "end_time": end,
                    "value_grouping_window": "day",
                    "limit": 100,
                },
            )
            rows = [
                (int(s.start_time), int(s.end_time), round(float(s.aggregated_value))) for s in page.auto_paging_iter()
            ]
        except stripe.StripeError as exc:
            raise _billing_error(exc, "meter event summary listing") from exc
        return sorted(rows)

    # --- setup ---------------------------------------------------------------------------------------

    def _find_meter(self, event_name: str) -> stripe.billing.Meter | None:
        """The active meter for event_name, else an inactive one, else None."""
        inactive: stripe.billing.Meter | None = None
        for meter in self._client.v1.billing.meters.list(params={"limit": 100}).auto_paging_iter():
            if meter.event_name != event_name:
                continue
            if meter.status == "active":
                return meter
            inactive = inactive or meter
        return inactive

    def _find_product(self, wanted: Mapping[str, str]) -> stripe.Product | None:
        products = self._client.v1.products.list(params={"active": True, "limit": 100})
        for product in products.auto_paging_iter():
            metadata = product.metadata.to_dict() if product.metadata else {}
            if all(metadata.get(k) == v for k, v in wanted.items()):
                return product
        return None

    def ensure_setup(self, *, event_name: str, spec: SetupSpec | None = None) -> SetupResult:
        spec = spec or SetupSpec(event_name=event_name, unit_amount_decimal=self._unit_amount_decimal)
        created: list[str] = []
        try:
            meter = self._find_meter(spec.event_name)
            if meter is None:
                meter = self._client.v1.billing.meters.create(
                    params={
                        "display_name": spec.product_name,
                        "event_name": spec.event_name,
                        "default_aggregation": {"formula": "sum"},
                        "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
                        "value_settings": {"event_payload_key": "value"},
                    }
                )
                created.append("meter")
            elif meter.status != "active":
                meter = self._client.v1.billing.meters.reactivate(meter.id)
                created.append("meter")

            prices = self._client.v1.prices.list(
                params={"lookup_keys": [spec.lookup_key], "active": True, "limit": 10}
            )
            existing = next(iter(prices.data), None)
            if existing is not None and existing.recurring and existing.recurring.meter == meter.id:
                product_id = existing.product if isinstance(existing.product, str) else existing.product.id
                return SetupResult(meter.id, product_id, existing.id, created)

            product = self._find_product(spec.product_metadata)
            if product is None:
                product = self._client.v1.products.create(
                    params={"name": spec.product_name, "metadata": dict(spec.product_metadata)}
                )
                created.append("product")
            price = self._client.v1.prices.create(
                params={
                    "product": product.id,
                    "currency": spec.currency,
                    # A plain string: the SDK writes a Decimal with str(), and str(Decimal("0.0000000001")) is
                    # "1E-10", exponent notation Stripe's decimal strings do not promise to take.
                    "unit_amount_decimal": cast(Decimal, format(Decimal(spec.unit_amount_decimal), "f")),
                    "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
                    "lookup_key": spec.lookup_key,
                    # A price left over from an older meter keeps the key otherwise.
                    "transfer_lookup_key": existing is not None,
                    "nickname": spec.nickname,
                }
            )
            created.append("price")
        except stripe.StripeError as exc:
            raise _billing_error(exc, "billing setup") from exc
        return SetupResult(meter.id, product.id, price.id, created)


def gateway_from_settings(settings: Settings) -> BillingGateway | None:
    """The Stripe gateway, or None when no secret key is configured."""
    if not settings.stripe_secret_key:
        return None
    return StripeGateway(settings)
