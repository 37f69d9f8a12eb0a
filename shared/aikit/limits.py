"""Per-key limits, enforced in Redis so they hold across every Lambda instance: requests per minute and per
UTC day, and a monthly token quota with reservations so parallel requests cannot overspend it."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aikit.keys import KeyInfo
from aikit.metering.layout import QUOTA_TTL_SECONDS, RedisLayout
from aikit.metering.scripts import ADMIT, RELEASE, SEED_QUOTA
from aikit.observability import logger
from aikit.redis_client import REDIS_DOWN_ERRORS
from aikit.settings import Settings

RESERVATION_TTL_SECONDS = 900  # a crashed call's reservation is given back after this


class LimiterUnavailable(Exception):
    """Redis cannot be reached and the limiter is set to fail closed."""


@dataclass(frozen=True, slots=True)
class LimitDecision:
    allowed: bool
    limit_hit: str | None = None  # minute | day | tokens
    retry_after: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    degraded: bool = False  # Redis was unreachable; decided by RATE_LIMIT_FAIL_MODE


def day_str(now: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(now))


def seconds_to_midnight(now: float) -> int:
    return 86400 - int(now) % 86400


def seconds_to_next_month(now: float) -> int:
    d = dt.datetime.fromtimestamp(now, dt.UTC)
    nxt = (d.replace(day=28) + dt.timedelta(days=4)).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return max(1, int(nxt.timestamp() - now))


def _limit(value: int | None) -> int:
    return -1 if value is None else value


def rate_headers(key: KeyInfo, minute_count: int, day_count: int, used: int, held: int, now: float
                 ) -> dict[str, str]:
    headers: dict[str, str] = {}
    if key.rpm is not None:
        headers["X-RateLimit-Limit-Requests"] = str(key.rpm)
        headers["X-RateLimit-Remaining-Requests"] = str(max(0, key.rpm - minute_count))
        headers["X-RateLimit-Reset-Requests"] = f"{60 - int(now) % 60}s"
    if key.rpd is not None:
        headers["X-RateLimit-Limit-Requests-Day"] = str(key.rpd)
        headers["X-RateLimit-Remaining-Requests-Day"] = str(max(0, key.rpd - day_count))
    if key.monthly_tokens is not None:
        headers["X-RateLimit-Limit-Tokens"] = str(key.monthly_tokens)
        headers["X-RateLimit-Remaining-Tokens"] = str(max(0, key.monthly_tokens - used - held))
    return headers


# Tokens a key already used in the quota period starting at the given Unix time, from the database.
QuotaUsedSince = Callable[[KeyInfo, int], Awaitable[int]]


async def _nothing_used(_key: KeyInfo, _since: int) -> int:
    return 0


class RateLimiter:
    def __init__(self, client: Any, layout: RedisLayout, settings: Settings,
                 used_since: QuotaUsedSince = _nothing_used) -> None:
        self._redis = client
        self._layout = layout
        self._fail_open = settings.rate_limit_fail_mode == "open"
        self._used_since = used_since

    def _keys(self, key: KeyInfo, now: float) -> list[str]:
        kid = key.api_key_id
        return [
            self._layout.minute(kid, int(now) // 60),
            self._layout.day(kid, day_str(now)),
            self._layout.quota(kid, key.quota_period_start),
            self._layout.inflight(kid),
            self._layout.quota_seeded(kid, key.quota_period_start),
        ]

    async def admit(self, key: KeyInfo, request_id: str, reserve_tokens: int,
                    now: float | None = None) -> LimitDecision:
        """One Redis round trip: check every limit, count the request and reserve tokens."""
        now = time.time() if now is None else now
        args = [_limit(key.rpm), _limit(key.rpd), _limit(key.monthly_tokens), max(0, reserve_tokens),
                request_id, 120, 2 * 86400, int(now), RESERVATION_TTL_SECONDS]
        keys = self._keys(key, now)
        try:
            allowed, hit, m, d, used, held = await ADMIT.run_async(self._redis, keys, args)
            if int(allowed) == -1:
                # First request of the period, or Redis lost its counters: start from what the database
                # holds, so a Redis restart cannot hand a key its whole monthly quota again.
                try:
                    already = await self._used_since(key, key.quota_period_start)
                except Exception:
                    logger.exception("quota_seed_failed")
                    return self._unavailable()
                await SEED_QUOTA.run_async(self._redis, [keys[2], keys[4]], [already, QUOTA_TTL_SECONDS])
                allowed, hit, m, d, used, held = await ADMIT.run_async(self._redis, keys, args)
        except REDIS_DOWN_ERRORS:
            return self._unavailable()
        headers = rate_headers(key, int(m), int(d), int(used), int(held), now)
        if int(allowed) == 1:
            return LimitDecision(allowed=True, headers=headers)
        retry = {"minute": 60 - int(now) % 60, "day": seconds_to_midnight(now)}.get(
            str(hit), seconds_to_next_month(now))
        headers["Retry-After"] = str(retry)
        return LimitDecision(allowed=False, limit_hit=str(hit), retry_after=retry, headers=headers)

    def _unavailable(self) -> LimitDecision:
        if self._fail_open:
            return LimitDecision(allowed=True, degraded=True)
        raise LimiterUnavailable("rate limiter unavailable")

    async def release(self, key: KeyInfo, request_id: str) -> None:
        """Give a reservation back (the call produced nothing). Best effort: it also expires by itself."""
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            await RELEASE.run_async(self._redis, [self._layout.inflight(key.api_key_id)], [request_id])

    async def remaining(self, key: KeyInfo, now: float | None = None) -> dict[str, int | None]:
        """What is left of each limit, from the same counters `admit` enforces."""
        now = time.time() if now is None else now
        minute, day, quota, *_ = self._keys(key, now)
        m, d, q = await self._redis.mget([minute, day, quota])
        return {
            "per_minute": None if key.rpm is None else max(0, key.rpm - int(m or 0)),
            "per_day": None if key.rpd is None else max(0, key.rpd - int(d or 0)),
            "tokens": None if key.monthly_tokens is None else max(0, key.monthly_tokens - int(q or 0)),
        }


class AuthGuard:
    """Counts invalid API keys per client address and minute, in Redis, so key guessing is rate limited
    across instances. Only requests with an unknown key pay the round trips."""

    def __init__(self, client: Any, prefix: str, per_minute: int) -> None:
        self._redis = client
        self._prefix = prefix
        self._per_minute = per_minute

    def _key(self, address: str, now: float) -> str:
        digest = hashlib.sha256(address.encode()).hexdigest()[:16]  # addresses never shape key names
        return f"{self._prefix}:{{authfail:{digest}}}:{int(now) // 60}"

    async def blocked(self, address: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        try:
            count = await self._redis.get(self._key(address, now))
        except REDIS_DOWN_ERRORS:
            return False
        return int(count or 0) >= self._per_minute

    async def failed(self, address: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        key = self._key(address, now)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, 120)
            await pipe.execute()
        except REDIS_DOWN_ERRORS:
            pass
