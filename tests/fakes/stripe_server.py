"""A local Stripe-compatible HTTP server for tests: the real `stripe` SDK talks to it via `base_addresses`.

It keeps the few resources aikit touches in memory and answers with Stripe-shaped bodies and statuses,
including the meter-event rules that matter for billing correctness (identifier uniqueness, timestamp
window, active meter, known customer), Idempotency-Key replay, and injectable network/server faults.

    with FakeStripe() as fake:
        client = stripe.StripeClient(fake.api_key, base_addresses={"api": fake.url, ...})
"""

from __future__ import annotations

import calendar
import contextlib
import json
import re
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

FAULT_KINDS = ("500", "503", "429", "timeout", "accept_then_500", "accept_then_drop", "reset")
METER_EVENT_PATH = "/v1/billing/meter_events"
MAX_PAST_SECONDS = 35 * 86400
MAX_FUTURE_SECONDS = 5 * 60
_WHOLE_NUMBER = re.compile(r"^[0-9]+$")


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


@dataclass(frozen=True)
class MeterEventRecord:
    identifier: str
    event_name: str
    customer: str
    value: int
    timestamp: int
    created: float


@dataclass
class _Fault:
    kind: str
    remaining: int
    path_prefix: str
    customer: str | None


@dataclass
class _Request:
    method: str
    path: str
    params: dict[str, Any]
    raw_body: str
    headers: dict[str, str]

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


_Route = Callable[["FakeStripe", _Request, list[str]], _Answer]


class FakeStripe:
    """In-memory Stripe imitation on 127.0.0.1:<random port>; use as a context manager."""

    api_key = "sk_test_fake_aikit"

    def __init__(self, *, strict_concurrency: bool = False, validate_customers: bool = True) -> None:
        self.strict_concurrency = strict_concurrency  # answer 429 on a concurrent call per customer and meter
        self.validate_customers = validate_customers  # refuse unknown customers' meter events at once
        self.latency = 0.0  # seconds added to every answer
        self.timeout_seconds = 2.0  # how long a "timeout" fault stalls; keep it above the client's timeout
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._clear()

    # --- lifecycle ---------------------------------------------------------------------------------------

    def _clear(self) -> None:
        self.customers: dict[str, dict[str, Any]] = {}
        self.products: dict[str, dict[str, Any]] = {}
        self.prices: dict[str, dict[str, Any]] = {}
        self.meters: dict[str, dict[str, Any]] = {}
        self.checkout_sessions: dict[str, dict[str, Any]] = {}
        self.portal_sessions: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self._events: list[MeterEventRecord] = []
        self._identifiers: set[str] = set()
        self._idempotent: dict[str, tuple[str, _Answer]] = {}
        self._in_flight_keys: set[str] = set()
        self._in_flight_customers: Counter[tuple[str, str]] = Counter()
        self._faults: list[_Fault] = []
        self._calls: Counter[str] = Counter()
        self._violations = 0
        self._created_seq = 0

    def reset(self) -> None:
        """Forget all objects, events, faults and counters (the server keeps running)."""
        with self._lock:
            self._clear()
            self.latency = 0.0

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

    # --- test controls and inspection --------------------------------------------------------------------

    def inject(
        self, kind: str, *, count: int = 1, path_prefix: str = METER_EVENT_PATH, customer: str | None = None
    ) -> None:
        """Queue a fault for the next `count` matching requests; faults are used up in the order queued."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULT_KINDS}")
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._faults.append(_Fault(kind, count, path_prefix, customer))

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return sum(f.remaining for f in self._faults)

    @property
    def meter_events(self) -> list[MeterEventRecord]:
        with self._lock:
            return list(self._events)

    def meter_totals(self, event_name: str | None = None) -> dict[str, int]:
        """Sum of accepted values per customer (for one event name, or all)."""
        totals: Counter[str] = Counter()
        for event in self.meter_events:
            if event_name is None or event.event_name == event_name:
                totals[event.customer] += event.value
        return dict(totals)

    @property
    def calls(self) -> Counter[str]:
        with self._lock:
            return Counter(self._calls)

    @property
    def concurrency_violations(self) -> int:
        with self._lock:
            return self._violations

    def add_customer(self, *, email: str | None = None, customer_id: str | None = None) -> str:
        """Create a customer directly (no HTTP)."""
        with self._lock:
            customer = self._customer_object(customer_id or _new_id("cus"), email, None, {})
            self.customers[customer["id"]] = customer
            return str(customer["id"])

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
                return fault.kind
        return None

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
        fault = self._take_fault(request)
        if fault in ("reset",):
            raise _Drop
        if fault == "timeout":
            self._sleep(self.timeout_seconds)
            raise _Drop
        if fault in ("500", "503"):
            return self._remember(request, _server_error(int(fault)))
        if fault == "429":
            return _Answer(429, _rate_limit_body())

        key = request.headers.get("idempotency-key") if request.method == "POST" else None
        if key:
            with self._lock:
                stored = self._idempotent.get(key)
                if stored is not None:
                    fingerprint, answer = stored
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
                self._idempotent.setdefault(key, (self._fingerprint(request), answer))
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
        elif scheme.lower() != "bearer" or not token.startswith("sk_"):
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
            "created": int(time.time()),
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
            "created": int(time.time()),
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
        recurring_in = p.get("recurring")
        recurring: dict[str, Any] | None = None
        if recurring_in is not None:
            if not isinstance(recurring_in, dict) or recurring_in.get("interval") not in (
                "day",
                "week",
                "month",
                "year",
            ):
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
            recurring = {
                "interval": recurring_in["interval"],
                "interval_count": int(recurring_in.get("interval_count", 1)),
                "meter": meter,
                "trial_period_days": None,
                "usage_type": usage_type,
            }
        lookup_key = _str_param(p, "lookup_key")
        price = {
            "id": _new_id("price"),
            "object": "price",
            "active": _bool_param(p, "active") is not False,
            "billing_scheme": "per_unit",
            "created": int(time.time()),
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
        now = int(time.time())
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
            meter["status_transitions"] = {"deactivated_at": int(time.time())}
            meter["updated"] = int(time.time())
        return _Answer(200, _public(meter))

    def reactivate_meter_route(self, _: _Request, args: list[str]) -> _Answer:
        meter = self._meter(args[0])
        with self._lock:
            if meter["status"] != "active" and self._active_meter(meter["event_name"]) is not None:
                raise StripeHTTPError(400, "Another active meter uses this event_name.", param="event_name")
            meter["status"] = "active"
            meter["status_transitions"] = {"deactivated_at": None}
            meter["updated"] = int(time.time())
        return _Answer(200, _public(meter))

    def create_meter_event_route(self, request: _Request, _: list[str]) -> _Answer:
        p = request.params
        event_name = str(_str_param(p, "event_name", required=True))
        meter = self._active_meter(event_name)
        if meter is None:
            raise StripeHTTPError(
                400,
                f"No active meter was found for event_name `{event_name}`.",
                code="resource_missing",
                param="event_name",
            )
        payload = p.get("payload")
        if not isinstance(payload, dict):
            raise missing_param("payload")
        customer_key = meter["customer_mapping"]["event_payload_key"]
        value_key = meter["value_settings"]["event_payload_key"]
        customer_id = payload.get(customer_key)
        if not isinstance(customer_id, str) or not customer_id:
            raise StripeHTTPError(
                400,
                f"Missing required param: payload[{customer_key}].",
                code="parameter_missing",
                param=f"payload[{customer_key}]",
            )
        raw_value = payload.get(value_key, "1" if meter["default_aggregation"]["formula"] == "count" else None)
        if not isinstance(raw_value, str) or not _WHOLE_NUMBER.match(raw_value):
            raise StripeHTTPError(
                400,
                f"Invalid payload[{value_key}]: must be a whole number, got {raw_value!r}.",
                code="parameter_invalid_integer",
                param=f"payload[{value_key}]",
            )
        now = int(time.time())
        timestamp = _int_param(p, "timestamp")
        if timestamp is None:
            timestamp = now
        if timestamp < now - MAX_PAST_SECONDS:
            raise StripeHTTPError(
                400,
                "Timestamp must be within the past 35 days.",
                code="timestamp_too_far_in_past",
                param="timestamp",
            )
        if timestamp > now + MAX_FUTURE_SECONDS:
            raise StripeHTTPError(
                400,
                "Timestamp must be no more than 5 minutes in the future.",
                code="timestamp_in_future",
                param="timestamp",
            )
        if self.validate_customers:
            with self._lock:
                known = customer_id in self.customers
            if not known:
                raise missing("customer", customer_id, f"payload[{customer_key}]")
        identifier = _str_param(p, "identifier") or _new_id("mtrevt")

        slot = (customer_id, meter["id"])
        with self._lock:
            busy = self._in_flight_customers[slot] > 0
            if busy:
                self._violations += 1
            if busy and self.strict_concurrency:
                raise StripeHTTPError(
                    429,
                    "Too many concurrent requests for this customer and meter; send one at a time.",
                    code="rate_limit",
                )
            self._in_flight_customers[slot] += 1
        try:
            self._sleep(self.latency)
            with self._lock:
                if identifier in self._identifiers:
                    raise StripeHTTPError(
                        400,
                        f"An event already exists with identifier {identifier}.",
                        param="identifier",
                        headers={"Stripe-Should-Retry": "false"},
                    )
                self._identifiers.add(identifier)
                self._events.append(
                    MeterEventRecord(identifier, event_name, customer_id, int(raw_value), timestamp, time.time())
                )
        finally:
            with self._lock:
                self._in_flight_customers[slot] -= 1
        return _Answer(
            200,
            {
                "object": "billing.meter_event",
                "created": now,
                "event_name": event_name,
                "identifier": identifier,
                "livemode": False,
                "payload": {str(k): str(v) for k, v in payload.items()},
                "timestamp": timestamp,
            },
        )

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
            events = [e for e in self._events if e.event_name == meter["event_name"] and e.customer == customer_id]
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
            "created": int(time.time()),
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
            "created": int(time.time()),
            "customer": customer_id,
            "livemode": False,
            "return_url": _str_param(p, "return_url"),
            "url": f"https://billing.stripe.test/p/session/{session_id}",
            "_seq": self._next_seq(),
        }
        with self._lock:
            self.portal_sessions[session_id] = session
        return _Answer(200, _public(session))

    def create_subscription_route(self, request: _Request, _: list[str]) -> _Answer:
        p = request.params
        customer_id = str(_str_param(p, "customer", required=True))
        self._customer(customer_id, "customer")
        items_in = p.get("items")
        if not isinstance(items_in, list) or not items_in:
            raise missing_param("items")
        now = int(time.time())
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
                    "created": now,
                    "current_period_start": now,
                    "current_period_end": _add_month(now),
                    "metadata": {},
                    "price": _public(price),
                    "quantity": None if metered else int(item.get("quantity", 1)),
                    "subscription": subscription_id,
                }
            )
        subscription = {
            "id": subscription_id,
            "object": "subscription",
            "billing_cycle_anchor": now,
            "cancel_at": None,
            "cancel_at_period_end": False,
            "canceled_at": None,
            "created": now,
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
            "metadata": _metadata(p),
            "start_date": now,
            "status": "active",
            "_seq": self._next_seq(),
        }
        with self._lock:
            self.subscriptions[subscription_id] = subscription
        return _Answer(200, _public(subscription))

    def _subscription(self, subscription_id: str) -> dict[str, Any]:
        with self._lock:
            subscription = self.subscriptions.get(subscription_id)
        if subscription is None:
            raise missing("subscription", subscription_id)
        return subscription

    def get_subscription_route(self, _: _Request, args: list[str]) -> _Answer:
        return _Answer(200, _public(self._subscription(args[0])))

    def update_subscription_route(self, request: _Request, args: list[str]) -> _Answer:
        subscription = self._subscription(args[0])
        cancel_at_period_end = _bool_param(request.params, "cancel_at_period_end")
        with self._lock:
            if cancel_at_period_end is not None:
                subscription["cancel_at_period_end"] = cancel_at_period_end
            subscription["metadata"].update(_metadata(request.params))
        return _Answer(200, _public(subscription))

    def cancel_subscription_route(self, _: _Request, args: list[str]) -> _Answer:
        subscription = self._subscription(args[0])
        with self._lock:
            now = int(time.time())
            subscription.update(status="canceled", canceled_at=now, ended_at=now)
        return _Answer(200, _public(subscription))


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def _server_error(status: int) -> _Answer:
    return _Answer(status, {"error": {"type": "api_error", "message": "An unknown error occurred."}})


def _rate_limit_body() -> dict[str, Any]:
    return {
        "error": {
            "type": "invalid_request_error",
            "code": "rate_limit",
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
    ("GET", ["v1", "subscriptions", "*"], FakeStripe.get_subscription_route),
    ("POST", ["v1", "subscriptions", "*"], FakeStripe.update_subscription_route),
    ("DELETE", ["v1", "subscriptions", "*"], FakeStripe.cancel_subscription_route),
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
