"""aikit.errors: every error aikit defines derives from AikitError, and the app answers each from what it carries."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import stripe
from fastapi import FastAPI
from fastapi.testclient import TestClient

import aikit
from aikit import errors
from aikit.api.errors import ERROR_TYPES, install_error_handlers
from aikit.errors import (
    INTERNAL_ERROR_MESSAGE,
    AikitError,
    AlreadySubscribed,
    ApiError,
    BillingError,
    BillingUnavailable,
    CallerRequired,
    CannotFetch,
    ClientError,
    InvalidRequestError,
    KeyRefused,
    LimiterUnavailable,
    MailerError,
    MalformedObject,
    MeterUnavailable,
    NoCustomer,
    PriceTableError,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    SecretResolutionError,
    SettingsError,
    UnavailableError,
    UnknownApiKey,
    UnknownEvent,
    UnknownUser,
    UnsupportedError,
    UpstreamError,
    UsageNotFound,
    UsageQueryError,
    UsageUnavailable,
    WebhookFailed,
    WebhookRejected,
    WebhooksNotConfigured,
)
from aikit.limits import LimitDecision
from aikit.settings import load_settings
from aikit.stripe_gateway import StripeGateway
from aikit.webhooks import WebhookEvent

# Exception classes of aikit that may stand outside the hierarchy, each with the reason. None so far: a new
# entry needs a reason a reviewer accepts (e.g. a class a third-party API requires as its base).
OUTSIDE_THE_HIERARCHY: dict[str, str] = {}


def aikit_modules() -> Iterator[Any]:
    yield aikit
    for info in pkgutil.walk_packages(aikit.__path__, "aikit."):
        yield importlib.import_module(info.name)


def exception_classes_defined_in_aikit() -> set[type[BaseException]]:
    found: set[type[BaseException]] = set()
    for module in aikit_modules():
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == module.__name__:
                found.add(value)
    return found


def test_every_exception_class_of_aikit_derives_from_aikit_error() -> None:
    classes = exception_classes_defined_in_aikit()
    outside = {f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, AikitError)}
    assert outside <= set(OUTSIDE_THE_HIERARCHY), f"not derived from aikit.errors.AikitError: {sorted(outside)}"
    assert len(classes) > 30  # the walk found the package (private control-flow classes included)


def test_errors_are_defined_in_one_module() -> None:
    # Private control-flow classes may live where they are used; public errors live in aikit.errors.
    public = {c for c in exception_classes_defined_in_aikit() if not c.__name__.startswith("_")}
    assert {c.__module__ for c in public} == {"aikit.errors"}


def test_built_in_bases_callers_rely_on_are_kept() -> None:
    assert issubclass(PriceTableError, ValueError)  # pydantic turns only ValueError into a validation error
    assert issubclass(UsageQueryError, ValueError)
    assert issubclass(UnknownApiKey, ValueError)
    assert issubclass(UsageNotFound, LookupError)
    for runtime_error in (UsageUnavailable, CallerRequired, BillingError, SettingsError, MailerError):
        assert issubclass(runtime_error, RuntimeError)
    assert issubclass(SecretResolutionError, SettingsError)


def _decision() -> LimitDecision:
    return LimitDecision(False, "minute", {"Retry-After": "17", "X-RateLimit-Limit-Requests": "3"})


def _event() -> WebhookEvent:
    return WebhookEvent("evt_1", "customer.subscription.updated", 0, {})


# One instance of every public error, and the answer the API gives it: (status, code, param, message, headers).
ANSWERS: list[tuple[Callable[[], AikitError], int, str | None, str | None, str, dict[str, str]]] = [
    (lambda: ApiError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}),
     401, "invalid_api_key", None, "invalid API key", {"WWW-Authenticate": "Bearer"}),
    (lambda: SettingsError("invalid setting X: bad"), 500, None, None, INTERNAL_ERROR_MESSAGE, {}),
    (lambda: SecretResolutionError("STRIPE_SECRET_ARN: unreadable"), 500, None, None, INTERNAL_ERROR_MESSAGE, {}),
    (lambda: PriceTableError(["PRICE_TABLE m: bad"]), 500, None, None, INTERNAL_ERROR_MESSAGE, {}),
    (lambda: KeyRefused("user a@b.c is already linked to another Stripe customer"), 409, "conflict", None,
     "user a@b.c is already linked to another Stripe customer", {}),
    (lambda: RateLimited(_decision()), 429, "rate_limit_exceeded", None, "rate limit exceeded: requests per minute",
     {"Retry-After": "17", "X-RateLimit-Limit-Requests": "3"}),
    (lambda: LimiterUnavailable("rate limiter unavailable"), 503, "limiter_unavailable", None,
     "rate limiter unavailable, try again shortly", {"Retry-After": "5"}),
    (lambda: MeterUnavailable("usage could not be recorded"), 503, "metering_unavailable", None,
     "usage could not be recorded, retry shortly", {}),
    (lambda: UnknownApiKey("no API key 'key_x'"), 500, None, None, INTERNAL_ERROR_MESSAGE, {}),
    (lambda: CallerRequired("track_tokens=True outside an authenticated request"), 500, None, None,
     INTERNAL_ERROR_MESSAGE, {}),
    (lambda: UsageQueryError("end is required when start is given", "end"), 422, "invalid_value", "end",
     "end is required when start is given", {}),
    (lambda: UsageNotFound("no API key key_x"), 404, "not_found", "api_key_id", "no API key key_x", {}),
    (lambda: UsageUnavailable("usage store unavailable"), 503, "usage_unavailable", None,
     "usage cannot be read right now, retry shortly", {"Retry-After": "5"}),
    (lambda: ProviderError("openai failed (HTTP 500)"), 502, "provider_error", None, "openai failed (HTTP 500)", {}),
    (lambda: ProviderError("openai rejected the request: no", 400), 400, "provider_error", None,
     "openai rejected the request: no", {}),
    (lambda: ProviderTimeout("openai timed out"), 504, "provider_error", None, "openai timed out", {}),
    (lambda: InvalidRequestError("messages: required", "messages"), 400, "provider_error", "messages",
     "messages: required", {}),
    (lambda: UnsupportedError("n is not supported by the echo provider", "n"), 422, "provider_error", "n",
     "n is not supported by the echo provider", {}),
    (lambda: BillingError("Stripe customer creation failed: boom", action="customer creation", stripe_status=500),
     502, "stripe_error", None, "Stripe customer creation failed; retry shortly", {"Retry-After": "5"}),
    (lambda: BillingUnavailable("billing is not configured: set STRIPE_SECRET_KEY"), 503, "billing_not_configured",
     None, "billing is not configured: set STRIPE_SECRET_KEY", {}),
    (lambda: UnknownUser("no user with email a@b.c"), 404, "not_found", None, "no user with email a@b.c", {}),
    (lambda: NoCustomer("no Stripe customer yet"), 409, "no_customer", None, "no Stripe customer yet", {}),
    (lambda: AlreadySubscribed("already subscribed", "https://billing.stripe.test/p"), 409, "already_subscribed",
     None, "already subscribed", {}),
    (lambda: MailerError("SES send_email failed: x"), 500, None, None, INTERNAL_ERROR_MESSAGE, {}),
    (lambda: WebhookRejected("missing Stripe-Signature header", kind="missing_signature"), 400,
     "webhook_missing_signature", None, "missing Stripe-Signature header", {}),
    (lambda: WebhookRejected("body too large", kind="too_large", status=413), 413, "webhook_too_large", None,
     "body too large", {}),
    (lambda: MalformedObject(_event(), "data.object.id is missing"), 400, "webhook_malformed", None,
     "malformed customer.subscription.updated event evt_1: data.object.id is missing", {}),
    (lambda: WebhooksNotConfigured("webhooks not configured: set STRIPE_WEBHOOK_SECRET"), 503,
     "webhooks_not_configured", None, "webhooks not configured: set STRIPE_WEBHOOK_SECRET", {}),
    (lambda: WebhookFailed("event evt_1 could not be applied; Stripe will retry"), 500, "webhook_failed", None,
     "the event could not be applied now; Stripe will retry", {}),
    (lambda: WebhookFailed("event evt_1 could not be fetched (STRIPE_SECRET_KEY is not set)"), 500,
     "webhook_failed", None, "the event could not be applied now; Stripe will retry (STRIPE_SECRET_KEY is not set)",
     {}),
    (lambda: CannotFetch("Stripe event retrieval failed: down"), 502, "stripe_error", None,
     "the event could not be fetched from Stripe; Stripe will retry", {}),
    (lambda: UnknownEvent("Stripe has no event evt_1"), 400, "webhook_unknown_event", None,
     "Stripe has no event evt_1", {}),
]


def answer(exc: AikitError) -> Any:
    """What an app with the real handlers answers when a route raises `exc`."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise")
    async def _raise() -> None:
        raise exc

    with TestClient(app) as client:
        return client.get("/raise")


def test_every_public_error_has_its_answer_listed() -> None:
    categories = {AikitError, ClientError, UnavailableError, UpstreamError}
    public = {c for c in vars(errors).values()
              if inspect.isclass(c) and issubclass(c, AikitError) and c not in categories}
    assert public == {type(make()) for make, *_ in ANSWERS}


@pytest.mark.parametrize(("make", "status", "code", "param", "message", "headers"), ANSWERS,
                         ids=[f"{i}-{type(make()).__name__}" for i, (make, *_) in enumerate(ANSWERS)])
def test_each_error_renders_in_the_openai_error_shape(make: Callable[[], AikitError], status: int,
                                                      code: str | None, param: str | None, message: str,
                                                      headers: dict[str, str]) -> None:
    exc = make()
    assert (exc.status, exc.code, exc.param) == (status, code, param)
    r = answer(exc)
    assert r.status_code == status
    error = {"message": message, "type": ERROR_TYPES.get(status, "api_error"), "param": param, "code": code}
    assert r.json() == {"error": {**error, **exc.details()}}
    assert {name: r.headers.get(name) for name in headers} == headers


def test_a_link_to_act_on_rides_in_the_error_object() -> None:
    r = answer(AlreadySubscribed("already subscribed: manage it in the portal", "https://billing.stripe.test/p"))
    assert r.json()["error"]["portal_url"] == "https://billing.stripe.test/p"


def test_an_error_outside_aikit_is_still_a_plain_500() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise")
    async def _raise() -> None:
        raise KeyError("secret detail")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/raise")
    assert r.status_code == 500
    assert r.json()["error"]["message"] == INTERNAL_ERROR_MESSAGE and "secret" not in r.text


def _stripe_client_refusing(exc: stripe.StripeError) -> Any:
    def refuse(**_: object) -> None:
        raise exc

    return SimpleNamespace(v1=SimpleNamespace(checkout=SimpleNamespace(sessions=SimpleNamespace(create=refuse))))


def test_stripes_status_and_code_survive_wrapping() -> None:
    body = {"error": {"type": "invalid_request_error", "code": "resource_missing", "message": "No such price"}}
    refused = stripe.InvalidRequestError("No such price: 'price_nope'", "line_items[0][price]", "resource_missing",
                                         None, 400, body)
    gateway = StripeGateway(load_settings(_env_file=None), client=_stripe_client_refusing(refused))

    with pytest.raises(BillingError) as caught:
        gateway.create_checkout_session(customer_id="cus_1", price_id="price_nope", success_url="https://a.test/",
                                        cancel_url="https://a.test/")

    exc = caught.value
    assert (exc.stripe_status, exc.stripe_code, exc.retryable) == (400, "resource_missing", False)
    assert exc.__cause__ is refused and "price_nope" in str(exc)  # the whole story, for the log
    r = answer(exc)
    assert (r.status_code, r.headers["Retry-After"]) == (502, "5")
    assert r.json()["error"] == {"message": "Stripe checkout session creation failed; retry shortly",
                                 "type": "api_error", "param": None, "code": "stripe_error"}
