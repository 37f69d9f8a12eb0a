"""Cold-start cost of each Lambda handler, imported from the layer `sam build` makes, as a ratio against
`import fastapi, mangum` in the same environment (issue 10's target: at most 1.5).

The artifacts are the ones tests/artifact builds and caches (.venv-artifacts/): the sam-built layer for this
machine's architecture and a clean python3.12 venv with only boto3. Each measurement is a fresh interpreter that
imports the handler module from its built function directory with the layer on its path, the way Lambda's init
phase does (module-level code included: the FastAPI app is built); no secret ARNs, tracing off unless the row
says so. Rounds interleave the reference and every handler; ratios are medians of per-round ratios.

    .venv/bin/python bench/bench_coldstart.py [--rounds 7] [--no-bytecode-row]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.artifact.builds import runtime_venv, sam_build  # noqa: E402

TARGET_RATIO = 1.5
REFERENCE = "import fastapi, mangum"
# name -> (function directory, statement, extra environment)
CASES: dict[str, tuple[str, str, dict[str, str]]] = {
    "api (Mangum, HTTP API)": ("ApiFunction", "import app", {}),
    "api (LWA: uvicorn + app)": ("ApiFunction", "import uvicorn.main, app", {}),
    "webhook": ("WebhookFunction", "import app", {}),
    "flush": ("FlushFunction", "import app", {}),
    "migrate": ("MigrateFunction", "import app", {}),
    # As deployed with Tracing: Active (X-Ray SDK loaded and patching at init).
    "api (Mangum) with tracing on": ("ApiFunction", "import app", {
        "LAMBDA_TASK_ROOT": "{task_root}", "POWERTOOLS_TRACE_DISABLED": "false",
        "AWS_XRAY_CONTEXT_MISSING": "IGNORE_ERROR"}),
    # What reading secrets from Secrets Manager adds on AWS (the Lambda runtime's boto3).
    "boto3 (secrets on AWS)": ("ApiFunction", "import boto3", {}),
}


def measure(python: Path, layer: Path, task_root: Path, statement: str, extra: dict[str, str]) -> float:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(layer), "PYTHONDONTWRITEBYTECODE": "1",
           "DATABASE_URL": "sqlite:///:memory:", "REDIS_URL": "memory://", "POWERTOOLS_TRACE_DISABLED": "true",
           "AWS_REGION": "us-east-1", **{k: v.format(task_root=task_root) for k, v in extra.items()}}
    code = (f"import sys, time; sys.path.insert(0, '.'); t = time.perf_counter(); {statement}; "
            "print('ELAPSED', time.perf_counter() - t)")
    proc = subprocess.run([str(python), "-s", "-c", code], cwd=task_root, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ELAPSED ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{statement} in {task_root.name} failed:\n{proc.stderr[-2000:]}")
    return float(lines[-1].split()[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--no-bytecode-row", action="store_true", help="skip the layer-without-bytecode comparison")
    args = p.parse_args(argv)

    build = sam_build()
    python = runtime_venv() / "bin" / "python"
    layer = build / "AikitLayer" / "python"
    cases = dict(CASES)
    stripped: Path | None = None
    if not args.no_bytecode_row:
        # The layer as aws-lambda-builders' python workflow makes it (no .pyc): what a cold start compiled before.
        stripped = Path(tempfile.mkdtemp(prefix="aikit-layer-nopyc-"))
        shutil.copytree(layer, stripped / "python", ignore=shutil.ignore_patterns("__pycache__"))
    try:
        times: dict[str, list[float]] = {name: [] for name in ["reference", *cases]}
        ratios: dict[str, list[float]] = {name: [] for name in cases}
        if stripped is not None:
            times["api (Mangum) from a layer without bytecode"] = []
            ratios["api (Mangum) from a layer without bytecode"] = []
        for _ in range(args.rounds):
            reference = measure(python, layer, build / "ApiFunction", REFERENCE, {})
            times["reference"].append(reference)
            for name, (function, statement, extra) in cases.items():
                elapsed = measure(python, layer, build / function, statement, extra)
                times[name].append(elapsed)
                ratios[name].append(elapsed / reference)
            if stripped is not None:
                name = "api (Mangum) from a layer without bytecode"
                elapsed = measure(python, stripped / "python", build / "ApiFunction", "import app", {})
                times[name].append(elapsed)
                ratios[name].append(elapsed / reference)
    finally:
        if stripped is not None:
            shutil.rmtree(stripped, ignore_errors=True)

    handlers = {"api (Mangum, HTTP API)", "api (LWA: uvicorn + app)", "webhook", "flush", "migrate"}
    result: dict[str, Any] = {
        "reference": REFERENCE,
        "reference_median_ms": round(statistics.median(times["reference"]) * 1000),
        "rounds": args.rounds,
        "target_ratio": TARGET_RATIO,
        "imports": {name: {"median_ms": round(statistics.median(times[name]) * 1000),
                           "ratio": round(statistics.median(ratios[name]), 2)} for name in ratios},
        "handlers_meeting_target": sorted(n for n in handlers if statistics.median(ratios[n]) <= TARGET_RATIO),
        "python": subprocess.run([str(python), "-V"], capture_output=True, text=True).stdout.strip(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
