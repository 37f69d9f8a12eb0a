"""Stripe's asynchronous rejections of meter events.

Stripe answers 200 to a meter event it has only received, validates it later, and reports the invalid ones
as thin events (`v1.billing.meter.error_report_triggered`, `v1.billing.meter.no_meter_found`) to an event
destination: per meter and validation window, an error count per code and a few sample errors, each naming
the request's `identifier` (our report id). The thin event carries no data: the full event is fetched with
GET /v2/core/events/{id}.

For each error type we mark the affected reports `rejected` (last_error = Stripe's code and message) and keep
one `meter_event_errors` row per rejection:
* by identifier, for every sample whose identifier is one of our reports;
* for the rest of the error count (Stripe samples only a few), by the validation window: reports sent inside
  it (with _WINDOW_SLACK of clock skew) of the customers the sample messages name, or of every customer for
  errors of the meter itself (archived_meter, no_meter), but only when that leaves no doubt (no more such
  reports than unexplained errors). Marking a report Stripe did count would risk billing it twice once
  requeued past Stripe's 24 h identifier memory, so ambiguous windows are stored unmatched instead.
Whatever cannot be matched is still stored (report_id NULL) and counted: the METER_EVENTS_REJECTED metric and
its alarm fire either way. `aikit requeue-parked` puts rejected reports back in the queue once the cause is
fixed; `aikit reconcile` shows what Stripe did not count.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from aikit.db.models import MeterEventError, MeterReport
from aikit.errors import BillingError, CannotFetch, UnknownEvent
from aikit.observability import METER_EVENTS_REJECTED, emit, logger
from aikit.outbox import ReportState

if TYPE_CHECKING:  # the Stripe SDK loads when an event is fetched, not on the API function's cold start
    from aikit.stripe_gateway import BillingGateway

ERROR_REPORT_TRIGGERED = "v1.billing.meter.error_report_triggered"
NO_METER_FOUND = "v1.billing.meter.no_meter_found"
EVENT_TYPES = frozenset({ERROR_REPORT_TRIGGERED, NO_METER_FOUND})
# Errors of the meter itself: every event sent in the window was refused, whoever it was for.
_METER_LEVEL_CODES = frozenset({"archived_meter", "no_meter"})
# Reports that Stripe was (or may have been) sent; open reports were not.
_SENT_STATUSES = (ReportState.SENT, ReportState.PENDING, ReportState.PARKED)
_WINDOW_SLACK = dt.timedelta(minutes=5)
_MAX_ERROR_TYPES = 100  # more error types or samples than this in one event is not Stripe
_MAX_SAMPLES = 1000
_CUSTOMER_ID = re.compile(r"\bcus_\w{1,250}")


@dataclass(frozen=True, slots=True)
class ThinEvent:
    id: str
    type: str
    created: int
    meter_id: str | None  # related_object.id (error_report_triggered)


@dataclass(frozen=True, slots=True)
class Sample:
    message: str
    identifier: str | None


@dataclass(frozen=True, slots=True)
class ErrorType:
    code: str
    error_count: int
    samples: tuple[Sample, ...]


@dataclass(frozen=True, slots=True)
class ErrorReport:
    event_id: str
    event_type: str
    meter_id: str | None
    validation_start: dt.datetime | None
    validation_end: dt.datetime | None
    error_types: tuple[ErrorType, ...]

    @property
    def error_count(self) -> int:
        return sum(t.error_count for t in self.error_types)


def parse_time(value: Any) -> dt.datetime | None:
    """An RFC 3339 time as Stripe's v2 API writes it ("2024-09-26T17:46:10.000Z"), else None."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def fetch_report(gateway: BillingGateway | None, thin: ThinEvent) -> ErrorReport:
    if gateway is None:
        raise CannotFetch("STRIPE_SECRET_KEY is not set, so the event cannot be fetched")
    try:
        full = gateway.retrieve_event(thin.id)
    except BillingError as exc:
        if exc.stripe_status == 404:
            raise UnknownEvent(f"Stripe has no event {thin.id}") from exc
        raise CannotFetch(str(exc)) from exc
    return parse_report(thin, full)


def parse_report(thin: ThinEvent, full: Mapping[str, Any]) -> ErrorReport:
    """The error report of a fetched event; what is missing or mistyped is left out, never an error."""
    data = _dict(full.get("data"))
    types = []
    for raw in _list(_dict(data.get("reason")).get("error_types"))[:_MAX_ERROR_TYPES]:
        if not isinstance(raw, dict) or not isinstance(raw.get("code"), str):
            continue
        samples = tuple(_sample(s) for s in _list(raw.get("sample_errors"))[:_MAX_SAMPLES] if isinstance(s, dict))
        count = raw.get("error_count")
        count = count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else 0
        types.append(ErrorType(raw["code"][:128], max(count, len(samples)), samples))
    related_id = _dict(full.get("related_object")).get("id")
    meter_id = related_id if isinstance(related_id, str) and related_id else thin.meter_id
    return ErrorReport(thin.id, thin.type, meter_id, parse_time(data.get("validation_start")),
                       parse_time(data.get("validation_end")), tuple(types))


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _sample(raw: Mapping[str, Any]) -> Sample:
    message = raw.get("error_message")
    request = raw.get("request")
    identifier = request.get("identifier") if isinstance(request, dict) else None
    return Sample(message[:2000] if isinstance(message, str) else "",
                  identifier if isinstance(identifier, str) and 0 < len(identifier) <= 255 else None)


def apply_report(session: Session, report: ErrorReport) -> str:
    """Mark the reports Stripe rejected and store each rejection; runs in the webhook's transaction."""
    rejected = 0
    for error_type in report.error_types:
        matched: set[str] = set()
        for sample in error_type.samples:
            report_id = _reject(session, sample.identifier, error_type.code, sample.message)
            if report_id:
                matched.add(report_id)
            _store(session, report, error_type.code, sample.message, sample.identifier, report_id,
                   "identifier" if report_id else "none")
        rest = error_type.error_count - len(error_type.samples)
        if rest > 0:
            message = error_type.samples[0].message if error_type.samples else ""
            candidates = _window_candidates(session, report, error_type, exclude=matched)
            if len(candidates) > rest:
                candidates = []  # ambiguous: which of them Stripe refused cannot be told
            for report_id in candidates:
                if _reject(session, report_id, error_type.code, message, by_window=True):
                    matched.add(report_id)
                    _store(session, report, error_type.code, message, None, report_id, "window")
            if len(candidates) < rest:
                _store(session, report, error_type.code, message, None, None, "none")
        rejected += len(matched)
    codes = ", ".join(f"{t.code} x{t.error_count}" for t in report.error_types) or "no error types"
    return f"{report.error_count} meter events rejected by Stripe ({codes}); {rejected} reports marked rejected"


def count(report: ErrorReport) -> None:
    """The metric (its alarm) and an error log line, once per event."""
    for error_type in report.error_types:
        emit(METER_EVENTS_REJECTED, error_type.error_count, code=error_type.code)
    logger.error("meter_events_rejected", extra={
        "event_id": report.event_id, "type": report.event_type, "meter_id": report.meter_id,
        "error_count": report.error_count, "codes": [t.code for t in report.error_types]})


def _reject(session: Session, report_id: str | None, code: str, message: str, *, by_window: bool = False) -> str | None:
    """Mark one report rejected; its id when it exists (already rejected counts as found)."""
    if not report_id:
        return None
    how = " (matched by validation window)" if by_window else ""
    error = f"rejected by Stripe after acceptance: {code}: {message}{how}"[:2000]
    result = session.execute(
        update(MeterReport)
        .where(MeterReport.id == report_id, MeterReport.status.in_((*_SENT_STATUSES, ReportState.REJECTED)))
        .values(status=ReportState.REJECTED, last_error=error)
    )
    return report_id if result.rowcount else None  # type: ignore[attr-defined]


def _window_candidates(session: Session, report: ErrorReport, error_type: ErrorType,
                       *, exclude: set[str]) -> list[str]:
    """Sent reports inside the validation window of the customers named (all, for meter-level errors)."""
    if report.validation_start is None or report.validation_end is None:
        return []
    customers = {m for s in error_type.samples for m in _CUSTOMER_ID.findall(s.message)}
    if not customers and error_type.code not in _METER_LEVEL_CODES:
        return []
    stmt = select(MeterReport.id).where(
        MeterReport.status == ReportState.SENT,
        MeterReport.sent_at >= report.validation_start - _WINDOW_SLACK,
        MeterReport.sent_at <= report.validation_end + _WINDOW_SLACK,
    )
    if error_type.code not in _METER_LEVEL_CODES:
        stmt = stmt.where(MeterReport.customer_id.in_(sorted(customers)))
    return [r for r in session.scalars(stmt.order_by(MeterReport.sent_at)) if r not in exclude]


def _store(session: Session, report: ErrorReport, code: str, message: str, identifier: str | None,
           report_id: str | None, matched_by: str) -> None:
    session.add(MeterEventError(
        event_id=report.event_id, event_type=report.event_type, code=code, message=message or None,
        identifier=identifier, report_id=report_id, matched_by=matched_by, meter_id=report.meter_id,
        validation_start=report.validation_start, validation_end=report.validation_end))
