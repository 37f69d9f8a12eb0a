"""Chaos harness: the API (uvicorn), the flush and the webhook handler run together against a throwaway
redis-server, a throwaway Postgres cluster and FakeStripe, while faults are injected phase by phase.

Clients keep a ledger of what they were told: every 200 answer's `usage.total_tokens` (and every stream's
final usage chunk) under its request id. At the end the ledger must equal, per customer, the rows in
`api_key_usage`, the `usage_daily` rollups and what FakeStripe accepted as meter events.

Redis runs with `appendonly yes, appendfsync always`: a kill -9 then loses no acknowledged write, like a
replicated ElastiCache node failing over. A Redis that loses its memory is out of scope (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import redis
from sqlalchemy import create_engine, func, select, text

from aikit.db.engine import get_engine
from aikit.db.migrate import upgrade
from aikit.db.models import ApiKeyUsage, MeterReport, UsageDaily
from aikit.flush import Flusher, FlushSummary
from aikit.keys import IssuedKey
from aikit.runtime import Runtime
from aikit.settings import Settings, load_settings
from aikit.stripe_gateway import StripeGateway
from tests.fakes.stripe_server import FakeStripe
from tests.support.api import full_app, issue_key
from tests.support.servers import RedisProcess, free_port, serve_app
from tests.support.webhooks import WEBHOOK_SECRET, deliver, subscription_event

ADMIN_TOKEN = "chaos-admin-" + uuid.uuid4().hex


# --- servers -------------------------------------------------------------------------------------------


class PgCluster:
    """A Postgres cluster of our own, so it can be stopped and restarted (the machine's must stay up)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = tempfile.mkdtemp(prefix="aikit-chaos-pg-", dir="/tmp")
        shutil.chown(self.root, "postgres")
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "postgres.log")

    @property
    def url(self) -> str:
        return f"postgresql+pg8000://postgres@127.0.0.1:{self.port}/aikit"

    def _ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", "pg_ctl", "-D", self.data, *args], check=check,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)

    def init(self) -> PgCluster:
        subprocess.run(["runuser", "-u", "postgres", "--", "initdb", "-D", self.data, "-A", "trust"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        self.start()
        admin = create_engine(f"postgresql+pg8000://postgres@127.0.0.1:{self.port}/postgres",
                              isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("CREATE DATABASE aikit"))
        admin.dispose()
        upgrade(self.url)
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._ctl("-o", options, "-l", self.log, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-w", "stop", "-m", mode)

    def restart(self) -> None:
        self._ctl("-w", "restart", "-m", "fast")

    def cleanup(self) -> None:
        self._ctl("-w", "stop", "-m", "immediate", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


class WebhookDriver(threading.Thread):
    """Delivers queued events in order like Stripe does: a 5xx (or no answer) is retried until it lands."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.queue: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self.retries = 0
        self.rejected: list[str] = []  # a 4xx for a signed, valid event would be a bug

    def send(self, *events: dict[str, Any]) -> None:
        with self.lock:
            self.queue.extend(events)

    def pending(self) -> int:
        with self.lock:
            return len(self.queue)

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as http:
            while True:
                with self.lock:
                    event = self.queue[0] if self.queue else None
                if event is None:
                    if self.stopping.is_set():
                        return
                    time.sleep(0.05)
                    continue
                try:
                    r = deliver(http, event)
                except httpx.HTTPError:
                    self.retries += 1
                    time.sleep(0.2)
                    continue
                if r.status_code >= 500:
                    self.retries += 1
                    time.sleep(0.2)
                    continue
                if r.status_code == 200:
                    self.outcomes[r.json()["outcome"]] += 1
                else:
                    self.rejected.append(f"{r.status_code} {r.text[:200]}")
                with self.lock:
                    self.queue.pop(0)


# --- clients and their ledger --------------------------------------------------------------------------


@dataclass
class Customer:
    customer_id: str
    subscription_id: str
    keys: list[IssuedKey]
    churned: bool = False


@dataclass
class PhaseStats:
    name: str
    started: float
    ended: float = 0.0
    ok: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    tokens: int = 0

    @property
    def seconds(self) -> float:
        return max(1e-6, (self.ended or time.monotonic()) - self.started)

    @property
    def total(self) -> int:
        return sum(self.codes.values())

    @property
    def errors(self) -> int:
        """What a client would call an error: a 5xx, a broken connection or a broken stream."""
        return sum(n for code, n in self.codes.items() if code.startswith(("5", "exc", "broken")))

    @property
    def error_rate(self) -> float:
        return self.errors / self.total if self.total else 0.0


class Ledger:
    """What the clients were told they used, by request id."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_request: dict[str, tuple[str, int, str]] = {}  # -> customer, tokens, how (phase/kind)
        self.broken_after_usage = 0

    def add(self, request_id: str, customer_id: str, tokens: int, how: str) -> None:
        with self.lock:
            if request_id in self.by_request:
                raise AssertionError(f"request id {request_id} answered twice")
            self.by_request[request_id] = (customer_id, tokens, how)

    def per_customer(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        with self.lock:
            for customer, tokens, _ in self.by_request.values():
                out[customer] += tokens
        return dict(out)

    def describe(self, request_ids: list[str]) -> Counter[str]:
        with self.lock:
            return Counter(self.by_request[r][2] for r in request_ids if r in self.by_request)


class Phases:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.all: list[PhaseStats] = []

    def begin(self, name: str) -> PhaseStats:
        with self.lock:
            now = time.monotonic()
            if self.all and not self.all[-1].ended:
                self.all[-1].ended = now
            stats = PhaseStats(name, now)
            self.all.append(stats)
            return stats

    def current(self) -> str:
        with self.lock:
            return self.all[-1].name

    def end(self) -> None:
        with self.lock:
            if self.all and not self.all[-1].ended:
                self.all[-1].ended = time.monotonic()

    def record(self, code: str, tokens: int = 0) -> None:
        with self.lock:
            current = self.all[-1]
            current.codes[code] += 1
            if code == "200":
                current.ok += 1
                current.tokens += tokens


class Load:
    """Concurrent clients in a thread of their own: httpx for plain calls, the openai SDK for streams."""

    def __init__(self, base: str, customers: list[Customer], phases: Phases, ledger: Ledger, *, workers: int,
                 stream_share: float, seed: int) -> None:
        self.base = base
        self.customers = customers
        self.phases = phases
        self.ledger = ledger
        self.workers = workers
        self.stream_share = stream_share
        self.seed = seed
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.failure: BaseException | None = None
        self.usage_reads: Counter[str] = Counter()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "clients did not stop"
        if self.failure is not None:
            raise self.failure

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.workers * 2, max_keepalive_connections=self.workers * 2)
        async with httpx.AsyncClient(base_url=self.base, timeout=60, limits=limits) as http:
            sdks = {k.api_key: openai.AsyncOpenAI(api_key=k.api_key, base_url=self.base + "/v1", max_retries=0,
                                                  timeout=60)
                    for c in self.customers for k in c.keys}
            try:
                await asyncio.gather(*[self._worker(i, http, sdks) for i in range(self.workers)])
            except BaseException as exc:
                self.failure = exc
            finally:
                for sdk in sdks.values():
                    await sdk.close()

    async def _worker(self, index: int, http: httpx.AsyncClient, sdks: dict[str, openai.AsyncOpenAI]) -> None:
        rng = random.Random(self.seed * 1000 + index)
        while not self.stopping.is_set():
            customer = rng.choice(self.customers)
            key = rng.choice(customer.keys)
            words = " ".join(f"w{rng.randint(0, 999)}" for _ in range(rng.randint(1, 40)))
            roll = rng.random()
            if roll < 0.03:
                await self._usage_read(http, key)
            elif roll < 0.03 + self.stream_share:
                await self._stream(sdks[key.api_key], customer, words, rng)
            else:
                await self._chat(http, customer, key, words, rng)

    async def _usage_read(self, http: httpx.AsyncClient, key: IssuedKey) -> None:
        try:
            r = await http.get("/v1/usage", headers={"Authorization": f"Bearer {key.api_key}"})
            self.usage_reads[str(r.status_code)] += 1
        except httpx.HTTPError as exc:
            self.usage_reads[f"exc:{type(exc).__name__}"] += 1

    async def _chat(self, http: httpx.AsyncClient, customer: Customer, key: IssuedKey, words: str,
                    rng: random.Random) -> None:
        body: dict[str, Any] = {"model": rng.choice(["echo-1", "echo-2"]),
                                "messages": [{"role": "user", "content": words}]}
        if rng.random() < 0.3:
            body["max_tokens"] = rng.randint(1, 20)
        try:
            r = await http.post("/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {key.api_key}"})
        except httpx.HTTPError as exc:
            self.phases.record(f"exc:{type(exc).__name__}")
            return
        if r.status_code == 200:
            tokens = int(r.json()["usage"]["total_tokens"])
            self.ledger.add(r.headers["x-request-id"], customer.customer_id, tokens,
                            f"{self.phases.current()}/chat")
            self.phases.record("200", tokens)
        else:
            self.phases.record(str(r.status_code))

    async def _stream(self, sdk: openai.AsyncOpenAI, customer: Customer, words: str, rng: random.Random) -> None:
        try:
            stream = await sdk.chat.completions.create(
                model="echo-1", messages=[{"role": "user", "content": words}], stream=True,
                stream_options={"include_usage": True})
        except openai.APIStatusError as exc:
            self.phases.record(str(exc.status_code))
            return
        except openai.APIError as exc:
            self.phases.record(f"exc:{type(exc).__name__}")
            return
        usage: int | None = None
        chunk_id = ""
        try:
            async for chunk in stream:
                chunk_id = chunk.id
                if chunk.usage is not None:
                    usage = chunk.usage.total_tokens
        except Exception as exc:
            if usage is None:
                self.phases.record(f"exc:stream:{type(exc).__name__}")
                return
            # The usage chunk arrived, then the stream broke: the client was told, so it must be billed.
            with self.ledger.lock:
                self.ledger.broken_after_usage += 1
            self.ledger.add("req_" + chunk_id.removeprefix("chatcmpl-"), customer.customer_id, usage,
                            f"{self.phases.current()}/stream-broken-after-usage")
            self.phases.record("broken_after_usage")
            return
        if usage is None:
            self.phases.record("exc:stream:no_usage")
            return
        self.ledger.add("req_" + chunk_id.removeprefix("chatcmpl-"), customer.customer_id, usage,
                        f"{self.phases.current()}/stream")
        self.phases.record("200", usage)


# --- the flush -----------------------------------------------------------------------------------------


def report_time(settings: Settings) -> dt.datetime:
    """A `now` late enough that every window holding usage so far has ended (so reports are sealed and sent)."""
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=settings.stripe_report_window_seconds + 5)


def short_sleep(seconds: float) -> None:
    time.sleep(min(seconds, 0.02))


class FlushLoop(threading.Thread):
    """The scheduled flush, every `interval` seconds (EventBridge in production)."""

    def __init__(self, settings: Settings, interval: float) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.interval = interval
        self.stopping = threading.Event()
        self.paused = threading.Event()
        self.idle = threading.Event()
        self.runs: Counter[str] = Counter()
        self.summaries: list[FlushSummary] = []

    def run(self) -> None:
        flusher = Flusher(self.settings, sleep=short_sleep)
        while not self.stopping.wait(self.interval):
            if self.paused.is_set():
                self.idle.set()
                continue
            self.idle.clear()
            try:
                summary = flusher.run(now=report_time(self.settings), time_budget=20)
            except Exception as exc:  # Postgres down: the flush cannot even take its lock
                self.runs[f"raised:{type(exc).__name__}"] += 1
                continue
            self.summaries.append(summary)
            self.runs["skipped" if summary.skipped else "ok" if summary.ok else "errors"] += 1

    def pause(self) -> None:
        self.idle.clear()
        self.paused.set()
        self.idle.wait(timeout=60)

    def resume(self) -> None:
        self.paused.clear()


def two_flushes_at_once(settings: Settings, *, use_lock: bool) -> list[str]:
    """Start two flushes at the same instant; returns how each ended. Without the advisory lock both really
    run over the same entries and reports (only idempotency keeps the totals right)."""
    barrier = threading.Barrier(2)
    results: list[str] = []

    def one() -> None:
        flusher = Flusher(settings, sleep=short_sleep, use_lock=use_lock)
        barrier.wait()
        try:
            s = flusher.run(now=report_time(settings), time_budget=20)
            results.append("skipped" if s.skipped else "ran" if s.ok else f"errors:{s.errors[:1]}")
        except Exception as exc:
            results.append(f"raised:{type(exc).__name__}")

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def child_env(settings: Settings) -> dict[str, str]:
    names = ("database_url", "redis_url", "redis_key_prefix", "redis_timeout_seconds", "stripe_secret_key",
             "stripe_api_base", "stripe_timeout_seconds", "stripe_report_window_seconds", "stripe_webhook_secret",
             "llm_provider", "flush_batch_size")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIKIT_", "DATABASE_", "REDIS_", "STRIPE_"))}
    env.update({n.upper(): str(getattr(settings, n)) for n in names if getattr(settings, n) is not None})
    return env


_CRASH_CHILD = """
import datetime as dt, json, os, sys, time
from aikit.flush import Flusher
from aikit.settings import load_settings
settings = load_settings(_env_file=None)
flusher = Flusher(settings, sleep=lambda s: time.sleep(min(s, 0.02)))
print("ready", flush=True)
sys.stdin.readline()
now = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=settings.stripe_report_window_seconds + 5)
summary = flusher.run(now=now, time_budget=30)
print(json.dumps(summary.as_dict(), default=str), flush=True)
"""


def crash_points() -> list[str]:
    """The flush's crash hook points (os._exit when AIKIT_CRASH_AT names one), if aikit.faults has the hook."""
    import aikit.faults

    return list(getattr(aikit.faults, "CRASH_POINTS", ()))


def crashing_flushes(settings: Settings, plans: list[tuple[str | None, float]]) -> list[str]:
    """Flushes in subprocesses that die mid-way, one after the other: each exits at its crash point
    (AIKIT_CRASH_AT), or, without one, is SIGKILLed after its delay. They are started together, so their
    imports overlap, and each waits for a go."""
    procs = []
    for point, _ in plans:
        env = child_env(settings)
        if point:
            env["AIKIT_CRASH_AT"] = point
        procs.append(subprocess.Popen([sys.executable, "-c", _CRASH_CHILD], env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    results = []
    try:
        for (point, delay), proc in zip(plans, procs, strict=True):
            assert proc.stdin is not None and proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", "the flush subprocess did not start"
            time.sleep(0.3)  # let usage pile up in Redis
            proc.stdin.write("go\n")
            proc.stdin.flush()
            if not point:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
            code = proc.wait(timeout=60)
            out = proc.stdout.read()
            results.append(f"exit {code}: " + ("finished (the point was not reached)" if out.strip()
                                               else "died mid-flush"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


# --- the world -----------------------------------------------------------------------------------------


@dataclass
class World:
    pg: PgCluster
    redis: RedisProcess
    fake: FakeStripe
    settings: Settings
    runtime: Runtime
    base: str
    customers: list[Customer]


@contextlib.contextmanager
def world(n_customers: int, keys_per_customer: int = 2) -> Iterator[World]:
    pg = PgCluster()
    redis_proc = RedisProcess(free_port(), extra=("--appendonly", "yes", "--appendfsync", "always"))
    fake = FakeStripe()
    try:
        pg.init()
        redis_proc.start()
        fake.start()
        fake.timeout_seconds = 1.0
        settings = load_settings(
            database_url=pg.url, redis_url=redis_proc.url, redis_key_prefix="chaos", redis_timeout_seconds=0.3,
            admin_token=ADMIN_TOKEN, llm_provider="echo", stripe_secret_key=fake.api_key,
            stripe_api_base=fake.url, stripe_webhook_secret=WEBHOOK_SECRET, stripe_timeout_seconds=0.5,
            stripe_max_network_retries=0, stripe_report_window_seconds=60, key_cache_ttl_seconds=1.0,
            flush_interval_seconds=0, rate_limit_fail_mode="open", _env_file=None)
        gateway = StripeGateway(settings)
        gateway.ensure_setup(event_name=settings.stripe_meter_event_name)
        gateway.close()
        customers = []
        for i in range(n_customers):
            email = f"chaos{i}-{uuid.uuid4().hex[:6]}@example.com"
            cid = fake.add_customer(email=email)
            keys = [issue_key(settings, email=email, customer_id=cid, rpm=10**7, rpd=10**9,
                              monthly_tokens=10**13) for _ in range(keys_per_customer)]
            customers.append(Customer(cid, "sub_" + uuid.uuid4().hex[:14], keys))
        runtime = Runtime(settings)
        with serve_app(full_app(runtime)) as base:
            with httpx.Client(base_url=base, timeout=30) as http:
                created = int(time.time())
                for c in customers:
                    r = deliver(http, subscription_event("customer.subscription.created", c.subscription_id,
                                                              c.customer_id, "active", created))
                    assert r.status_code == 200 and r.json()["outcome"] == "applied", r.text
            yield World(pg, redis_proc, fake, settings, runtime, base, customers)
    finally:
        fake.stop()
        redis_proc.cleanup()
        get_engine(pg.url).dispose()
        pg.cleanup()


# --- the end: settle and count -------------------------------------------------------------------------


def redis_backlog(settings: Settings) -> tuple[int, dict[str, dict[str, str]]]:
    """(entries still in the usage streams, pending-hash fields left by key) of this world's Redis."""
    from aikit.metering.layout import RedisLayout

    layout = RedisLayout(settings.redis_key_prefix, settings.redis_usage_shards)
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        entries = sum(int(client.xlen(layout.stream(s))) for s in range(layout.shards))
        fields = {k: client.hgetall(k) for s in range(layout.shards)
                  for k in client.scan_iter(match=layout.pending_prefix(s) + "*")}
    finally:
        client.close()
    return entries, {k: h for k, h in fields.items() if h}


def unsent_reports(settings: Settings) -> Counter[str]:
    with get_engine(settings.database_url).connect() as conn:
        rows = conn.execute(select(MeterReport.status, func.count()).group_by(MeterReport.status)).all()
    return Counter({str(status): int(n) for status, n in rows if status != "sent"})


def settle(settings: Settings, rounds: int = 40) -> list[FlushSummary]:
    """Final flushes with everything up, until Redis is empty and every report has gone to Stripe."""
    flusher = Flusher(settings, sleep=short_sleep)
    summaries = []
    for _ in range(rounds):
        summary = flusher.run(now=report_time(settings), time_budget=60)
        summaries.append(summary)
        if summary.ok and not summary.skipped and redis_backlog(settings)[0] == 0 \
                and not unsent_reports(settings):
            break
        time.sleep(0.2)
    return summaries


@dataclass
class Totals:
    clients: dict[str, int]  # what the clients were told
    uncertain: dict[str, int]  # stored, though the client got a 503 the app logged as `usage_unrecorded`
    usage_rows: dict[str, int]
    usage_daily: dict[str, int]
    stripe: dict[str, int]
    reports_sent: dict[str, int]

    def customers(self) -> list[str]:
        return sorted(set(self.clients) | set(self.usage_rows) | set(self.usage_daily) | set(self.stripe))

    def differences(self) -> list[str]:
        out = []
        for c in self.customers():
            figures = (self.clients.get(c, 0) + self.uncertain.get(c, 0), self.usage_rows.get(c, 0),
                       self.usage_daily.get(c, 0), self.stripe.get(c, 0), self.reports_sent.get(c, 0))
            if len(set(figures)) != 1:
                out.append(f"{c}: clients(+uncertain)={figures[0]} api_key_usage={figures[1]} "
                           f"usage_daily={figures[2]} stripe={figures[3]} reports_sent={figures[4]}")
        return out


def count(settings: Settings, ledger: Ledger, fake: FakeStripe, uncertain_ids: list[str]) -> Totals:
    engine = get_engine(settings.database_url)
    with engine.connect() as conn:
        rows = dict(conn.execute(select(ApiKeyUsage.customer_id, func.sum(ApiKeyUsage.tokens))
                                 .group_by(ApiKeyUsage.customer_id)).all())
        daily = dict(conn.execute(select(UsageDaily.customer_id, func.sum(UsageDaily.tokens))
                                  .group_by(UsageDaily.customer_id)).all())
        sent = dict(conn.execute(select(MeterReport.customer_id, func.sum(MeterReport.value))
                                 .where(MeterReport.status == "sent").group_by(MeterReport.customer_id)).all())
        uncertain = dict(conn.execute(select(ApiKeyUsage.customer_id, func.sum(ApiKeyUsage.tokens))
                                      .where(ApiKeyUsage.request_id.in_(uncertain_ids))
                                      .group_by(ApiKeyUsage.customer_id)).all()) if uncertain_ids else {}
    return Totals(ledger.per_customer(), {str(k): int(v) for k, v in uncertain.items()},
                  {str(k): int(v) for k, v in rows.items()}, {str(k): int(v) for k, v in daily.items()},
                  fake.meter_totals(), {str(k): int(v) for k, v in sent.items()})


def flagged_unrecorded(log_path: str) -> set[str]:
    """Request ids the app logged as `usage_unrecorded` (it answered 503, not knowing whether a store that
    failed mid-way had committed)."""
    sys.stdout.flush()
    ids = set()
    with open(log_path) as log:
        for line in log:
            if '"usage_unrecorded"' not in line:
                continue
            try:
                ids.add(json.loads(json.loads(line)["usage_event"])["request_id"])
            except (ValueError, KeyError, TypeError):
                continue
    return ids


def request_id_diff(settings: Settings, ledger: Ledger) -> tuple[list[str], list[str]]:
    """(answered but not stored, stored but never answered) request ids, for diagnosing a difference."""
    with get_engine(settings.database_url).connect() as conn:
        stored = {r for (r,) in conn.execute(select(ApiKeyUsage.request_id))}
    with ledger.lock:
        answered = set(ledger.by_request)
    return sorted(answered - stored), sorted(stored - answered)


@contextlib.contextmanager
def quiet_logs(path: str) -> Iterator[None]:
    """Send the app's JSON logs, metric lines and uvicorn's error log to a file while the run prints tables."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    with open(path, "w") as sink, contextlib.redirect_stdout(sink):
        saved = (uvicorn_log.handlers[:], uvicorn_log.propagate)
        uvicorn_log.handlers[:] = [logging.StreamHandler(sink)]
        uvicorn_log.propagate = False
        try:
            yield
        finally:
            uvicorn_log.handlers[:], uvicorn_log.propagate = saved


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False))
    out = io.StringIO()
    out.write(line + "\n" + "  ".join("-" * w for w in widths) + "\n")
    for row in rows:
        out.write("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)) + "\n")
    return out.getvalue()


def per_customer_table(totals: Totals) -> str:
    rows = []
    for c in totals.customers():
        rows.append([c, str(totals.clients.get(c, 0)), str(totals.uncertain.get(c, 0)),
                     str(totals.usage_rows.get(c, 0)), str(totals.usage_daily.get(c, 0)),
                     str(totals.reports_sent.get(c, 0)), str(totals.stripe.get(c, 0))])
    return table(rows, ["customer", "clients", "uncertain", "api_key_usage", "usage_daily", "reports_sent",
                        "stripe"])


def phase_table(phases: list[PhaseStats]) -> str:
    rows = []
    for p in phases:
        codes = ",".join(f"{k}:{v}" for k, v in sorted(p.codes.items()) if k != "200")
        rows.append([p.name, f"{p.seconds:.1f}", str(p.total), f"{p.ok / p.seconds:.0f}",
                     f"{100 * p.error_rate:.1f}%", codes or "-"])
    return table(rows, ["phase", "secs", "requests", "ok/s", "errors", "non-200 answers"])


def fault_table(faults: list[tuple[str, str, str]]) -> str:
    return table([list(f) for f in faults], ["phase", "fault", "observed"])

