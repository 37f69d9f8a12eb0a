"""A local Stripe-compatible HTTP server for tests: the real `stripe` SDK talks to it via `base_addresses`.

It keeps the few resources aikit touches in memory and answers with Stripe-shaped bodies and statuses. It is
meant to be at least as strict as Stripe where billing correctness is at stake:

- Test clock: `now()` is the real clock plus an offset that `advance(seconds)` moves forward. Identifier and
  Idempotency-Key memory, timestamp rules, billing periods and invoice finalization all run on it.
- Meter-event identifiers are remembered for 24 h only: after that a repeat is accepted again (and billed
  twice, as Stripe would). Idempotency keys likewise.
- Validation rules (`rules`): each of "customer" (unknown customer), "meter" (no active meter for the
  event_name) and "timestamp" (35 days back, 5 minutes ahead) is "sync" (400 at once), "async" (200, then a
  `v1.billing.meter.error_report_triggered` / `v1.billing.meter.no_meter_found` thin event) or "off".
  Defaults: the customer is checked asynchronously (as live Stripe does), the others synchronously.
  Rejected events are remembered (their identifier stays taken) but never counted or invoiced.
- Thin events go to an event destination (`event_destination(url_or_callable, secret)`), signed like Stripe
  signs them, when `deliver_events()` runs (a failed delivery stays queued, as Stripe retries); the full
  event is served at GET /v2/core/events/{id}, where stripe-python's `fetch_event()` reads it.
- Invoices: every subscription has billing periods (its price's interval); the invoice of a period finalizes
  `finalization_grace` seconds after the period ends (1 h by default). A meter event stamped inside a period
  that arrives after its invoice finalized is accepted and never invoiced. `invoices()` / `will_invoice()`
  say what the fake will bill per customer and period: tokens per meter and money (value x the price's
  unit_amount_decimal, rounded to the cent), per subscription item, so per-meter prices just work.
- Limits: one concurrent meter-event call per customer and meter (429), the test-mode rate limit of 25
  requests per second for the whole account (429 with `Stripe-Rate-Limited-Reason: global-rate`), and the
  documented length limits (identifier and event_name at most 100 characters, a meter event value at most 15
  significant digits).
- Idempotency-Key replay, and injectable network/server faults (`inject`).
- Keys: any `sk_...` key is accepted unless listed in `refused_keys` (key -> 401, a revoked or wrong key, or
  403, a restricted key without the permission, which may be an `rk_...` key), answered as Stripe answers those.
- `duplicate_code`: None (default) answers a repeated identifier as Stripe does today, a 400 whose message
  says "An event already exists with identifier ..." and no code; a string answers it with that error code
  and reworded text instead (to test that the code alone is recognised).

    with FakeStripe() as fake:
        client = stripe.StripeClient(fake.api_key, base_addresses={"api": fake.url, ...})
"""

from __future__ import annotations

import calendar
import contextlib
import datetime as dt
import json
import re
import secrets
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import httpx
import stripe

FAULT_KINDS = ("500", "503", "429", "timeout", "accept_then_500", "accept_then_drop", "reset", "async_reject")
METER_EVENT_PATH = "/v1/billing/meter_events"
DAY = 86400
MAX_PAST_SECONDS = 35 * DAY
MAX_FUTURE_SECONDS = 5 * 60
IDENTIFIER_MEMORY_SECONDS = DAY  # Stripe: "a rolling period of at least 24 hours"; the fake keeps exactly that
IDEMPOTENCY_KEY_MEMORY_SECONDS = DAY
DEFAULT_FINALIZATION_GRACE_SECONDS = 3600  # Stripe's default; configurable up to 72 h in Billing settings
TEST_MODE_RATE_LIMIT = 25  # requests per second for the whole account in test mode (sandbox)
MAX_IDENTIFIER_LENGTH = 100  # maxLength of `identifier` and `event_name` in Stripe's OpenAPI spec
MAX_EVENT_NAME_LENGTH = 100
MAX_STRING_LENGTH = 5000  # Stripe's limit for string parameters without a tighter one (payload values)
MAX_SAMPLE_ERRORS = 5  # sample_errors per error type in an error report (error_count has the full number)
_WHOLE_NUMBER = re.compile(r"^[0-9]+$")

RuleMode = Literal["sync", "async", "off"]
DEFAULT_RULES: dict[str, RuleMode] = {"customer": "async", "meter": "sync", "timestamp": "sync"}
ERROR_REPORT_TRIGGERED = "v1.billing.meter.error_report_triggered"
NO_METER_FOUND = "v1.billing.meter.no_meter_found"


MAX_VALUE_DIGITS = 15  # significant digits of a meter event value (Stripe changelog 2026-04-22)


class StripeHTTPError(Exception):
    """An error answer; raised anywhere in a handler, turned into a Stripe-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


def missing(kind: str, object_id: str, param: str = "id") -> StripeHTTPError:
    return StripeHTTPError(
        404 if param == "id" else 400,
        f"No such {kind}: '{object_id}'",
        code="resource_missing",
        param=param,
    )


def missing_param(name: str) -> StripeHTTPError:
    return StripeHTTPError(400, f"Missing required param: {name}.", code="parameter_missing", param=name)


# --- form decoding ----------------------------------------------------------------------------------------


def _key_path(key: str) -> list[str]:
    """`payload[value]` -> ["payload", "value"]; `items[0][price]` -> ["items", "0", "price"]."""
    head, _, rest = key.partition("[")
    parts = [head]
    while rest:
        inner, _, rest = rest.partition("]")
        parts.append(inner)
        rest = rest.removeprefix("[")
    return parts


def _listify(value: Any) -> Any:
    # Bracket notation writes arrays as `a[0]=..&a[1]=..` (or `a[]=..`): digit-keyed dicts become lists.
    if isinstance(value, dict):
        converted = {k: _listify(v) for k, v in value.items()}
        if converted and all(k.isdigit() for k in converted):
            return [converted[k] for k in sorted(converted, key=int)]
        return converted
    return value


def decode_form(raw: str) -> dict[str, Any]:
    """Decode a Stripe form body or query string into nested dicts/lists of strings."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(raw, keep_blank_values=True):
        parts = _key_path(key)
        node = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "":  # `a[]=x`: append
                part = str(sum(1 for k in node if k.isdigit()))
            if last:
                node[part] = value
            else:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = {}
                    node[part] = child
                node = child
    result = _listify(root)
    assert isinstance(result, dict)
    return result


# --- state ------------------------------------------------------------------------------------------------


@dataclass
class MeterEventRecord:
    """One meter event Stripe answered 200 for. `created` is when it arrived (test clock); `rejection` the
    error code of an asynchronous rejection (then it is never counted)."""

    identifier: str
    event_name: str
    customer: str
    value: int
    timestamp: int
    created: float
    meter_id: str | None = None
    rejection: str | None = None

    @property
    def counted(self) -> bool:
        return self.rejection is None


@dataclass(frozen=True)
class _MeterError:
    """An asynchronous rejection waiting to be reported in a thin event."""

    event_type: str  # ERROR_REPORT_TRIGGERED or NO_METER_FOUND
    meter_id: str | None
    code: str
    message: str
    identifier: str
    received: float


@dataclass(frozen=True)
class InvoiceLine:
    """One metered subscription item of an invoice: what its meter summed in the period, and its money."""

    price_id: str
    meter_id: str
    event_name: str
    quantity: int
    unit_amount_decimal: str
    amount: int  # cents: quantity x unit_amount_decimal, rounded half up to the cent


@dataclass(frozen=True)
class PeriodInvoice:
    """What the fake bills one subscription for one billing period.

    status: "open" (the period runs or its grace has not passed: late usage still counts), "finalized"
    (usage arriving from now on is never invoiced) or "not_invoiced" (a subscription canceled without
    invoice_now: the usage of its last, partial period is never billed, as in Stripe)."""

    subscription_id: str
    customer: str
    period_start: int
    period_end: int
    finalizes_at: int
    status: str
    lines: tuple[InvoiceLine, ...]

    @property
    def tokens(self) -> dict[str, int]:
        """Quantity per meter event_name."""
        out: Counter[str] = Counter()
        for line in self.lines:
            out[line.event_name] += line.quantity
        return dict(out)

    @property
    def amount(self) -> int:
        return sum(line.amount for line in self.lines)


@dataclass
class _Fault:
    kind: str
    remaining: int
    path_prefix: str
    customer: str | None
    code: str = "meter_event_invalid_value"  # async_reject: the error code Stripe reports later


@dataclass
class _Request:
    method: str
    path: str
    params: dict[str, Any]
    raw_body: str
    headers: dict[str, str]
    async_reject: str | None = None  # an injected asynchronous rejection for this meter event

    @property
    def customer(self) -> str | None:
        payload = self.params.get("payload")
        if isinstance(payload, dict) and isinstance(payload.get("stripe_customer_id"), str):
            return str(payload["stripe_customer_id"])
        customer = self.params.get("customer")
        return customer if isinstance(customer, str) else None


@dataclass
class _Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class _Drop(Exception):
    """Close the connection without answering."""


def _new_id(prefix: str) -> str:
    return f"{prefix}_test_{secrets.token_hex(12)}"


def _int_param(params: dict[str, Any], name: str, *, required: bool = False) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise missing_param(name)
        return None
    try:
        return int(str(value))
    except ValueError:
        raise StripeHTTPError(400, f"Invalid integer: {value}", code="parameter_invalid_integer", param=name) from None


def _str_param(params: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise missing_param(name)
        return None
    if not isinstance(value, str):
        raise StripeHTTPError(400, f"Invalid string: {value!r}", code="parameter_invalid_string", param=name)
    return value


def _check_length(value: str, param: str, limit: int) -> None:
    if len(value) > limit:
        raise StripeHTTPError(400, f"Invalid string: {value[:20]}...; must be at most {limit} characters",
                              code="parameter_invalid_string_too_long", param=param)


def _metadata(params: dict[str, Any]) -> dict[str, str]:
    value = params.get("metadata") or {}
    if not isinstance(value, dict):
        raise StripeHTTPError(400, "Invalid object", code="parameter_invalid_object", param="metadata")
    return {str(k): str(v) for k, v in value.items()}


def _bool_param(params: dict[str, Any], name: str) -> bool | None:
    value = params.get(name)
    if value is None:
        return None
    if value not in ("true", "false"):
        raise StripeHTTPError(400, f"Invalid boolean: {value}", code="parameter_invalid_boolean", param=name)
    return bool(value == "true")


def _whole_or_none(decimal: str) -> int | None:
    number = float(decimal)
    return int(number) if number.is_integer() else None


def _add_month(ts: int) -> int:
    t = time.gmtime(ts)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    day = min(t.tm_mday, calendar.monthrange(year, month)[1])
    return calendar.timegm((year, month, day, t.tm_hour, t.tm_min, t.tm_sec, 0, 0, 0))


def _add_interval(ts: int, interval: str, count: int) -> int:
    if interval == "day":
        return ts + count * DAY
    if interval == "week":
        return ts + count * 7 * DAY
    months = count * (12 if interval == "year" else 1)
    for _ in range(months):
        ts = _add_month(ts)
    return ts


def _iso(ts: float) -> str:
    """Stripe's v2 timestamps: RFC 3339 in UTC with milliseconds."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


def _cents(quantity: int, unit_amount_decimal: str) -> int:
    return int((Decimal(quantity) * Decimal(unit_amount_decimal)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


# An event destination: a URL, or a callable taking (body, headers) and answering an HTTP status.
Destination = str | Callable[[bytes, dict[str, str]], int]

_Route = Callable[["FakeStripe", _Request, list[str]], _Answer]


class FakeStripe:
    """In-memory Stripe imitation on 127.0.0.1:<random port>; use as a context manager."""

    api_key = "sk_test_fake_aikit"

    def __init__(self, *, strict_concurrency: bool = True, validate_customers: bool | None = None,
                 rate_limit: int | None = TEST_MODE_RATE_LIMIT) -> None:
        self.strict_concurrency = strict_concurrency  # answer 429 on a concurrent call per customer and meter
        self.rules: dict[str, RuleMode] = dict(DEFAULT_RULES)
        if validate_customers is not None:
            self.validate_customers = validate_customers
        self.rate_limit = rate_limit  # requests per second for the account (None: no limit)
        self.finalization_grace = DEFAULT_FINALIZATION_GRACE_SECONDS
        self.max_sample_errors = MAX_SAMPLE_ERRORS
        self.latency = 0.0  # seconds added to every answer
        self.timeout_seconds = 2.0  # how long a "timeout" fault stalls; keep it above the client's timeout
        self.refused_keys: dict[str, int] = {}  # API key -> 401 (invalid/revoked) or 403 (lacks permission)
        self.duplicate_code: str | None = None  # see the module docstring
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._clock_offset = 0.0
        self._destination: tuple[Destination, str] | None = None
        self._clear()

    @property
    def validate_customers(self) -> bool:
        """Compatibility switch: False turns the customer check off (accepted and counted), True makes it sync."""
        return self.rules["customer"] != "off"

    @validate_customers.setter
    def validate_customers(self, value: bool) -> None:
        self.rules["customer"] = "sync" if value else "off"

    # --- lifecycle ---------------------------------------------------------------------------------------

    def _clear(self) -> None:
        self.customers: dict[str, dict[str, Any]] = {}
        self.products: dict[str, dict[str, Any]] = {}
        self.prices: dict[str, dict[str, Any]] = {}
        self.meters: dict[str, dict[str, Any]] = {}
        self.checkout_sessions: dict[str, dict[str, Any]] = {}
        self.portal_sessions: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.events_v2: dict[str, dict[str, Any]] = {}  # full thin events by id, as GET /v2/core/events serves
        self._events: list[MeterEventRecord] = []
        self._identifiers: dict[str, float] = {}  # identifier -> when it was taken (test clock)
        self._idempotent: dict[str, tuple[str, _Answer, float]] = {}
        self._in_flight_keys: set[str] = set()
        self._in_flight_customers: Counter[tuple[str, str]] = Counter()
        self._faults: list[_Fault] = []
        self._calls: Counter[str] = Counter()
        self._violations = 0
        self._rate_limited = 0
        self._recent: deque[float] = deque()  # monotonic times of the requests of the last second
        self._created_seq = 0
        self._pending_errors: list[_MeterError] = []
        self._outbox: list[str] = []  # thin event ids not yet delivered
        self.deliveries: list[tuple[str, int]] = []  # (event id, HTTP status) of every delivery attempt

    def reset(self) -> None:
        """Forget all objects, events, faults and counters (the server keeps running)."""
        with self._lock:
            self._clear()
            self.latency = 0.0
            self.refused_keys = {}
            self.duplicate_code = None
            self._clock_offset = 0.0

    def start(self) -> FakeStripe:
        handler = type("_BoundHandler", (_Handler,), {"fake": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.block_on_close = False  # idle keep-alive connections must not hold up close()
        self._server = server
        self._stop.clear()
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes handlers stalled by a "timeout" fault
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeStripe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeStripe is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def base_addresses(self) -> dict[str, str]:
        return {"api": self.url, "meter_events": self.url, "connect": self.url, "files": self.url}

    # --- test clock --------------------------------------------------------------------------------------

    def now(self) -> float:
        """The fake's clock: real time plus what `advance` added."""
        return time.time() + self._clock_offset

    def advance(self, seconds: float) -> None:
        """Move the test clock forward: identifiers and idempotency keys expire, periods roll, invoices
        finalize. Requests carry on being answered in real time (rate limit, latency)."""
        if seconds < 0:
            raise ValueError("the test clock only moves forward")
        with self._lock:
            self._clock_offset += seconds

    # --- test controls and inspection --------------------------------------------------------------------

    def inject(
        self, kind: str, *, count: int = 1, path_prefix: str = METER_EVENT_PATH, customer: str | None = None,
        code: str = "meter_event_invalid_value",
    ) -> None:
        """Queue a fault for the next `count` matching requests; faults are used up in the order queued.
        "async_reject": the meter event is accepted (200), then rejected asynchronously with `code`."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULT_KINDS}")
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._faults.append(_Fault(kind, count, path_prefix, customer, code))

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return sum(f.remaining for f in self._faults)

    @property
    def meter_events(self) -> list[MeterEventRecord]:
        """Every meter event answered 200, rejected ones included (see `MeterEventRecord.counted`)."""
        with self._lock:
            return list(self._events)

    def meter_totals(self, event_name: str | None = None) -> dict[str, int]:
        """Sum of the values Stripe counts per customer (for one event name, or all): accepted and not
        rejected asynchronously. Whether they land on an invoice is `invoices()`'s business."""
        totals: Counter[str] = Counter()
        for event in self.meter_events:
            if event.counted and (event_name is None or event.event_name == event_name):
                totals[event.customer] += event.value
        return dict(totals)

    @property
    def calls(self) -> Counter[str]:
        with self._lock:
            return Counter(self._calls)

    @property
    def concurrency_violations(self) -> int:
        """Concurrent meter-event calls for one customer and meter (refused when strict_concurrency)."""
        with self._lock:
            return self._violations

    @property
    def rate_limited(self) -> int:
        """Requests refused by the account rate limit."""
        with self._lock:
            return self._rate_limited

    def add_customer(self, *, email: str | None = None, customer_id: str | None = None) -> str:
        """Create a customer directly (no HTTP)."""
        with self._lock:
            customer = self._customer_object(customer_id or _new_id("cus"), email, None, {})
            self.customers[customer["id"]] = customer
            return str(customer["id"])

    def add_subscription(self, customer: str, price_id: str, *, start: int | None = None,
                         status: str = "active") -> dict[str, Any]:
        """Subscribe a customer directly (no HTTP), its first period starting at `start` (test clock now by
        default; earlier starts give past periods at once)."""
        with self._lock:
            if price_id not in self.prices:
                raise ValueError(f"no price {price_id}")
            subscription = self._subscription_object(customer, [{"price": price_id}], {},
                                                     int(self.now()) if start is None else start)
            subscription["status"] = status
            self.subscriptions[subscription["id"]] = subscription
            return _public(subscription)

    # --- event destination -------------------------------------------------------------------------------

    def event_destination(self, target: Destination, secret: str) -> None:
        """Where thin events go: a URL (POSTed over HTTP) or a callable (body, headers) -> status."""
        with self._lock:
            self._destination = (target, secret)

    def emit_error_reports(self) -> list[str]:
        """Turn the asynchronous rejections so far into thin events (one per event type and meter, like
        Stripe's per-window reports) and queue them for delivery; returns their ids."""
        with self._lock:
            pending, self._pending_errors = self._pending_errors, []
            groups: dict[tuple[str, str | None], list[_MeterError]] = {}
            for error in pending:
                groups.setdefault((error.event_type, error.meter_id), []).append(error)
            ids = []
            for (event_type, meter_id), errors in groups.items():
                event = self._thin_event(event_type, meter_id, errors)
                self.events_v2[event["id"]] = event
                self._outbox.append(event["id"])
                ids.append(event["id"])
            return ids

    def deliver_events(self) -> list[tuple[str, int]]:
        """Emit pending error reports, then deliver every queued thin event to the destination, signed with
        its secret. A delivery that is not answered 2xx stays queued (Stripe retries for days).
        Returns (event id, HTTP status) per attempt; 0 when the destination could not be reached."""
        self.emit_error_reports()
        with self._lock:
            if self._destination is None:
                raise RuntimeError("no event destination: call event_destination(url_or_callable, secret)")
            target, secret = self._destination
            queued = list(self._outbox)
        attempts = []
        for event_id in queued:
            body = json.dumps(self.thin_payload(event_id))
            headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "Stripe/1.0",
                       "Stripe-Signature": stripe.WebhookSignature.generate_signature_header(body, secret)}
            status = self._post(target, body.encode(), headers)
            attempts.append((event_id, status))
            with self._lock:
                self.deliveries.append((event_id, status))
                if 200 <= status < 300 and event_id in self._outbox:
                    self._outbox.remove(event_id)
        return attempts

    @property
    def undelivered(self) -> list[str]:
        with self._lock:
            return list(self._outbox)

    def thin_payload(self, event_id: str) -> dict[str, Any]:
        """What an event destination receives: the event without its data (a thin event)."""
        with self._lock:
            event = self.events_v2[event_id]
        return {k: v for k, v in event.items() if k != "data"}

    @staticmethod
    def _post(target: Destination, body: bytes, headers: dict[str, str]) -> int:
        if callable(target):
            return int(target(body, headers))
        try:
            return httpx.post(target, content=body, headers=headers, timeout=30).status_code
        except httpx.HTTPError:
            return 0

    def _thin_event(self, event_type: str, meter_id: str | None, errors: list[_MeterError]) -> dict[str, Any]:
        by_code: dict[str, list[_MeterError]] = {}
        for error in errors:
            by_code.setdefault(error.code, []).append(error)
        start = min(e.received for e in errors)
        end = max(e.received for e in errors)
        event: dict[str, Any] = {
            "id": "evt_test_" + secrets.token_hex(24),
            "object": "v2.core.event",
            "context": None,
            "created": _iso(self.now()),
            "livemode": False,
            "reason": None,
            "type": event_type,
            "data": {
                "developer_message_summary": f"There {'is' if len(errors) == 1 else 'are'} {len(errors)} "
                                             f"invalid event{'' if len(errors) == 1 else 's'}",
                "reason": {
                    "error_count": len(errors),
                    "error_types": [
                        {"code": code, "error_count": len(group),
                         "sample_errors": [{"error_message": e.message, "request": {"identifier": e.identifier}}
                                           for e in group[: self.max_sample_errors]]}
                        for code, group in by_code.items()
                    ],
                },
                "validation_start": _iso(start - start % 10),
                "validation_end": _iso(end - end % 10 + 10),
            },
        }
        if meter_id is not None:
            event["related_object"] = {"id": meter_id, "type": "billing.meter",
                                       "url": f"/v1/billing/meters/{meter_id}"}
        return event

    # --- invoices ----------------------------------------------------------------------------------------

    def invoices(self, customer: str | None = None) -> list[PeriodInvoice]:
        """Per subscription and billing period (oldest first): what the fake bills, as of the test clock."""
        now = self.now()
        with self._lock:
            subscriptions = [s for s in self.subscriptions.values() if customer in (None, s["customer"])]
            out = []
            for sub in sorted(subscriptions, key=lambda s: s["_seq"]):
                for start, end, invoiced in self._periods(sub, now):
                    finalizes = end + self.finalization_grace
                    status = "not_invoiced" if not invoiced else "finalized" if now >= finalizes else "open"
                    lines = tuple(self._invoice_line(sub["customer"], item, start, end, finalizes)
                                  for item in sub["items"]["data"]
                                  if item["price"]["recurring"] and item["price"]["recurring"]["meter"])
                    out.append(PeriodInvoice(sub["id"], sub["customer"], start, end, finalizes, status, lines))
            return out

    def will_invoice(self, customer: str) -> dict[tuple[int, int], tuple[dict[str, int], int]]:
        """(period_start, period_end) -> (tokens per meter event_name, cents) that this customer is or will be
        billed; periods nothing will ever be billed for (canceled without a final invoice) are left out."""
        out: dict[tuple[int, int], tuple[dict[str, int], int]] = {}
        for invoice in self.invoices(customer):
            if invoice.status != "not_invoiced":
                tokens, cents = out.get((invoice.period_start, invoice.period_end), ({}, 0))
                merged = Counter(tokens)
                merged.update(invoice.tokens)
                out[(invoice.period_start, invoice.period_end)] = (dict(merged), cents + invoice.amount)
        return out

    def uninvoiced(self, customer: str | None = None) -> list[tuple[MeterEventRecord, str]]:
        """Accepted meter events that no invoice counts, with why: "rejected:<code>", "late" (arrived after
        its period's invoice finalized), "canceled" (last period of a subscription canceled without a final
        invoice) or "no_period" (no subscription period of the customer covers its timestamp)."""
        now = self.now()
        with self._lock:
            out = []
            for event in self._events:
                if customer not in (None, event.customer):
                    continue
                if event.rejection is not None:
                    out.append((event, f"rejected:{event.rejection}"))
                    continue
                reason = "no_period"
                for sub in self.subscriptions.values():
                    if sub["customer"] != event.customer or not self._bills_event_name(sub, event.event_name):
                        continue
                    for start, end, invoiced in self._periods(sub, now):
                        if start <= event.timestamp < end:
                            if not invoiced:
                                reason = "canceled"
                            elif event.created >= end + self.finalization_grace:
                                reason = "late"
                            else:
                                reason = ""
                if reason:
                    out.append((event, reason))
            return out

    def _bills_event_name(self, sub: dict[str, Any], event_name: str) -> bool:
        for item in sub["items"]["data"]:
            meter_id = (item["price"]["recurring"] or {}).get("meter")
            if meter_id and self.meters.get(meter_id, {}).get("event_name") == event_name:
                return True
        return False

    def _invoice_line(self, customer: str, item: dict[str, Any], start: int, end: int,
                      finalizes: int) -> InvoiceLine:
        price = item["price"]
        meter = self.meters[price["recurring"]["meter"]]
        quantity = sum(e.value for e in self._events
                       if e.counted and e.customer == customer and e.event_name == meter["event_name"]
                       and start <= e.timestamp < end and e.created < finalizes)
        decimal = price["unit_amount_decimal"]
        return InvoiceLine(price["id"], meter["id"], meter["event_name"], quantity, decimal, _cents(quantity, decimal))

    def _periods(self, sub: dict[str, Any], now: float) -> list[tuple[int, int, bool]]:
        """(start, end, invoiced) of every billing period begun by `now`; an ended subscription's last period
        is cut at its end and invoiced only with invoice_now."""
        recurring = sub["items"]["data"][0]["price"]["recurring"]
        interval, count = recurring["interval"], recurring["interval_count"]
        ended = sub.get("ended_at")
        periods = []
        start = sub["_anchor"]
        while start <= now and (ended is None or start < ended):
            end = _add_interval(start, interval, count)
            if ended is not None and ended <= end:
                periods.append((start, int(ended), bool(sub.get("_invoice_now"))))
                break
            periods.append((start, end, True))
            start = end
        return periods

    # --- plumbing ----------------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        with self._lock:
            self._created_seq += 1
            return self._created_seq

    def _take_fault(self, request: _Request) -> str | None:
        with self._lock:
            for fault in self._faults:
                if not request.path.startswith(fault.path_prefix):
                    continue
                if fault.customer is not None and fault.customer != request.customer:
                    continue
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                if fault.kind == "async_reject":
                    request.async_reject = fault.code
                return fault.kind
        return None

    def _over_rate_limit(self) -> bool:
        """The account's requests per second (a sliding one-second window of real time)."""
        if self.rate_limit is None:
            return False
        with self._lock:
            now = time.monotonic()
            while self._recent and now - self._recent[0] >= 1.0:
                self._recent.popleft()
            if len(self._recent) >= self.rate_limit:
                self._rate_limited += 1
                return True
            self._recent.append(now)
            return False

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stop.wait(seconds)

    def handle(self, request: _Request) -> _Answer:
        """Answer one authenticated request; raises _Drop to close without answering."""
        with self._lock:
            self._calls[request.path] += 1
        auth = self._check_auth(request)
        if auth is not None:
            return auth
        if self._over_rate_limit():
            return _Answer(429, _rate_limit_body(), {"Stripe-Rate-Limited-Reason": "global-rate"})
        fault = self._take_fault(request)
        if fault in ("reset",):
            raise _Drop
        if fault == "timeout":
            self._sleep(self.timeout_seconds)
            raise _Drop
        if fault in ("500", "503"):
            return self._remember(request, _server_error(int(fault)))
        if fault == "429":
            return _Answer(429, _rate_limit_body(), {"Stripe-Rate-Limited-Reason": "global-rate"})

        key = request.headers.get("idempotency-key") if request.method == "POST" else None
        if key:
            with self._lock:
                stored = self._idempotent.get(key)
                if stored is not None and self.now() - stored[2] >= IDEMPOTENCY_KEY_MEMORY_SECONDS:
                    del self._idempotent[key]  # Stripe prunes keys after 24 hours
                    stored = None
                if stored is not None:
                    fingerprint, answer, _ = stored
                    if fingerprint != self._fingerprint(request):
                        raise StripeHTTPError(
                            400,
                            "Keys for idempotent requests can only be used with the same parameters they "
                            f"were first used with. Try using a key other than '{key}' if you meant to "
                            "execute a different request.",
                            type_="idempotency_error",
                        )
                    return _Answer(answer.status, answer.body, {**answer.headers, "Idempotent-Replayed": "true"})
                if key in self._in_flight_keys:
                    raise StripeHTTPError(
                        409,
                        "There is currently another in-progress request using this Idempotent Key (that "
                        "probably means you submitted twice, and the other request is still going through): "
                        f"{key}. Please try again later.",
                        type_="idempotency_error",
                    )
                self._in_flight_keys.add(key)
        try:
            answer = self._execute(request)
            if fault == "accept_then_500":
                answer = _server_error(500)
            if key and (200 <= answer.status < 300 or answer.status >= 500):
                # Stripe saves the result once the endpoint ran (5xx included), not validation failures.
                self._remember(request, answer)
            if fault == "accept_then_drop":
                raise _Drop
            return answer
        finally:
            if key:
                with self._lock:
                    self._in_flight_keys.discard(key)

    def _remember(self, request: _Request, answer: _Answer) -> _Answer:
        key = request.headers.get("idempotency-key") if request.method == "POST" else None
        if key:
            with self._lock:
                self._idempotent.setdefault(key, (self._fingerprint(request), answer, self.now()))
        return answer

    @staticmethod
    def _fingerprint(request: _Request) -> str:
        return f"{request.method} {request.path} {request.raw_body}"

    def _check_auth(self, request: _Request) -> _Answer | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            message = (
                "You did not provide an API key. You need to provide your API key in the Authorization "
                "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY')."
            )
        elif self.refused_keys.get(token) == 403:
            return _Answer(403, {"error": {
                "type": "invalid_request_error",
                "message": f"The provided key '{token[:8]}****' does not have the required permissions for this "
                           "endpoint on account 'acct_fake'. Having the 'rak_billing_meter_event_write' "
                           "permission would allow this request to continue."}})
        elif scheme.lower() != "bearer" or not token.startswith("sk_") or self.refused_keys.get(token) == 401:
            message = f"Invalid API Key provided: {token[:8]}****"
        else:
            return None
        return _Answer(
            401,
            {"error": {"type": "invalid_request_error", "message": message}},
            {"WWW-Authenticate": 'Bearer realm="Stripe"'},
        )

    def _execute(self, request: _Request) -> _Answer:
        parts = [p for p in request.path.split("/") if p]
        for method, pattern, route in _ROUTES:
            if method != request.method or len(pattern) != len(parts):
                continue
            args = []
            for want, got in zip(pattern, parts, strict=True):
                if want == "*":
                    args.append(got)
                elif want != got:
                    break
            else:
                if request.path.startswith(METER_EVENT_PATH):
                    return route(self, request, args)  # applies latency inside its concurrency window
                self._sleep(self.latency)
                return route(self, request, args)
        raise StripeHTTPError(
            404,
            f"Unrecognized request URL ({request.method}: {request.path}). "
            "Please see https://stripe.com/docs or we can help at https://support.stripe.com/.",
        )

    def _list(
        self, request: _Request, objects: list[dict[str, Any]], url: str, *, newest_first: bool = True
    ) -> _Answer:
        limit = _int_param(request.params, "limit") or 10
        if not 1 <= limit <= 100:
            raise StripeHTTPError(400, "This value must be between 1 and 100.", param="limit")
        ordered = sorted(objects, key=lambda o: o["_seq"], reverse=newest_first)
        after = _str_param(request.params, "starting_after")
        before = _str_param(request.params, "ending_before")
        ids = [o["id"] for o in ordered]
        if after is not None:
            if after not in ids:
                raise missing("object", after, "starting_after")
            ordered = ordered[ids.index(after) + 1 :]
            page = ordered[:limit]
            has_more = len(ordered) > limit
        elif before is not None:
            if before not in ids:
                raise missing("object", before, "ending_before")
            ordered = ordered[: ids.index(before)]
            page = ordered[-limit:]
            has_more = len(ordered) > limit
        else:
            page = ordered[:limit]
            has_more = len(ordered) > limit
        return _Answer(200, {"object": "list", "url": url, "has_more": has_more, "data": [_public(o) for o in page]})

    # --- customers ---------------------------------------------------------------------------------------

    def _customer_object(
        self, customer_id: str, email: str | None, name: str | None, metadata: dict[str, str]
    ) -> dict[str, Any]:
        return {
            "id": customer_id,
            "object": "customer",
            "created": int(self.now()),
            "email": email,
            "name": name,
            "metadata": metadata,
            "livemode": False,
            "_seq": self._next_seq(),
        }

    def _customer(self, customer_id: str, param: str = "id") -> dict[str, Any]:
        with self._lock:
            customer = self.customers.get(customer_id)
        if customer is None or customer.get("deleted"):
            raise missing("customer", customer_id, param)
        return customer

    def create_customer_route(self, request: _Request, _: list[str]) -> _Answer:
        p = request.params
        customer = self._customer_object(_new_id("cus"), _str_param(p, "email"), _str_param(p, "name"), _metadata(p))
        with self._lock:
            self.customers[customer["id"]] = customer
        return _Answer(200, _public(customer))

    def get_customer_route(self, _: _Request, args: list[str]) -> _Answer:
        return _Answer(200, _public(self._customer(args[0])))

    def list_customers_route(self, request: _Request, _: list[str]) -> _Answer:
        email = _str_param(request.params, "email")
        with self._lock:
            found = [c for c in self.customers.values() if email is None or c["email"] == email]
        return self._list(request, found, "/v1/customers")

    # --- products and prices -----------------------------------------------------------------------------

    def create_product_route(self, request: _Request, _: list[str]) -> _Answer:
        p = request.params
        product = {
            "id": _str_param(p, "id") or _new_id("prod"),
            "object": "product",
            "active": _bool_param(p, "active") is not False,
            "created": int(self.now()),
            "name": _str_param(p, "name", required=True),
            "description": _str_param(p, "description"),
            "metadata": _metadata(p),
            "livemode": False,
            "_seq": self._next_seq(),
        }
        with self._lock:
            if product["id"] in self.products:
                raise StripeHTTPError(
                    400,
                    f"Product already exists: {product['id']}",
                    code="resource_already_exists",
                    param="id",
                )
            self.products[product["id"]] = product
        return _Answer(200, _public(product))

    def get_product_route(self, _: _Request, args: list[str]) -> _Answer:
        with self._lock:
            product = self.products.get(args[0])
        if product is None:
            raise missing("product", args[0])
        return _Answer(200, _public(product))

    def list_products_route(self, request: _Request, _: list[str]) -> _Answer:
        active = _bool_param(request.params, "active")
        with self._lock:
            found = [p for p in self.products.values() if active is None or p["active"] == active]
        return self._list(request, found, "/v1/products")

    def _recurring_param(self, recurring_in: Any) -> dict[str, Any] | None:
        if recurring_in is None:
            return None
        if not isinstance(recurring_in, dict) or recurring_in.get("interval") not in ("day", "week", "month", "year"):
            raise StripeHTTPError(400, "Invalid recurring[interval]", param="recurring[interval]")
        usage_type = recurring_in.get("usage_type", "licensed")
        meter = recurring_in.get("meter")
        if usage_type == "metered":
            if not meter:
                raise StripeHTTPError(
                    400,
                    "Metered prices must be backed by a meter: pass recurring[meter].",
                    code="parameter_missing",
                    param="recurring[meter]",
                )
            with self._lock:
                if meter not in self.meters:
                    raise missing("billing meter", meter, "recurring[meter]")
        return {
            "interval": recurring_in["interval"],
            "interval_count": int(recurring_in.get("interval_count", 1)),
            "meter": meter,
            "trial_period_days": None,
            "usage_type": usage_type,
        }

    def create_price_route(self, request: _Request, _: list[str]) -> _Answer:
        p = request.params
        currency = (_str_param(p, "currency", required=True) or "").lower()
        product_id = _str_param(p, "product")
        if product_id is None:
            raise missing_param("product")
        with self._lock:
            if product_id not in self.products:
                raise missing("product", product_id, "product")
        unit_amount = _int_param(p, "unit_amount")
        decimal = _str_param(p, "unit_amount_decimal")
        if unit_amount is None and decimal is None:
            raise StripeHTTPError(
                400, "Missing required param: unit_amount.", code="parameter_missing", param="unit_amount"
            )
        if decimal is not None:
            try:
                float(decimal)
            except ValueError:
                raise StripeHTTPError(
                    400,
                    f"Invalid decimal: {decimal}",
                    code="parameter_invalid_decimal",
                    param="unit_amount_decimal",
                ) from None
        recurring = self._recurring_param(p.get("recurring"))
        lookup_key = _str_param(p, "lookup_key")
        price = {
            "id": _new_id("price"),
            "object": "price",
            "active": _bool_param(p, "active") is not False,
            "billing_scheme": "per_unit",
            "created": int(self.now()),
            "currency": currency,
            "livemode": False,
            "lookup_key": lookup_key,
            "metadata": _metadata(p),
            "nickname": _str_param(p, "nickname"),
            "product": product_id,
            "recurring": recurring,
            "type": "recurring" if recurring else "one_time",
            "unit_amount": unit_amount if decimal is None else _whole_or_none(decimal),
            "unit_amount_decimal": decimal if decimal is not None else str(unit_amount),
            "_seq": self._next_seq(),
        }
        with self._lock:
            if lookup_key is not None:
                holder = next((x for x in self.prices.values() if x["lookup_key"] == lookup_key), None)
                if holder is not None:
                    if _bool_param(p, "transfer_lookup_key") is not True:
                        raise StripeHTTPError(
                            400,
                            f"A price (`{holder['id']}`) already uses that lookup key.",
                            param="lookup_key",
                        )
                    holder["lookup_key"] = None
            self.prices[price["id"]] = price
        return _Answer(200, _public(price))

    def get_price_route(self, _: _Request, args: list[str]) -> _Answer:
        with self._lock:
            price = self.prices.get(args[0])
        if price is None:
            raise missing("price", args[0])
        return _Answer(200, _public(price))

    def list_prices_route(self, request: _Request, _: list[str]) -> _Answer:
        p = request.params
        active = _bool_param(p, "active")
        product = _str_param(p, "product")
        keys = p.get("lookup_keys")
        if isinstance(keys, str):
            keys = [keys]
        with self._lock:
            found = [
                x
                for x in self.prices.values()
                if (active is None or x["active"] == active)
                and (product is None or x["product"] == product)
                and (keys is None or x["lookup_key"] in keys)
            ]
        return self._list(request, found, "/v1/prices")

    # --- billing meters ----------------------------------------------------------------------------------

    def create_meter_route(self, request: _Request, _: list[str]) -> _Answer:
        p = request.params
        display_name = _str_param(p, "display_name", required=True)
        event_name = _str_param(p, "event_name", required=True)
        aggregation = p.get("default_aggregation")
        formula = aggregation.get("formula") if isinstance(aggregation, dict) else None
        if formula not in ("sum", "count", "last"):
            raise StripeHTTPError(
                400,
                "Missing or invalid param: default_aggregation[formula] (one of count, last, sum).",
                code="parameter_missing" if formula is None else "parameter_invalid_string",
                param="default_aggregation[formula]",
            )
        mapping = p.get("customer_mapping") or {"event_payload_key": "stripe_customer_id", "type": "by_id"}
        if not isinstance(mapping, dict) or mapping.get("type") != "by_id" or not mapping.get("event_payload_key"):
            raise StripeHTTPError(400, "Invalid customer_mapping.", param="customer_mapping")
        value_settings = p.get("value_settings") or {"event_payload_key": "value"}
        if not isinstance(value_settings, dict) or not value_settings.get("event_payload_key"):
            raise StripeHTTPError(400, "Invalid value_settings.", param="value_settings")
        now = int(self.now())
        meter = {
            "id": _new_id("mtr"),
            "object": "billing.meter",
            "created": now,
            "customer_mapping": {"event_payload_key": mapping["event_payload_key"], "type": "by_id"},
            "default_aggregation": {"formula": formula},
            "display_name": display_name,
            "event_name": event_name,
            "event_time_window": _str_param(p, "event_time_window"),
            "livemode": False,
            "status": "active",
            "status_transitions": {"deactivated_at": None},
            "updated": now,
            "value_settings": {"event_payload_key": value_settings["event_payload_key"]},
            "_seq": self._next_seq(),
        }
        with self._lock:
            if self._active_meter(str(event_name)) is not None:
                raise StripeHTTPError(
                    400,
                    f"An active meter with event_name `{event_name}` already exists.",
                    param="event_name",
                )
            self.meters[meter["id"]] = meter
        return _Answer(200, _public(meter))

    def _active_meter(self, event_name: str) -> dict[str, Any] | None:
        with self._lock:
            return next(
                (m for m in self.meters.values() if m["event_name"] == event_name and m["status"] == "active"),
                None,
            )

    def _meter(self, meter_id: str) -> dict[str, Any]:
        with self._lock:
            meter = self.meters.get(meter_id)
        if meter is None:
            raise missing("billing meter", meter_id)
        return meter

    def get_meter_route(self, _: _Request, args: list[str]) -> _Answer:
        return _Answer(200, _public(self._meter(args[0])))

    def list_meters_route(self, request: _Request, _: list[str]) -> _Answer:
        status = _str_param(request.params, "status")
        with self._lock:
            found = [m for m in self.meters.values() if status is None or m["status"] == status]
        return self._list(request, found, "/v1/billing/meters")

    def deactivate_meter_route(self, _: _Request, args: list[str]) -> _Answer:
        meter = self._meter(args[0])
        with self._lock:
            meter["status"] = "inactive"
            meter["status_transitions"] = {"deactivated_at": int(self.now())}
            meter["updated"] = int(self.now())
        return _Answer(200, _public(meter))

    def reactivate_meter_route(self, _: _Request, args: list[str]) -> _Answer:
        meter = self._meter(args[0])
        with self._lock:
            if meter["status"] != "active" and self._active_meter(meter["event_name"]) is not None:
                raise StripeHTTPError(400, "Another active meter uses this event_name.", param="event_name")
            meter["status"] = "active"
            meter["status_transitions"] = {"deactivated_at": None}
            meter["updated"] = int(self.now())
        return _Answer(200, _public(meter))

    def create_meter_event_route(self, request: _Request, _: list[str]) -> _Answer:
        p = request.params
        event_name = str(_str_param(p, "event_name", required=True))
        _check_length(event_name, "event_name", MAX_EVENT_NAME_LENGTH)
        identifier = _str_param(p, "identifier") or _new_id("mtrevt")
        _check_length(identifier, "identifier", MAX_IDENTIFIER_LENGTH)
        errors: list[tuple[str, str, str, str | None]] = []  # (event type, code, message, meter id)
        meter = self._active_meter(event_name)
        if meter is None:
            problem = self._meter_problem(event_name)
            errors += [problem] if problem else []
            meter = self._any_meter(event_name)
        payload, customer_id, value = self._meter_event_payload(p, meter)
        now = self.now()
        timestamp = _int_param(p, "timestamp")
        if timestamp is None:
            timestamp = int(now)
        errors += self._timestamp_problems(timestamp, now, meter)
        errors += self._customer_problems(customer_id, meter)
        if request.async_reject is not None and meter is not None:
            errors.append((ERROR_REPORT_TRIGGERED, request.async_reject,
                           f"Meter event {identifier} was rejected ({request.async_reject}).", meter["id"]))
        record = MeterEventRecord(identifier, event_name, customer_id, value, timestamp, now,
                                  meter["id"] if meter else None)
        self._record_meter_event(record, self._rejection(errors))
        return _Answer(
            200,
            {
                "object": "billing.meter_event",
                "created": int(record.created),
                "event_name": event_name,
                "identifier": identifier,
                "livemode": False,
                "payload": {str(k): str(v) for k, v in payload.items()},
                "timestamp": timestamp,
            },
        )

    @staticmethod
    def _meter_event_payload(p: dict[str, Any], meter: dict[str, Any] | None) -> tuple[dict[str, Any], str, int]:
        """The payload, its customer and its whole-number value, under the meter's payload keys."""
        payload = p.get("payload")
        if not isinstance(payload, dict):
            raise missing_param("payload")
        for key, value in payload.items():
            if not isinstance(value, str):
                raise StripeHTTPError(400, f"Invalid string: {value!r}", code="parameter_invalid_string",
                                      param=f"payload[{key}]")
            _check_length(value, f"payload[{key}]", MAX_STRING_LENGTH)
        customer_key = meter["customer_mapping"]["event_payload_key"] if meter else "stripe_customer_id"
        value_key = meter["value_settings"]["event_payload_key"] if meter else "value"
        customer_id = payload.get(customer_key)
        if not isinstance(customer_id, str) or not customer_id:
            raise StripeHTTPError(
                400,
                f"Missing required param: payload[{customer_key}].",
                code="parameter_missing",
                param=f"payload[{customer_key}]",
            )
        formula = meter["default_aggregation"]["formula"] if meter else "sum"
        raw_value = payload.get(value_key, "1" if formula == "count" else None)
        if not isinstance(raw_value, str) or not _WHOLE_NUMBER.match(raw_value):
            raise StripeHTTPError(
                400,
                f"Invalid payload[{value_key}]: must be a whole number, got {raw_value!r}.",
                code="parameter_invalid_integer",
                param=f"payload[{value_key}]",
            )
        if len(raw_value.lstrip("-").lstrip("0")) > MAX_VALUE_DIGITS:
            # API 2026-04-22.dahlia: Stripe aggregates in double precision and refuses longer values.
            raise StripeHTTPError(
                400,
                f"The value in the event payload can have at most {MAX_VALUE_DIGITS} digits. Received {raw_value}.",
                code="meter_event_value_too_many_digits",
                param=f"payload[{value_key}]",
            )
        return payload, customer_id, int(raw_value)

    def _record_meter_event(self, record: MeterEventRecord,
                            rejection: tuple[str, str, str, str | None] | None) -> None:
        """Keep the event unless its identifier was taken in the last 24 h; one call per customer and meter."""
        slot = (record.customer, record.meter_id or record.event_name)
        with self._lock:
            busy = self._in_flight_customers[slot] > 0
            if busy:
                self._violations += 1
            if busy and self.strict_concurrency:
                raise StripeHTTPError(
                    429,
                    "Too many concurrent requests for this customer and meter; send one at a time.",
                    code="rate_limit",
                    headers={"Stripe-Rate-Limited-Reason": "resource-specific"},
                )
            self._in_flight_customers[slot] += 1
        try:
            self._sleep(self.latency)
            with self._lock:
                now = self.now()
                taken = self._identifiers.get(record.identifier)
                if taken is not None and now - taken < IDENTIFIER_MEMORY_SECONDS:
                    if self.duplicate_code is not None:
                        raise StripeHTTPError(
                            400, f"Meter event identifier {record.identifier} was used before.",
                            code=self.duplicate_code, param="identifier",
                            headers={"Stripe-Should-Retry": "false"})
                    raise StripeHTTPError(
                        400,
                        f"An event already exists with identifier {record.identifier}.",
                        param="identifier",
                        headers={"Stripe-Should-Retry": "false"},
                    )
                self._identifiers[record.identifier] = now
                record.created = now
                self._events.append(record)
                if rejection is not None:
                    event_type, code, message, meter_id = rejection
                    record.rejection = code
                    self._pending_errors.append(_MeterError(event_type, meter_id, code, message, record.identifier,
                                                            now))
        finally:
            with self._lock:
                self._in_flight_customers[slot] -= 1

    def _any_meter(self, event_name: str) -> dict[str, Any] | None:
        with self._lock:
            return next((m for m in self.meters.values() if m["event_name"] == event_name), None)

    def _meter_problem(self, event_name: str) -> tuple[str, str, str, str | None] | None:
        """No active meter for event_name: refused now (rule "sync"), reported later ("async"), or counted on
        the inactive meter ("off")."""
        inactive = self._any_meter(event_name)
        mode = self.rules["meter"]
        if mode == "off" and inactive is not None:
            return None
        if mode == "sync" or mode == "off":
            raise StripeHTTPError(
                400,
                f"No active meter was found for event_name `{event_name}`.",
                code="resource_missing",
                param="event_name",
            )
        if inactive is not None:
            return (ERROR_REPORT_TRIGGERED, "archived_meter", f"Meter {inactive['id']} is not active.",
                    inactive["id"])
        return (NO_METER_FOUND, "no_meter", f"No active meter was found for event_name `{event_name}`.", None)

    def _timestamp_problems(self, timestamp: int, now: float,
                            meter: dict[str, Any] | None) -> list[tuple[str, str, str, str | None]]:
        if timestamp < now - MAX_PAST_SECONDS:
            code, message = "timestamp_too_far_in_past", "Timestamp must be within the past 35 days."
        elif timestamp > now + MAX_FUTURE_SECONDS:
            code, message = "timestamp_in_future", "Timestamp must be no more than 5 minutes in the future."
        else:
            return []
        mode = self.rules["timestamp"]
        if mode == "sync":
            raise StripeHTTPError(400, message, code=code, param="timestamp")
        if mode == "off":
            return []
        return [(ERROR_REPORT_TRIGGERED, code, message, meter["id"] if meter else None)]

    def _customer_problems(self, customer_id: str,
                           meter: dict[str, Any] | None) -> list[tuple[str, str, str, str | None]]:
        with self._lock:
            known = customer_id in self.customers and not self.customers[customer_id].get("deleted")
        mode = self.rules["customer"]
        if known or mode == "off":
            return []
        if mode == "sync":
            key = meter["customer_mapping"]["event_payload_key"] if meter else "stripe_customer_id"
            raise missing("customer", customer_id, f"payload[{key}]")
        return [(ERROR_REPORT_TRIGGERED, "meter_event_customer_not_found", f"No such customer: '{customer_id}'",
                 meter["id"] if meter else None)]

    @staticmethod
    def _rejection(errors: list[tuple[str, str, str, str | None]]) -> tuple[str, str, str, str | None] | None:
        """The error Stripe reports for an event with problems: a missing meter first (nothing else can be
        checked without one), else the first problem found."""
        no_meter = [e for e in errors if e[0] == NO_METER_FOUND]
        first = no_meter or errors
        return first[0] if first else None

    def event_summaries_route(self, request: _Request, args: list[str]) -> _Answer:
        meter = self._meter(args[0])
        p = request.params
        customer_id = str(_str_param(p, "customer", required=True))
        self._customer(customer_id, "customer")
        start = _int_param(p, "start_time", required=True)
        end = _int_param(p, "end_time", required=True)
        assert start is not None
        assert end is not None
        window = _str_param(p, "value_grouping_window")
        step = {None: 60, "hour": 3600, "day": 86400}.get(window)
        if step is None:
            raise StripeHTTPError(
                400, "Invalid value_grouping_window: must be one of day, hour.", param="value_grouping_window"
            )
        unit = {60: "minute", 3600: "hour", 86400: "day"}[step]
        for name, value in (("start_time", start), ("end_time", end)):
            if value % step:
                raise StripeHTTPError(400, f"{name} must be aligned with {unit} boundaries (UTC).", param=name)
        if end <= start:
            raise StripeHTTPError(400, "end_time must be after start_time.", param="end_time")
        windows = [(start, end)] if window is None else [(s, s + step) for s in range(start, end, step)]
        with self._lock:
            events = [e for e in self._events
                      if e.counted and e.event_name == meter["event_name"] and e.customer == customer_id]
        formula = meter["default_aggregation"]["formula"]
        summaries = []
        for seq, (w_start, w_end) in enumerate(windows):
            inside = sorted((e for e in events if w_start <= e.timestamp < w_end), key=lambda e: e.timestamp)
            if formula == "sum":
                value = float(sum(e.value for e in inside))
            elif formula == "count":
                value = float(len(inside))
            else:
                value = float(inside[-1].value) if inside else 0.0
            summaries.append(
                {
                    "id": f"mtrsu_test_{meter['id']}_{customer_id}_{w_start}",
                    "object": "billing.meter_event_summary",
                    "aggregated_value": value,
                    "end_time": w_end,
                    "livemode": False,
                    "meter": meter["id"],
                    "start_time": w_start,
                    "_seq": seq,
                }
            )
        return self._list(request, summaries, f"/v1/billing/meters/{meter['id']}/event_summaries", newest_first=False)

    # --- checkout, portal, subscriptions -----------------------------------------------------------------

    def create_checkout_route(self, request: _Request, _: list[str]) -> _Answer:
        p = request.params
        mode = _str_param(p, "mode", required=True)
        if mode not in ("payment", "setup", "subscription"):
            raise StripeHTTPError(400, f"Invalid mode: {mode}", param="mode")
        customer_id = _str_param(p, "customer")
        if customer_id is not None:
            self._customer(customer_id, "customer")
        success_url = _str_param(p, "success_url", required=True)
        items = p.get("line_items") or []
        if mode != "setup" and not items:
            raise missing_param("line_items")
        for i, item in enumerate(items if isinstance(items, list) else []):
            price_id = item.get("price") if isinstance(item, dict) else None
            with self._lock:
                price = self.prices.get(price_id) if isinstance(price_id, str) else None
            if price is None:
                raise missing("price", str(price_id), f"line_items[{i}][price]")
            recurring = price["recurring"]
            if mode == "subscription" and recurring is None:
                raise StripeHTTPError(
                    400,
                    "You must provide at least one recurring price in `subscription` mode when using prices.",
                    param=f"line_items[{i}][price]",
                )
            if recurring and recurring["usage_type"] == "metered" and "quantity" in item:
                raise StripeHTTPError(
                    400,
                    "Quantity should not be specified where usage_type is `metered`. Remove quantity from "
                    f"`line_items[{i}]`",
                    param=f"line_items[{i}][quantity]",
                )
        session_id = _new_id("cs")
        session = {
            "id": session_id,
            "object": "checkout.session",
            "cancel_url": _str_param(p, "cancel_url"),
            "created": int(self.now()),
            "customer": customer_id,
            "livemode": False,
            "metadata": _metadata(p),
            "mode": mode,
            "status": "open",
            "subscription": None,
            "success_url": success_url,
            "url": f"https://checkout.stripe.test/c/pay/{session_id}",
            "_seq": self._next_seq(),
            "_line_items": items,
        }
        with self._lock:
            self.checkout_sessions[session_id] = session
        return _Answer(200, _public(session))

    def get_checkout_route(self, _: _Request, args: list[str]) -> _Answer:
        with self._lock:
            session = self.checkout_sessions.get(args[0])
        if session is None:
            raise missing("checkout.session", args[0])
        return _Answer(200, _public(session))

    def create_portal_route(self, request: _Request, _: list[str]) -> _Answer:
        p = request.params
        customer_id = str(_str_param(p, "customer", required=True))
        self._customer(customer_id, "customer")
        session_id = _new_id("bps")
        session = {
            "id": session_id,
            "object": "billing_portal.session",
            "created": int(self.now()),
            "customer": customer_id,
            "livemode": False,
            "return_url": _str_param(p, "return_url"),
            "url": f"https://billing.stripe.test/p/session/{session_id}",
            "_seq": self._next_seq(),
        }
        with self._lock:
            self.portal_sessions[session_id] = session
        return _Answer(200, _public(session))

    def _subscription_object(self, customer_id: str, items_in: list[Any], metadata: dict[str, str],
                             start: int) -> dict[str, Any]:
        subscription_id = _new_id("sub")
        items = []
        for i, item in enumerate(items_in):
            price_id = item.get("price") if isinstance(item, dict) else None
            with self._lock:
                price = self.prices.get(price_id) if isinstance(price_id, str) else None
            if price is None:
                raise missing("price", str(price_id), f"items[{i}][price]")
            if price["recurring"] is None:
                raise StripeHTTPError(400, "The price must be recurring.", param=f"items[{i}][price]")
            metered = price["recurring"]["usage_type"] == "metered"
            if metered and "quantity" in item:
                raise StripeHTTPError(
                    400,
                    "Quantity should not be specified where usage_type is `metered`.",
                    param=f"items[{i}][quantity]",
                )
            items.append(
                {
                    "id": _new_id("si"),
                    "object": "subscription_item",
                    "created": start,
                    "current_period_start": start,
                    "current_period_end": _add_interval(start, price["recurring"]["interval"],
                                                        price["recurring"]["interval_count"]),
                    "metadata": {},
                    "price": _public(price),
                    "quantity": None if metered else int(item.get("quantity", 1)),
                    "subscription": subscription_id,
                }
            )
        return {
            "id": subscription_id,
            "object": "subscription",
            "billing_cycle_anchor": start,
            "cancel_at": None,
            "cancel_at_period_end": False,
            "canceled_at": None,
            "created": start,
            "currency": items[0]["price"]["currency"],
            "customer": customer_id,
            "ended_at": None,
            "items": {
                "object": "list",
                "data": items,
                "has_more": False,
                "url": f"/v1/subscription_items?subscription={subscription_id}",
            },
            "livemode": False,
            "metadata": metadata,
            "start_date": start,
            "status": "active",
            "_seq": self._next_seq(),
            "_anchor": start,
        }

    def create_subscription_route(self, request: _Request, _: list[str]) -> _Answer:
        p = request.params
        customer_id = str(_str_param(p, "customer", required=True))
        self._customer(customer_id, "customer")
        items_in = p.get("items")
        if not isinstance(items_in, list) or not items_in:
            raise missing_param("items")
        subscription = self._subscription_object(customer_id, items_in, _metadata(p), int(self.now()))
        with self._lock:
            self.subscriptions[subscription["id"]] = subscription
        return _Answer(200, self._subscription_view(subscription))

    def _subscription(self, subscription_id: str) -> dict[str, Any]:
        with self._lock:
            subscription = self.subscriptions.get(subscription_id)
        if subscription is None:
            raise missing("subscription", subscription_id)
        return subscription

    def _subscription_view(self, subscription: dict[str, Any]) -> dict[str, Any]:
        """The subscription as of the test clock: its items carry the current billing period (basil shape)."""
        with self._lock:
            periods = self._periods(subscription, self.now())
            if periods:
                start, end, _ = periods[-1]
                for item in subscription["items"]["data"]:
                    item["current_period_start"], item["current_period_end"] = start, end
            view: dict[str, Any] = json.loads(json.dumps(_public(subscription)))
            return view

    def get_subscription_route(self, _: _Request, args: list[str]) -> _Answer:
        return _Answer(200, self._subscription_view(self._subscription(args[0])))

    def list_subscriptions_route(self, request: _Request, _: list[str]) -> _Answer:
        p = request.params
        customer = _str_param(p, "customer")
        price = _str_param(p, "price")
        status = _str_param(p, "status")
        with self._lock:
            found = [
                s for s in self.subscriptions.values()
                if customer in (None, s["customer"])
                and (price is None or any(i["price"]["id"] == price for i in s["items"]["data"]))
                # Stripe lists every status but canceled unless asked for "all" or one status.
                and (s["status"] == status if status not in (None, "all") else
                     status == "all" or s["status"] != "canceled")
            ]
        answer = self._list(request, found, "/v1/subscriptions")
        answer.body["data"] = [self._subscription_view(self.subscriptions[o["id"]]) for o in answer.body["data"]]
        return answer

    def update_subscription_route(self, request: _Request, args: list[str]) -> _Answer:
        subscription = self._subscription(args[0])
        cancel_at_period_end = _bool_param(request.params, "cancel_at_period_end")
        with self._lock:
            if cancel_at_period_end is not None:
                subscription["cancel_at_period_end"] = cancel_at_period_end
            subscription["metadata"].update(_metadata(request.params))
        return _Answer(200, self._subscription_view(subscription))

    def cancel_subscription_route(self, request: _Request, args: list[str]) -> _Answer:
        """Cancel now. Without invoice_now=true the usage of the last, partial period is never invoiced."""
        subscription = self._subscription(args[0])
        invoice_now = _bool_param(request.params, "invoice_now") is True
        with self._lock:
            now = int(self.now())
            subscription.update(status="canceled", canceled_at=now, ended_at=now, _invoice_now=invoice_now)
        return _Answer(200, self._subscription_view(subscription))

    # --- v2 events ---------------------------------------------------------------------------------------

    def get_v2_event_route(self, _: _Request, args: list[str]) -> _Answer:
        with self._lock:
            event = self.events_v2.get(args[0])
        if event is None:
            raise StripeHTTPError(404, f"Event {args[0]} not found.", type_="not_found", code="not_found")
        return _Answer(200, json.loads(json.dumps(event)))


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def _server_error(status: int) -> _Answer:
    return _Answer(status, {"error": {"type": "api_error", "message": "An unknown error occurred."}})


def _rate_limit_body() -> dict[str, Any]:
    return {
        "error": {
            "type": "invalid_request_error",
            "code": "rate_limit",
            "doc_url": "https://stripe.com/docs/error-codes/rate-limit",
            "message": "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
        }
    }


_ROUTES: list[tuple[str, list[str], _Route]] = [
    ("POST", ["v1", "customers"], FakeStripe.create_customer_route),
    ("GET", ["v1", "customers"], FakeStripe.list_customers_route),
    ("GET", ["v1", "customers", "*"], FakeStripe.get_customer_route),
    ("POST", ["v1", "products"], FakeStripe.create_product_route),
    ("GET", ["v1", "products"], FakeStripe.list_products_route),
    ("GET", ["v1", "products", "*"], FakeStripe.get_product_route),
    ("POST", ["v1", "prices"], FakeStripe.create_price_route),
    ("GET", ["v1", "prices"], FakeStripe.list_prices_route),
    ("GET", ["v1", "prices", "*"], FakeStripe.get_price_route),
    ("POST", ["v1", "billing", "meters"], FakeStripe.create_meter_route),
    ("GET", ["v1", "billing", "meters"], FakeStripe.list_meters_route),
    ("GET", ["v1", "billing", "meters", "*"], FakeStripe.get_meter_route),
    ("POST", ["v1", "billing", "meters", "*", "deactivate"], FakeStripe.deactivate_meter_route),
    ("POST", ["v1", "billing", "meters", "*", "reactivate"], FakeStripe.reactivate_meter_route),
    ("GET", ["v1", "billing", "meters", "*", "event_summaries"], FakeStripe.event_summaries_route),
    ("POST", ["v1", "billing", "meter_events"], FakeStripe.create_meter_event_route),
    ("POST", ["v1", "checkout", "sessions"], FakeStripe.create_checkout_route),
    ("GET", ["v1", "checkout", "sessions", "*"], FakeStripe.get_checkout_route),
    ("POST", ["v1", "billing_portal", "sessions"], FakeStripe.create_portal_route),
    ("POST", ["v1", "subscriptions"], FakeStripe.create_subscription_route),
    ("GET", ["v1", "subscriptions"], FakeStripe.list_subscriptions_route),
    ("GET", ["v1", "subscriptions", "*"], FakeStripe.get_subscription_route),
    ("POST", ["v1", "subscriptions", "*"], FakeStripe.update_subscription_route),
    ("DELETE", ["v1", "subscriptions", "*"], FakeStripe.cancel_subscription_route),
    ("GET", ["v2", "core", "events", "*"], FakeStripe.get_v2_event_route),
]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeStripe
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's pooled client expects
    timeout = 30  # idle keep-alive connections give up eventually
    # One buffered write per answer with Nagle off: split small writes on keep-alive meet delayed ACKs (~40 ms).
    wbufsize = -1
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length).decode("utf-8") if length else ""
        raw = raw_body if method == "POST" else split.query
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            params = decode_form(raw)
            request = _Request(method, split.path, params, raw, headers)
            answer = self.fake.handle(request)
        except _Drop:
            self._drop()
            return
        except StripeHTTPError as exc:
            answer = _Answer(exc.status, exc.body(), exc.headers)
        except Exception as exc:  # a bug in the fake: answer like Stripe would, but say what broke
            answer = _Answer(500, {"error": {"type": "api_error", "message": f"fake stripe bug: {exc!r}"}})
        self._send(answer, headers)

    def _send(self, answer: _Answer, request_headers: dict[str, str]) -> None:
        body = json.dumps(answer.body).encode()
        self.send_response(answer.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Request-Id", "req_" + secrets.token_hex(7))
        if "idempotency-key" in request_headers:
            self.send_header("Idempotency-Key", request_headers["idempotency-key"])
        if "stripe-version" in request_headers:
            self.send_header("Stripe-Version", request_headers["stripe-version"])
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
