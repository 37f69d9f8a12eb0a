"""`make bench`: run every benchmark as a subprocess, collect their JSON into bench/results/latest.json and
print a table.

    .venv/bin/python bench/run.py [--only api,flush,usage] [--quick]

bench_api.py always runs; bench_flush.py, bench_usage.py and bench_coldstart.py (handler import times from the
sam-built layer against `import fastapi, mangum`; builds the artifacts first if they are not cached) run when
present. Defaults are small but
meaningful so the whole run stays under ~10 minutes: 3,000 API requests per configuration, a flush of
1,000,000 events, /v1/usage over 10,000,000 rows (--quick divides them by 10). Each benchmark prints one JSON
document on stdout (anything else it prints is ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


def size_flags(script: Path, wanted: dict[str, int]) -> list[str]:
    """The size options the script accepts (from its --help), so a renamed option is simply not passed."""
    try:
        help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                                   timeout=120).stdout
    except subprocess.TimeoutExpired:
        return []
    flags: list[str] = []
    for flag, value in wanted.items():
        if flag in help_text.split():
            flags += [flag, str(value)]
    return flags


def last_json(stdout: str) -> Any:
    """The benchmark's JSON document: the whole output, or the last top-level {...} block in it."""
    text = stdout.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    found: Any = None
    for i, ch in enumerate(text):
        if ch == "{" and (i == 0 or text[i - 1] == "\n"):
            try:
                found, _ = decoder.raw_decode(text[i:])
            except ValueError:
                continue
    if found is None:
        raise ValueError("no JSON document in the output")
    return found


def run_one(name: str, script: Path, flags: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(script), *flags]
    print(f"--> {name}: {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}", flush=True)
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=BENCH.parent)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f}s", "seconds": round(timeout, 1)}
    seconds = round(time.monotonic() - started, 1)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"ok": False, "error": f"exit status {proc.returncode}", "stderr_tail": tail, "seconds": seconds}
    try:
        data = last_json(proc.stdout)
    except ValueError as exc:
        return {"ok": False, "error": str(exc), "seconds": seconds}
    return {"ok": True, "seconds": seconds, "command": flags, "result": data}


# -------------------------------------------------------------------------------------------- the table


def _get(data: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def api_rows(result: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for part in ("in_process", "http"):
        section = result.get(part) or {}
        for run, values in section.items():
            label = f"{part} {run.replace('concurrency_', 'c=')}"
            for config in ("with_billing", "without_billing"):
                v = values[config]
                rows.append((f"{label} {config}", f"{v['rps']} req/s, p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms"))
            rows.append((f"{label} billing overhead", f"p50 +{values['billing_overhead_p50_ms']} ms, "
                                                      f"p99 +{values['billing_overhead_p99_ms']} ms, "
                                                      f"server time +{values['billing_cost_per_request_ms']} ms"))
    for run, values in (result.get("mounted_route") or {}).items():
        if isinstance(values, dict) and "mounted_route" in values:
            label = f"mounted route vs /v1/chat/completions {run.replace('concurrency_', 'c=')}"
            mine, builtin = values["mounted_route"], values["chat_completions"]
            rows.append((label, f"{mine['rps']} vs {builtin['rps']} req/s, p50 {mine['p50_ms']} vs "
                                f"{builtin['p50_ms']} ms ({values['mounted_overhead_p50_ms']:+} ms)"))
    for key in ("redis_round_trips_per_request", "redis_scripts_per_request", "postgres_statements_per_request",
                "all_metered", "target"):
        if key in result:
            rows.append((key, result[key]))
    return rows


def ab_rows(result: dict[str, Any]) -> list[tuple[str, Any]]:
    """bench_ab.py: the A/B of `aikit serve` against a bare FastAPI echo, and the in-process overhead."""
    ab, inproc = result["ab"], result["in_process"]
    rows: list[tuple[str, Any]] = [("uvicorn", result["uvicorn"]),
                                   ("client ceiling", f"{result['client_ceiling_rps']} req/s")]
    for i, r in enumerate(ab["rounds"], 1):
        rows.append((f"round {i}", f"aikit {r['aikit_rps']} vs bare {r['bare_rps']} req/s = {r['ratio']}x; CPU "
                                   f"{r['aikit_cpu_ms']} vs {r['bare_cpu_ms']} ms/request = {r['cpu_ratio']}x"))
    target = ab["target"]
    rows += [
        ("aikit serve (median)", f"{ab['aikit']['rps']} req/s, p50 {ab['aikit']['p50_ms']} ms, "
                                 f"p99 {ab['aikit']['p99_ms']} ms, {ab['aikit']['cpu_ms_per_request']} CPU ms/request"),
        ("bare echo (median)", f"{ab['bare']['rps']} req/s, p50 {ab['bare']['p50_ms']} ms, "
                               f"p99 {ab['bare']['p99_ms']} ms, {ab['bare']['cpu_ms_per_request']} CPU ms/request"),
        ("median ratio (req/s)", f"{ab['median_ratio']}x: >= {target['ratio_at_least']}x "
                                 f"{'met' if target['met'] else 'NOT met'}, >= {target['stretch_ratio']}x "
                                 f"{'met' if target['stretch_met'] else 'not met'}"),
        ("median ratio (CPU/request)", f"{ab['median_cpu_ratio']}x: >= {target['ratio_at_least']}x "
                                       f"{'met' if target['cpu_ratio_met'] else 'NOT met'}"),
        ("non-200", ab["non_200"]), ("all_metered", result["all_metered"]),
        ("in-process c=1", f"p50 {inproc['with_billing']['p50_ms']} vs {inproc['without_billing']['p50_ms']} ms, "
                           f"p99 {inproc['with_billing']['p99_ms']} vs {inproc['without_billing']['p99_ms']} ms"),
        ("in-process billing overhead", f"p50 +{inproc['billing_overhead_p50_ms']} ms (<= "
                                        f"{inproc['target']['p50_ms_at_most']}), "
                                        f"p99 +{inproc['billing_overhead_p99_ms']} ms (<= "
                                        f"{inproc['target']['p99_ms_at_most']}): "
                                        f"{'met' if inproc['target']['met'] else 'NOT met'}"),
        ("in-process round-trip floor", f"p50 +{inproc['round_trip_floor_p50_ms']} ms for the two Redis round "
                                        f"trips alone (a script that does nothing); billing above them: p50 "
                                        f"+{inproc['billing_above_floor_p50_ms']} ms"),
        ("round trips per request", f"Redis {inproc['redis_round_trips_per_request']}, "
                                    f"Postgres {inproc['postgres_statements_per_request']}"),
    ]
    return rows


def generic_rows(result: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """Scalars of a benchmark's JSON, flattened two levels deep."""
    rows: list[tuple[str, Any]] = []
    if not isinstance(result, dict):
        return [(prefix or "result", result)]
    for key, value in result.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and depth < 1:
            rows += generic_rows(value, name, depth + 1)
        elif isinstance(value, (dict, list)):
            text = json.dumps(value)
            rows.append((name, text if len(text) <= 80 else text[:77] + "..."))
        else:
            rows.append((name, value))
    return rows


def table(results: dict[str, dict[str, Any]]) -> str:
    lines: list[tuple[str, str, str]] = []
    for name, outcome in results.items():
        if not outcome["ok"]:
            lines.append((name, "FAILED", f"{outcome['error']} ({outcome['seconds']}s)"))
            for tail in outcome.get("stderr_tail", [])[-3:]:
                lines.append(("", "", tail[:100]))
            continue
        rows = {"api": api_rows, "ab": ab_rows}.get(name, generic_rows)(outcome["result"])
        rows.append(("wall time", f"{outcome['seconds']} s"))
        for metric, value in rows:
            lines.append((name, metric, value if isinstance(value, str) else json.dumps(value)))
    w1 = max([len(a) for a, _, _ in lines] + [5])
    w2 = max([len(b) for _, b, _ in lines] + [6])
    out = [f"{'bench':<{w1}}  {'metric':<{w2}}  value", f"{'-' * w1}  {'-' * w2}  {'-' * 5}"]
    out += [f"{a:<{w1}}  {b:<{w2}}  {c}" for a, b, c in lines]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the benchmarks and collect their results.")
    p.add_argument("--only", help="comma-separated subset of: api,flush,usage,coldstart,ab,pricing")
    p.add_argument("--quick", action="store_true", help="a tenth of the default sizes")
    p.add_argument("--timeout", type=float, default=900, help="seconds per benchmark")
    args = p.parse_args(argv)
    scale = 10 if args.quick else 1
    plan = {
        "api": (BENCH / "bench_api.py", {"--requests": 3000 // scale, "--http-requests": 1000 // scale,
                                         "--concurrency": 16}),
        "flush": (BENCH / "bench_flush.py", {"--events": 1_000_000 // scale}),
        "usage": (BENCH / "bench_usage.py", {"--rows": 10_000_000 // scale}),
        "coldstart": (BENCH / "bench_coldstart.py", {"--rounds": max(3, 7 // scale)}),
        "ab": (BENCH / "bench_ab.py", {"--rounds": 5, "--seconds": 3 if scale == 1 else 1,
                                       "--requests": 2000 // scale}),
        "pricing": (BENCH / "bench_pricing.py", {"--events": 200_000 // scale}),
    }
    only = set(args.only.split(",")) if args.only else set(plan)
    unknown = only - set(plan)
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")

    results: dict[str, dict[str, Any]] = {}
    for name, (script, sizes) in plan.items():
        if name not in only:
            continue
        if not script.exists():
            print(f"--  {name}: {script.name} not present, skipped", flush=True)
            continue
        results[name] = run_one(name, script, size_flags(script, sizes), args.timeout)

    RESULTS.mkdir(exist_ok=True)
    document = {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "benchmarks": results,
    }
    (RESULTS / "latest.json").write_text(json.dumps(document, indent=2) + "\n")
    print()
    print(table(results))
    print(f"\nwritten: {(RESULTS / 'latest.json').relative_to(BENCH.parent)}")
    return 0 if results and all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
