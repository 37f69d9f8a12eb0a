"""The meter of the embedded first-try setup (`REDIS_URL=memory://`, `make run`): the in-process Redis substitute
dies with the process, so it cannot be the durable buffer. Each event is written to the database (SQLite by
default) before the call returns, through the same idempotent store the flush uses; the substitute keeps only
the live counters the limiter reads. Ctrl-C, SIGTERM or a crash lose nothing, and `aikit flush` from another
shell finds every report in the database."""

from __future__ import annotations

import anyio

from aikit.metering.base import UsageEvent
from aikit.metering.redis_meter import RedisMeter
from aikit.metering.scripts import COUNT_RECORDED
from aikit.observability import TOKENS_METERED, emit


class EmbeddedMeter(RedisMeter):
    async def record_event(self, event: UsageEvent) -> None:
        period = event.quota_period_start
        if period is None:
            period = await self._periods.of(event.api_key_id)
        await anyio.to_thread.run_sync(self._store, event)  # raises MeterUnavailable: nothing was recorded
        kid = event.api_key_id
        keys = [self._layout.quota(kid, period), self._layout.inflight(kid), self._layout.quota_catchup(kid, period)]
        await COUNT_RECORDED.run_async(self._redis, keys, [event.request_id, event.tokens])
        emit(TOKENS_METERED, event.tokens)
