"""Period parsing and the pure parts of usage assembly (aikit.usage), no services needed."""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aikit.errors import UsageQueryError
from aikit.pricing import build_price_book
from aikit.usage import (
    MAX_RANGE_DAYS,
    Counts,
    Period,
    UsageRow,
    combine,
    key_usage_body,
    money,
    month_bounds,
    parse_pending,
    resolve_period,
    usage_csv,
)

TODAY = dt.date(2024, 11, 17)


def test_default_is_the_current_calendar_month() -> None:
    p = resolve_period(None, None, None, TODAY)
    assert (p.start, p.end, p.name) == (dt.date(2024, 11, 1), dt.date(2024, 11, 30), "current_month")
    assert (p.start_iso, p.end_iso) == ("2024-11-01T00:00:00Z", "2024-11-30T23:59:59Z")
    assert resolve_period("current_month", None, None, TODAY) == p


@pytest.mark.parametrize(
    ("today", "last"),
    [
        (dt.date(2024, 2, 10), dt.date(2024, 2, 29)),  # leap year
        (dt.date(2023, 2, 28), dt.date(2023, 2, 28)),
        (dt.date(2024, 12, 31), dt.date(2024, 12, 31)),  # year end
        (dt.date(2024, 1, 1), dt.date(2024, 1, 31)),
        (dt.date(2024, 4, 30), dt.date(2024, 4, 30)),
    ],
)
def test_month_bounds(today: dt.date, last: dt.date) -> None:
    assert month_bounds(today) == (today.replace(day=1), last)


def test_last_30_days_is_today_and_the_29_before() -> None:
    p = resolve_period("last_30_days", None, None, dt.date(2024, 3, 1))
    assert (p.start, p.end, p.days) == (dt.date(2024, 2, 1), dt.date(2024, 3, 1), 30)  # 2024-02 has 29 days
    assert p.end_iso == "2024-03-01T23:59:59Z"


def test_explicit_range_is_inclusive() -> None:
    p = resolve_period(None, "2024-11-01", "2024-11-01", TODAY)
    assert (p.days, p.name, p.covers(dt.date(2024, 11, 1)), p.covers(dt.date(2024, 11, 2))) == (
        1, "range", True, False)
    full_leap_year = resolve_period(None, "2024-01-01", "2024-12-31", TODAY)
    assert full_leap_year.days == MAX_RANGE_DAYS == 366


@pytest.mark.parametrize(
    ("period", "start", "end", "param", "words"),
    [
        ("yearly", None, None, "period", "unknown period"),
        ("", None, None, "period", "unknown period"),
        ("CURRENT_MONTH", None, None, "period", "unknown period"),
        ("last_30_days", "2024-01-01", "2024-01-02", "period", "not both"),
        ("current_month", None, "2024-01-02", "period", "not both"),
        (None, "2024-01-01", None, "end", "end is required"),
        (None, None, "2024-01-01", "start", "start is required"),
        (None, "2024-1-01", "2024-01-02", "start", "YYYY-MM-DD"),
        (None, "20240101", "2024-01-02", "start", "YYYY-MM-DD"),
        (None, "2024-01-01T00:00:00", "2024-01-02", "start", "YYYY-MM-DD"),
        (None, "2024-01-01\n", "2024-01-02", "start", "YYYY-MM-DD"),
        (None, "2024-01-01", "2024-02-30", "end", "not a valid date"),
        (None, "2024-01-01", "\uff12\uff10\uff12\uff14-01-02", "end", "YYYY-MM-DD"),  # non-ASCII digits
        (None, "2024-01-02", "2024-01-01", "end", "before start"),
        (None, "2023-01-01", "2024-01-02", "end", "longer than 366 days"),  # 367 days
    ],
)
def test_bad_periods_name_the_parameter(period: str | None, start: str | None, end: str | None, param: str,
                                        words: str) -> None:
    with pytest.raises(UsageQueryError) as info:
        resolve_period(period, start, end, TODAY)
    assert info.value.param == param
    assert words in info.value.message
    assert param in info.value.message


@given(st.dates(min_value=dt.date(1970, 1, 1), max_value=dt.date(2100, 1, 1)), st.integers(0, 800))
def test_range_length_rule(start: dt.date, length: int) -> None:
    end = start + dt.timedelta(days=length)
    if length + 1 <= MAX_RANGE_DAYS:
        p = resolve_period(None, start.isoformat(), end.isoformat(), TODAY)
        assert (p.start, p.end, p.days) == (start, end, length + 1)
    else:
        with pytest.raises(UsageQueryError):
            resolve_period(None, start.isoformat(), end.isoformat(), TODAY)


@given(st.dates(min_value=dt.date(1, 1, 1), max_value=dt.date(9999, 12, 31)))
def test_current_month_always_contains_today(today: dt.date) -> None:
    p = resolve_period(None, None, None, today)
    assert p.start.day == 1
    assert p.covers(today)
    assert p.end.month == today.month
    assert p.end == dt.date(9999, 12, 31) or (p.end + dt.timedelta(days=1)).day == 1


NOV = Period(dt.date(2024, 11, 1), dt.date(2024, 11, 30), "current_month")


def test_parse_pending_reads_every_counter_and_filters_by_period() -> None:
    raw = {
        "2024-11-05|gpt-a|t": "30", "2024-11-05|gpt-a|r": "2", "2024-11-05|gpt-a|i": "10",
        "2024-11-05|gpt-a|o": "20", "2024-11-05|gpt-a|x": "4",
        "2024-11-05|org|model|t": "5", "2024-11-05|org|model|r": "1",  # '|' inside a model name
        "2024-10-31|gpt-a|t": "999",  # outside the period
        "garbage": "1", "2024-11-05|gpt-a|q": "1", "2024-11-05|gpt-a|z|": "1", "bad-date|m|t": "1",
        b"2024-11-06|gpt-b|t": b"7",
    }
    rows = {(r.date.isoformat(), r.model): r for r in parse_pending("key_1", "cus_1", raw, NOV)}
    assert set(rows) == {("2024-11-05", "gpt-a"), ("2024-11-05", "org|model"), ("2024-11-06", "gpt-b")}
    assert rows[("2024-11-05", "gpt-a")].counts == Counts(requests=2, input_tokens=10, output_tokens=20,
                                                           cached_tokens=4, tokens=30)
    assert rows[("2024-11-05", "org|model")].counts == Counts(requests=1, tokens=5)
    assert rows[("2024-11-06", "gpt-b")].customer_id == "cus_1"


def _row(day: int, model: str, tokens: int, *, key: str = "key_1",
         customer: str | None = "cus_1") -> UsageRow:
    return UsageRow(key, customer, dt.date(2024, 11, day), model,
                    Counts(requests=1, input_tokens=tokens, output_tokens=0, tokens=tokens))


def test_combine_adds_same_key_day_model_and_keeps_the_flushed_customer() -> None:
    flushed = [_row(5, "gpt-a", 10), _row(6, "gpt-a", 1)]
    pending = [_row(5, "gpt-a", 3, customer=None), _row(5, "gpt-b", 7)]
    merged = combine(flushed, pending)
    assert [(r.date.day, r.model, r.counts.tokens, r.counts.requests, r.customer_id) for r in merged] == [
        (5, "gpt-a", 13, 2, "cus_1"), (5, "gpt-b", 7, 1, "cus_1"), (6, "gpt-a", 1, 1, "cus_1")]
    assert flushed[0].counts.tokens == 10  # inputs untouched


def test_pending_usage_is_priced_per_token_type_at_the_book_rates() -> None:
    book = build_price_book({"a": {"input": 3, "cached_input": 1.5, "output": 15}}, None)
    raw = {"2024-11-05|a|i": "1500", "2024-11-05|a|x": "500", "2024-11-05|a|o": "500", "2024-11-05|a|t": "2000",
           "2024-11-05|z|i": "10", "2024-11-05|z|t": "10"}
    rows = {r.model: r for r in parse_pending("key_1", "cus_1", raw, NOV, book)}
    # 1000 uncached x $3/M + 500 cached x $1.5/M + 500 out x $15/M = $0.01125
    assert money(rows["a"].counts.cost) == "0.011250000000"
    assert rows["z"].counts.cost == 0  # unpriced
    body = key_usage_body(list(rows.values()), NOV, None, book, partial=False)
    assert body["unpriced_models"] == ["z"]
    assert body["cost"] == "0.011250000000"
    by_model = {m["model"]: m for m in body["by_model"]}
    assert by_model["a"]["by_type"]["cached_input"] == {"tokens": 500, "rate_per_million": "1.5",
                                                        "cost": "0.000750000000"}
    assert by_model["z"]["cost"] is None


def test_body_starts_with_the_documented_shape() -> None:
    rows = [_row(5, "gpt-a", 84_000), _row(6, "gpt-a", 200)]
    body = key_usage_body(rows, NOV, {"per_minute": 42, "per_day": 3570, "tokens": 10}, None, partial=False)
    assert {k: body[k] for k in list(body)[:5]} == {
        "tokens_used": 84_200, "requests": 2, "period_start": "2024-11-01T00:00:00Z",
        "period_end": "2024-11-30T23:59:59Z", "rate_limit_remaining": {"per_minute": 42, "per_day": 3570}}
    assert body["monthly_tokens_remaining"] == 10
    assert body["unpriced_models"] == ["gpt-a"]
    assert body["estimated_cost_usd"] == 0.0
    assert [d["date"] for d in body["by_day"]] == ["2024-11-05", "2024-11-06"]
    empty = key_usage_body([], NOV, None, None, partial=True)
    assert (empty["tokens_used"], empty["by_model"], empty["partial"]) == (0, [], True)
    assert empty["rate_limit_remaining"] == {"per_minute": None, "per_day": None}


def test_csv_columns_and_formula_guard() -> None:
    rows = [_row(5, "+cmd", 4), _row(5, "gpt-a", 2, customer=None)]
    parsed = list(csv.reader(io.StringIO(usage_csv(rows))))
    assert parsed == [
        ["date", "api_key_id", "customer_id", "model", "requests", "input_tokens", "output_tokens",
         "cached_tokens", "tokens", "cost", "currency"],
        ["2024-11-05", "key_1", "cus_1", "'+cmd", "1", "4", "0", "0", "4", "0.000000000000", "usd"],
        ["2024-11-05", "key_1", "", "gpt-a", "1", "2", "0", "0", "2", "0.000000000000", "usd"],
    ]
