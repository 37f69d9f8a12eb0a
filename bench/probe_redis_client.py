"""Probe (not a test, not product code): the client-side CPU cost of one EVALSHA from the asyncio event loop,
for the choices of issue 16's Redis item, so the next change is made on figures.

    .venv/bin/python bench/probe_redis_client.py [--concurrency 16] [--commands 6000] [--rounds 5]

Variants, each running a one-line Lua script `--commands` times from `--concurrency` concurrent callers:
  pool:           redis-py's asyncio client as aikit.redis_client makes it (ConnectionPool, a connection per
                  concurrent caller, an asyncio.Lock around get_connection and release);
  blocking_pool:  the same with BlockingConnectionPool(max_connections=32);
  lock_free_pool: a ConnectionPool whose get_connection skips the lock (one event loop: nothing awaits between
                  taking a connection and marking it in use) and the connect() retry wrapper of a live socket;
  multiplexed:    a prototype: one connection, commands from all callers written together once per loop
                  iteration, replies matched in order (hiredis parser). Not what aikit uses: it shows what
                  pipelining the scripts of concurrent requests would save;
  aikit_mux:      aikit.redis_mux.RedisMux, what the request path's scripts now use (the multiplexed design
                  with redis-py's error classes, a deadline per command, reconnects).
Prints one JSON document: client CPU microseconds per command (median of --rounds), on uvloop when installed.
Uses the Redis at --redis-url (a key under a random prefix, deleted at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool, ConnectionPool

from aikit.redis_mux import RedisMux, mux_options
from aikit.settings import Settings

SCRIPT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


class LockFreePool(ConnectionPool):
    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> AbstractConnection:
        connection = self.get_available_connection()
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        if connection.is_connected and not await connection.can_read():
            return
        await super().ensure_connection(connection)


class Multiplexed(asyncio.Protocol):
    """One connection shared by every caller; writes coalesced per loop iteration; replies in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8")
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.out: list[bytes] = []
        self.flush_due = False
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError("connection lost"))

    def _flush(self) -> None:
        self.flush_due = False
        self.transport.write(b"".join(self.out))
        self.out.clear()

    def send(self, *args: Any) -> asyncio.Future[Any]:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.out.append(b"".join(parts))
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.waiters.append(waiter)
        if not self.flush_due:
            self.flush_due = True
            loop.call_soon(self._flush)
        return waiter


async def measure(variant: str, url: str, key: str, commands: int, concurrency: int) -> float:
    options: dict[str, Any] = {"decode_responses": True, "socket_timeout": 1.0, "socket_connect_timeout": 1.0}
    pools: dict[str, Callable[[], Any]] = {
        "pool": lambda: ConnectionPool.from_url(url, **options),
        "blocking_pool": lambda: BlockingConnectionPool.from_url(url, max_connections=32, timeout=1, **options),
        "lock_free_pool": lambda: LockFreePool.from_url(url, **options),
        "multiplexed": lambda: ConnectionPool.from_url(url, **options),
        "aikit_mux": lambda: ConnectionPool.from_url(url, **options),
    }
    client = aioredis.Redis(connection_pool=pools[variant]())
    sha = await client.script_load(SCRIPT)
    call: Callable[[], Awaitable[Any]]
    if variant == "multiplexed":
        host, port = client.connection_pool.connection_kwargs["host"], client.connection_pool.connection_kwargs["port"]
        transport, protocol = await asyncio.get_running_loop().create_connection(Multiplexed, host, port)

        def call() -> Awaitable[Any]:
            return asyncio.wait_for(protocol.send("EVALSHA", sha, 1, key, 1), 1.0)
    elif variant == "aikit_mux":
        options_ = mux_options(Settings.model_construct(redis_url=url, redis_cluster=False))
        assert options_ is not None
        mux = RedisMux(options_, 1.0, 1.0)

        def call() -> Awaitable[Any]:
            return mux.evalsha(sha, 1, key, 1)
    else:
        def call() -> Awaitable[Any]:
            return client.evalsha(sha, 1, key, 1)  # type: ignore[no-any-return]

    async def run() -> None:
        remaining = commands

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await call()

        await asyncio.gather(*[worker() for _ in range(concurrency)])

    await run()  # warm: connections made
    started = time.process_time()
    await run()
    cpu = time.process_time() - started
    if variant == "multiplexed":
        transport.close()
    if variant == "aikit_mux":
        await mux.aclose()
    await client.aclose()
    return cpu / commands * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--commands", type=int, default=6000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
        loop_name = "uvloop"
    except ImportError:
        runner, loop_name = asyncio.run, "asyncio"
    key = f"probe{uuid.uuid4().hex[:8]}:{{k}}"
    variants = ("pool", "blocking_pool", "lock_free_pool", "multiplexed", "aikit_mux")
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:  # interleaved, so machine noise hits all alike
            samples[variant].append(runner(measure(variant, args.redis_url, key, args.commands, args.concurrency)))
    import redis

    redis.Redis.from_url(args.redis_url).delete(key)
    print(json.dumps({"probe": "redis_client", "loop": loop_name, "concurrency": args.concurrency,
                      "client_cpu_us_per_command": {v: round(statistics.median(s), 1) for v, s in samples.items()}},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
