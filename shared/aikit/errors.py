"""Every error aikit raises, and how the API answers each: one base class, small subclasses.

`AikitError` carries the answer: `status` (HTTP), `code` (the OpenAI-style `error.code`), `param` (the field it
is about), `retry_after` (seconds, sent as Retry-After). An instance may refine them; the class gives the
default. `aikit.api.errors` renders any of them in the OpenAI error shape (`/v1/messages` in Anthropic's), so a
route lets them propagate instead of translating them.

The grouping says who can act on the error:
- `ClientError` (4xx): the request is wrong; its message tells the client what to change.
- `UnavailableError` (503): something we depend on is down or not configured; retrying may do.
- `UpstreamError` (502, or the provider's own status): Stripe or the LLM provider failed.
- anything else is internal (500): the client is told only to report the request id; the log has the rest.

Errors that also fill a built-in role keep that base too (`PriceTableError` is a `ValueError` because pydantic
turns only those into validation errors; callers catch `ValueError`, `LookupError` or `RuntimeError`).

This module imports nothing of aikit's at run time, so every module can raise these without an import cycle.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aikit.limits import LimitDecision
    from aikit.webhooks import WebhookEvent

INTERNAL_ERROR_MESSAGE = "internal error: report the request id to the operator"
UNHANDLED_ERROR_EVENT = "unhandled_error"
RETRY_SHORTLY_SECONDS = 5


class AikitError(Exception):
    """Base of aikit's errors. The class attributes are how the API answers one; the defaults are a 500."""

    status: int = 500
    code: str | None = None
    param: str | None = None
    retry_after: int | None = None
    # What the client reads: a fixed text, or None for the message the error was raised with.
    client_text: str | None = INTERNAL_ERROR_MESSAGE
    # The log line written when the API answers it (UNHANDLED_ERROR_EVENT: with the traceback); None: none.
    log_event: str | None = UNHANDLED_ERROR_EVENT

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def client_message(self) -> str:
        return self.message if self.client_text is None else self.client_text

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}

    def details(self) -> dict[str, object]:
        """Fields the error object carries beyond OpenAI's (a link to act on, ...)."""
        return {}


class ClientError(AikitError):
    status = 400
    code = "invalid_value"
    client_text: str | None = None
    log_event: str | None = None


class UnavailableError(AikitError):
    status = 503
    client_text: str | None = None
    log_event: str | None = None


class UpstreamError(AikitError):
    status = 502
    client_text: str | None = None
    log_event: str | None = None


# --- the API's own -------------------------------------------------------------------------------------


class ApiError(AikitError):
    """An answer a route or a dependency decides on the spot (auth, limits of the API itself, ...)."""

    client_text: str | None = None
    log_event: str | None = None

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self._headers = headers or {}

    def headers(self) -> dict[str, str]:
        return self._headers


# --- settings --------------------------------------------------------------------------------------------


class SettingsError(AikitError, RuntimeError):
    """A missing or malformed setting; the message is one line naming it (the CLI prints it and exits 2)."""


class SecretResolutionError(SettingsError):
    """A secret could not be read or lacks a field; the message names the variable, never a value."""


class PriceTableError(AikitError, ValueError):
    """Bad price table entries; `lines` holds one line per bad entry."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


# --- keys, limits, metering -------------------------------------------------------------------------------


class KeyRefused(ClientError):
    """A key operation was refused; the message says why."""

    status = 409
    code = "conflict"


class RateLimited(ClientError):
    """A limit refused the call: 429 with the decision's headers (Retry-After included)."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, decision: LimitDecision) -> None:
        super().__init__(f"rate limit exceeded: {decision.limit_name}")
        self.decision = decision

    def headers(self) -> dict[str, str]:
        return self.decision.headers


class LimiterUnavailable(UnavailableError):
    """Redis cannot be reached and the limiter is set to fail closed."""

    code = "limiter_unavailable"
    client_text = "rate limiter unavailable, try again shortly"
    retry_after = RETRY_SHORTLY_SECONDS


class MeterUnavailable(UnavailableError):
    """Neither Redis nor the database took the event (it was logged as `usage_unrecorded`).

    No Retry-After: the X-Request-Id of the answer lets support match the rare write that did commit."""

    code = "metering_unavailable"
    client_text = "usage could not be recorded, retry shortly"


class UnknownApiKey(AikitError, ValueError):
    """Usage for an API key id the database does not know: it would be billed to nobody (a programming error
    of the caller that named it)."""


class CallerRequired(AikitError, RuntimeError):
    """`track_tokens=True` with nobody to bill: a programming error, raised before any provider call."""


# --- usage reports ----------------------------------------------------------------------------------------


class UsageQueryError(ClientError, ValueError):
    """A usage query parameter is wrong; `param` names it."""

    status = 422

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class UsageNotFound(ClientError, LookupError):
    """The admin asked about an API key that does not exist."""

    status = 404
    code = "not_found"
    param = "api_key_id"


class UsageUnavailable(UnavailableError, RuntimeError):
    """The database could not be read: usage cannot be shown without it."""

    code = "usage_unavailable"
    client_text = "usage cannot be read right now, retry shortly"
    retry_after = RETRY_SHORTLY_SECONDS


# --- LLM providers ----------------------------------------------------------------------------------------


class ProviderError(UpstreamError):
    """The provider could not answer. `status` is what our API answers with.

    502: the upstream failed or answered nonsense; 400: the upstream refused the request as invalid
    (the message carries its reason); 422: the provider cannot express a field of the request (`param` names
    it); 504: the upstream timed out. Messages never carry secrets.
    """

    code = "provider_error"

    def __init__(self, message: str, status: int = 502, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


class ProviderTimeout(ProviderError):
    """`cut_off`: we stopped waiting while the upstream was working on the request (a read timeout, the call's
    deadline), so the upstream bills it; false when it never got the request or answered with a timeout."""

    def __init__(self, message: str = "provider timed out", status: int = 504, *, cut_off: bool = False) -> None:
        super().__init__(message, status)
        self.cut_off = cut_off


class InvalidRequestError(ProviderError):
    """The request is malformed before any provider sees it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, 400, param)


class UnsupportedError(ProviderError):
    """The configured provider has no equivalent for a field of the request (or for a whole endpoint)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, 422, param)


# --- Stripe and billing -----------------------------------------------------------------------------------


class BillingError(UpstreamError, RuntimeError):
    """A failed Stripe call other than a meter event. Stripe's own answer is kept: `stripe_status` (its HTTP
    status, None when there was no answer) and `stripe_code` (its error code), for callers that branch on
    them. The client learns only which step failed; what Stripe or the network said is logged."""

    code = "stripe_error"
    retry_after = RETRY_SHORTLY_SECONDS
    log_event = "stripe_failed"

    def __init__(self, message: str, *, action: str = "request", stripe_status: int | None = None,
                 stripe_code: str | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.action = action
        self.stripe_status = stripe_status
        self.stripe_code = stripe_code
        self.retryable = retryable

    def client_message(self) -> str:
        return f"Stripe {self.action} failed; retry shortly"


class BillingUnavailable(UnavailableError):
    """Stripe (or the price) is not configured here."""

    code = "billing_not_configured"


class UnknownUser(ClientError):
    status = 404
    code = "not_found"


class NoCustomer(ClientError):
    """The user has no Stripe customer yet, so there is nothing to manage."""

    status = 409
    code = "no_customer"


class AlreadySubscribed(ClientError):
    """The customer already pays for the metered price: a second subscription would bill the meter twice."""

    status = 409
    code = "already_subscribed"

    def __init__(self, message: str, portal_url: str) -> None:
        super().__init__(message)
        self.portal_url = portal_url

    def details(self) -> dict[str, object]:
        return {"portal_url": self.portal_url}  # where a client finds the link without parsing the message


class MailerError(AikitError, RuntimeError):
    """The message was not handed over to the mail service."""


# --- Stripe webhooks --------------------------------------------------------------------------------------


class WebhookRejected(ClientError):
    """The request is not a verified Stripe event (answer `status`, change nothing)."""

    def __init__(self, reason: str, *, kind: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # metric dimension: missing_signature | bad_signature | stale_signature | ...
        self.status = status
        self.code = f"webhook_{kind}"


class MalformedObject(WebhookRejected):
    def __init__(self, event: WebhookEvent, what: str) -> None:
        super().__init__(f"malformed {event.type} event {event.id}: {what}", kind="malformed")


class WebhooksNotConfigured(UnavailableError):
    """No webhook secret: nothing can be verified."""

    code = "webhooks_not_configured"


# A setting of ours named in a failure's message ("STRIPE_SECRET_KEY is not set"): the operator can act on it.
_MISSING_SETTING = re.compile(r"\b[A-Z][A-Z_]{3,} is not set\b")


class WebhookFailed(AikitError):
    """Applying a verified event failed; the transaction was rolled back so Stripe's retry starts clean.

    A 5xx makes Stripe deliver the event again later. What Stripe or the database said is for the logs: the
    answer shows in Stripe's dashboard."""

    code = "webhook_failed"
    log_event = "webhook_failed"

    def client_message(self) -> str:
        missing = _MISSING_SETTING.search(self.message)
        return "the event could not be applied now; Stripe will retry" + (f" ({missing[0]})" if missing else "")


class CannotFetch(UpstreamError):
    """The full event could not be read from Stripe (no key, Stripe down): Stripe delivers it again."""

    code = "stripe_error"
    client_text = "the event could not be fetched from Stripe; Stripe will retry"  # what Stripe said: logged


class UnknownEvent(ClientError):
    """Stripe has no event with this id (404): nothing to apply, however often it is delivered."""

    code = "webhook_unknown_event"
