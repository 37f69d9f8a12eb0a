"""Benchmark of the flush with pricing (not a test): 5 models x 3 token types against the unpriced flush.

    .venv/bin/python bench/bench_pricing.py --events 200000

Buffers the same `--events` usage events (5 models, every event with input, cached input and output tokens)
into Redis through the real RECORD script, once without a price table (token meter, cost 0) and once with a
5-model price book (each event carries its cost, the flush reports the cost meter), and times one flush of each
(two of each by default, in the order A B B A; the best of each is reported) against the local FakeStripe
through the real stripe SDK. Prints one JSON document: events/s drained and Stripe calls per window of each,
their ratios (priced / unpriced, within this run), and whether FakeStripe's totals equal what was buffered
(tokens, resp. the sum of tokens x rate in 1e-12 USD). Drops its databases and Redis keys at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fakes
os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")

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
from aikit.settings import Settings, load_settings
from aikit.stripe_gateway import StripeGateway, setup_spec

ADMIN_URL = os.environ.get("TEST_DATABASE_ADMIN_URL", "postgresql+pg8000://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PRICES = {  # USD per million tokens: input, cached input, output
    "gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.6},
    "gpt-4o": {"input": 2.5, "cached_input": 1.25, "output": 10},
    "o3": {"input": 2, "cached_input": 0.5, "output": 8},
    "claude-sonnet-4": {"input": 3, "cached_input": 0.3, "output": 15},
    "llama-3-70b": {"input": 0.59, "cached_input": 0.59, "output": 0.79},
}
MODELS = tuple(PRICES)


def admin_sql(sql: str) -> None:
    engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


def expected_cost(model: str, inp: int, out: int, cached: int) -> int:
    """1e-12 USD, straight from PRICES (independent of aikit.pricing)."""
    rate = {k: Decimal(str(v)) for k, v in PRICES[model].items()}
    usd = ((inp - cached) * rate["input"] + cached * rate["cached_input"] + out * rate["output"]) / 10**6
    return int(usd * 10**12)


def buffer_events(client: redis.Redis, layout: RedisLayout, settings: Settings, *, events: int, keys: int,
                  customers: int, priced: bool) -> dict[str, int]:
    """RECORD each event, pipelined, with its cost when priced; returns what each customer is due (tokens, or
    1e-12 USD)."""
    client.script_load(RECORD.source)  # RECORD.run queues EVALSHA on the pipeline
    window = settings.stripe_report_window_seconds
    first_window = (int(time.time()) // window - 3) * window
    due: dict[str, int] = {}
    key_ids = [f"key_bench{i:05d}" for i in range(keys)]
    names = [layout.record_keys(k, 0) for k in key_ids]
    pipe = client.pipeline(transaction=False)
    run = uuid.uuid4().hex[:8]
    for n in range(events):
        k = n % keys
        customer = f"cus_bench{k % customers:04d}"
        model = MODELS[n % len(MODELS)]
        inp, out = 50 + n % 977, 10 + n % 313
        cached = (n * 31) % inp  # every event has all three token types (cached may be 0 rarely)
        ts = first_window + (n * 7919 % (3 * window * 1000)) / 1000
        cost = expected_cost(model, inp, out, cached) if priced else 0
        event = UsageEvent(request_id=f"req_{run}{n:09d}", api_key_id=key_ids[k], customer_id=customer,
                           model=model, input_tokens=inp, output_tokens=out, cached_tokens=cached, ts=ts, cost=cost)
        RECORD.run(pipe, names[k], encode(event))
        due[customer] = due.get(customer, 0) + (cost if priced else inp + out)
        if len(pipe) >= 5000:
            pipe.execute()
    pipe.execute()
    return due


def one_run(fake: FakeStripe, client: redis.Redis, args: argparse.Namespace, *, priced: bool) -> dict[str, Any]:
    db = f"aikit_bench_{uuid.uuid4().hex[:10]}"
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    admin_sql(f'CREATE DATABASE "{db}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + db
    try:
        upgrade(url)
        settings = load_settings(
            database_url=url, redis_url=REDIS_URL, redis_key_prefix=prefix, stripe_secret_key=fake.api_key,
            stripe_api_base=fake.url, stripe_timeout_seconds=5.0, redis_timeout_seconds=30.0, _env_file=None,
            price_table=PRICES if priced else {})
        spec = setup_spec(settings)
        gateway = StripeGateway(settings)
        gateway.ensure_setup(event_name=spec.event_name, spec=spec)
        gateway.close()
        due = buffer_events(client, RedisLayout(prefix, settings.redis_usage_shards), settings,
                            events=args.events, keys=args.keys, customers=args.customers, priced=priced)
        before = fake.calls["/v1/billing/meter_events"]
        seen = len(fake.meter_events)
        flusher = Flusher(settings)
        started = time.perf_counter()
        summary = flusher.run()
        wall = time.perf_counter() - started
        flusher.close()
        get_engine(url).dispose()
        mine = [e for e in fake.meter_events[seen:] if e.event_name == spec.event_name and e.counted]
        totals: dict[str, int] = {}
        for e in mine:  # this run's events only: the same customers are billed in every run
            totals[e.customer] = totals.get(e.customer, 0) + e.value
        windows = len({e.timestamp - e.timestamp % settings.stripe_report_window_seconds for e in mine})
        calls = fake.calls["/v1/billing/meter_events"] - before
        return {
            "meter": spec.event_name,
            "flush_wall_seconds": round(wall, 2),
            "events_per_second_drained": round(summary.events_read / summary.drain_seconds)
            if summary.drain_seconds else None,
            "events_read": summary.events_read,
            "stripe_calls": calls,
            "stripe_calls_per_window": round(calls / windows, 1) if windows else None,
            "stripe_totals_match": totals == due,
            "summary_ok": summary.ok,
        }
    finally:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        admin_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--keys", type=int, default=500)
    p.add_argument("--customers", type=int, default=50)
    p.add_argument("--rounds", type=int, default=2, choices=(1, 2), help="flushes of each kind (A B B A)")
    args = p.parse_args()
    client = redis.Redis.from_url(REDIS_URL)
    result: dict[str, Any] = {"events": args.events, "keys": args.keys, "customers": args.customers,
                              "models": len(MODELS), "token_types": 3}
    try:
        with FakeStripe(rate_limit=1000) as fake:
            for c in range(args.customers):
                fake.add_customer(customer_id=f"cus_bench{c:04d}")
            # A B B A: neither side always runs first (warm-up, other load on the machine); the best of each.
            runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
            for priced in [False, True, True, False][: 2 * args.rounds]:
                runs[priced].append(one_run(fake, client, args, priced=priced))
            for priced, name in ((False, "unpriced"), (True, "priced")):
                best = max(runs[priced], key=lambda r: r["events_per_second_drained"] or 0)
                result[name] = {**best, "events_per_second_each_round": [
                    r["events_per_second_drained"] for r in runs[priced]],
                    "all_totals_match": all(r["stripe_totals_match"] for r in runs[priced])}
    finally:
        client.close()
    a, b = result["unpriced"], result["priced"]
    if a["events_per_second_drained"] and b["events_per_second_drained"]:
        result["throughput_ratio_priced_vs_unpriced"] = round(
            b["events_per_second_drained"] / a["events_per_second_drained"], 2)
    if a["stripe_calls"]:
        result["stripe_calls_ratio_priced_vs_unpriced"] = round(b["stripe_calls"] / a["stripe_calls"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
