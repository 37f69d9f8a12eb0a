"""The per-process container of clients: created once per Lambda container, lazily, so moto and tests can
patch them first."""

from __future__ import annotations

import datetime as dt
from functools import cached_property
from typing import TYPE_CHECKING, Any

import anyio
from sqlalchemy import Engine, func, select

from aikit.db.engine import get_engine
from aikit.db.models import ApiKeyUsage, UsageDaily
from aikit.keys import KeyCache, KeyInfo
from aikit.limits import AuthGuard, RateLimiter
from aikit.metering.layout import RedisLayout
from aikit.metering.redis_meter import RedisMeter
from aikit.redis_client import PerLoopRedis
from aikit.redis_mux import make_script_client
from aikit.settings import Settings, get_settings

if TYPE_CHECKING:
    from aikit.emails import Mailer
    from aikit.llm import LLM
    from aikit.stripe_gateway import BillingGateway


def flushed_tokens_since(engine: Engine, api_key_id: str, period_start: int) -> int:
    """Tokens of a key stored in the database from a Unix time on: the daily rollups of the days after it, and
    the rows of its own day from that time on (a period can start mid-day, at a renewal)."""
    start = dt.datetime.fromtimestamp(period_start, dt.UTC)
    midnight = start == start.replace(hour=0, minute=0, second=0, microsecond=0)
    with engine.connect() as conn:
        days = conn.execute(
            select(func.coalesce(func.sum(UsageDaily.tokens), 0))
            .where(UsageDaily.api_key_id == api_key_id,
                   UsageDaily.date >= start.date() if midnight else UsageDaily.date > start.date())
        ).scalar_one()
        first_day = 0 if midnight else conn.execute(
            select(func.coalesce(func.sum(ApiKeyUsage.tokens), 0))
            .where(ApiKeyUsage.api_key_id == api_key_id, ApiKeyUsage.date == start.date(), ApiKeyUsage.ts >= start)
        ).scalar_one()
    return int(days) + int(first_day)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def engine(self) -> Engine:
        return get_engine(self.settings.database_url)

    @cached_property
    def layout(self) -> RedisLayout:
        return RedisLayout(self.settings.redis_key_prefix, self.settings.redis_usage_shards)

    @cached_property
    def redis(self) -> Any:
        return PerLoopRedis(self.settings)

    @cached_property
    def scripts(self) -> Any:
        """The request path's scripts (limiter, RECORD): one auto-pipelined connection per loop (redis_mux)."""
        return PerLoopRedis(self.settings, factory=make_script_client)

    @cached_property
    def keys(self) -> KeyCache:
        return KeyCache(self.engine, self.settings)

    @cached_property
    def limiter(self) -> RateLimiter:
        return RateLimiter(self.scripts, self.layout, self.settings, used_since=self.quota_used_since)

    async def quota_used_since(self, key: KeyInfo, period_start: int) -> int:
        return await anyio.to_thread.run_sync(flushed_tokens_since, self.engine, key.api_key_id, period_start)

    @cached_property
    def auth_guard(self) -> AuthGuard:
        return AuthGuard(self.redis, self.settings.redis_key_prefix, self.settings.auth_failures_per_minute)

    @cached_property
    def admin_guard(self) -> AuthGuard:
        return AuthGuard(self.redis, self.settings.redis_key_prefix, self.settings.admin_failures_per_minute,
                         kind="adminfail")

    @cached_property
    def meter(self) -> RedisMeter:
        if self.settings.redis_url.startswith("memory://"):
            from aikit.metering.embedded import EmbeddedMeter

            return EmbeddedMeter(self.redis, self.layout, self.engine, self.settings)
        return RedisMeter(self.scripts, self.layout, self.engine, self.settings)

    @cached_property
    def llm(self) -> LLM:
        from aikit.llm import LLM, build_provider

        return LLM(build_provider(self.settings), meter=self.meter,
                   default_model=self.settings.llm_default_model,
                   deadline_seconds=self.settings.llm_deadline_seconds)

    @cached_property
    def billing(self) -> BillingGateway | None:
        from aikit.stripe_gateway import gateway_from_settings

        return gateway_from_settings(self.settings)

    @cached_property
    def mailer(self) -> Mailer:
        from aikit.emails import mailer_from_settings

        return mailer_from_settings(self.settings)

    async def aclose(self) -> None:
        if "redis" in self.__dict__:
            await self.redis.aclose()
        if "scripts" in self.__dict__:
            await self.scripts.aclose()


_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        _runtime = Runtime(get_settings())
    return _runtime
