"""aikit.redis_mux against real redis-servers: concurrent callers' commands share one connection and one write
per loop iteration, replies reach the right callers in order, error replies raise redis-py's exception classes,
timeouts and lost connections fail the waiting commands (and only once), and the next command reconnects."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.exceptions

from aikit.metering.scripts import LuaScript
from aikit.redis_client import REDIS_DOWN_ERRORS
from aikit.redis_mux import RedisMux, make_script_client, mux_options, pack_command
from aikit.settings import Settings
from tests.support.servers import RedisProcess, free_port, throwaway_redis
from tests.support.settings import REDIS_URL

SCRIPT = LuaScript("return redis.call('INCRBY', KEYS[1], ARGV[1])")
ECHO = LuaScript("return {KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]}")


def mux(url: str = REDIS_URL, timeout: float = 1.0) -> RedisMux:
    options = mux_options(Settings.model_construct(redis_url=url, redis_cluster=False))
    assert options is not None
    return RedisMux(options, timeout, timeout)


@pytest.fixture
def proc() -> Iterator[RedisProcess]:
    with throwaway_redis() as p:
        yield p


def test_only_single_node_tcp_urls_are_multiplexed() -> None:
    def opts(url: str, cluster: bool = False) -> dict[str, Any] | None:
        return mux_options(Settings.model_construct(redis_url=url, redis_cluster=cluster))

    assert opts("redis://127.0.0.1:6379/0") == {"host": "127.0.0.1", "port": 6379, "db": 0}
    assert opts("rediss://h:1/0") is not None
    assert opts("redis://127.0.0.1:6379/0", cluster=True) is None
    assert opts("memory://") is None
    assert opts("unix:///tmp/redis.sock") is None
    assert opts("redis://h:1/0?health_check_interval=3") is None  # an option it does not implement
    assert isinstance(make_script_client(Settings.model_construct(redis_url="memory://", redis_cluster=False,
                                                                  redis_timeout_seconds=1.0)), object)


def test_arguments_are_encoded_as_redis_py_encodes_them() -> None:
    values = ("é", b"x", 3, 1.5, 0.1, 1e20, -7)
    assert pack_command(values) == b"".join([b"*7\r\n", *(b"$%d\r\n%b\r\n" % (len(v), v) for v in (
        "é".encode(), b"x", b"3", b"1.5", b"0.1", repr(1e20).encode(), b"-7"))])
    for bad in (None, True, [1]):
        with pytest.raises(redis.exceptions.DataError):
            pack_command(("SET", "k", bad))
    assert pack_command(("GET", "k")) == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"


def test_concurrent_scripts_share_one_connection_and_get_their_own_replies() -> None:
    key = f"mux{uuid.uuid4().hex[:8]}:{{k}}"

    async def scenario() -> tuple[list[Any], int]:
        client = mux()
        replies = await asyncio.gather(*[ECHO.run_async(client, [f"{key}{i}"], [f"v{i}", i, "é"])
                                         for i in range(200)])
        await asyncio.gather(*[SCRIPT.run_async(client, [key], [1]) for _ in range(100)])
        connects = client.connects
        await client.aclose()
        return replies, connects

    replies, connects = asyncio.run(scenario())
    assert replies == [[f"{key}{i}", f"v{i}", i, "é"] for i in range(200)]
    assert connects == 1
    plain = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    assert plain.get(key) == "100"
    plain.delete(key)
    plain.close()


def test_noscript_loads_the_script_and_errors_are_redis_py_classes(proc: RedisProcess) -> None:
    script = LuaScript(f"return '{uuid.uuid4().hex}'")

    async def scenario() -> None:
        client = mux(proc.url)
        with pytest.raises(redis.exceptions.NoScriptError):
            await client.evalsha(script.sha, 0)
        assert await script.run_async(client, [], []) == script.source.split("'")[1]  # EVAL after NOSCRIPT
        assert await client.evalsha(script.sha, 0) == script.source.split("'")[1]
        with pytest.raises(redis.exceptions.ResponseError):
            await client.execute_command("NOSUCHCOMMAND")
        assert await client.execute_command("PING") == "PONG"  # the connection survives an error reply
        plain = redis.Redis(port=proc.port)
        plain.config_set("maxmemory-policy", "noeviction")
        plain.config_set("maxmemory", "1")
        with pytest.raises(redis.exceptions.OutOfMemoryError) as oom:
            await client.eval("return redis.call('SET', KEYS[1], '1')", 1, "k")
        assert isinstance(oom.value, REDIS_DOWN_ERRORS)
        plain.config_set("maxmemory", "0")
        plain.replicaof("127.0.0.1", free_port())
        with pytest.raises(redis.exceptions.ReadOnlyError):
            await client.eval("return redis.call('SET', KEYS[1], '1')", 1, "k")
        plain.replicaof("NO", "ONE")
        plain.close()
        assert client.connects == 1
        await client.aclose()

    asyncio.run(scenario())


def test_a_frozen_redis_times_out_every_waiting_command_and_the_next_reconnects(proc: RedisProcess) -> None:
    assert proc.proc is not None
    pid = proc.proc.pid

    async def scenario() -> None:
        client = mux(proc.url, timeout=0.2)
        assert await client.execute_command("PING") == "PONG"
        os.kill(pid, signal.SIGSTOP)
        try:
            started = asyncio.get_running_loop().time()
            results = await asyncio.gather(*[client.execute_command("INCR", "n") for _ in range(5)],
                                           return_exceptions=True)
            elapsed = asyncio.get_running_loop().time() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        assert all(isinstance(r, redis.exceptions.TimeoutError) for r in results), results
        assert elapsed < 1.0
        # The stalled INCRs run late on the old connection; their replies are never taken for new commands.
        assert await client.execute_command("SET", "m", "fresh") == "OK"
        assert await client.execute_command("GET", "m") == "fresh"
        assert client.connects == 2
        await client.aclose()

    asyncio.run(scenario())


def test_a_command_sent_while_an_older_timer_is_armed_gets_its_own_full_timeout(proc: RedisProcess) -> None:
    """The deadline timer stays armed after the last reply (it is not re-armed per command): a command sent
    late in its period must neither fail when that timer fires nor wait past its own deadline."""
    assert proc.proc is not None
    pid = proc.proc.pid

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        client = mux(proc.url, timeout=0.4)
        assert await client.execute_command("PING") == "PONG"  # arms the timer for t0 + 0.4
        await asyncio.sleep(0.25)
        os.kill(pid, signal.SIGSTOP)
        try:
            started = loop.time()
            with pytest.raises(redis.exceptions.TimeoutError):
                await client.execute_command("PING")  # the armed timer fires ~0.15 s in: not yet due
            elapsed = loop.time() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        assert 0.38 <= elapsed < 0.8, elapsed
        await client.aclose()

    asyncio.run(scenario())


def test_connection_refused_then_redis_comes_back(proc: RedisProcess) -> None:
    async def scenario() -> None:
        client = mux(proc.url, timeout=0.5)
        assert await client.execute_command("PING") == "PONG"
        await asyncio.to_thread(proc.kill)
        lost = await asyncio.gather(*[client.execute_command("PING") for _ in range(3)], return_exceptions=True)
        assert all(isinstance(r, redis.exceptions.ConnectionError) for r in lost), lost
        refused = await asyncio.gather(*[client.execute_command("PING") for _ in range(3)],
                                       return_exceptions=True)
        assert all(isinstance(r, redis.exceptions.ConnectionError) for r in refused), refused
        await asyncio.to_thread(proc.start)
        assert await client.execute_command("PING") == "PONG"
        await client.aclose()

    asyncio.run(scenario())


def test_a_cancelled_caller_does_not_shift_the_replies() -> None:
    async def scenario() -> None:
        client = mux()
        slow = asyncio.ensure_future(client.execute_command("ECHO", "first"))
        second = asyncio.ensure_future(client.execute_command("ECHO", "second"))
        await asyncio.sleep(0)
        slow.cancel()
        assert await second == "second"
        assert await client.execute_command("ECHO", "third") == "third"
        await client.aclose()

    asyncio.run(scenario())


def test_password_and_database_are_sent_first(proc: RedisProcess) -> None:
    plain = redis.Redis(port=proc.port)
    plain.config_set("requirepass", "s3cret")
    plain.close()

    async def scenario() -> None:
        client = mux(f"redis://:s3cret@127.0.0.1:{proc.port}/3")
        assert await client.execute_command("SET", "in3", "yes") == "OK"
        await client.aclose()
        wrong = mux(f"redis://:nope@127.0.0.1:{proc.port}/0")
        with pytest.raises(redis.exceptions.AuthenticationError):
            await wrong.execute_command("PING")
        await wrong.aclose()

    asyncio.run(scenario())
    check = redis.Redis(port=proc.port, password="s3cret", db=3, decode_responses=True)
    assert check.get("in3") == "yes"
    check.close()


def test_a_command_on_an_idle_connection_goes_out_without_waiting_for_the_next_loop_iteration(
        proc: RedisProcess) -> None:
    """A lone command has nothing to be coalesced with: it is written when issued, not one iteration later."""
    plain = redis.Redis(port=proc.port, decode_responses=True)

    def server_has(value: str) -> bool:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # the loop is blocked here: only a write already made can arrive
            if plain.get("idle") == value:
                return True
            time.sleep(0.01)
        return False

    async def scenario() -> tuple[bool, bool]:
        client = mux(proc.url, timeout=5.0)  # longer than the loop is blocked below
        assert await client.execute_command("PING") == "PONG"  # connected, nothing in flight
        lone = asyncio.ensure_future(client.execute_command("SET", "idle", "lone"))
        await asyncio.sleep(0)  # one iteration: the task issues its command; the loop does not turn again
        lone_arrived = server_has("lone")
        await lone
        # Commands issued while others are in flight are still coalesced into the next iteration's write.
        busy = [asyncio.ensure_future(client.execute_command("SET", "idle", value)) for value in ("a", "b")]
        await asyncio.gather(*busy)
        await client.aclose()
        return lone_arrived, plain.get("idle") == "b"

    assert asyncio.run(scenario()) == (True, True)
    plain.close()
