"""Runs inside the clean runtime venv (the built layer + boto3, nothing else): imports ./app.py the way Lambda's
Python runtime imports a handler (module `app` from the function directory, the layer on sys.path), invokes
`handler` with the JSON event read from stdin and a Lambda-shaped context, and prints one line
`DRIVER_RESULT {"result": ..., "foreign": [...]}` where foreign lists modules imported from outside the layer, the
venv and the standard library (a leak from the developer's checkout would hide a missing dependency).

    python lambda_driver.py [remaining_ms]   (cwd: the built function directory)
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import uuid
from typing import Any

MARKER = "DRIVER_RESULT "


class Context:
    function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "aikit-fn")
    function_version = "$LATEST"
    invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{function_name}"
    memory_limit_in_mb = 1024
    log_group_name = f"/aws/lambda/{function_name}"
    log_stream_name = "2026/12/01/[$LATEST]0123456789abcdef"

    def __init__(self, remaining_ms: int) -> None:
        self.aws_request_id = str(uuid.uuid4())
        self._deadline = time.monotonic() + remaining_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return int((self._deadline - time.monotonic()) * 1000)


def foreign_modules(allowed: list[str]) -> list[str]:
    found = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and not any(os.path.abspath(path).startswith(root) for root in allowed):
            found.append(f"{name}: {path}")
    return sorted(found)


def main() -> int:
    remaining_ms = int(sys.argv[1]) if len(sys.argv) > 1 else 60_000
    task_root = os.getcwd()
    sys.path.insert(0, task_root)
    event: Any = json.loads(sys.stdin.read() or "{}")
    module = importlib.import_module("app")
    # DRIVER_IMPORT_ONLY: a cold start's init phase and nothing more.
    result = None if os.environ.get("DRIVER_IMPORT_ONLY") else module.handler(event, Context(remaining_ms))
    allowed = [os.path.abspath(p) for p in (task_root, sys.prefix, sys.base_prefix,
                                             *os.environ.get("PYTHONPATH", "").split(os.pathsep)) if p]
    allowed.append(os.path.abspath(os.path.dirname(__file__)))
    sys.stdout.flush()
    print(MARKER + json.dumps({"result": result, "foreign": foreign_modules(allowed)}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
