"""The request-path meter: one Redis round trip per event, falling back to a direct Postgres write."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import anyio
from sqlalchemy import Engine

from aikit.metering.base import Meter, UsageEvent
from aikit.metering.layout import QUOTA_TTL_SECONDS, RedisLayout
from aikit.metering.scripts import RECORD
from aikit.metering.sql_sink import store_events
from aikit.observability import METER_FALLBACKS, TOKENS_METERED, emit, logger
from aikit.redis_client import REDIS_DOWN_ERRORS
from aikit.settings import Settings


class MeterUnavailable(Exception):
    """Neither Redis nor the database took the event (it was logged as `usage_unrecorded`)."""


def record_args(event: UsageEvent) -> list[Any]:
    return [event.request_id, event.api_key_id, event.customer_id or "", event.model, event.input_tokens,
            event.output_tokens, event.cached_tokens, repr(event.ts),
            time.strftime("%Y-%m-%d", time.gmtime(event.ts)), QUOTA_TTL_SECONDS]


class RedisMeter(Meter):
    def __init__(self, client: Any, layout: RedisLayout, engine: Engine, settings: Settings,
                 quota_period_of: Callable[[str], int] | None = None) -> None:
        self._redis = client
        self._layout = layout
        self._engine = engine
        self._settings = settings
        # api_key_id -> quota period start; the API sets it from the key lookup it already made.
        self._quota_period_of = quota_period_of or (lambda _kid: 0)

    def keys_for(self, event: UsageEvent) -> list[str]:
        kid = event.api_key_id
        shard = self._layout.shard_of(kid)
        return [self._layout.stream(shard), self._layout.pending(kid),
                self._layout.quota(kid, int(self._quota_period_of(kid))), self._layout.inflight(kid)]

    async def record_event(self, event: UsageEvent) -> None:
        try:
            await RECORD.run_async(self._redis, self.keys_for(event), record_args(event))
        except REDIS_DOWN_ERRORS:
            await anyio.to_thread.run_sync(self._fallback, event)
        emit(TOKENS_METERED, event.tokens)

    def _fallback(self, event: UsageEvent) -> None:
        """Redis is down: write the event straight to the database, keyed by the same request id."""
        emit(METER_FALLBACKS)
        try:
            with self._engine.begin() as conn:
                store_events(conn, [event], billable=self._settings.stripe_enabled
                             and self._settings.stripe_metering_enabled,
                             window_seconds=self._settings.stripe_report_window_seconds)
        except Exception as exc:
            # Last resort: the full event in the log, so it can be replayed by hand.
            logger.error("usage_unrecorded", extra={"usage_event": json.dumps(asdict(event))})
            raise MeterUnavailable("usage could not be recorded") from exc
