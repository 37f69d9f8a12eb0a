"""Benchmark of GET /v1/usage at scale (not a test).

    .venv/bin/python bench/bench_usage.py --rows 10000000

Creates its own Postgres database, bulk-loads `--rows` api_key_usage rows for ONE key spread over `--days` days
and a few models (server-side INSERT ... SELECT generate_series, split over parallel connections, indexes
built after the load), derives usage_daily from them with one INSERT ... SELECT ... GROUP BY (what the flush
would have produced), then times GET /v1/usage?period=last_30_days in-process (httpx + ASGITransport) and
runs EXPLAIN ANALYZE of the documented per-day query on api_key_usage. Prints one JSON document; drops the
database (and its Redis keys) at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
# stdout carries the result JSON only: keep aikit's EMF metric lines off it.
os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")

import httpx
import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from aikit.api.app import create_app
from aikit.db.engine import get_engine
from aikit.db.migrate import upgrade
from aikit.keys import create_key
from aikit.runtime import Runtime
from aikit.settings import load_settings

ADMIN_URL = os.environ.get("TEST_DATABASE_ADMIN_URL", "postgresql+pg8000://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "llama-3-70b", "mistral-large", "gemini-1.5-pro"]
DOCUMENTED_QUERY = ("SELECT date, SUM(tokens) as total_tokens, COUNT(*) as requests FROM api_key_usage "
                    "WHERE api_key_id = '{kid}' GROUP BY date ORDER BY date DESC;")

# One slice of the rows; ids are given explicitly (no sequence round trip per row), the sequence is set after.
LOAD_SLICE = """
INSERT INTO api_key_usage (id, request_id, api_key_id, customer_id, date, ts, model, input_tokens,
                           output_tokens, cached_tokens, tokens, billable)
SELECT g, 'bench_' || g, :kid, :cus, (t AT TIME ZONE 'UTC')::date, t, m, i, o, c, i + o, true
FROM (
  SELECT g,
         to_timestamp(CAST(:end_ts AS double precision) - (g - 1) * CAST(:step AS double precision)) AS t,
         (CAST(:models AS text[]))[1 + mod(g, CAST(:n_models AS int))] AS m,
         CAST(50 + mod(g * 7919, 2000) AS int) AS i,
         CAST(10 + mod(g * 104729, 800) AS int) AS o,
         CAST(mod(g * 31, 50) AS int) AS c  -- never more than input: mod() (pg8000 reads % as a placeholder)
  FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS g
) s
"""

ROLLUP = """
INSERT INTO usage_daily (api_key_id, date, model, customer_id, requests, input_tokens, output_tokens,
                         cached_tokens, tokens)
SELECT api_key_id, date, model, max(customer_id), count(*), sum(input_tokens), sum(output_tokens),
       sum(cached_tokens), sum(tokens)
FROM api_key_usage GROUP BY api_key_id, date, model
"""

# Other keys' rollups, so usage_daily is not a table of one key.
NOISE = """
INSERT INTO usage_daily (api_key_id, date, model, customer_id, requests, input_tokens, output_tokens,
                         cached_tokens, tokens)
SELECT 'key_noise_' || k, d::date, 'gpt-4o', 'cus_noise_' || k, 10, 1000, 500, 0, 1500
FROM generate_series(1, CAST(:keys AS int)) AS k,
     generate_series(CAST(:first AS date), CAST(:last AS date), interval '1 day') AS d
"""


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def admin_engine() -> Engine:
    return create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")


def create_database(name: str) -> str:
    eng = admin_engine()
    with eng.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_database(name: str) -> None:
    eng = admin_engine()
    with eng.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    eng.dispose()


def fast_session(conn: Any) -> None:
    # Session settings only. Not synchronous_commit=off: there are few commits to save, and until an
    # asynchronous commit reaches disk VACUUM cannot mark its pages all-visible (index-only scans need that).
    conn.execute(text("SET maintenance_work_mem = '512MB'"))
    conn.execute(text("SET max_parallel_maintenance_workers = 2"))
    conn.execute(text("SET work_mem = '64MB'"))


def table_indexes(engine: Engine) -> list[tuple[str, str, str | None]]:
    """(index name, CREATE INDEX statement, constraint type p/u or None) of api_key_usage."""
    with engine.connect() as conn:
        rows = conn.execute(text("""
            SELECT i.relname, pg_get_indexdef(i.oid), c.contype
            FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
            LEFT JOIN pg_constraint c ON c.conindid = i.oid AND c.conrelid = x.indrelid
            WHERE x.indrelid = 'api_key_usage'::regclass ORDER BY i.relname""")).all()
    return [(str(r[0]), str(r[1]), None if r[2] is None else str(r[2])) for r in rows]


def load(engine: Engine, *, rows: int, days: int, n_models: int, kid: str, cus: str, workers: int,
         noise_keys: int) -> dict[str, Any]:
    timings: dict[str, Any] = {}
    indexes = table_indexes(engine)
    # Bulk-load practice: drop the indexes, load, rebuild them with the definitions read above.
    with engine.begin() as conn:
        for name, _, contype in indexes:
            if contype:
                conn.execute(text(f'ALTER TABLE api_key_usage DROP CONSTRAINT "{name}"'))
            else:
                conn.execute(text(f'DROP INDEX "{name}"'))

    end_ts = time.time()
    step = days * 86400 / rows
    models = "{" + ",".join(MODELS[:n_models]) + "}"
    bounds = [(1 + rows * i // workers, rows * (i + 1) // workers) for i in range(workers)]

    def slice_(lo: int, hi: int) -> None:
        with engine.begin() as conn:
            fast_session(conn)
            conn.execute(text(LOAD_SLICE), {"kid": kid, "cus": cus, "end_ts": end_ts, "step": step,
                                            "models": models, "n_models": n_models, "lo": lo, "hi": hi})

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda b: slice_(*b), bounds))
    timings["insert_rows_s"] = round(time.perf_counter() - t0, 1)

    def build(stmt: str) -> None:
        with engine.begin() as conn:
            fast_session(conn)
            conn.execute(text(stmt))

    t0 = time.perf_counter()
    # CREATE INDEX takes a SHARE lock, so the builds can run side by side; constraints attach after.
    with ThreadPoolExecutor(min(workers, len(indexes)) or 1) as pool:
        list(pool.map(build, [ddl for _, ddl, _ in indexes]))
    with engine.begin() as conn:
        for name, _, contype in indexes:
            kind = {"p": "PRIMARY KEY", "u": "UNIQUE"}.get(contype or "")
            if kind:
                conn.execute(text(f'ALTER TABLE api_key_usage ADD CONSTRAINT "{name}" {kind} USING INDEX "{name}"'))
        conn.execute(text("SELECT setval(pg_get_serial_sequence('api_key_usage', 'id'), :n)"), {"n": rows})
    timings["build_indexes_s"] = round(time.perf_counter() - t0, 1)
    assert table_indexes(engine) == indexes, "indexes were not rebuilt as they were"

    t0 = time.perf_counter()
    with engine.begin() as conn:
        fast_session(conn)
        conn.execute(text(ROLLUP))
        first, last = conn.execute(text("SELECT min(date), max(date) FROM api_key_usage")).one()
        conn.execute(text(NOISE), {"keys": noise_keys, "first": first, "last": last})
    timings["rollups_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    autocommit = create_engine(engine.url, isolation_level="AUTOCOMMIT")  # VACUUM refuses a transaction
    with autocommit.connect() as conn:
        fast_session(conn)
        # Sets the visibility map (index-only scans need it) and the planner statistics.
        conn.execute(text("VACUUM (ANALYZE) api_key_usage"))
        conn.execute(text("VACUUM (ANALYZE) usage_daily"))
    autocommit.dispose()
    timings["vacuum_analyze_s"] = round(time.perf_counter() - t0, 1)
    with engine.connect() as conn:
        timings["api_key_usage_size"] = conn.execute(
            text("SELECT pg_size_pretty(pg_total_relation_size('api_key_usage'))")).scalar_one()
        pages, visible = conn.execute(text(
            "SELECT relpages, relallvisible FROM pg_class WHERE relname = 'api_key_usage'")).one()
        timings["all_visible_pages"] = f"{visible}/{pages}"
        timings["usage_daily_rows"] = conn.execute(text("SELECT count(*) FROM usage_daily")).scalar_one()
        timings["first_date"], timings["last_date"] = (str(first), str(last))
    return timings


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out.extend(plan_nodes(child))
    return out


def explain(engine: Engine, sql: str, *, settings: tuple[str, ...] = ()) -> dict[str, Any]:
    with engine.connect() as conn:
        for s in settings:
            conn.execute(text(s))
        conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}"))  # warm the cache once
        doc = conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}")).scalar_one()
        conn.rollback()
    doc = json.loads(doc) if isinstance(doc, str) else doc
    top = doc[0]
    nodes = plan_nodes(top["Plan"])
    scans = [n for n in nodes if "Scan" in n["Node Type"]]
    return {
        "settings": list(settings),
        "execution_ms": round(top["Execution Time"], 2),
        "planning_ms": round(top["Planning Time"], 2),
        "scan": [{"node": n["Node Type"], "index": n.get("Index Name"), "heap_fetches": n.get("Heap Fetches"),
                  "workers": n.get("Workers Launched")} for n in scans],
        "used_ix_api_key_usage_key_date": any(n.get("Index Name") == "ix_api_key_usage_key_date" for n in scans),
        "index_only_scan": any(n["Node Type"] == "Index Only Scan" for n in scans),
        "plan": " -> ".join(n["Node Type"] for n in nodes),
    }


async def time_requests(app: Any, secret: str, n: int) -> tuple[list[float], dict[str, Any]]:
    headers = {"Authorization": f"Bearer {secret}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        first = None
        for _ in range(20):  # warm-up: connection pool, key cache, statement caches
            r = await client.get("/v1/usage", params={"period": "last_30_days"}, headers=headers)
            assert r.status_code == 200, r.text
            first = r.json()
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = await client.get("/v1/usage", params={"period": "last_30_days"}, headers=headers)
            samples.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
    assert first is not None
    return samples, first


async def record_pending(runtime: Runtime, kid: str, cus: str) -> int:
    tokens = 0
    for i in range(5):
        await runtime.meter.record(kid, 100 + i, cus, model=MODELS[0], input_tokens=60, output_tokens=40 + i)
        tokens += 100 + i
    return tokens


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--days", type=int, default=400)
    ap.add_argument("--models", type=int, default=4, choices=range(1, len(MODELS) + 1))
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="parallel load connections")
    ap.add_argument("--noise-keys", type=int, default=1000, help="other keys with rollups over the same days")
    ap.add_argument("--keep", action="store_true", help="keep the database (prints its URL)")
    args = ap.parse_args()

    name = f"aikit_bench_usage_{uuid.uuid4().hex[:10]}"
    prefix = f"benchusage{uuid.uuid4().hex[:8]}"
    result: dict[str, Any] = {"rows": args.rows, "days": args.days, "models": args.models,
                              "cpus": os.cpu_count()}
    url = create_database(name)
    try:
        t_all = time.perf_counter()
        upgrade(url)
        settings = load_settings(database_url=url, redis_url=REDIS_URL, redis_key_prefix=prefix,
                                 llm_provider="echo", stripe_secret_key=None, flush_interval_seconds=0,
                                 price_table={m: {"input": 0.0025, "output": 0.01} for m in MODELS[:2]},
                                 _env_file=None)
        engine = get_engine(url)
        with Session(engine) as session:
            issued = create_key(session, settings, email="bench@example.com", customer_id="cus_bench",
                                rpm=1_000_000, rpd=10_000_000, monthly_tokens=None)
            session.commit()
        kid = issued.api_key_id
        result["load"] = load(engine, rows=args.rows, days=args.days, n_models=args.models, kid=kid,
                              cus="cus_bench", workers=args.workers, noise_keys=args.noise_keys)
        result["load"]["total_s"] = round(time.perf_counter() - t_all, 1)

        runtime = Runtime(settings)
        app = create_app(runtime=runtime)
        if not any(getattr(r, "path", None) == "/v1/usage" for r in app.routes):
            from aikit.api.routes import usage as usage_routes

            app.include_router(usage_routes.router)

        async def run() -> tuple[list[float], dict[str, Any], int]:
            pending = await record_pending(runtime, kid, "cus_bench")
            samples, body = await time_requests(app, issued.api_key, args.requests)
            await runtime.aclose()
            return samples, body, pending

        load_before = os.getloadavg()[0]
        samples, body, pending_tokens = asyncio.run(run())
        load_after = os.getloadavg()[0]
        with engine.connect() as conn:
            flushed = conn.execute(text(
                "SELECT coalesce(sum(tokens), 0) FROM usage_daily WHERE api_key_id = :k "
                "AND date >= (now() AT TIME ZONE 'UTC')::date - 29"), {"k": kid}).scalar_one()
        assert body["tokens_used"] == int(flushed) + pending_tokens, (body["tokens_used"], flushed)
        result["usage_endpoint"] = {
            "path": "/v1/usage?period=last_30_days",
            "requests": len(samples),
            "p50_ms": ms(statistics.median(samples)),
            "p99_ms": ms(percentile(samples, 99)),
            "max_ms": ms(max(samples)),
            "mean_ms": ms(statistics.fmean(samples)),
            "target_p99_ms": 20,
            "meets_target": percentile(samples, 99) < 0.020,
            "tokens_used": body["tokens_used"],
            "requests_counted": body["requests"],
            "days_returned": len(body["by_day"]),
            # Other work on the machine shows up in the tail: the 1-minute load average around the timing.
            "loadavg_1m_before_after": [round(load_before, 2), round(load_after, 2)],
        }

        query = DOCUMENTED_QUERY.format(kid=kid)
        result["documented_query"] = {"sql": query, "default_plan": explain(engine, query)}
        if not result["documented_query"]["default_plan"]["index_only_scan"]:
            # What the index alone would do, for comparison with the planner's choice.
            result["documented_query"]["forced_index_plan"] = explain(
                engine, query, settings=("SET enable_seqscan = off", "SET enable_bitmapscan = off"))
        result["rollup_query"] = explain(
            engine, "SELECT date, SUM(tokens) AS total_tokens, SUM(requests) AS requests FROM usage_daily "
                    f"WHERE api_key_id = '{kid}' GROUP BY date ORDER BY date DESC")
        engine.dispose()
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()
        if args.keep:
            result["database_url"] = url
        else:
            get_engine(url).dispose()
            drop_database(name)
            result["database_dropped"] = name
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
