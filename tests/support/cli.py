"""Running the `aikit` command line as a user does: only a shell's environment plus the given settings.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tests.support.servers import AIKIT


def aikit(*args: str, env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AIKIT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def base_env(**settings: str) -> dict[str, str]:
    """Only what a shell needs plus the given settings: nothing leaks in from the test runner's environment
    (and the cwd is a temporary directory, so no .env file is read either)."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update({"REDIS_URL": "memory://", "LLM_PROVIDER": "echo", "FLUSH_INTERVAL_SECONDS": "0",
                "POWERTOOLS_METRICS_DISABLED": "true"})
    env.update(settings)
    return env


def out_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
