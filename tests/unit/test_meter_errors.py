"""Reading Stripe's meter-event error reports: whatever the fetched event holds, never an exception."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from aikit.meter_errors import ErrorType, Sample, ThinEvent, parse_report, parse_time

THIN = ThinEvent("evt_1", "v1.billing.meter.error_report_triggered", 1_790_000_000, "mtr_thin")

# The event as Stripe's API reference shows it (GET /v2/core/events/{id}).
DOCUMENTED = {
    "id": "evt_test_65RCjj4EqW1sabcjs2Z16RCMoNQdSQkOWvfL6L5uU2K40u", "object": "v2.core.event", "context": None,
    "created": "2024-09-26T17:46:22.134Z",
    "data": {
        "developer_message_summary": "There is 1 invalid event",
        "reason": {"error_count": 1, "error_types": [{
            "code": "meter_event_no_customer_defined", "error_count": 1,
            "sample_errors": [{"error_message": "Customer mapping key stripe_customer_id not found in payload.",
                               "request": {"identifier": "cb447754-6880-45c2-8f2f-ef19b6ce81e9"}}]}]},
        "validation_end": "2024-09-26T17:46:20.000Z", "validation_start": "2024-09-26T17:46:10.000Z"},
    "livemode": False, "reason": None,
    "related_object": {"id": "mtr_test_61RCjiqdTDC91zgip41IqPCzPnxqqSVc", "type": "billing.meter",
                       "url": "/v1/billing/meters/mtr_test_61RCjiqdTDC91zgip41IqPCzPnxqqSVc"},
    "type": "v1.billing.meter.error_report_triggered",
}


def test_the_documented_event() -> None:
    report = parse_report(THIN, DOCUMENTED)
    assert report.meter_id == "mtr_test_61RCjiqdTDC91zgip41IqPCzPnxqqSVc"
    assert report.validation_start == dt.datetime(2024, 9, 26, 17, 46, 10, tzinfo=dt.UTC)
    assert report.validation_end == dt.datetime(2024, 9, 26, 17, 46, 20, tzinfo=dt.UTC)
    assert report.error_types == (ErrorType("meter_event_no_customer_defined", 1, (Sample(
        "Customer mapping key stripe_customer_id not found in payload.", "cb447754-6880-45c2-8f2f-ef19b6ce81e9"),)),)
    assert report.error_count == 1


@pytest.mark.parametrize("data", [
    None, [], "x", {}, {"reason": []}, {"reason": {"error_types": "x"}},
    {"reason": {"error_types": [None, 5, {"code": 7}, {"code": "c", "error_count": "many", "sample_errors": "x"}]}},
    {"reason": {"error_types": [{"code": "c", "error_count": True,
                                 "sample_errors": [1, {"request": "x"}, {"request": {"identifier": 5}}]}]}},
    {"validation_start": 5, "validation_end": "not a time"},
])
def test_mistyped_reports_are_read_as_far_as_they_go(data: Any) -> None:
    report = parse_report(THIN, {"data": data, "related_object": "x"})
    assert report.meter_id == "mtr_thin"  # from the thin event when the full one has none
    for error_type in report.error_types:
        assert error_type.error_count >= len(error_type.samples)
        assert all(s.identifier is None for s in error_type.samples)


@pytest.mark.parametrize(("value", "expected"), [
    ("2026-11-27T11:00:00.000Z", dt.datetime(2026, 11, 27, 11, tzinfo=dt.UTC)),
    ("2026-11-27T11:00:00+01:00", dt.datetime(2026, 11, 27, 10, tzinfo=dt.UTC)),
    ("2026-11-27T11:00:00", dt.datetime(2026, 11, 27, 11, tzinfo=dt.UTC)),
    ("yesterday", None), ("", None), (1790000000, None), (None, None), ("2026-11-27T11:00:00Z" + " " * 40, None),
])
def test_parse_time(value: Any, expected: dt.datetime | None) -> None:
    assert parse_time(value) == expected
