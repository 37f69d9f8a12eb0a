"""Logs, traces and CloudWatch metrics (Embedded Metric Format) for every aikit entry point.

Public API: `logger`, `emit(...)`, the metric-name constants, `flush_metrics()`, `redact(...)`,
`lambda_entry(handler)` for Lambda handlers, `asgi_entry(app)` for the API under Lambda Web Adapter, and
`tracer()` (None unless tracing is on).

Metrics: this module owns a small EMF writer (no Powertools Metrics internals). Values are aggregated per process:
a Count metric is summed, any other unit keeps its values (at most MAX_VALUES per record). Buffers are written
as EMF JSON lines on stdout at the end of every Lambda invocation (lambda_entry) and of every request under
Lambda Web Adapter (asgi_entry), since Lambda may freeze the process right after; in a long-running process
(`aikit serve`) every WRITE_INTERVAL_SECONDS (aikit.server) and at shutdown. POWERTOOLS_METRICS_DISABLED=true turns the
writing off (`make run`).

Dimensions: every value is recorded in the total series {service=aikit} (which the alarms in template.yaml
watch) and, when dimensions are given, also in its own series {service=aikit, **dimensions} for breakdowns
(STRIPE_ERRORS: kind; WEBHOOK_EVENTS: type, outcome). Each breakdown is written as a separate EMF record, so
dimensions never leak from one metric to another. At most MAX_SERIES breakdowns are held at once.

Traces: X-Ray is loaded only when tracing is on (in Lambda, unless POWERTOOLS_TRACE_DISABLED), and then patches
only TRACED_MODULES; importing this module never imports the X-Ray SDK.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import IO, Any, TypeVar, cast

from aws_lambda_powertools.logging import Logger
from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter

SERVICE = "aikit"
NAMESPACE = "aikit"

# Metric names (namespace "aikit"; every metric also has the dimension service=aikit).
TOKENS_METERED = "TokensMetered"
REQUESTS = "Requests"
RATE_LIMITED = "RateLimited"
FLUSH_DURATION = "FlushDuration"  # Milliseconds
EVENTS_FLUSHED = "EventsFlushed"
STRIPE_ERRORS = "StripeErrors"  # dimension: kind
PARKED_BATCHES = "ParkedBatches"
FLUSH_LAG = "FlushLagSeconds"  # Seconds
WEBHOOK_EVENTS = "WebhookEvents"  # dimensions: type, outcome
WEBHOOK_SIGNATURE_FAILURES = "WebhookSignatureFailures"
METER_FALLBACKS = "MeterFallbacks"  # usage written straight to Postgres while Redis was down
STRIPE_AUTH_FAILURES = "StripeAuthFailures"  # Stripe refused the API key (401/403): the flush stopped sending
METER_EVENTS_REJECTED = "MeterEventsRejected"  # Stripe rejected meter events after accepting them (dimension: code)

ALL_METRICS: tuple[str, ...] = (
    TOKENS_METERED, REQUESTS, RATE_LIMITED, FLUSH_DURATION, EVENTS_FLUSHED, STRIPE_ERRORS, PARKED_BATCHES,
    FLUSH_LAG, WEBHOOK_EVENTS, WEBHOOK_SIGNATURE_FAILURES, METER_FALLBACKS, STRIPE_AUTH_FAILURES,
)
DEFAULT_UNITS: dict[str, str] = {FLUSH_DURATION: "Milliseconds", FLUSH_LAG: "Seconds"}

# CloudWatch EMF takes at most 100 values per metric in one record, and 30 dimensions.
MAX_VALUES = 100
MAX_SERIES = 100  # distinct breakdown dimension sets held at once
WRITE_INTERVAL_SECONDS = 60.0
MAX_DIMENSIONS = 29  # plus service
MAX_DIMENSION_VALUE = 250

# CloudWatch's units (what PutMetricData and EMF accept).
UNITS = frozenset({
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes", "Terabytes",
    "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count", "Bytes/Second",
    "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second", "Terabytes/Second", "Bits/Second",
    "Kilobits/Second", "Megabits/Second", "Gigabits/Second", "Terabits/Second", "Count/Second", "None",
})

# What X-Ray patches when tracing is on: the LLM and Stripe HTTP clients, AWS calls and Postgres.
TRACED_MODULES: tuple[str, ...] = ("botocore", "httpx", "requests", "pg8000")


# --------------------------------------------------------------------------------------- redaction
_REDACTED = "[REDACTED]"
_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Header-like or key=value secrets, also inside JSON (quotes possibly escaped) and Python reprs.
    (
        re.compile(
            r"(?i)((?:proxy-)?authorization|x-api-key|api[_-]?key|secret[_-]?key|webhook[_-]?secret|"
            r"client[_-]?secret|admin[_-]?token|access[_-]?token|password|passwd)"
            r"(\\?[\"']?\s*[:=]\s*\\?[\"']?)"
            r"(?:(?:bearer|basic|token)\s+)?[^\s\"'\\,;&}\]]+"
        ),
        r"\1\2" + _REDACTED,
    ),
    # Bearer tokens anywhere else.
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{6,}"), r"\1 " + _REDACTED),
    # Key-looking strings: Stripe (sk_/rk_/whsec_), aikit API keys (ak_), OpenAI/Anthropic (sk-...).
    (re.compile(r"(?<![A-Za-z0-9])(sk|rk|ak|whsec)_[A-Za-z0-9_]{6,}"), r"\1_" + _REDACTED),
    (re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{12,}"), "sk-" + _REDACTED),
    # Passwords in connection URLs: scheme://user:password@host.
    (re.compile(r"([a-z][a-z0-9+.-]*://[^:/\s\"'@]+:)[^@\s\"'/]+@"), r"\1" + _REDACTED + "@"),
)


def redact(text: str) -> str:
    """Masks API keys, secrets, Authorization values and URL passwords in a log line."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFormatter(LambdaPowertoolsFormatter):
    """Powertools JSON formatter whose final line (message, extra keys, traceback) passes through redact()."""

    def format(self, record: Any) -> str:
        return redact(super().format(record))


class _Stdout(io.TextIOBase):  # an IO[str] for the handler
    """Looks up sys.stdout on every write, so replaced streams (pytest capture, uvicorn) get the logs."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


# ------------------------------------------------------------------------------------------ logger
logger = Logger(service=SERVICE, stream=cast(IO[str], _Stdout()), logger_formatter=RedactingFormatter())
if not isinstance(logger.registered_handler.formatter, RedactingFormatter):
    # Someone configured the "aikit" logger first; redaction is not optional.
    logger.registered_handler.setFormatter(RedactingFormatter())


# ----------------------------------------------------------------------------------------- metrics
SeriesKey = tuple[str, str, tuple[tuple[str, str], ...]]  # name, unit, sorted breakdown dimensions


class _Values:
    """One series between two writes: a running sum for counts, the values themselves otherwise."""

    __slots__ = ("count", "total", "values")

    def __init__(self) -> None:
        self.values: list[float] = []
        self.total = 0.0
        self.count = 0

    def add(self, unit: str, value: float) -> bool:
        """Adds a value; True when the series holds MAX_VALUES values and must be written."""
        self.count += 1
        if unit == "Count":
            self.total += value
            return False
        self.values.append(value)
        return len(self.values) >= MAX_VALUES

    def emf(self, unit: str) -> list[float]:
        return [self.total] if unit == "Count" else self.values


class MetricWriter:
    """Aggregates metric values per process and writes them as EMF records (one JSON line each)."""

    def __init__(self, namespace: str = NAMESPACE, service: str = SERVICE,
                 write: Callable[[str], None] | None = None) -> None:
        self.namespace = namespace
        self.service = service
        self._write_line = write
        self._lock = threading.Lock()
        self._totals: dict[tuple[str, str], _Values] = {}
        self._breakdowns: dict[SeriesKey, _Values] = {}
        self._dropped_breakdowns = 0
        self._last_write = time.monotonic()

    def add(self, name: str, unit: str, value: float, dimensions: dict[str, str]) -> None:
        warn = False
        full_totals: dict[tuple[str, str], _Values] = {}
        full_breakdown: tuple[SeriesKey, _Values] | None = None
        with self._lock:
            if self._totals.setdefault((name, unit), _Values()).add(unit, value):
                # A full series writes the totals record now (a record holds every total metric).
                full_totals, self._totals = self._totals, {}
            if dimensions:
                key: SeriesKey = (name, unit, tuple(sorted(dimensions.items())))
                series = self._breakdowns.get(key)
                if series is None and len(self._breakdowns) >= MAX_SERIES:
                    # Too many dimension combinations at once: keep the total, skip this breakdown.
                    self._dropped_breakdowns += 1
                    warn = self._dropped_breakdowns == 1
                else:
                    if series is None:
                        series = self._breakdowns[key] = _Values()
                    if series.add(unit, value):
                        full_breakdown = (key, series)
                        del self._breakdowns[key]
            due = time.monotonic() - self._last_write >= WRITE_INTERVAL_SECONDS
        if warn:
            logger.warning("metric breakdowns dropped", extra={"metric": name, "max_series": MAX_SERIES})
        if full_totals or full_breakdown:
            self._write(full_totals, dict([full_breakdown]) if full_breakdown else {})
        if due:
            self.flush()

    def series_count(self) -> int:
        return len(self._breakdowns)

    def held_values(self) -> int:
        """The largest number of values any series holds now (at most MAX_VALUES)."""
        with self._lock:
            held = [len(v.values) for v in (*self._totals.values(), *self._breakdowns.values())]
        return max(held, default=0)

    def flush(self) -> None:
        with self._lock:
            totals, self._totals = self._totals, {}
            breakdowns, self._breakdowns = self._breakdowns, {}
            self._last_write = time.monotonic()
        self._write(totals, breakdowns)

    def _write(self, totals: dict[tuple[str, str], _Values], breakdowns: dict[SeriesKey, _Values]) -> None:
        if metrics_disabled():
            return
        stamp = int(time.time() * 1000)
        lines: list[str] = []
        if totals:
            lines.append(self._record(stamp, {name: (unit, v) for (name, unit), v in totals.items()}, {}))
        for (name, unit, dims), values in breakdowns.items():
            lines.append(self._record(stamp, {name: (unit, values)}, dict(dims)))
        for line in lines:
            self._emit_line(line)

    def _record(self, stamp: int, metrics: dict[str, tuple[str, _Values]], dimensions: dict[str, str]) -> str:
        dims = {"service": self.service, **dimensions}
        record: dict[str, Any] = {
            "_aws": {"Timestamp": stamp, "CloudWatchMetrics": [{
                "Namespace": self.namespace,
                "Dimensions": [list(dims)],
                "Metrics": [{"Name": name, "Unit": unit} for name, (unit, _) in metrics.items()],
            }]},
            **dims,
        }
        for name, (unit, values) in metrics.items():
            record[name] = values.emf(unit)
        return json.dumps(record, separators=(",", ":"))

    def _emit_line(self, line: str) -> None:
        if self._write_line is not None:
            self._write_line(line)
            return
        sys.stdout.write(line + "\n")  # EMF records go to stdout; CloudWatch Logs turns them into metrics


def metrics_disabled() -> bool:
    return os.environ.get("POWERTOOLS_METRICS_DISABLED", "").strip().lower() in ("1", "true", "yes", "on")


metrics = MetricWriter()


def emit(name: str, value: float = 1, unit: str | None = None, **dimensions: str) -> None:
    """Records one metric value. Never raises: a metric must not break a request.

    unit: a CloudWatch unit ("Count", "Milliseconds", "Seconds", ...); default by metric name, else "Count".
    dimensions: optional; the value then also goes to the series of exactly these dimensions.
    """
    chosen_unit = unit or DEFAULT_UNITS.get(name, "Count")
    try:
        if chosen_unit not in UNITS:
            raise ValueError(f"unknown CloudWatch unit {chosen_unit!r}")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"not a finite number: {value!r}")
        dims = {
            str(k)[:MAX_DIMENSION_VALUE]: str(v)[:MAX_DIMENSION_VALUE]
            for k, v in list(dimensions.items())[:MAX_DIMENSIONS]
            if str(v) != ""
        }
        dims.pop("service", None)
        metrics.add(name, chosen_unit, number, dims)
    except Exception as exc:  # bad unit or value
        logger.warning("metric dropped", extra={"metric": name, "error": f"{type(exc).__name__}: {exc}"})


def flush_metrics() -> None:
    """Writes every buffered metric now (the Lambda and LWA wrappers do this after each invocation/request)."""
    metrics.flush()


# ------------------------------------------------------------------------------------------ traces
_tracer: Any = None
_tracer_lock = threading.Lock()


# Lambda Web Adapter's exec wrapper: invocations reach uvicorn over HTTP, never a Python handler.
WEB_ADAPTER_WRAPPER = "/opt/bootstrap"


def tracing_enabled(environ: MutableMapping[str, str] = os.environ) -> bool:
    """In Lambda (Powertools' test: LAMBDA_TASK_ROOT, not sam local) unless POWERTOOLS_TRACE_DISABLED, and not
    under Lambda Web Adapter: its server process has no per-invocation X-Ray segment to attach to."""
    if not environ.get("LAMBDA_TASK_ROOT") or environ.get("AWS_SAM_LOCAL"):
        return False
    if environ.get("AWS_LAMBDA_EXEC_WRAPPER") == WEB_ADAPTER_WRAPPER:
        return False
    return environ.get("POWERTOOLS_TRACE_DISABLED", "").strip().lower() not in ("1", "true", "yes", "on")


def tracer() -> Any:
    """The Powertools Tracer when tracing is on (created on first call, patching TRACED_MODULES only), else
    None. Responses are never recorded: they can hold new API keys or LLM output."""
    global _tracer
    if not tracing_enabled():
        return None
    with _tracer_lock:
        if _tracer is None:
            from aws_lambda_powertools.tracing import Tracer

            _tracer = Tracer(service=SERVICE, patch_modules=list(TRACED_MODULES))
        return _tracer


# ------------------------------------------------------------------------------------------ Lambda
R = TypeVar("R")

# API Gateway (REST and HTTP API) request id; absent on other events, which then log without one.
CORRELATION_ID_PATH = "requestContext.requestId"


def lambda_entry(handler: Callable[[Any, Any], R]) -> Callable[[Any, Any], R]:
    """Wraps a Lambda handler (a function or a callable such as Mangum) with the Powertools logger context
    (never the event itself: it holds API keys), the tracer when tracing is on, and a metrics write after every
    invocation, failed ones included."""

    def entry(event: Any, context: Any) -> R:
        try:
            return handler(event, context)
        finally:
            flush_metrics()

    entry.__name__ = getattr(handler, "__name__", type(handler).__name__)
    entry.__doc__ = getattr(handler, "__doc__", None)
    active = tracer()  # at init, so SnapStart's snapshot holds it
    traced = active.capture_lambda_handler(entry, capture_response=False) if active is not None else entry
    wrapped = logger.inject_lambda_context(
        traced, log_event=False, correlation_id_path=CORRELATION_ID_PATH, clear_state=True
    )
    cast(Any, wrapped).__wrapped__ = handler
    return cast(Callable[[Any, Any], R], wrapped)


# -------------------------------------------------------------------------------- Lambda Web Adapter
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Headers Lambda Web Adapter adds to every request it forwards (JSON).
LWA_REQUEST_CONTEXT = b"x-amzn-request-context"
LWA_LAMBDA_CONTEXT = b"x-amzn-lambda-context"


def _json_header(headers: list[tuple[bytes, bytes]], name: bytes) -> dict[str, Any]:
    for key, value in headers:
        if key.lower() == name:
            try:
                data = json.loads(value)
            except ValueError:
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def asgi_entry(app: ASGIApp) -> ASGIApp:
    """Wraps the ASGI app that Lambda Web Adapter serves: per request, log keys from LWA's context headers
    (API Gateway request id as correlation_id, the Lambda request id), and buffered metrics and logs written
    before the response's last byte goes out: Lambda may freeze the process as soon as the response ends.
    No X-Ray SDK here: the server process has no per-invocation segment (Lambda still traces the invocation)."""

    async def entry(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = list(scope.get("headers") or [])
        request = _json_header(headers, LWA_REQUEST_CONTEXT)
        invocation = _json_header(headers, LWA_LAMBDA_CONTEXT)
        logger.clear_state()
        keys = {"correlation_id": request.get("requestId"), "function_request_id": invocation.get("request_id")}
        logger.append_keys(**{k: v for k, v in keys.items() if v})
        finished = False

        async def send_then_flush_last(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
                _flush_all()
            await send(message)

        try:
            await app(scope, receive, send_then_flush_last)
        finally:
            if not finished:
                _flush_all()

    return entry


def _flush_all() -> None:
    flush_metrics()
    sys.stdout.flush()
