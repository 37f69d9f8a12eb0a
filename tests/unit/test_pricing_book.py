"""The price book (aikit.pricing): matching, exact integer costs, validation. No services needed."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aikit.errors import PriceTableError
from aikit.pricing import build_price_book, format_money, split_tokens

TABLE = {"gpt-4o": {"input": 2.5, "output": 10}, "gpt-4o*": {"input": 1, "output": 1},
         "gpt-4o-mini*": {"input": 0.15, "cached_input": 0.075, "output": 0.6}, "*": {"input": 99, "output": 99}}


def test_exact_beats_patterns_and_longer_patterns_beat_shorter() -> None:
    book = build_price_book(TABLE, None)
    assert book is not None
    assert book.rates_for("gpt-4o") == book.exact["gpt-4o"]
    assert book.rates_for("gpt-4o-mini-2024-07-18") == dict(book.patterns)["gpt-4o-mini*"]
    assert book.rates_for("gpt-4o-2024-08-06") == dict(book.patterns)["gpt-4o*"]
    assert book.rates_for("anything") == dict(book.patterns)["*"]
    assert build_price_book({"o3": {"input": 1, "output": 1}}, None).rates_for("o3-mini") is None  # type: ignore[union-attr]


def test_costs_are_exact_integers_of_1e_12_usd() -> None:
    book = build_price_book({"m": {"input": 0.1, "cached_input": 0.2, "output": 0.3}}, None)
    assert book is not None
    # Binary floats would drift here: 0.1 + 0.2 != 0.3. The book works in integers.
    assert book.cost("m", 1, 0, 0) + book.cost("m", 1, 1, 1) == book.cost("m", 2, 1, 1)  # type: ignore[operator]
    assert book.cost("m", 1_000_000, 1_000_000, 500_000) == (500_000 * 100_000 + 500_000 * 200_000
                                                            + 1_000_000 * 300_000)
    assert format_money(book.cost("m", 3, 0, 0) or 0) == "0.000000300000"
    assert book.cost("unknown", 1, 1, 0) is None


RATE = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)


@given(st.integers(0, 10**9), st.integers(0, 10**9), st.integers(0, 10**9), RATE, RATE, RATE)
def test_cost_is_tokens_times_rate_exactly(inp: int, out: int, cached: int, r_in: Decimal, r_cached: Decimal,
                                           r_out: Decimal) -> None:
    book = build_price_book({"m": {"input": str(r_in), "cached_input": str(r_cached), "output": str(r_out)}},
                            None)
    assert book is not None
    split = split_tokens(inp, out, cached)
    expected = (split["input"] * r_in + split["cached_input"] * r_cached + split["output"] * r_out) / 10**6
    assert Decimal(book.cost("m", inp, out, cached) or 0).scaleb(-12) == expected


def test_no_table_means_no_book_and_the_file_is_merged_under_the_setting(tmp_path: Path) -> None:
    assert build_price_book({}, None) is None
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"a": {"input": 1, "output": 1}, "b": {"input": 2, "output": 2}}))
    book = build_price_book({"b": {"input": 3, "output": 3}}, str(path))
    assert book is not None
    assert book.exact["a"].per_million[0] == 1 and book.exact["b"].per_million[0] == 3  # PRICE_TABLE wins


@pytest.mark.parametrize(("spec", "fragment"), [
    ({"input": 1}, "missing 'output'"),
    ({"input": 1, "output": 1, "reasoning": 2}, "unknown token type 'reasoning'"),
    ({"input": -1, "output": 1}, "between 0 and"),
    ({"input": "NaN", "output": 1}, "between 0 and"),
    ({"input": True, "output": 1}, "must be a number"),
    ({"input": 0.0000001, "output": 1}, "more than 6 decimal places"),
    ([1, 2], "must be an object"),
])
def test_each_bad_entry_is_one_line_naming_it(spec: object, fragment: str) -> None:
    with pytest.raises(PriceTableError) as caught:
        build_price_book({"good": {"input": 1, "output": 2}, "bad": spec}, None)
    assert len(caught.value.lines) == 1
    assert "'bad'" in caught.value.lines[0] and fragment in caught.value.lines[0]


def test_unreadable_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(PriceTableError) as caught:
        build_price_book(None, str(tmp_path / "missing.json"))
    assert caught.value.lines[0].startswith("PRICE_TABLE_FILE") and "cannot be read" in caught.value.lines[0]


def test_stripe_unit_amount_is_one_unit_in_the_minor_currency_unit() -> None:
    assert build_price_book(TABLE, None, "usd").minor_unit_amount == "0.0000000001"  # type: ignore[union-attr]
    assert build_price_book(TABLE, None, "jpy").minor_unit_amount == "0.000000000001"  # type: ignore[union-attr]
