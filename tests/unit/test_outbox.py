"""The outbox's pure rules (aikit.outbox): event timestamps, the identifier-memory rule, the carry-forward cutoff
and the report states. No services needed."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import String

from aikit.db.models import MeterReport
from aikit.outbox import (
    CARRY_MARGIN_SECONDS,
    IDENTIFIER_SAFE_HOURS,
    UNCONFIRMED_PREFIX,
    UNCONFIRMED_REASON,
    ReportState,
    carry_forward_to,
    event_timestamp,
    unsafe_to_resend,
)
from aikit.periods import Period

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
WINDOW = dt.timedelta(hours=1)
GRACE = 3600  # STRIPE_FINALIZATION_GRACE_SECONDS


def report(*, start: dt.datetime = T0, end: dt.datetime | None = None, last: dt.datetime | None = None,
           first_attempt: dt.datetime | None = None, carried_to: dt.datetime | None = None) -> SimpleNamespace:
    return SimpleNamespace(window_start=start, window_end=end or start + WINDOW, last_usage_ts=last or start,
                           first_attempt_at=first_attempt, carried_forward_from=None, carried_forward_to=carried_to)


# -- event_timestamp -------------------------------------------------------------------------------------------


@given(offset=st.integers(-86_400, 86_400), now_offset=st.integers(-3600, 86_400))
def test_event_timestamp_is_inside_the_window_and_never_in_the_future(offset: int, now_offset: int) -> None:
    """Whatever the last usage time says (clock skew on a writer, a late entry), the stamp stays in
    [window_start, window_end) and not after `now`."""
    row = report(last=T0 + dt.timedelta(seconds=offset))
    now = T0 + dt.timedelta(seconds=now_offset)
    stamp = event_timestamp(row, now)
    assert min(int(T0.timestamp()), int(now.timestamp())) <= stamp <= int(now.timestamp())
    if now >= row.window_end:  # a sealed report: its window is over
        assert int(T0.timestamp()) <= stamp < int(row.window_end.timestamp())


def test_event_timestamp_is_the_last_usage_inside_the_window() -> None:
    last = T0 + dt.timedelta(minutes=17, seconds=3)
    assert event_timestamp(report(last=last), T0 + dt.timedelta(days=1)) == int(last.timestamp())


def test_event_timestamp_clamps_to_the_last_second_of_the_window() -> None:
    row = report(last=T0 + 2 * WINDOW)
    assert event_timestamp(row, T0 + dt.timedelta(days=1)) == int((T0 + WINDOW).timestamp()) - 1


def test_event_timestamp_of_a_naive_database_time_is_utc() -> None:
    """SQLite hands back naive datetimes; they are UTC, not local time."""
    naive = report(start=T0.replace(tzinfo=None), end=(T0 + WINDOW).replace(tzinfo=None),
                   last=(T0 + dt.timedelta(minutes=5)).replace(tzinfo=None))
    assert event_timestamp(naive, T0 + dt.timedelta(days=1)) == int((T0 + dt.timedelta(minutes=5)).timestamp())


def test_a_carried_forward_report_keeps_the_stamp_chosen_for_it() -> None:
    to = T0 + dt.timedelta(days=40)
    assert event_timestamp(report(carried_to=to), T0 + dt.timedelta(days=41)) == int(to.timestamp())


# -- the 23-hour rule ------------------------------------------------------------------------------------------


def test_never_tried_is_always_safe_to_send() -> None:
    assert not unsafe_to_resend(report(), T0 + dt.timedelta(days=365))


def test_resend_is_unsafe_from_the_23rd_hour_after_the_first_attempt() -> None:
    first = T0
    limit = dt.timedelta(hours=IDENTIFIER_SAFE_HOURS)
    assert IDENTIFIER_SAFE_HOURS < 24  # inside Stripe's "at least 24 hours" of identifier memory
    assert not unsafe_to_resend(report(first_attempt=first), first + limit - dt.timedelta(seconds=1))
    assert unsafe_to_resend(report(first_attempt=first), first + limit)
    assert unsafe_to_resend(report(first_attempt=first.replace(tzinfo=None)), first + limit)


def test_the_park_reason_is_what_requeue_looks_for() -> None:
    assert UNCONFIRMED_REASON.startswith(UNCONFIRMED_PREFIX)
    assert f"{IDENTIFIER_SAFE_HOURS} h" in UNCONFIRMED_REASON


# -- the carry-forward cutoff ----------------------------------------------------------------------------------

MARCH = Period(dt.datetime(2026, 3, 1, tzinfo=dt.UTC), dt.datetime(2026, 4, 1, tzinfo=dt.UTC))
APRIL = Period(MARCH.end, dt.datetime(2026, 5, 1, tzinfo=dt.UTC))


def late_march_report() -> SimpleNamespace:
    start = MARCH.end - WINDOW
    return report(start=start, last=start + dt.timedelta(minutes=30))


def test_no_known_periods_keeps_the_timestamp() -> None:
    assert carry_forward_to(late_march_report(), [], MARCH.end + dt.timedelta(days=3), GRACE) is None


def test_inside_the_grace_less_the_margin_the_report_stays_in_its_period() -> None:
    now = MARCH.end + dt.timedelta(seconds=GRACE - CARRY_MARGIN_SECONDS - 1)
    assert carry_forward_to(late_march_report(), [MARCH, APRIL], now, GRACE) is None


def test_within_the_margin_of_finalization_it_is_carried_into_the_current_period() -> None:
    """The margin: one arriving a little early on the next invoice is still billed, one arriving just after
    finalization never would be."""
    now = MARCH.end + dt.timedelta(seconds=GRACE - CARRY_MARGIN_SECONDS, microseconds=250_000)
    assert carry_forward_to(late_march_report(), [MARCH, APRIL], now, GRACE) == now.replace(microsecond=0)


def test_after_finalization_it_is_carried_and_stamped_inside_the_current_period() -> None:
    now = APRIL.start + dt.timedelta(days=10)
    to = carry_forward_to(late_march_report(), [MARCH, APRIL], now, GRACE)
    assert to is not None and APRIL.contains(to) and to <= now


def test_without_a_current_period_nothing_could_invoice_it_later_either() -> None:
    now = APRIL.start + dt.timedelta(days=10)
    assert carry_forward_to(late_march_report(), [MARCH], now, GRACE) is None


def test_a_grace_shorter_than_the_margin_carries_at_the_period_end() -> None:
    now = MARCH.end
    assert carry_forward_to(late_march_report(), [MARCH, APRIL], now, CARRY_MARGIN_SECONDS // 2) == MARCH.end


# -- states ----------------------------------------------------------------------------------------------------


def test_report_states_are_the_stored_strings() -> None:
    assert [s.value for s in ReportState] == ["open", "pending", "sent", "parked", "rejected"]
    assert ReportState("parked") is ReportState.PARKED and f"{ReportState.SENT}" == "sent"
    status = MeterReport.__table__.c.status
    assert isinstance(status.type, String) and status.type.length is not None
    assert max(len(s.value) for s in ReportState) <= status.type.length
    assert status.default is not None and status.default.arg == ReportState.OPEN
