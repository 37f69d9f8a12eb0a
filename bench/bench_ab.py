"""Benchmark (not a test), issue 16: `aikit serve` against a bare FastAPI echo route, A/B in one run.

    .venv/bin/python bench/bench_ab.py --rounds 5 --seconds 3

Two servers, each a process of its own pinned to the same core (os.sched_setaffinity), alternately loaded by
16 concurrent keep-alive clients pinned to the other core (with the redis-server, which is another machine on
AWS):
  aikit: `aikit serve` with billing fully on: key lookup through the cache, rate limits and the quota
         reservation (one Redis script before the LLM call), durable metering into a real redis-server (one
         script after), the echo provider, metrics on (EMF lines to stdout, discarded), default log level;
  bare:  the same POST /v1/chat/completions without auth, limits or metering (same body model, same echo
         provider, same JSON), served by `aikit serve`'s own function with the app swapped, so both get the
         same uvicorn configuration (uvloop and httptools when installed, log level, access log).
The client is a small asyncio raw-socket HTTP/1.1 client (one pre-encoded request, Content-Length parsing);
its own ceiling is measured against a null server on the server core. Each round runs both servers for
--seconds each (the order alternates per round); the figure is the median of the per-round ratios
aikit/bare, and of the ratios of CPU time per request (read from /proc: robust when other processes share the
server core). Then the in-process overhead at one client (bench_api's harness, alternating rounds, on uvloop
as uvicorn runs): p50 and p99 with billing minus without, against the targets 0.3 ms and 1 ms, beside the
floor under them: the same bare route plus two Redis round trips of a script that does nothing (the two the
design keeps, through the same client), so what billing adds above its round trips is printed too. Every 200
from aikit must be metered. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))  # tests.support.servers: free ports, a throwaway redis-server
CONCURRENCY = 16
TARGET_RATIO = 0.5
STRETCH_RATIO = 0.7
TARGET_P50_MS = 0.3
TARGET_P99_MS = 1.0
BODY = {"model": "echo-1", "messages": [{"role": "user", "content": "hello there, how are you today?"}]}


# ------------------------------------------------------------------------------------------- the servers


def serve_bare(port: int) -> None:
    """The bare route served by `aikit serve`'s own code (aikit.cli.cmd_serve) with the app swapped: whatever
    uvicorn configuration that command passes (loop, HTTP implementation, log level, access log) applies to
    both servers alike."""
    from bench_api import bare_app

    import aikit.server
    from aikit import cli
    from aikit.settings import get_settings

    aikit.server.create_server_app = lambda _settings: bare_app()  # type: ignore[assignment]
    cli.cmd_serve(argparse.Namespace(host="127.0.0.1", port=port), get_settings())


def serve_null(port: int) -> None:
    """Answers every request with a fixed small JSON at once: what the client manages when the server costs
    (almost) nothing."""
    reply = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")

    class Null(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                head = self.buffer[:end].lower()
                at = head.find(b"content-length:")
                length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
                if len(self.buffer) < end + 4 + length:
                    return
                self.buffer = self.buffer[end + 4 + length:]
                self.transport.write(reply)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Null, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(main())


def free_port() -> int:
    from tests.support.servers import free_port as pick

    return pick()


def prioritize(pid: int, nice: int) -> None:
    """A higher scheduling priority (root only): on a shared machine other processes would otherwise take
    turns on the server core and the figures would measure them."""
    if nice and os.geteuid() == 0:
        os.setpriority(os.PRIO_PROCESS, pid, nice)


@contextlib.contextmanager
def server(cmd: list[str], port: int, core: int, env: dict[str, str], nice: int) -> Iterator[int]:
    def pin() -> None:
        os.sched_setaffinity(0, {core})
        prioritize(0, nice)

    proc = subprocess.Popen(cmd, env=env, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=pin)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                asyncio.run(wait_ready(port))
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
                    raise RuntimeError(f"{cmd[:3]} did not start: {err}") from None
                time.sleep(0.1)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_ready(port: int) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    await writer.wait_closed()


# -------------------------------------------------------------------------------------------- the client


def encode_request(port: int, key: str | None) -> bytes:
    body = json.dumps(BODY).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"content-length:")
    if at < 0:
        raise RuntimeError(f"no content-length: {head[:200]!r}")
    await reader.readexactly(int(lower[at + 15:].split(b"\r\n", 1)[0]))
    return status


async def load(port: int, request: bytes, seconds: float, concurrency: int = CONCURRENCY) -> dict[str, Any]:
    """`concurrency` keep-alive connections sending one request after another for `seconds`."""
    latencies: list[float] = []
    codes: dict[int, int] = {}

    async def one(stop_at: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (start := time.perf_counter()) < stop_at:
                writer.write(request)
                status = await read_response(reader)
                latencies.append(time.perf_counter() - start)
                codes[status] = codes.get(status, 0) + 1
        finally:
            writer.close()

    began = time.perf_counter()
    await asyncio.gather(*[one(began + seconds) for _ in range(concurrency)])
    wall = time.perf_counter() - began
    ordered = sorted(latencies)
    q = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else [0.0] * 99
    return {"requests": len(ordered), "rps": round(len(ordered) / wall, 1),
            "p50_ms": round(statistics.median(ordered) * 1000, 3), "p99_ms": round(q[98] * 1000, 3),
            "codes": {str(k): v for k, v in sorted(codes.items())}}


# ------------------------------------------------------------------------------------------------- A/B


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(port: int, request: bytes, seconds: float, pid: int) -> dict[str, Any]:
    before = cpu_seconds(pid)
    out = asyncio.run(load(port, request, seconds))
    out["cpu_ms_per_request"] = round((cpu_seconds(pid) - before) * 1000 / max(1, out["requests"]), 4)
    return out


def ab_rounds(ports: dict[str, int], pids: dict[str, int], requests: dict[str, bytes], rounds: int,
              seconds: float) -> dict[str, Any]:
    warm = {name: asyncio.run(load(ports[name], requests[name], 1.0)) for name in ports}  # caches, scripts
    per_round: list[dict[str, Any]] = []
    for i in range(rounds):
        order = ["aikit", "bare"] if i % 2 == 0 else ["bare", "aikit"]
        row: dict[str, Any] = {}
        for name in order:
            row[name] = measured(ports[name], requests[name], seconds, pids[name])
        row["ratio"] = round(row["aikit"]["rps"] / row["bare"]["rps"], 3)
        # The same comparison in CPU time per request: what each server costs its core, unaffected by other
        # processes taking turns on that core (a busy machine): on a dedicated core, rps = 1 / CPU time.
        row["cpu_ratio"] = round(row["bare"]["cpu_ms_per_request"] / row["aikit"]["cpu_ms_per_request"], 3)
        per_round.append(row)
    ratio = statistics.median(r["ratio"] for r in per_round)
    cpu_ratio = statistics.median(r["cpu_ratio"] for r in per_round)
    return {
        "rounds": [{"aikit_rps": r["aikit"]["rps"], "bare_rps": r["bare"]["rps"], "ratio": r["ratio"],
                    "aikit_cpu_ms": r["aikit"]["cpu_ms_per_request"], "bare_cpu_ms": r["bare"]["cpu_ms_per_request"],
                    "cpu_ratio": r["cpu_ratio"]} for r in per_round],
        "median_ratio": round(ratio, 3),
        "median_cpu_ratio": round(cpu_ratio, 3),
        **{name: {k: statistics.median(r[name][k] for r in per_round)
                  for k in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_request")} for name in ("aikit", "bare")},
        "aikit_200": sum(r["aikit"]["codes"].get("200", 0) for r in [warm, *per_round]),
        "non_200": {name: sum(sum(v for k, v in r[name]["codes"].items() if k != "200") for r in per_round)
                    for name in ("aikit", "bare")},
        "target": {"ratio_at_least": TARGET_RATIO, "met": ratio >= TARGET_RATIO,
                   "stretch_ratio": STRETCH_RATIO, "stretch_met": ratio >= STRETCH_RATIO,
                   "cpu_ratio_met": cpu_ratio >= TARGET_RATIO, "cpu_ratio_stretch_met": cpu_ratio >= STRETCH_RATIO},
    }


def in_process(runtime: Any, auth: dict[str, str], requests: int) -> dict[str, Any]:
    """bench_api's in-process comparison at one client: what billing adds per request."""
    import httpx
    from bench_api import Counters, bare_app, compare, sender

    from aikit.api.app import create_app

    counters = Counters()
    counters.install(runtime.engine)

    async def run() -> dict[str, Any]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(runtime=runtime)),
                                     base_url="http://bench") as a, \
                httpx.AsyncClient(transport=httpx.ASGITransport(app=bare_app()), base_url="http://bench") as b, \
                httpx.AsyncClient(transport=httpx.ASGITransport(app=bare_app(runtime)),
                                  base_url="http://bench") as f:
            return await compare(sender(a, auth), sender(b, None), requests, 1, counters,
                                 extra={"round_trips_only": sender(f, None)})

    # On the loop `aikit serve` runs (uvicorn's loop="auto": uvloop when installed), for both configurations.
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), \
            asyncio.Runner(loop_factory=server_loop_factory()) as runner:  # EMF lines go to the sink
        out = runner.run(run())
    billed = out["with_billing"]["requests"]
    p50, p99 = out["billing_overhead_p50_ms"], out["billing_overhead_p99_ms"]
    floor = round(out["round_trips_only"]["p50_ms"] - out["without_billing"]["p50_ms"], 3)
    return {
        "with_billing": out["with_billing"], "without_billing": out["without_billing"],
        "round_trips_only": out["round_trips_only"],
        "billing_overhead_p50_ms": p50, "billing_overhead_p99_ms": p99,
        # What the two round trips the design keeps cost by themselves, and what billing adds on top of them.
        "round_trip_floor_p50_ms": floor, "billing_above_floor_p50_ms": round(p50 - floor, 3),
        "redis_round_trips_per_request": round(counters.redis_round_trips / billed, 3),
        "postgres_statements_per_request": round(counters.pg_statements / billed, 4),
        "target": {"p50_ms_at_most": TARGET_P50_MS, "p99_ms_at_most": TARGET_P99_MS,
                   "met": p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS},
    }


def server_loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def metered(runtime: Any) -> int:
    import redis

    client = redis.Redis.from_url(runtime.settings.redis_url, decode_responses=True)
    total = sum(int(client.xlen(runtime.layout.stream(s))) for s in range(runtime.layout.shards))
    client.close()
    return total


def pick_cores() -> tuple[int, int]:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("bench_ab needs two cores: one for the server, one for the clients")
    return cores[0], cores[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0, help="per server per round")
    p.add_argument("--requests", type=int, default=2000, help="in-process requests per configuration")
    p.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--serve-null", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--nice", type=int, default=-10, help="scheduling priority of the servers, redis-server and "
                                                          "the clients when run as root (0: unchanged)")
    p.add_argument("--hold", type=float, default=0, help="keep loading aikit this many seconds at the end "
                                                         "(for a profiler attached to the printed pid)")
    args = p.parse_args(argv)
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return 0
    if args.serve_null:
        serve_null(args.serve_null)
        return 0
    if args.rounds < 1:
        p.error("--rounds must be at least 1")

    from bench_api import bench_database
    from sqlalchemy.orm import Session
    from tests.support.servers import throwaway_redis

    from aikit.keys import create_key
    from aikit.runtime import Runtime
    from aikit.settings import load_settings

    server_core, client_core = pick_cores()
    result: dict[str, Any] = {
        "bench": "ab", "python": platform.python_version(), "cpus": os.cpu_count(),
        "cores": {"server": server_core, "client": client_core}, "concurrency": CONCURRENCY,
        "nice": args.nice if os.geteuid() == 0 else 0,
        "uvicorn": {"uvloop": find_spec("uvloop") is not None, "httptools": find_spec("httptools") is not None},
    }
    with bench_database() as db_url, throwaway_redis() as redis_process:
        redis_url = redis_process.url
        if redis_process.proc is not None:
            # Redis is another machine on AWS (ElastiCache): here it runs beside the clients, so the server
            # core holds only the server under test (unpinned, it took turns on the server's core).
            os.sched_setaffinity(redis_process.proc.pid, {client_core})
            prioritize(redis_process.proc.pid, args.nice)
        prefix = f"ab{uuid.uuid4().hex[:8]}"
        settings = load_settings(database_url=db_url, redis_url=redis_url, redis_key_prefix=prefix,
                                 llm_provider="echo", stripe_secret_key=None, flush_interval_seconds=0,
                                 _env_file=None)
        runtime = Runtime(settings)
        with Session(runtime.engine) as session:
            issued = create_key(session, settings, email="ab@example.com", rpm=10**9, rpd=10**9,
                                monthly_tokens=10**12)
            session.commit()
        env = {k: v for k, v in os.environ.items() if k != "POWERTOOLS_METRICS_DISABLED"}
        env.update(DATABASE_URL=db_url, REDIS_URL=redis_url, REDIS_KEY_PREFIX=prefix, LLM_PROVIDER="echo",
                   FLUSH_INTERVAL_SECONDS="0", PYTHONPATH=f"{BENCH}{os.pathsep}{env.get('PYTHONPATH', '')}")
        env.pop("STRIPE_SECRET_KEY", None)
        aikit_bin = str(Path(sys.executable).with_name("aikit"))
        ports = {"aikit": free_port(), "bare": free_port(), "null": free_port()}
        requests = {"aikit": encode_request(ports["aikit"], issued.api_key),
                    "bare": encode_request(ports["bare"], None), "null": encode_request(ports["null"], None)}
        me = __file__
        with server([aikit_bin, "serve", "--host", "127.0.0.1", "--port", str(ports["aikit"])], ports["aikit"],
                    server_core, env, args.nice) as aikit_pid, \
                server([sys.executable, me, "--serve-bare", str(ports["bare"])], ports["bare"], server_core,
                       env, args.nice) as bare_pid, \
                server([sys.executable, me, "--serve-null", str(ports["null"])], ports["null"], server_core, env,
                       args.nice):
            own, own_nice = os.sched_getaffinity(0), os.getpriority(os.PRIO_PROCESS, 0)
            os.sched_setaffinity(0, {client_core})
            prioritize(0, args.nice)
            try:
                ceiling = asyncio.run(load(ports["null"], requests["null"], args.seconds))
                result["client_ceiling_rps"] = ceiling["rps"]
                ab = ab_rounds({k: ports[k] for k in ("aikit", "bare")}, {"aikit": aikit_pid, "bare": bare_pid},
                               requests, args.rounds, args.seconds)
                if args.hold > 0:
                    print(f"aikit serve pid {aikit_pid}: loading for {args.hold}s", file=sys.stderr, flush=True)
                    held = asyncio.run(load(ports["aikit"], requests["aikit"], args.hold))
                    ab["aikit_200"] += held["codes"].get("200", 0)
            finally:
                os.sched_setaffinity(0, own)
                if os.geteuid() == 0:
                    os.setpriority(os.PRIO_PROCESS, 0, own_nice)
        result["ab"] = ab
        result["client_not_the_bottleneck"] = ceiling["rps"] > 2 * ab["bare"]["rps"]
        # Every 200 `aikit serve` answered (warm-up, rounds and --hold) is one event in the durable buffer.
        result["metered_events"] = metered(runtime)
        result["all_metered"] = result["metered_events"] == ab["aikit_200"]
        result["in_process"] = in_process(runtime, {"Authorization": f"Bearer {issued.api_key}"}, args.requests)
        import redis

        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()
        runtime.engine.dispose()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
