"""Benchmark of the request path (not a test): what auth + limits + metering cost per chat completion.

    .venv/bin/python bench/bench_api.py --requests 3000

POST /v1/chat/completions with the echo provider, in one process, in two configurations:
  with_billing:    the real app (key lookup through the cache, one Redis script before the LLM call, one after);
  without_billing: a bare FastAPI route with the same body model, the same echo provider and the same JSON.
And a mounted route (create_app(routers=...), as AIKIT_ROUTERS mounts one) whose body calls
`llm.chat(..., track_tokens=True)` once and answers the same JSON, against /v1/chat/completions in the same app:
both fully billed, so the difference is what a route of your own costs beyond the built-in one.
Each is driven in-process (httpx.AsyncClient + ASGITransport) and over real HTTP (uvicorn on a free port), at
concurrency 1 (latency) and --concurrency (throughput); the two configurations alternate in rounds so machine
noise hits both alike. It also counts, for the billed requests only, the Redis round trips (commands sent by
the client; a pipeline counts once), the scripts Redis ran (INFO commandstats of a dedicated redis-server) and
the Postgres statements (SQLAlchemy before_cursor_execute), and checks every billed request was metered.

Uses its own Postgres database (dropped at the end) and its own throwaway redis-server (or --redis-url with a
fresh key prefix; commandstats are then shared with whatever else uses that server). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio.connection
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import create_engine, event, text
from sqlalchemy.orm import Session

from aikit import llm, redis_mux
from aikit.api.app import create_app
from aikit.api.routes.chat import completion_json
from aikit.api.schemas import ChatCompletionRequest
from aikit.db.engine import get_engine
from aikit.db.migrate import upgrade
from aikit.keys import create_key
from aikit.llm import LLM
from aikit.llm.echo import EchoProvider
from aikit.metering.base import new_request_id
from aikit.metering.scripts import LuaScript
from aikit.runtime import Runtime
from aikit.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get("TEST_DATABASE_ADMIN_URL", "postgresql+pg8000://postgres@127.0.0.1:5432/postgres")
BODY = {"model": "echo-1", "messages": [{"role": "user", "content": "hello there, how are you today?"}]}
TARGET_P50_OVERHEAD_MS = 1.0
MOUNTED_NOISE_MS = 0.1  # p50 difference between the mounted route and /v1/chat/completions counted as noise

Send = Callable[[], Awaitable[httpx.Response]]
NOTHING = LuaScript("return 1")


# ------------------------------------------------------------------------------------------------ setup


def admin_sql(sql: str) -> None:
    engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


@contextlib.contextmanager
def bench_database() -> Iterator[str]:
    name = f"aikit_bench_api_{uuid.uuid4().hex[:8]}"
    admin_sql(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        upgrade(url)
        yield url
    finally:
        get_engine(url).dispose()
        admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def bench_redis(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    sys.path.insert(0, str(ROOT))
    from tests.support.servers import throwaway_redis

    with throwaway_redis() as proc:
        yield proc.url


def bare_app(runtime: Runtime | None = None) -> FastAPI:
    """The same endpoint without auth, limits or metering. With `runtime`: plus two Redis round trips, one before
    the LLM call and one after, each a script that does nothing, sent as billing sends its two (the same
    auto-pipelined client): what the round trips the design keeps cost by themselves, the floor under billing's
    latency at one client."""
    app = FastAPI()
    llm = LLM(EchoProvider())

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> JSONResponse:
        if runtime is not None:
            await NOTHING.run_async(runtime.scripts.client(), (), ())
        result = await llm.chat(body.messages_payload(), model=body.model, max_tokens=body.limit(),
                                **body.provider_params())
        if runtime is not None:
            await NOTHING.run_async(runtime.scripts.client(), (), ())
        return JSONResponse(completion_json(new_request_id(), result, int(time.time())))

    return app


def mounted_router() -> APIRouter:
    """A route of the user's own, written as the README shows, answering what /v1/chat/completions answers."""
    router = APIRouter()

    @router.post("/v1/mine")
    async def mine(body: ChatCompletionRequest) -> JSONResponse:
        result = await llm.chat(body.messages_payload(), model=body.model, max_tokens=body.limit(),
                                track_tokens=True, **body.provider_params())
        return JSONResponse(completion_json(new_request_id(), result, int(time.time())))

    return router


# ---------------------------------------------------------------------------------------------- counting


class Counters:
    """Redis round trips (client side) and Postgres statements, switched on only around billed requests."""

    def __init__(self) -> None:
        self.on = False
        self.redis_round_trips = 0
        self.pg_statements = 0

    def install(self, engine: Any) -> None:
        original = redis.asyncio.connection.AbstractConnection.send_packed_command
        counters = self

        async def counted(conn: Any, command: Any, check_health: bool = True) -> None:
            if counters.on:
                counters.redis_round_trips += 1
            await original(conn, command, check_health)

        redis.asyncio.connection.AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]

        # The request path's scripts go through aikit.redis_mux: each command is one round trip for its
        # request, however many requests' commands share a write.
        mux_send = redis_mux._Protocol.send

        def counted_mux(protocol: Any, args: tuple[Any, ...]) -> Any:
            if counters.on:
                counters.redis_round_trips += 1
            return mux_send(protocol, args)

        redis_mux._Protocol.send = counted_mux  # type: ignore[method-assign]

        @event.listens_for(engine, "before_cursor_execute")
        def _count(*_: Any) -> None:
            if self.on:
                self.pg_statements += 1

    @contextlib.contextmanager
    def counting(self, enabled: bool) -> Iterator[None]:
        self.on = enabled
        try:
            yield
        finally:
            self.on = False


def script_calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()
            if name in ("cmdstat_evalsha", "cmdstat_eval")}


# ---------------------------------------------------------------------------------------------- driving


async def drive(send: Send, n: int, concurrency: int) -> tuple[list[float], float, int]:
    """n requests, `concurrency` at a time; returns latencies (s), wall time (s) and non-200 count."""
    latencies: list[float] = []
    failures = 0
    remaining = n

    async def worker() -> None:
        nonlocal remaining, failures
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            r = await send()
            latencies.append(time.perf_counter() - start)
            if r.status_code != 200:
                failures += 1

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return latencies, time.perf_counter() - started, failures


def summary(latencies: list[float], wall: float) -> dict[str, float]:
    ordered = sorted(latencies)
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"requests": len(ordered), "rps": round(len(ordered) / wall, 1),
            "p50_ms": round(statistics.median(ordered) * 1000, 3), "p99_ms": round(q[98] * 1000, 3),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 3)}


async def compare(billed: Send, bare: Send, n: int, concurrency: int, counters: Counters,
                  rounds: int = 6, names: tuple[str, str] = ("with_billing", "without_billing"),
                  extra: dict[str, Send] | None = None) -> dict[str, Any]:
    """Alternates the two configurations (and any `extra` ones) in rounds; counts only during the rounds of the
    first."""
    configurations = {names[0]: billed, names[1]: bare, **(extra or {})}
    for send in configurations.values():  # warm-up: connections, caches, script loaded
        await drive(send, 50, concurrency)
    results: dict[str, tuple[list[float], float]] = {name: ([], 0.0) for name in configurations}
    failures = 0
    per_round = max(1, n // rounds)
    for _ in range(rounds):
        for name, send in configurations.items():
            with counters.counting(name == names[0]):
                lat, wall, bad = await drive(send, per_round, concurrency)
            failures += bad
            acc, total = results[name]
            acc.extend(lat)
            results[name] = (acc, total + wall)
    out: dict[str, Any] = {name: summary(lat, wall) for name, (lat, wall) in results.items()}
    first, second = out[names[0]], out[names[1]]
    prefix = "billing" if names[0] == "with_billing" else "mounted"
    out[f"{prefix}_overhead_p50_ms"] = round(first["p50_ms"] - second["p50_ms"], 3)
    out[f"{prefix}_overhead_p99_ms"] = round(first["p99_ms"] - second["p99_ms"], 3)
    # At concurrency > 1 latency is mostly queueing; the time each request costs the server is 1/throughput.
    out[f"{prefix}_cost_per_request_ms"] = round(1000 / first["rps"] - 1000 / second["rps"], 3)
    out["non_200"] = failures
    return out


def sender(client: httpx.AsyncClient, auth: dict[str, str] | None, path: str = "/v1/chat/completions") -> Send:
    async def send() -> httpx.Response:
        return await client.post(path, json=BODY, headers=auth)

    return send


async def run_mounted(real: FastAPI, auth: dict[str, str], args: argparse.Namespace,
                      counters: Counters) -> dict[str, Any]:
    """The mounted route vs /v1/chat/completions, both billed, in-process, alternating in rounds."""
    out: dict[str, Any] = {}
    names = ("mounted_route", "chat_completions")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=real), base_url="http://bench") as a:
        mine, builtin = sender(a, auth, "/v1/mine"), sender(a, auth)
        before = counters.redis_round_trips, counters.pg_statements
        out["concurrency_1"] = await compare(mine, builtin, args.requests, 1, counters, names=names)
        out[f"concurrency_{args.concurrency}"] = await compare(mine, builtin, args.requests, args.concurrency,
                                                               counters, names=names)
    mounted = sum(run["mounted_route"]["requests"] for run in out.values())
    out["redis_round_trips_per_request"] = round((counters.redis_round_trips - before[0]) / mounted, 3)
    out["postgres_statements_per_request"] = round((counters.pg_statements - before[1]) / mounted, 4)
    # Kept out of the chat completions figures below.
    counters.redis_round_trips, counters.pg_statements = before
    return out


async def run_in_process(real: FastAPI, bare: FastAPI, auth: dict[str, str], args: argparse.Namespace,
                         counters: Counters) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=real), base_url="http://bench") as a, \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=bare), base_url="http://bench") as b:
        out["concurrency_1"] = await compare(sender(a, auth), sender(b, None), args.requests, 1, counters)
        out[f"concurrency_{args.concurrency}"] = await compare(sender(a, auth), sender(b, None), args.requests,
                                                               args.concurrency, counters)
    return out


async def run_http(real_url: str, bare_url: str, auth: dict[str, str], args: argparse.Namespace,
                   counters: Counters) -> dict[str, Any]:
    out: dict[str, Any] = {}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=real_url, limits=limits, timeout=30) as a, \
            httpx.AsyncClient(base_url=bare_url, limits=limits, timeout=30) as b:
        out["concurrency_1"] = await compare(sender(a, auth), sender(b, None), args.http_requests, 1, counters)
        out[f"concurrency_{args.concurrency}"] = await compare(sender(a, auth), sender(b, None), args.http_requests,
                                                               args.concurrency, counters)
    return out


# ------------------------------------------------------------------------------------------------- main


def metered_events(settings: Settings, runtime: Runtime) -> int:
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    total = sum(int(client.xlen(runtime.layout.stream(s))) for s in range(runtime.layout.shards))
    client.close()
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=3000, help="in-process requests per configuration and run")
    p.add_argument("--http-requests", type=int, default=1000, help="over-HTTP requests per configuration and run")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--no-http", action="store_true", help="skip the uvicorn runs")
    p.add_argument("--redis-url", help="use this Redis (a fresh key prefix) instead of a throwaway redis-server")
    args = p.parse_args(argv)

    with bench_database() as db_url, bench_redis(args.redis_url) as redis_url:
        settings = load_settings(database_url=db_url, redis_url=redis_url, redis_key_prefix=f"b{uuid.uuid4().hex[:8]}",
                                 llm_provider="echo", stripe_secret_key=None, flush_interval_seconds=0,
                                 _env_file=None)
        runtime = Runtime(settings)
        with Session(runtime.engine) as session:
            issued = create_key(session, settings, email="bench@example.com", rpm=10**9, rpd=10**9,
                                monthly_tokens=10**12)
            session.commit()
        auth = {"Authorization": f"Bearer {issued.api_key}"}
        counters = Counters()
        counters.install(runtime.engine)
        real, bare = create_app(runtime=runtime, routers=[mounted_router()]), bare_app()
        stats = redis.Redis.from_url(redis_url)
        scripts_before = script_calls(stats)

        result: dict[str, Any] = {"bench": "api", "provider": "echo", "python": platform.python_version(),
                                  "cpus": os.cpu_count(), "key_cache_ttl_seconds": settings.key_cache_ttl_seconds}
        # Powertools writes EMF metric records to stdout as it goes: keep them out of the JSON document
        # (they are still produced, so their cost is measured).
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            result["in_process"] = asyncio.run(run_in_process(real, bare, auth, args, counters))
            result["mounted_route"] = asyncio.run(run_mounted(real, auth, args, counters))
            if not args.no_http:
                sys.path.insert(0, str(ROOT))
                from tests.support.servers import serve_app

                with serve_app(real) as real_url, serve_app(bare_app()) as bare_url:
                    result["http"] = asyncio.run(run_http(real_url, bare_url, auth, args, counters))

        billed = sum(run["with_billing"]["requests"] for part in ("in_process", "http") if part in result
                     for run in result[part].values())
        mounted_runs = [run for run in result["mounted_route"].values() if isinstance(run, dict)]
        billed_elsewhere = sum(run["mounted_route"]["requests"] + run["chat_completions"]["requests"]
                               for run in mounted_runs) + 2 * 50 * len(mounted_runs)
        scripts = {k: v - scripts_before.get(k, 0) for k, v in script_calls(stats).items()}
        stats.close()
        warmups = 2 * 50 * (2 if "http" in result else 1)  # billed warm-up requests, metered too
        result["billed_requests"] = billed
        result["redis_round_trips_per_request"] = round(counters.redis_round_trips / billed, 3)
        result["redis_scripts_per_request"] = {k: round(v / (billed + warmups), 3) for k, v in scripts.items()}
        result["postgres_statements_per_request"] = round(counters.pg_statements / billed, 4)
        result["postgres_statements_total"] = counters.pg_statements
        result["metered_events"] = metered_events(settings, runtime)
        result["all_metered"] = result["metered_events"] == billed + warmups + billed_elsewhere
        p50 = result["in_process"]["concurrency_1"]["billing_overhead_p50_ms"]
        result["target"] = {"billing_overhead_p50_ms_below": TARGET_P50_OVERHEAD_MS, "in_process_p50_ms": p50,
                            "met": p50 < TARGET_P50_OVERHEAD_MS}
        # Issue 11: a mounted route calling llm.chat once costs what /v1/chat/completions costs, within noise.
        mounted_p50 = result["mounted_route"]["concurrency_1"]["mounted_overhead_p50_ms"]
        result["mounted_route"]["same_as_chat_completions"] = abs(mounted_p50) <= MOUNTED_NOISE_MS
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{settings.redis_key_prefix}:*", count=1000):
            client.delete(key)
        client.close()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
