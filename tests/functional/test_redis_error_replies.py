"""Redis answering with an error reply instead of not answering: a replica after a failover (READONLY), the
memory cap (OOM), a replica cut from its master (MASTERDOWN), a cluster without the slot (CLUSTERDOWN), a
slot being migrated (TRYAGAIN), a dataset being loaded (LOADING). Each is injected on a real throwaway
redis-server while requests keep coming.

What must hold, as for a Redis that is down: every request is answered; the usage of completed calls,
streams included (their text was delivered before the usage was recorded), goes straight to Postgres under
its request id; the limiter follows RATE_LIMIT_FAIL_MODE; after the fault and a flush everything is counted
exactly once.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from aikit.api.app import create_app
from aikit.flush import Flusher
from aikit.keys import IssuedKey
from aikit.runtime import Runtime
from aikit.settings import Settings
from tests.support.api import chat
from tests.support.db import migrated_database
from tests.support.redis import pending_tokens
from tests.support.redis_faults import (
    LONG_AGO,
    TOKENS,
    fault_settings,
    new_paying_key,
    outbox_total,
    rollup,
    serve_requests,
    usage_rows,
)
from tests.support.servers import RedisProcess, cluster_port, free_port

Fault = Callable[[RedisProcess], contextlib.AbstractContextManager[None]]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with migrated_database("replies") as url:
        yield url


def admin(proc: RedisProcess) -> redis.Redis:
    return redis.Redis(port=proc.port, socket_timeout=5, decode_responses=True)


def assign_all_slots(proc: RedisProcess) -> None:
    """Give the one-node cluster every slot back and wait until it serves again."""
    with admin(proc) as client:
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while client.execute_command("CLUSTER", "INFO").find("cluster_state:ok") < 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def refused(proc: RedisProcess, error: type[Exception]) -> bool:
    """Whether a write is refused with `error` right now."""
    with admin(proc) as client:
        try:
            client.eval("return redis.call('SET', KEYS[1], '1')", 1, "probe")
        except error:
            return True
        except redis.RedisError:
            return False
    return False


@contextlib.contextmanager
def oom(proc: RedisProcess) -> Iterator[None]:
    with admin(proc) as client:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1")
    assert refused(proc, redis.exceptions.OutOfMemoryError)
    try:
        yield
    finally:
        with admin(proc) as client:
            client.config_set("maxmemory", "0")


@contextlib.contextmanager
def readonly(proc: RedisProcess, *, stale_reads: bool = True) -> Iterator[None]:
    """The node became a replica (of a master that is gone, so it keeps its data): what a client still
    connected to an old primary sees after a failover."""
    with admin(proc) as client:
        client.config_set("replica-serve-stale-data", "yes" if stale_reads else "no")
        client.replicaof("127.0.0.1", free_port())
    expected = redis.exceptions.ReadOnlyError if stale_reads else redis.exceptions.MasterDownError
    deadline = time.monotonic() + 5
    while not refused(proc, expected):
        assert time.monotonic() < deadline, "the fault did not take"
        time.sleep(0.05)
    try:
        yield
    finally:
        with admin(proc) as client:
            client.replicaof("NO", "ONE")
            client.config_set("replica-serve-stale-data", "yes")


@contextlib.contextmanager
def masterdown(proc: RedisProcess) -> Iterator[None]:
    with readonly(proc, stale_reads=False):
        yield


@contextlib.contextmanager
def clusterdown(proc: RedisProcess) -> Iterator[None]:
    """A cluster node that serves no slot any more (the cluster lost the majority for them)."""
    with admin(proc) as client:
        client.execute_command("CLUSTER", "DELSLOTSRANGE", 0, 16383)
    assert refused(proc, redis.exceptions.ClusterDownError)
    try:
        yield
    finally:
        assign_all_slots(proc)


FAULTS: dict[str, tuple[Fault, tuple[str, ...]]] = {
    "OOM": (oom, ()),
    "READONLY": (readonly, ()),
    "MASTERDOWN": (masterdown, ()),
    "CLUSTERDOWN": (clusterdown, ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")),
}


@contextlib.contextmanager
def started(extra: tuple[str, ...]) -> Iterator[RedisProcess]:
    cluster = "--cluster-enabled" in extra
    proc = RedisProcess(cluster_port() if cluster else free_port(), extra=extra).start()
    try:
        if cluster:
            assign_all_slots(proc)
        yield proc
    finally:
        proc.cleanup()


def streamed(client: TestClient, key: IssuedKey) -> str:
    """A streamed chat completion read to the end; returns its request id."""
    with client.stream("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {key.api_key}"},
                       json={"model": "echo-1", "stream": True,
                             "messages": [{"role": "user", "content": "hello there world"}]}) as r:
        assert r.status_code == 200
        body = r.read().decode()
        request_id = r.headers["X-Request-Id"]
    assert body.rstrip().endswith("data: [DONE]"), body
    assert '"echo: "' in body  # the text was delivered before the usage was recorded
    return request_id


def assert_counted_once(settings: Settings, runtime: Runtime, key: IssuedKey, customer: str,
                        ids: list[str], direct: set[str]) -> None:
    summary = Flusher(settings).run(now=LONG_AGO)
    assert summary.ok, summary.errors
    assert summary.rows_inserted == len(ids) - len(direct)
    assert usage_rows(runtime, key) == {rid: (TOKENS, True) for rid in ids}
    assert rollup(runtime, key) == (len(ids), len(ids) * TOKENS)
    assert outbox_total(runtime, customer) == len(ids) * TOKENS
    assert pending_tokens(runtime, key.api_key_id) == 0


@pytest.mark.parametrize("kind", list(FAULTS))
def test_an_error_reply_takes_the_postgres_fallback_and_the_limiter_fails_open(pg_url: str, kind: str) -> None:
    fault, extra = FAULTS[kind]
    with started(extra) as proc:
        settings = fault_settings(pg_url, proc, rate_limit_fail_mode="open")
        runtime = Runtime(settings)
        key, customer = new_paying_key(settings, rpd=100)
        with TestClient(create_app(runtime=runtime)) as client:
            before = serve_requests(client, key, 2)
            with fault(proc):
                during = [*serve_requests(client, key, 2), streamed(client, key)]
                # Written straight to Postgres before any flush: row, rollup and Stripe outbox.
                assert usage_rows(runtime, key) == {rid: (TOKENS, True) for rid in during}
                assert outbox_total(runtime, customer) == 3 * TOKENS
            after = serve_requests(client, key, 1)
        assert_counted_once(settings, runtime, key, customer, before + during + after, set(during))


@pytest.mark.parametrize("kind", ["OOM", "READONLY", "CLUSTERDOWN"])
def test_an_error_reply_with_the_limiter_failing_closed_answers_503(pg_url: str, kind: str) -> None:
    fault, extra = FAULTS[kind]
    with started(extra) as proc:
        settings = fault_settings(pg_url, proc, rate_limit_fail_mode="closed")
        runtime = Runtime(settings)
        key, customer = new_paying_key(settings)
        with TestClient(create_app(runtime=runtime)) as client:
            before = serve_requests(client, key, 1)
            with fault(proc):
                r = chat(client, key)
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "limiter_unavailable"
                assert int(r.headers["Retry-After"]) > 0
            after = serve_requests(client, key, 1)
        assert usage_rows(runtime, key) == {}  # the refused call reached no LLM and was never metered
        assert_counted_once(settings, runtime, key, customer, before + after, set())


def test_a_dataset_being_loaded_is_a_fault_too(pg_url: str) -> None:
    """LOADING: a restarted Redis replays its snapshot (slowly here: key-load-delay) and answers every
    command with an error reply until it is done."""
    proc = RedisProcess(free_port()).start()
    try:
        settings = fault_settings(pg_url, proc, rate_limit_fail_mode="open")
        runtime = Runtime(settings)
        key, customer = new_paying_key(settings)
        with TestClient(create_app(runtime=runtime)) as client:
            before = serve_requests(client, key, 2)
            with admin(proc) as c:
                pipe = c.pipeline(transaction=False)
                for i in range(150_000):
                    pipe.set(f"filler:{i}", "x")
                pipe.execute()
                c.save()  # the snapshot holds the usage buffered so far
            proc.kill()
            proc.proc = subprocess.Popen(
                ["redis-server", "--port", str(proc.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                 "no", "--dir", proc.workdir, "--key-load-delay", "30", "--loading-process-events-interval-bytes",
                 "1024"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            probe = redis.Redis(port=proc.port, socket_timeout=2)
            deadline = time.monotonic() + 10
            while True:
                try:
                    probe.ping()
                    raise AssertionError("the dataset loaded before the test could see it loading")
                except redis.exceptions.BusyLoadingError:
                    break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            during = [*serve_requests(client, key, 2), streamed(client, key)]
            with pytest.raises(redis.exceptions.BusyLoadingError):
                probe.ping()  # still loading: the requests above really met the fault
            deadline = time.monotonic() + 60
            while True:
                try:
                    probe.ping()
                    break
                except redis.exceptions.BusyLoadingError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            probe.close()
            after = serve_requests(client, key, 1)
        assert usage_rows(runtime, key) == {rid: (TOKENS, True) for rid in during} | {
            rid: (TOKENS, True) for rid in usage_rows(runtime, key) if rid in after}
        assert_counted_once(settings, runtime, key, customer, before + during + after, set(during))
    finally:
        proc.cleanup()


def test_tryagain_during_a_slot_migration_takes_the_fallback(pg_url: str) -> None:
    """TRYAGAIN: the key's slot is being migrated to another node and the keys one script touches are split
    between the two, so the script cannot run anywhere until the migration ends."""
    extra = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    with started(extra) as source, started(extra) as target:
        with admin(source) as a, admin(target) as b:
            b.execute_command("CLUSTER", "DELSLOTSRANGE", 0, 16383)
            b.execute_command("CLUSTER", "MEET", "127.0.0.1", source.port)
            deadline = time.monotonic() + 10
            while (len(a.execute_command("CLUSTER", "NODES").strip().splitlines()) < 2
                   or "cluster_state:ok" not in b.execute_command("CLUSTER", "INFO")):
                assert time.monotonic() < deadline, "the two nodes did not form a cluster"
                time.sleep(0.05)
            source_id, target_id = a.execute_command("CLUSTER", "MYID"), b.execute_command("CLUSTER", "MYID")
        settings = fault_settings(pg_url, source, rate_limit_fail_mode="open", redis_usage_shards=1)
        runtime = Runtime(settings)
        key, customer = new_paying_key(settings)
        slot = int(redis.Redis(port=source.port).execute_command(
            "CLUSTER", "KEYSLOT", runtime.layout.stream(0)))
        with TestClient(create_app(runtime=runtime)) as client:
            before = serve_requests(client, key, 2)
            with admin(source) as a, admin(target) as b:
                b.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
                a.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
                # The request counters move first: scripts now find some of their keys here, some not.
                for name in (runtime.layout.minute(key.api_key_id), runtime.layout.day(key.api_key_id)):
                    a.execute_command("MIGRATE", "127.0.0.1", target.port, name, 0, 5000)
                with pytest.raises(redis.exceptions.TryAgainError):
                    a.eval("return redis.call('GET', KEYS[1])", 2, runtime.layout.stream(0),
                           runtime.layout.minute(key.api_key_id))
            during = [*serve_requests(client, key, 2), streamed(client, key)]
            assert usage_rows(runtime, key) == {rid: (TOKENS, True) for rid in during}
            with admin(source) as a, admin(target) as b:  # the migration is called off
                a.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
                b.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
            after = serve_requests(client, key, 1)
        assert_counted_once(settings, runtime, key, customer, before + during + after, set(during))
