"""The request-path meter: one Redis round trip per event, falling back to a direct Postgres write whenever
Redis did not take it (unreachable, timed out, or refusing the write: READONLY, OOM, LOADING, MASTERDOWN,
CLUSTERDOWN, TRYAGAIN)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from collections import OrderedDict
from dataclasses import asdict
from typing import Any

import anyio
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from aikit.errors import MeterUnavailable, UnknownApiKey
from aikit.keys import load_quota_period, month_start
from aikit.metering.base import Meter, UsageEvent
from aikit.metering.layout import RedisLayout
from aikit.metering.record import encode
from aikit.metering.scripts import RECORD
from aikit.metering.sql_sink import report_meter, store_events
from aikit.observability import METER_FALLBACKS, TOKENS_METERED, emit, logger
from aikit.pricing import PriceBook
from aikit.redis_client import REDIS_DOWN_ERRORS
from aikit.settings import Settings


def priced_event(event: UsageEvent, book: PriceBook | None) -> UsageEvent:
    """The event with its cost at today's rates (kept as is without a price table). A model the book does not
    price (the API refuses those; only direct `meter.record` calls get here) is stored at cost 0 and logged."""
    if book is None:
        return event
    cost = book.cost(event.model, event.input_tokens, event.output_tokens, event.cached_tokens)
    if cost is None:
        logger.error("unpriced_usage", extra={"model": event.model, "request_id": event.request_id})
        cost = 0
    return dataclasses.replace(event, cost=cost)


class _QuotaPeriods:
    """Quota period starts of keys recorded without one (standalone use of the meter), briefly cached."""

    def __init__(self, engine: Engine, ttl: float, max_entries: int = 10_000) -> None:
        self._engine = engine
        self._ttl = ttl
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def _load(self, api_key_id: str) -> int:
        try:
            with Session(self._engine) as session:
                found = load_quota_period(session, api_key_id)
        except (DBAPIError, OSError):
            # The database is down: the calendar month is every key's period unless a paid invoice moved it.
            logger.warning("quota_period_unknown", extra={"api_key_id": api_key_id})
            return int(month_start(dt.datetime.now(dt.UTC)).timestamp())
        if found is None:
            raise UnknownApiKey(f"no API key {api_key_id!r}: its usage cannot be metered")
        return found

    async def of(self, api_key_id: str) -> int:
        now = time.monotonic()
        hit = self._entries.get(api_key_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        period = await anyio.to_thread.run_sync(self._load, api_key_id)
        self._entries[api_key_id] = (now + self._ttl, period)
        self._entries.move_to_end(api_key_id)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return period


class RedisMeter(Meter):
    """Records usage into the durable buffer and the live counters the limiter reads. An event should carry
    its quota period (`quota_period_start`, as the API's callers do); one without it is looked up by key."""

    def __init__(self, client: Any, layout: RedisLayout, engine: Engine, settings: Settings) -> None:
        self._redis = client
        self._layout = layout
        self._engine = engine
        self._settings = settings
        self._periods = _QuotaPeriods(engine, max(1.0, settings.key_cache_ttl_seconds))

    async def record_event(self, event: UsageEvent) -> None:
        event = priced_event(event, self._settings.price_book)
        period = event.quota_period_start
        if period is None:
            period = await self._periods.of(event.api_key_id)
        try:
            await RECORD.run_async(self._redis, self._layout.record_keys(event.api_key_id, period), encode(event))
        except REDIS_DOWN_ERRORS as exc:
            logger.warning("meter_fallback", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
            await anyio.to_thread.run_sync(self._fallback, event)
        emit(TOKENS_METERED, event.tokens)

    def _fallback(self, event: UsageEvent) -> None:
        """Redis did not take the event: write it straight to the database, keyed by the same request id."""
        emit(METER_FALLBACKS)
        self._store(event)

    def _store(self, event: UsageEvent) -> None:
        try:
            with self._engine.begin() as conn:
                store_events(conn, [event], billable=self._settings.stripe_enabled
                             and self._settings.stripe_metering_enabled,
                             window_seconds=self._settings.stripe_report_window_seconds,
                             meter=report_meter(self._settings))
        except Exception as exc:
            # Last resort: the full event in the log, so it can be replayed by hand.
            logger.error("usage_unrecorded", extra={"usage_event": json.dumps(asdict(event))})
            raise MeterUnavailable("usage could not be recorded") from exc
