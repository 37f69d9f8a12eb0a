"""Redis clients: a single node, a Redis Cluster (ElastiCache Serverless), or an in-process substitute."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from aikit.settings import Settings

# Errors that mean "this command did not run": Redis unreachable or slow, or an error reply that refuses
# the write as a whole (a replica after a failover, the memory cap, loading, a cluster without this slot, a
# resharding in progress) as opposed to a bug in a command. Callers take their fallback on these.
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # BusyLoadingError (LOADING) included
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # READONLY
    redis.exceptions.OutOfMemoryError,  # OOM
    redis.exceptions.ClusterDownError,  # CLUSTERDOWN, MasterDownError (MASTERDOWN) included
    redis.exceptions.TryAgainError,  # TRYAGAIN
    ConnectionError,
    TimeoutError,
    OSError,
)


@lru_cache(maxsize=1)
def _fake_server() -> Any:
    import fakeredis

    return fakeredis.FakeServer()


def _options(settings: Settings) -> dict[str, Any]:
    return {
        "socket_timeout": settings.redis_timeout_seconds,
        "socket_connect_timeout": settings.redis_timeout_seconds,
        "decode_responses": True,
    }


class _AsyncCluster(AsyncRedisCluster):
    """Initializes once, under redis-py's lock, before any command: with redis-py 8.1 commands issued
    concurrently on a fresh client race its topology setup and fail with AttributeError (a 500)."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            await self.initialize()
        return await super().execute_command(*args, **kwargs)


def make_sync_redis(settings: Settings) -> Any:
    if settings.redis_url.startswith("memory://"):
        import fakeredis

        return fakeredis.FakeRedis(server=_fake_server(), decode_responses=True)
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, **_options(settings))
    return redis.Redis.from_url(settings.redis_url, **_options(settings))


def make_async_redis(settings: Settings) -> Any:
    if settings.redis_url.startswith("memory://"):
        import fakeredis

        return fakeredis.FakeAsyncRedis(server=_fake_server(), decode_responses=True)
    if settings.redis_cluster:
        return _AsyncCluster.from_url(settings.redis_url, **_options(settings))
    # No retries: a script that may have run must not run twice; callers fall back instead.
    return aioredis.Redis.from_url(settings.redis_url, retry_on_timeout=False, **_options(settings))


class PerLoopRedis:
    """An async client per event loop: asyncio connections cannot cross loops (tests run several; a Lambda
    container keeps one, so it gets exactly one client)."""

    def __init__(self, settings: Settings, factory: Callable[[Settings], Any] | None = None) -> None:
        self._settings = settings
        self._factory = factory or make_async_redis
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], Any] | None = None

    def client(self) -> Any:
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:  # the common case: the loop of the previous call
            return last[1]
        found = self._clients.get(loop)
        if found is None:
            found = self._clients[loop] = self._factory(self._settings)
        self._last = (weakref.ref(loop), found)
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client(), name)

    async def aclose(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        found = self._clients.pop(loop, None)
        self._last = None
        if found is not None:
            await found.aclose()
