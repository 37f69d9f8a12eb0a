"""The price book: what one token of each model and token type costs, in exact integer picodollars.

Rates are configured in USD (or PRICE_CURRENCY) per million tokens, per model name or glob pattern
(`gpt-4o*`): an exact name beats any pattern, a longer pattern beats a shorter one. A rate may have at most six
decimal places, so one token costs a whole number of 1e-12 currency units ("picodollars" for USD) and every
cost is an exact integer: cost = Σ tokens * rate * 10^6, summed without rounding anywhere. Stripe receives that
integer as the value of one cost meter; its price converts a picodollar to the invoice's minor unit exactly
(1e-12 USD = 1e-10 cents) and Stripe rounds the invoice line to the cent once, at the end.

Token types: `input` (input not served from cache), `cached_input` (input served from the provider's cache;
defaults to the input rate) and `output`.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from aikit.errors import PriceTableError

TOKEN_TYPES = ("input", "cached_input", "output")
UNITS_PER_MAJOR = 10**12  # the cost unit: 1e-12 of the currency's major unit (a picodollar for USD)
_RATE_SCALE = UNITS_PER_MAJOR // 10**6  # rates are per million tokens
MAX_RATE = Decimal(1_000_000)  # per million tokens; keeps every per-event cost far inside a BIGINT
# Stripe's zero-decimal currencies: their minor unit is the major unit.
ZERO_DECIMAL = frozenset({"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
                          "xaf", "xof", "xpf"})
_GLOB = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class Rates:
    """Cost units per token of each type (integers), and the configured rates per million tokens."""

    input: int
    cached_input: int
    output: int
    per_million: tuple[Decimal, Decimal, Decimal]

    def cost(self, input_tokens: int, output_tokens: int, cached_tokens: int) -> int:
        """`input_tokens` includes the cached ones (as providers report it); cached ones bill at their rate."""
        cached = min(cached_tokens, input_tokens)
        return (input_tokens - cached) * self.input + cached * self.cached_input + output_tokens * self.output


@dataclass(frozen=True)
class PriceBook:
    exact: Mapping[str, Rates]
    patterns: tuple[tuple[str, Rates], ...]  # longest first
    currency: str = "usd"

    def rates_for(self, model: str) -> Rates | None:
        found = self.exact.get(model)
        if found is not None:
            return found
        for pattern, rates in self.patterns:
            if fnmatch.fnmatchcase(model, pattern):
                return rates
        return None

    def priced(self, model: str) -> bool:
        return self.rates_for(model) is not None

    def cost(self, model: str, input_tokens: int, output_tokens: int, cached_tokens: int) -> int | None:
        rates = self.rates_for(model)
        return None if rates is None else rates.cost(input_tokens, output_tokens, cached_tokens)

    def entries(self) -> dict[str, Rates]:
        return {**self.exact, **dict(self.patterns)}

    @property
    def minor_unit_amount(self) -> str:
        """One cost unit in the currency's minor unit, as Stripe's `unit_amount_decimal` (exact)."""
        digits = 12 if self.currency in ZERO_DECIMAL else 10
        return format(Decimal(1).scaleb(-digits), "f")


def split_tokens(input_tokens: int, output_tokens: int, cached_tokens: int) -> dict[str, int]:
    """Tokens per type, the way they are priced."""
    cached = min(cached_tokens, input_tokens)
    return {"input": input_tokens - cached, "cached_input": cached, "output": output_tokens}


def format_money(units: int, currency: str = "usd") -> str:
    """Cost units as an exact decimal string of the major unit ("0.000123450000")."""
    return format(Decimal(units).scaleb(-12), "f")


def _rate(kind: str, value: object) -> tuple[Decimal | None, str | None]:
    """(rate, None) or (None, what is wrong with it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        return None, f"{kind} must be a number (per million tokens), got {value!r}"
    try:
        # str() of a float is its shortest repr, so 0.15 stays 0.15 (no binary drift).
        rate = Decimal(str(value))
    except InvalidOperation:
        return None, f"{kind} must be a number (per million tokens), got {value!r}"
    if not rate.is_finite() or rate < 0 or rate > MAX_RATE:
        return None, f"{kind} must be between 0 and {MAX_RATE} per million tokens, got {value}"
    scaled = rate * _RATE_SCALE
    if scaled != scaled.to_integral_value():
        return None, f"{kind} {value} has more than 6 decimal places (the smallest step is 0.000001)"
    return rate, None


def _entry(model: object, spec: object, source: str) -> tuple[Rates | None, str | None]:
    """(rates, None), or (None, the one line describing everything wrong with this entry)."""
    if not isinstance(model, str) or not model.strip() or len(model) > 128:
        return None, f"{source}: model name {model!r} must be a non-empty string of at most 128 characters"
    if not isinstance(spec, Mapping):
        return None, (f"{source} {model!r}: must be an object like "
                      '{"input": 0.15, "cached_input": 0.075, "output": 0.6}')
    problems = [f"unknown token type {k!r}" for k in sorted(set(map(str, spec)) - set(TOKEN_TYPES))]
    problems += [f"missing {k!r}" for k in ("input", "output") if k not in spec]
    parsed: dict[str, Decimal] = {}
    for kind in TOKEN_TYPES:
        if kind in spec:
            rate, problem = _rate(kind, spec[kind])
            if problem:
                problems.append(problem)
            elif rate is not None:
                parsed[kind] = rate
    if problems:
        return None, f"{source} {model!r}: {'; '.join(problems)} (rates per million tokens: {', '.join(TOKEN_TYPES)})"
    inp, out = parsed["input"], parsed["output"]
    cached = parsed.get("cached_input", inp)
    return Rates(int(inp * _RATE_SCALE), int(cached * _RATE_SCALE), int(out * _RATE_SCALE), (inp, cached, out)), None


def _read_file(path: str, lines: list[str]) -> Mapping[str, Any]:
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        lines.append(f"PRICE_TABLE_FILE {path}: cannot be read ({exc.strerror or exc})")
        return {}
    except ValueError as exc:
        lines.append(f"PRICE_TABLE_FILE {path}: not JSON ({exc})")
        return {}
    if not isinstance(loaded, dict):
        lines.append(f"PRICE_TABLE_FILE {path}: must hold a JSON object of model -> rates")
        return {}
    return loaded


def build_price_book(table: Mapping[str, Any] | None, file: str | None, currency: str = "usd") -> PriceBook | None:
    """The price book of PRICE_TABLE and PRICE_TABLE_FILE (PRICE_TABLE wins for a model in both); None when
    neither is configured. Raises PriceTableError naming every bad entry, one line each."""
    lines: list[str] = []
    sources: list[tuple[str, Mapping[str, Any]]] = []
    if file:
        sources.append((f"PRICE_TABLE_FILE {file}", _read_file(file, lines)))
    if table:
        sources.append(("PRICE_TABLE", table))
    if not sources and not lines:
        return None
    rates: dict[str, Rates] = {}
    for source, entries in sources:
        for model, spec in entries.items():
            parsed, problem = _entry(model, spec, source)
            if problem:
                lines.append(problem)
            elif parsed is not None:
                rates[model] = parsed
    if lines:
        raise PriceTableError(lines)
    exact = {m: r for m, r in rates.items() if not _GLOB & set(m)}
    patterns = tuple(sorted(((m, r) for m, r in rates.items() if _GLOB & set(m)), key=lambda p: (-len(p[0]), p[0])))
    return PriceBook(exact=exact, patterns=patterns, currency=currency)
