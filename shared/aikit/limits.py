"""Per-key limits, enforced in Redis so they hold across every Lambda instance: requests per minute and per
UTC day, and a monthly token quota with reservations so parallel calls cannot overspend it. Every decision
uses Redis' clock (see metering/scripts.py), so instances with skewed clocks agree."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aikit.errors import LimiterUnavailable
from aikit.keys import KeyInfo
from aikit.metering.layout import QUOTA_TTL_SECONDS, RedisLayout
from aikit.metering.scripts import ADMIT, AUTH_FAILURES, PEEK, RELEASE, SEED_QUOTA
from aikit.observability import logger
from aikit.redis_client import REDIS_DOWN_ERRORS
from aikit.settings import Settings

RESERVATION_TTL_SECONDS = 900  # a crashed call's reservation is given back after this
CATCHUP_TTL_SECONDS = 600  # longer than any seeding takes (one database query)

LIMIT_NAMES = {"minute": "requests per minute", "day": "requests per day", "tokens": "monthly token quota"}


@dataclass(frozen=True, slots=True)
class LimitDecision:
    allowed: bool
    limit_hit: str | None = None  # minute | day | tokens
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def limit_name(self) -> str:
        """The refusing limit as a client reads it."""
        return LIMIT_NAMES.get(self.limit_hit or "", "limit")


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

    def _keys(self, key: KeyInfo) -> tuple[str, ...]:
        return self._layout.admit_keys(key.api_key_id, key.quota_period_start)

    async def admit(self, key: KeyInfo, call_id: str, reserve_tokens: int, *,
                    count_request: bool = True) -> LimitDecision:
        """One Redis round trip (on a warm counter): check the limits, count the request once
        (`count_request`) and reserve `reserve_tokens` against the monthly quota under `call_id`."""
        args = [_limit(key.rpm), _limit(key.rpd), _limit(key.monthly_tokens), max(0, reserve_tokens), call_id,
                1 if count_request else 0, RESERVATION_TTL_SECONDS, key.api_key_id, key.quota_period_start,
                CATCHUP_TTL_SECONDS]
        keys = self._keys(key)
        try:
            allowed, hit, m, d, used, held, now = await ADMIT.run_async(self._redis, keys, args)
            if int(allowed) == -1:
                if not await self._seed(key, keys, int(used)):
                    return self._unavailable()
                allowed, hit, m, d, used, held, now = await ADMIT.run_async(self._redis, keys, args)
        except REDIS_DOWN_ERRORS:
            return self._unavailable()
        now = float(now)
        headers = rate_headers(key, int(m), int(d), int(used), int(held), now)
        if int(allowed) == 1:
            return LimitDecision(allowed=True, headers=headers)
        retry = {"minute": 60 - int(now) % 60, "day": seconds_to_midnight(now)}.get(
            str(hit), seconds_to_next_month(now))
        headers["Retry-After"] = str(retry)
        return LimitDecision(allowed=False, limit_hit=str(hit), headers=headers)

    async def count(self, key: KeyInfo) -> None:
        """Count one request against requests per minute/day, whatever the limits (it was already served).
        Best effort: the request is over; a Redis failure loses only this count."""
        args = [-1, -1, -1, 0, "", 1, RESERVATION_TTL_SECONDS, key.api_key_id, key.quota_period_start,
                CATCHUP_TTL_SECONDS]
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            await ADMIT.run_async(self._redis, self._keys(key), args)

    async def _seed(self, key: KeyInfo, keys: tuple[str, ...], unflushed: int) -> bool:
        """The quota counter is missing (a new period, or Redis lost or evicted it): start it from what the
        database holds plus what Redis has not flushed yet, so it never restarts from zero."""
        try:
            flushed = await self._used_since(key, key.quota_period_start)
        except Exception:
            logger.exception("quota_seed_failed")
            return False
        await SEED_QUOTA.run_async(self._redis, [keys[2], keys[5]], [flushed + unflushed, QUOTA_TTL_SECONDS])
        return True

    def _unavailable(self) -> LimitDecision:
        if self._fail_open:
            return LimitDecision(allowed=True)  # Redis unreachable: RATE_LIMIT_FAIL_MODE open
        raise LimiterUnavailable("rate limiter unavailable")

    async def release(self, key: KeyInfo, call_id: str) -> None:
        """Give a reservation back (the call produced nothing). Best effort: it also expires by itself."""
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            await RELEASE.run_async(self._redis, [self._layout.inflight(key.api_key_id)], [call_id])

    async def remaining(self, key: KeyInfo) -> dict[str, int | None]:
        """What is left of each limit, from the same counters `admit` enforces."""
        m, d, q = await PEEK.run_async(self._redis, self._keys(key)[:3], [])
        return {
            "per_minute": None if key.rpm is None else max(0, key.rpm - int(m)),
            "per_day": None if key.rpd is None else max(0, key.rpd - int(d)),
            "tokens": None if key.monthly_tokens is None else max(0, key.monthly_tokens - int(q)),
        }


class AuthGuard:
    """Counts failed credentials (unknown API keys, wrong admin tokens) per client address and per key prefix
    and minute (of Redis' clock), in Redis, so guessing is rate limited across instances.

    It never refuses a credential that is valid: it is consulted only after the credential failed, and turns
    that failure's 401 into a 429 once the address (or the prefix, for guessing spread over many addresses)
    is over its limit. Only failed credentials pay the round trips."""

    def __init__(self, client: Any, prefix: str, per_minute: int, kind: str = "authfail") -> None:
        self._redis = client
        self._prefix = prefix
        self._per_minute = per_minute
        self._kind = kind

    def _key(self, subject: str) -> str:
        digest = hashlib.sha256(subject.encode()).hexdigest()[:16]  # addresses never shape key names
        return f"{self._prefix}:{{{self._kind}:{digest}}}"

    async def failed(self, address: str, key_prefix: str | None = None) -> bool:
        """Count one failure of `address` (and of `key_prefix`); True when either is now over the limit."""
        subjects = [address] if key_prefix is None else [address, "prefix:" + key_prefix]
        over = False
        for subject in subjects:
            try:
                count = await AUTH_FAILURES.run_async(self._redis, [self._key(subject)], [1])
            except REDIS_DOWN_ERRORS:
                return False  # fail open: the guard slows guessing, it never decides who may call
            over = over or int(count) > self._per_minute
        return over
