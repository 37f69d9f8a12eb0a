"""The usage record's codec (aikit.metering.record): encode -> stream entry -> decode, every validation rule,
the limits against the table definitions, and the Lua scripts built from the same field list. No services."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import BigInteger, Integer, String

from aikit.db.models import ApiKeyUsage, UsageDaily
from aikit.metering.base import UsageEvent
from aikit.metering.record import (
    COPY_COLUMNS,
    COST,
    FIELD_ORDER,
    FIELDS,
    LIMITS,
    PENDING_COUNTERS,
    billable_row,
    column_limit,
    copy_rows,
    decode_batch,
    encode,
    pending_amounts,
)
from aikit.metering.scripts import ACK_THROUGH, ADMIT, RECORD
from aikit.pricing import PriceBook, Rates

TS = 1_767_225_600.25  # 2026-01-01T00:00:00.25Z


def event(**changes: Any) -> UsageEvent:
    values: dict[str, Any] = {"request_id": "req_1", "api_key_id": "key_1", "customer_id": "cus_1",
                              "model": "gpt-x", "input_tokens": 120, "output_tokens": 30, "cached_tokens": 20,
                              "ts": TS, "cost": 4_500}
    return UsageEvent(**(values | changes))


def entry(values: list[Any], entry_id: str = "1-0") -> list[Any]:
    """A stream entry as Redis returns it to the flush: [id, [name, value, ...]], every value a string."""
    flat: list[str] = []
    for name, value in zip(FIELD_ORDER, values, strict=False):
        flat += (name, str(value))
    return [entry_id, flat]


def decode(*entries: list[Any], copy: bool = False, metering_on: bool = True, book: PriceBook | None = None
           ) -> Any:
    return decode_batch(3, list(entries), metering_on=metering_on, copy=copy, full=False, book=book)


def with_field(values: list[Any], name: str, value: Any) -> list[Any]:
    changed = list(values)
    changed[FIELD_ORDER.index(name)] = value
    return changed


# -- encode -> decode ---------------------------------------------------------------------------------------


def test_encode_writes_every_field_in_order() -> None:
    args = encode(event())
    assert len(args) == len(FIELD_ORDER)
    assert dict(zip(FIELD_ORDER, args, strict=True)) == {
        "r": "req_1", "k": "key_1", "c": "cus_1", "m": "gpt-x", "i": 120, "o": 30, "x": 20, "t": repr(TS),
        "d": "2026-01-01", "p": 4_500}


names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\|"), min_size=1,
                max_size=40)


@given(request_id=names, api_key_id=names, customer_id=st.none() | names, model=names,
       counts=st.tuples(*[st.integers(0, 10**9 - 1)] * 3), ts=st.floats(946684800.0, 4102444800.0),
       cost=st.integers(0, 10**18 - 1))
def test_a_recorded_event_decodes_to_itself(request_id: str, api_key_id: str, customer_id: str | None, model: str,
                                            counts: tuple[int, int, int], ts: float, cost: int) -> None:
    original = event(request_id=request_id, api_key_id=api_key_id, customer_id=customer_id, model=model,
                     input_tokens=counts[0], output_tokens=counts[1], cached_tokens=counts[2], ts=ts, cost=cost)

    batch = decode(entry(encode(original)))

    assert batch.events == [original] and batch.valid == 1 and not batch.malformed_ids
    assert batch.key_ids == {api_key_id}
    day = encode(original)[FIELD_ORDER.index("d")]
    assert batch.deltas == {(api_key_id, day, model): list(pending_amounts(*counts))}


def test_copy_rows_of_a_batch_match_those_of_its_events() -> None:
    events = [event(), event(request_id="req_2", customer_id=None, cost=0)]
    entries = [entry(encode(e), f"1-{n}") for n, e in enumerate(events)]

    for metering_on in (True, False):
        batch = decode(*entries, copy=True, metering_on=metering_on)
        assert batch.copy_rows == copy_rows(events, metering_on=metering_on)
        rows = batch.copy_rows.decode().splitlines()
        assert [len(row.split("\t")) for row in rows] == [len(COPY_COLUMNS)] * 2
        billable = [row.split("\t")[[name for name, _ in COPY_COLUMNS].index("billable")] for row in rows]
        assert billable == (["t", "f"] if metering_on else ["f", "f"])


def test_an_entry_given_as_a_dict_or_in_another_order_decodes_the_same() -> None:
    args = encode(event())
    as_dict = dict(zip(FIELD_ORDER, map(str, args), strict=True))
    reordered = [x for name in reversed(FIELD_ORDER) for x in (name, as_dict[name])]

    assert decode(["1-0", as_dict]).events == decode(["1-0", reordered]).events == [event()]


def test_an_entry_recorded_before_costs_is_priced_at_the_flush() -> None:
    rates = Rates(input=3, cached_input=1, output=7, per_million=(Decimal(3), Decimal(1), Decimal(7)))
    book = PriceBook(exact={"gpt-x": rates}, patterns=())
    without_cost = entry(encode(event())[:-1])
    empty_cost = entry(with_field(encode(event()), COST, ""))

    assert decode(without_cost).events[0].cost == 0  # no price table: 0
    priced = book.cost("gpt-x", 120, 30, 20)
    assert priced
    assert decode(without_cost, book=book).events[0].cost == priced
    assert decode(empty_cost, book=book).events[0].cost == priced


def test_billable_only_with_metering_on_and_a_customer() -> None:
    assert billable_row(True, "cus_1")
    assert not billable_row(True, None) and not billable_row(True, "")
    assert not billable_row(False, "cus_1")


# -- validation: each rule refuses what it should ---------------------------------------------------------


GOOD = encode(event())
REFUSED = {
    "request id empty": with_field(GOOD, "r", ""),
    "api key empty": with_field(GOOD, "k", ""),
    "model empty": with_field(GOOD, "m", ""),
    "date empty": with_field(GOOD, "d", ""),
    "date holding the counter separator": with_field(GOOD, "d", "2026-01|01"),
    "time not a number": with_field(GOOD, "t", "soon"),
    "time before 2000": with_field(GOOD, "t", "12.5"),
    "time after 2100": with_field(GOOD, "t", "4102444801.0"),
    "count not a number": with_field(GOOD, "i", "12a"),
    "negative count": with_field(GOOD, "o", "-3"),
    "count empty": with_field(GOOD, "x", ""),
    "non-ASCII digits": with_field(GOOD, "i", "²"),
    "cost not a number": with_field(GOOD, "p", "1.5"),
    "tab in a model name": with_field(GOOD, "m", "gpt\tx"),
    "newline in a request id": with_field(GOOD, "r", "req\n1"),
    "carriage return in a customer": with_field(GOOD, "c", "cus\r1"),
    "backslash in an api key": with_field(GOOD, "k", "key\\1"),
    "NUL in a model name": with_field(GOOD, "m", "gpt\x00"),
    **{f"{FIELDS[name]} longer than its column": with_field(GOOD, name, ("9" if name in "ioxp" else "a")
                                                           * (LIMITS[name] + 1)) for name in LIMITS},
}


@pytest.mark.parametrize("values", REFUSED.values(), ids=REFUSED.keys())
def test_a_malformed_entry_is_set_aside_and_the_rest_stored(values: list[Any]) -> None:
    batch = decode(entry(GOOD, "1-0"), entry(values, "1-1"), copy=True)

    assert batch.malformed_ids == ["1-1"] and batch.valid == 1 and batch.size == 2
    assert batch.copy_rows == copy_rows([event()], metering_on=True)
    assert batch.deltas == {("key_1", "2026-01-01", "gpt-x"): list(pending_amounts(120, 30, 20))}


@pytest.mark.parametrize("name", [name for name in FIELD_ORDER if name != COST])
def test_an_entry_missing_a_field_is_malformed_but_its_key_is_kept(name: str) -> None:
    fields = dict(zip(FIELD_ORDER, map(str, GOOD), strict=True))
    del fields[name]

    batch = decode(["1-0", fields], ["1-1", [x for kv in fields.items() for x in kv]])

    assert batch.malformed_ids == ["1-0", "1-1"] and batch.valid == 0
    assert batch.key_ids == (set() if name == "k" else {"key_1"})  # its pending counters move on removal


def test_values_at_their_limits_are_stored() -> None:
    at_limits = GOOD
    for name, limit in LIMITS.items():
        at_limits = with_field(at_limits, name, ("9" if name in "ioxp" else "a") * limit)

    assert decode(entry(at_limits)).valid == 1


# -- limits come from the tables ---------------------------------------------------------------------------


def test_limits_match_the_stored_columns() -> None:
    for name, limit in LIMITS.items():
        for table in (ApiKeyUsage.__table__, UsageDaily.__table__):
            column = table.c.get(FIELDS[name])
            if column is None:
                continue
            if isinstance(column.type, String):
                assert column.type.length is not None and limit <= column.type.length
            else:
                top = 2**63 - 1 if isinstance(column.type, BigInteger) else 2**31 - 1
                assert isinstance(column.type, Integer) and 2 * (10**limit - 1) <= top
    assert LIMITS == {"r": 64, "k": 40, "c": 255, "m": 128, "i": 9, "o": 9, "x": 9, "p": 18}
    # input + output make `tokens`, an int4 column: two counts at the limit must still fit it
    assert isinstance(ApiKeyUsage.__table__.c.tokens.type, Integer)
    assert 2 * (10 ** LIMITS["i"] - 1) < 2**31


def test_column_limit_refuses_a_column_without_one() -> None:
    with pytest.raises(TypeError):
        column_limit(ApiKeyUsage.__table__.c.ts)


# -- the Lua scripts are built from the same schema -------------------------------------------------------


def test_record_writes_the_fields_in_argv_order() -> None:
    xadd = next(line for line in RECORD.source.splitlines() if "XADD" in line)
    assert [part.split("'")[1] for part in xadd.split("'*', ")[1].split(", ")[0::2]] == list(FIELD_ORDER)
    for suffix in PENDING_COUNTERS:
        assert f"f .. '{suffix}'" in RECORD.source
        assert f"fields[base .. '{suffix}']" in ACK_THROUGH.source
    assert "$" not in RECORD.source.replace("%d+$'", "")
    assert "'$" not in ADMIT.source and "'$" not in ACK_THROUGH.source


def test_pending_amounts_follow_the_counters() -> None:
    inp, out, cached = 7, 5, 3
    value = {"i": inp, "o": out, "x": cached}
    expected = tuple(sum(value[f] for f in fields) if fields else 1 for _, fields in PENDING_COUNTERS.values())
    assert pending_amounts(inp, out, cached) == expected
