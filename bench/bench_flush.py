"""Benchmark of one flush (not a test): Redis buffer -> Postgres -> FakeStripe.

    .venv/bin/python bench/bench_flush.py --events 1000000

Creates its own Postgres database (migrated with aikit.db.migrate.upgrade) and Redis key prefix, buffers
`--events` usage events into Redis through the real RECORD script (pipelined), spread over `--keys` API keys
and `--customers` Stripe customers, with timestamps in the few reporting windows before the current one. Then
times ONE flush (`Flusher.run`) against the local FakeStripe through the real stripe SDK and prints one JSON
document: events/s drained into Postgres, wall time, peak RSS, Stripe calls made, and a check that FakeStripe's
per-customer totals equal the tokens buffered. Drops the database and the Redis keys at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fakes
# stdout carries the result JSON only: keep aikit's EMF metric lines off it.
os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")

import psutil  # type: ignore[import-untyped]
import redis
from sqlalchemy import create_engine, text
from tests.fakes.stripe_server import FakeStripe

from aikit.db.engine import get_engine
from aikit.db.migrate import upgrade
from aikit.flush import Flusher
from aikit.metering.base import UsageEvent
from aikit.metering.layout import RedisLayout
from aikit.metering.record import encode
from aikit.metering.scripts import RECORD
from aikit.settings import load_settings
from aikit.stripe_gateway import StripeGateway

ADMIN_URL = os.environ.get("TEST_DATABASE_ADMIN_URL", "postgresql+pg8000://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "llama-3-70b")
EVENT_NAME = "api_tokens"


def admin_sql(sql: str) -> None:
    engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


def buffer_events(client: redis.Redis, layout: RedisLayout, *, events: int, keys: int, customers: int,
                  window: int, windows: int, pipeline_size: int = 5000) -> dict[str, int]:
    """RECORD each event (the request path's script), pipelined; returns tokens per customer."""
    sha = client.script_load(RECORD.source)
    assert sha == RECORD.sha
    now = time.time()
    first_window = (int(now) // window - windows) * window  # all windows have ended by flush time
    span = windows * window
    totals: dict[str, int] = {}
    key_ids = [f"key_bench{i:05d}" for i in range(keys)]
    key_customer = [f"cus_bench{i % customers:04d}" for i in range(keys)]
    key_names = [layout.record_keys(k, 0) for k in key_ids]
    pipe = client.pipeline(transaction=False)
    run = uuid.uuid4().hex[:8]
    for n in range(events):
        k = n % keys
        customer = key_customer[k]
        inp, out = 50 + n % 977, 10 + n % 313
        ts = first_window + (n * 7919 % (span * 1000)) / 1000
        event = UsageEvent(request_id=f"req_{run}{n:09d}", api_key_id=key_ids[k], customer_id=customer,
                           model=MODELS[n % len(MODELS)], input_tokens=inp, output_tokens=out, cached_tokens=n % 7,
                           ts=ts)  # cost 0: no price table here
        RECORD.run(pipe, key_names[k], encode(event))
        totals[customer] = totals.get(customer, 0) + inp + out
        if len(pipe) >= pipeline_size:
            pipe.execute()
    pipe.execute()
    return totals


class RssSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--keys", type=int, default=1000)
    p.add_argument("--customers", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=None, help="FLUSH_BATCH_SIZE (default: the setting's)")
    p.add_argument("--store-workers", type=int, default=None, help="parallel store lanes (default: Flusher's)")
    p.add_argument("--window", type=int, default=300, help="STRIPE_REPORT_WINDOW_SECONDS")
    p.add_argument("--windows", type=int, default=3, help="how many past windows the timestamps cover")
    p.add_argument("--keep", action="store_true", help="keep the database and Redis keys")
    args = p.parse_args()

    db = f"aikit_bench_{uuid.uuid4().hex[:10]}"
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    admin_sql(f'CREATE DATABASE "{db}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + db
    client = redis.Redis.from_url(REDIS_URL)
    result: dict[str, Any] = {"events": args.events, "keys": args.keys, "customers": args.customers}
    try:
        upgrade(url)
        with FakeStripe(rate_limit=1000) as fake:  # live mode: meter events have their own 1,000 calls/s
            overrides: dict[str, Any] = {
                "database_url": url, "redis_url": REDIS_URL, "redis_key_prefix": prefix,
                "stripe_secret_key": fake.api_key, "stripe_api_base": fake.url,
                "stripe_meter_event_name": EVENT_NAME, "stripe_report_window_seconds": args.window,
                "stripe_timeout_seconds": 5.0, "redis_timeout_seconds": 30.0, "_env_file": None,
            }
            if args.batch_size:
                overrides["flush_batch_size"] = args.batch_size
            settings = load_settings(**overrides)
            setup_gateway = StripeGateway(settings)
            setup_gateway.ensure_setup(event_name=EVENT_NAME)
            setup_gateway.close()
            for c in range(args.customers):
                fake.add_customer(customer_id=f"cus_bench{c:04d}")
            layout = RedisLayout(prefix, settings.redis_usage_shards)

            started = time.perf_counter()
            expected = buffer_events(client, layout, events=args.events, keys=args.keys,
                                     customers=args.customers, window=args.window, windows=args.windows)
            result["buffer_seconds"] = round(time.perf_counter() - started, 2)
            result["redis_used_memory_mb"] = round(int(client.info("memory")["used_memory"]) / 2**20, 1)

            flusher = Flusher(settings) if args.store_workers is None else \
                Flusher(settings, store_workers=args.store_workers)
            sampler = RssSampler()
            result["rss_before_flush_mb"] = round(sampler.peak / 2**20, 1)
            sampler.start()
            started = time.perf_counter()
            summary = flusher.run()
            wall = time.perf_counter() - started
            sampler.stop.set()
            sampler.join()
            flusher.close()

            totals = fake.meter_totals(EVENT_NAME)
            result.update({
                "batch_size": settings.flush_batch_size,
                "store_workers": flusher.drainer.store_workers,
                "flush_wall_seconds": round(wall, 2),
                "drain_seconds": round(summary.drain_seconds, 2),
                "events_per_second_drained": round(summary.events_read / summary.drain_seconds)
                if summary.drain_seconds else None,
                "events_per_second_overall": round(summary.events_read / wall),
                "events_read": summary.events_read,
                "rows_inserted": summary.rows_inserted,
                "stripe_calls": summary.stripe_calls,
                "fake_stripe_meter_event_calls": fake.calls["/v1/billing/meter_events"],
                "reports_sent": summary.reports_sent,
                "peak_rss_during_flush_mb": round(sampler.peak / 2**20, 1),
                "peak_rss_process_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "stripe_totals_match": totals == expected,
                "concurrency_violations": fake.concurrency_violations,
                "summary_ok": summary.ok,
                "errors": summary.errors,
            })
            with get_engine(url).connect() as conn:
                result["api_key_usage_rows"] = conn.execute(text("SELECT count(*) FROM api_key_usage")).scalar_one()
            get_engine(url).dispose()
    finally:
        if not args.keep:
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                client.delete(key)
            admin_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        else:
            result["database_url"] = url
            result["redis_key_prefix"] = prefix
        client.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
