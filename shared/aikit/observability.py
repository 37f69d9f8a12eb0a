"""Logs, traces and CloudWatch metrics (Embedded Metric Format) for every aikit entry point.

Public API: `logger`, `tracer`, `metrics`, `emit(...)`, the metric-name constants and `lambda_entry(handler)`.

Metrics go to stdout as EMF JSON; in Lambda, CloudWatch turns those lines into metrics and the Lambda wrapper
writes them after every invocation. Elsewhere (make run, tests) memory and output stay bounded: a series is
written once it holds MAX_VALUES values or WRITE_INTERVAL_SECONDS passed, at most MAX_SERIES breakdowns are held.

Dimensions: every value is recorded in the total series {service=aikit} (which the alarms in template.yaml
watch) and, when dimensions are given, also in its own series {service=aikit, **dimensions} for breakdowns
(STRIPE_ERRORS: kind; WEBHOOK_EVENTS: type, outcome). Each dimension set is written as a separate EMF record,
so dimensions never leak from one metric to another.
"""

from __future__ import annotations

import functools
import io
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar, cast

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter
from aws_lambda_powertools.metrics.functions import is_metrics_disabled
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import AmazonCloudWatchEMFProvider

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
METER_EVENTS_REJECTED = "MeterEventsRejected"  # Stripe rejected meter events after accepting them (dimension: code)

ALL_METRICS: tuple[str, ...] = (
    TOKENS_METERED, REQUESTS, RATE_LIMITED, FLUSH_DURATION, EVENTS_FLUSHED, STRIPE_ERRORS, PARKED_BATCHES,
    FLUSH_LAG, WEBHOOK_EVENTS, WEBHOOK_SIGNATURE_FAILURES, METER_FALLBACKS,
)
DEFAULT_UNITS: dict[str, str] = {FLUSH_DURATION: "Milliseconds", FLUSH_LAG: "Seconds"}

# CloudWatch EMF takes at most 100 values per metric in one record, and 30 dimensions.
MAX_VALUES = 100
MAX_SERIES = 100  # distinct dimension sets held at once
WRITE_INTERVAL_SECONDS = 60.0
MAX_DIMENSIONS = 29  # plus service
MAX_DIMENSION_VALUE = 250


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

# Disabled automatically outside Lambda. Responses are not recorded: they can hold new API keys or LLM output.
tracer = Tracer(service=SERVICE)


# ----------------------------------------------------------------------------------------- metrics
SeriesKey = tuple[str, str, tuple[tuple[str, str], ...]]


class _EMFProvider(AmazonCloudWatchEMFProvider):
    """The Powertools provider plus per-dimension-set series that are written as separate EMF records, so
    dimensions never leak from one metric to another, and that are bounded in memory and in output."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._series: dict[SeriesKey, list[float]] = {}
        self._series_lock = threading.Lock()
        self._last_write = time.monotonic()
        self._dropped_breakdowns = 0
        # Guards the totals (Powertools' metric set) against a flush from another thread mid-write.
        self.totals_lock = threading.Lock()

    def add_series_value(self, name: str, unit: str, value: float, dimensions: dict[str, str]) -> None:
        key: SeriesKey = (name, unit, tuple(sorted(dimensions.items())))
        ready: list[tuple[SeriesKey, list[float]]] = []
        warn = False
        with self._series_lock:
            values = self._series.get(key)
            if values is None:
                if len(self._series) >= MAX_SERIES:
                    # Too many dimension combinations at once: keep the total, skip this breakdown.
                    self._dropped_breakdowns += 1
                    warn = self._dropped_breakdowns == 1
                else:
                    values = self._series[key] = []
            if values is not None:
                values.append(value)
                if len(values) >= MAX_VALUES:
                    # Written now; the series keeps its slot so a busy series is never crowded out.
                    ready.append((key, values[:]))
                    values.clear()
        if warn:
            logger.warning("metric breakdowns dropped", extra={"metric": name, "max_series": MAX_SERIES})
        self._write_series(ready)

    def add_total_value(self, name: str, unit: str, value: float) -> None:
        with self.totals_lock:
            # Powertools writes a record by itself once a metric holds 100 values.
            self.add_metric(name=name, unit=unit, value=value)

    def flush_if_due(self) -> None:
        # Long-running processes (make run) write at least this often; a Lambda writes after each call.
        if time.monotonic() - self._last_write >= WRITE_INTERVAL_SECONDS:
            self.flush_metrics()

    def flush_series(self) -> None:
        with self._series_lock:
            ready = list(self._series.items())
            self._series.clear()
            self._last_write = time.monotonic()
        self._write_series(ready)

    def _write_series(self, ready: list[tuple[SeriesKey, list[float]]]) -> None:
        if not ready or is_metrics_disabled():
            return
        for (name, unit, dims), values in ready:
            if not values:
                continue
            # A throwaway provider serialises one record: this provider's own dimensions stay out of it.
            single = AmazonCloudWatchEMFProvider(namespace=self.namespace)
            record = single.serialize_metric_set(
                metrics={name: {"Unit": unit, "StorageResolution": 60, "Value": values}},
                dimensions={"service": SERVICE, **dict(dims)},
                metadata={},
            )
            print(json.dumps(record, separators=(",", ":")))  # noqa: T201 - EMF records go to stdout

    def flush_metrics(self, raise_on_empty_metrics: bool = False) -> None:
        self.flush_series()
        with self.totals_lock:
            # An empty set is skipped quietly: Powertools would warn on every quiet invocation.
            if self.metric_set or raise_on_empty_metrics:
                super().flush_metrics(raise_on_empty_metrics=raise_on_empty_metrics)


# Share Metrics' class-level stores so any other Metrics() instance writes into the same buffers.
_provider = _EMFProvider(
    namespace=NAMESPACE,
    service=SERVICE,
    metric_set=Metrics._metrics,
    dimension_set=Metrics._dimensions,
    metadata_set=Metrics._metadata,
    default_dimensions=Metrics._default_dimensions,
)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE, provider=_provider)


def emit(name: str, value: float = 1, unit: str | None = None, **dimensions: str) -> None:
    """Records one metric value. Never raises: a metric must not break a request.

    unit: a CloudWatch unit ("Count", "Milliseconds", "Seconds", ...); default by metric name, else "Count".
    dimensions: optional; the value then also goes to the series of exactly these dimensions.
    """
    chosen_unit = unit or DEFAULT_UNITS.get(name, "Count")
    try:
        number = float(value)
        dims = {
            str(k)[:MAX_DIMENSION_VALUE]: str(v)[:MAX_DIMENSION_VALUE]
            for k, v in list(dimensions.items())[:MAX_DIMENSIONS]
            if str(v) != ""
        }
        dims.pop("service", None)
        if dims:
            _provider.add_series_value(name, _provider_unit(chosen_unit), number, dims)
        _provider.add_total_value(name, chosen_unit, number)
        _provider.flush_if_due()
    except Exception as exc:  # bad unit or value
        logger.warning("metric dropped", extra={"metric": name, "error": f"{type(exc).__name__}: {exc}"})


@functools.lru_cache(maxsize=64)
def _provider_unit(unit: str) -> str:
    """Validates a unit the way Powertools does (raises MetricUnitError) and returns its CloudWatch name."""
    probe = AmazonCloudWatchEMFProvider(namespace=NAMESPACE)
    probe.add_metric(name="probe", unit=unit, value=0)
    return str(probe.metric_set["probe"]["Unit"])


def flush_metrics() -> None:
    """Writes every buffered metric now (the Lambda wrapper does this after each invocation)."""
    metrics.flush_metrics()


# ------------------------------------------------------------------------------------------ Lambda
R = TypeVar("R")

# API Gateway (REST and HTTP API) request id; absent on other events, which then log without one.
CORRELATION_ID_PATH = "requestContext.requestId"


def lambda_entry(handler: Callable[[Any, Any], R]) -> Callable[[Any, Any], R]:
    """Wraps a Lambda handler (a function or a callable such as Mangum) with the Powertools logger context
    (never the event itself: it holds API keys), the tracer and metrics flushing plus a cold-start metric."""

    def entry(event: Any, context: Any) -> R:
        return handler(event, context)

    entry.__name__ = getattr(handler, "__name__", type(handler).__name__)
    entry.__doc__ = getattr(handler, "__doc__", None)
    traced = tracer.capture_lambda_handler(entry, capture_response=False)
    measured = metrics.log_metrics(traced, capture_cold_start_metric=True)
    wrapped = logger.inject_lambda_context(
        measured, log_event=False, correlation_id_path=CORRELATION_ID_PATH, clear_state=True
    )
    wrapped.__wrapped__ = handler  # type: ignore[attr-defined]
    return wrapped  # type: ignore[no-any-return]
