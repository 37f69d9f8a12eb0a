"""The usage record: one metered request on its way through the Redis buffer, written down once.

The request path appends it to its key's shard stream (the RECORD script, aikit.metering.scripts) as short
fields, FIELDS in FIELD_ORDER, which is also RECORD's ARGV order (`encode`). The flush reads entries back and
turns a run of them into COPY rows or events (`decode_batch`), and removes them with the pending-counter deltas
computed while reading (PENDING_COUNTERS; ACK_FAST/ACK_THROUGH). The staging table the COPY rows go to has the
columns COPY_COLUMNS; the length limits an entry must respect come from the tables it is stored in
(aikit.db.models), so a stored entry can never fail the COPY of its whole batch.

Money rules:
- An entry is malformed when a field is missing, a count is not a plain ASCII number, its time is not a real
  one, a string is longer than its column or holds a COPY control character or backslash (ids, keys and model
  names never do). A malformed entry is never stored: the flush keeps it aside (the shard's `:malformed`
  stream) and stores the rest of its batch.
- A row is billable (reported to Stripe) only when metering is on and it has a customer (`billable_row`): usage
  of keys without a Stripe customer is stored and never reported.
- Entries already in the buffer are never rewritten: a field added later must decode without it (`p`, the cost:
  an entry recorded before costs existed is priced at the flush, at the then current rates).
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, ColumnElement, Integer, String

from aikit.db.models import ApiKeyUsage, UsageDaily
from aikit.metering.base import UsageEvent

if TYPE_CHECKING:
    from aikit.pricing import PriceBook

# The stream fields, in the order RECORD takes them (ARGV) and writes them (XADD).
_REQUEST_ID = "r"  # every write of the usage is idempotent on it
_API_KEY_ID = "k"
_CUSTOMER_ID = "c"  # the Stripe customer id; empty without one
_MODEL = "m"
_INPUT = "i"  # input tokens, cached ones included
_OUTPUT = "o"  # output tokens
_CACHED = "x"  # the part of the input served from the provider's cache
TS = "t"  # when the usage happened: Unix seconds, the repr of a float
DATE = "d"  # the UTC day of TS, YYYY-MM-DD: the day of its pending counters
COST = "p"  # 1e-12 currency units (aikit.pricing); absent or empty: recorded before costs existed
# field -> what it holds, named as in UsageEvent and the stored columns (the Lua scripts name them so too).
FIELDS: dict[str, str] = {
    _REQUEST_ID: "request_id", _API_KEY_ID: "api_key_id", _CUSTOMER_ID: "customer_id", _MODEL: "model",
    _INPUT: "input_tokens", _OUTPUT: "output_tokens", _CACHED: "cached_tokens", TS: "ts", DATE: "date", COST: "cost",
}
FIELD_ORDER: tuple[str, ...] = tuple(FIELDS)
_FIELD_LIST = list(FIELD_ORDER)  # what a raw entry's names (a list) compare equal to

# The pending counters: one hash per API key (RedisLayout.pending), field "<date>|<model>|<suffix>", raised by
# RECORD and lowered by ACK_FAST/ACK_THROUGH when the entry leaves the buffer; aikit.usage adds them to the
# stored usage as not yet flushed. suffix -> (counter, the fields it adds up; none: one per request).
PENDING_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "t": ("tokens", (_INPUT, _OUTPUT)),
    "r": ("requests", ()),
    "i": ("input_tokens", (_INPUT,)),
    "o": ("output_tokens", (_OUTPUT,)),
    "x": ("cached_tokens", (_CACHED,)),
}

# Columns of the COPY staging table (aikit.metering.sql_sink), in the order of a COPY row.
COPY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("request_id", "text"), ("api_key_id", "text"), ("customer_id", "text"), ("ts", "double precision"),
    ("model", "text"), ("input_tokens", "int"), ("output_tokens", "int"), ("cached_tokens", "int"),
    ("billable", "bool"), ("cost", "bigint"),
)
_NULL = "\\N"

# Fields whose values are stored as they are, in the column of their name: each gets the tightest limit of them.
_LIMITED = (_REQUEST_ID, _API_KEY_ID, _CUSTOMER_ID, _MODEL, _INPUT, _OUTPUT, _CACHED, COST)
_TABLES = (ApiKeyUsage.__table__, UsageDaily.__table__)
_TS_RANGE = (946684800.0, 4102444800.0)  # 2000-01-01 .. 2100-01-01: anything else is not a real event time


def column_limit(column: ColumnElement[Any]) -> int:
    """The longest value a column takes: characters of a String, digits of an integer. A count gets the digits
    for which it and the sum of two such fit (input + output make the `tokens` column)."""
    if isinstance(column.type, String) and column.type.length is not None:
        return column.type.length
    if isinstance(column.type, Integer):
        top = 2**63 - 1 if isinstance(column.type, BigInteger) else 2**31 - 1
        digits = 1
        while 2 * (10 ** (digits + 1) - 1) <= top:
            digits += 1
        return digits
    raise TypeError(f"{column} has no length limit")


def _limits() -> dict[str, int]:
    return {name: min(column_limit(table.c[FIELDS[name]]) for table in _TABLES if FIELDS[name] in table.c)
            for name in _LIMITED}


LIMITS = _limits()
_MAX_R, _MAX_K, _MAX_C, _MAX_M = LIMITS[_REQUEST_ID], LIMITS[_API_KEY_ID], LIMITS[_CUSTOMER_ID], LIMITS[_MODEL]
_MAX_I, _MAX_O, _MAX_X, _MAX_P = LIMITS[_INPUT], LIMITS[_OUTPUT], LIMITS[_CACHED], LIMITS[COST]


def billable_row(metering_on: bool, customer_id: str | None) -> bool:
    """Whether a row is added to a Stripe report."""
    return bool(metering_on and customer_id)


def _utc_day(ts: float) -> str:
    return _day_of(int(ts // 86400))


@functools.lru_cache(maxsize=8)
def _day_of(day_number: int) -> str:
    """The UTC date of a day counted from the epoch (cached: every record of a day asks for the same one)."""
    return time.strftime("%Y-%m-%d", time.gmtime(day_number * 86400))


def encode(event: UsageEvent) -> list[Any]:
    """RECORD's ARGV for an event: its fields' values in FIELD_ORDER."""
    return [event.request_id, event.api_key_id, event.customer_id or "", event.model, event.input_tokens,
            event.output_tokens, event.cached_tokens, repr(event.ts), _utc_day(event.ts), event.cost]


def pending_amounts(inp: int, out: int, cached: int) -> tuple[int, int, int, int, int]:
    """What one entry adds to its pending counters, in PENDING_COUNTERS order."""
    return inp + out, 1, inp, out, cached


# -- decoding a run of stream entries ----------------------------------------------------------------------


@dataclass
class Batch:
    """One contiguous run of a shard's stream, ready to store: COPY rows (Postgres) or events (others),
    plus what the pending counters lose when it leaves Redis."""

    shard: int
    first_id: str
    last_id: str
    size: int  # entries read, malformed ones included
    full: bool  # as long as a batch may be: more may follow in this shard
    copy_rows: bytes = b""
    events: list[UsageEvent] = field(default_factory=list)
    valid: int = 0
    malformed_ids: list[str] = field(default_factory=list)
    key_ids: set[str] = field(default_factory=set)  # api keys of all entries, malformed ones included
    # (api_key_id, date, model) -> amounts in PENDING_COUNTERS order, valid entries only
    deltas: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)


def decode_batch(shard: int, entries: list[Any], *, metering_on: bool, copy: bool, full: bool,
                 book: PriceBook | None = None) -> Batch:
    """Stream entries ([id, fields]) -> a Batch. The flush's hot path: per entry one slice, a few C-level
    checks and one f-string (COPY text in COPY_COLUMNS order, no objects per row)."""
    batch = Batch(shard=shard, first_id=entries[0][0], last_id=entries[-1][0], size=len(entries), full=full)
    rows: list[str] = []
    # billable_row, decided once: an entry with a customer is billable exactly when metering is on.
    with_customer = "t" if billable_row(metering_on, "a customer") else "f"
    for entry in entries:
        values = _fields(entry[1])
        if values is None:
            _set_aside(batch, entry)
            continue
        r, k, c, m, i, o, x, t, d, p = values
        batch.key_ids.add(k)
        ts = _timestamp(t)
        if not _well_formed(values, ts):
            batch.malformed_ids.append(entry[0])
            continue
        inp, out, cached = int(i), int(o), int(x)
        if not p:  # the cost may be "" (recorded before costs): priced here
            p = _missing_cost(m, (inp, out, cached), book)
        if copy:
            rows.append(f"{r}\t{k}\t{c or _NULL}\t{ts!r}\t{m}\t{i}\t{o}\t{x}"
                        f"\t{with_customer if c else 'f'}\t{p}\n")
        else:
            batch.events.append(UsageEvent(r, k, c or None, m, inp, out, cached, ts, cost=int(p)))
        _add_delta(batch.deltas, (k, d, m), inp, out, cached)
    batch.valid = batch.size - len(batch.malformed_ids)
    batch.copy_rows = "".join(rows).encode()
    return batch


def _fields(raw: Any) -> tuple[str, ...] | None:
    """The values in FIELD_ORDER of an entry given as a flat [name, value, ...] list (no client-side parsing)
    or a dict; None when a field is missing. An entry recorded before costs existed has no COST: ""."""
    if isinstance(raw, list) and raw[0::2] == _FIELD_LIST:
        return tuple(raw[1::2])
    f = raw if isinstance(raw, dict) else dict(zip(raw[0::2], raw[1::2], strict=False))
    try:
        return (*(f[name] for name in FIELD_ORDER[:-1]), f.get(COST, ""))
    except KeyError:
        return None


def _set_aside(batch: Batch, entry: Any) -> None:
    """An entry missing fields: malformed, but its key's pending counters still move when it is removed."""
    raw = entry[1]
    fields = raw if isinstance(raw, dict) else dict(zip(raw[0::2], raw[1::2], strict=False))
    k = fields.get(_API_KEY_ID)
    if isinstance(k, str) and k:
        batch.key_ids.add(k)
    batch.malformed_ids.append(entry[0])


def _timestamp(t: str) -> float:
    try:
        return float(t)
    except ValueError:
        return 0.0  # outside _TS_RANGE: malformed


def _well_formed(values: tuple[str, ...], ts: float) -> bool:
    """An entry's values (FIELD_ORDER) and its parsed time make a row that stores (see the money rules)."""
    r, k, c, m, i, o, x, _, d, p = values
    lo, hi = _TS_RANGE
    return bool(k and r and m and d and lo <= ts <= hi and "|" not in d
                and _fits_columns(values) and plain(f"{r}{k}{c}{m}{d}", f"{i}{o}{x}{p}"))


def _fits_columns(values: tuple[str, ...]) -> bool:
    """Every value within LIMITS; counts not empty."""
    r, k, c, m, i, o, x, _, _, p = values
    return (len(r) <= _MAX_R and len(k) <= _MAX_K and len(c) <= _MAX_C and len(m) <= _MAX_M
            and 0 < len(i) <= _MAX_I and 0 < len(o) <= _MAX_O and 0 < len(x) <= _MAX_X and len(p) <= _MAX_P)


def plain(text: str, counts: str) -> bool:
    """Counts are ASCII digits ("²".isdigit() is True); text holds no COPY control character or backslash."""
    return (counts.isdigit() and counts.isascii() and "\t" not in text and "\n" not in text
            and "\\" not in text and "\r" not in text and "\x00" not in text)


def _missing_cost(model: str, counts: tuple[int, int, int], book: PriceBook | None) -> str:
    """The cost of an entry recorded without one: at today's rates (0 without a price book or for an unpriced
    model)."""
    cost = book.cost(model, *counts) if book is not None else None
    return str(cost or 0)


def _add_delta(deltas: dict[tuple[str, str, str], list[int]], key: tuple[str, str, str],
               inp: int, out: int, cached: int) -> None:
    acc = deltas.get(key)
    if acc is None:
        acc = deltas[key] = [0, 0, 0, 0, 0]
    acc[0] += inp + out  # the hot path's unrolled pending_amounts
    acc[1] += 1
    acc[2] += inp
    acc[3] += out
    acc[4] += cached


# -- COPY rows of events (the request path's fallback, the embedded meter) ---------------------------------


def _copy_value(value: object) -> str:
    if value is None:
        return _NULL
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def copy_rows(events: Sequence[UsageEvent], *, metering_on: bool) -> bytes:
    """UsageEvents -> COPY text rows (COPY_COLUMNS), escaping whatever they hold."""
    buf = io.StringIO()
    for e in events:
        row = (e.request_id, e.api_key_id, e.customer_id, repr(float(e.ts)), e.model, e.input_tokens,
               e.output_tokens, e.cached_tokens, "t" if billable_row(metering_on, e.customer_id) else "f", e.cost)
        buf.write("\t".join(_copy_value(v) for v in row))
        buf.write("\n")
    return buf.getvalue().encode()
