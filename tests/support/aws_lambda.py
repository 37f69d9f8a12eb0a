"""Driving the Lambda handlers in-process: a Lambda context, HTTP API proxy events, invoking a handler
module and reading its answer.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import importlib.util
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import aikit.runtime
from aikit.settings import get_settings
from tests.support.settings import REDIS_URL

ROOT = Path(__file__).resolve().parents[2]
HANDLER_FILE = ROOT / "functions" / "api" / "app.py"
SAM = ROOT / ".venv-sam" / "bin" / "sam"


def hand_built_event() -> dict[str, Any]:
    return {
        "version": "2.0", "routeKey": "$default", "rawPath": "/", "rawQueryString": "", "headers": {},
        "requestContext": {
            "accountId": "123456789012", "apiId": "api-id", "domainName": "id.execute-api.us-east-1.amazonaws.com",
            "domainPrefix": "id", "requestId": "id", "routeKey": "$default", "stage": "$default",
            "time": "27/Nov/2026:11:00:00 +0000", "timeEpoch": 1795777200000,
            "http": {"method": "GET", "path": "/", "protocol": "HTTP/1.1", "sourceIp": "192.168.0.1",
                     "userAgent": "agent"},
        },
        "isBase64Encoded": False,
    }


def http_event(template: dict[str, Any], method: str, path: str, body: Any = None,
               headers: dict[str, str] | None = None, *, b64: bool = False) -> dict[str, Any]:
    event = copy.deepcopy(template)
    for optional in ("cookies", "queryStringParameters", "pathParameters", "stageVariables"):
        event.pop(optional, None)
    event["rawPath"] = path
    event["rawQueryString"] = ""
    event["requestContext"]["http"].update(method=method, path=path)
    event["requestContext"]["requestId"] = uuid.uuid4().hex
    # HTTP APIs lower-case header names.
    event["headers"] = {"host": "id.execute-api.us-east-1.amazonaws.com", "user-agent": "pytest",
                        **{k.lower(): v for k, v in (headers or {}).items()}}
    if body is None:
        event.pop("body", None)
        event["isBase64Encoded"] = False
    else:
        raw = json.dumps(body)
        event["headers"]["content-type"] = "application/json"
        event["body"] = base64.b64encode(raw.encode()).decode() if b64 else raw
        event["isBase64Encoded"] = b64
    return event


def invoke(module: ModuleType, event: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = module.handler(event, LambdaContext("aikit-api", remaining_ms=29_000))
    return response


def body_of(response: dict[str, Any]) -> str:
    raw: str = response.get("body") or ""
    return base64.b64decode(raw).decode() if response.get("isBase64Encoded") else raw


def header(response: dict[str, Any], name: str) -> str | None:
    for key, value in (response.get("headers") or {}).items():
        if key.lower() == name.lower():
            return str(value)
    return None


class LambdaContext:
    """The context object the Lambda runtime passes to a handler, for the function `function_name`."""

    function_version = "$LATEST"

    def __init__(self, function_name: str, *, remaining_ms: int = 30_000, memory_limit_in_mb: int = 512,
                 aws_request_id: str | None = None, log_group_name: str | None = None,
                 log_stream_name: str = "2026/01/01/[$LATEST]0123456789abcdef") -> None:
        self.function_name = function_name
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{function_name}"
        self.memory_limit_in_mb = memory_limit_in_mb
        self.aws_request_id = aws_request_id or str(uuid.uuid4())
        self.log_group_name = log_group_name or f"/aws/lambda/{function_name}"
        self.log_stream_name = log_stream_name
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def http_api_event_template() -> dict[str, Any]:
    """The HTTP API proxy event the SAM CLI generates (its own venv, when installed), else the same shape
    built by hand."""
    if SAM.exists():
        out = subprocess.run([str(SAM), "local", "generate-event", "apigateway", "http-api-proxy"],
                             capture_output=True, text=True, timeout=60, env={"SAM_CLI_TELEMETRY": "0",
                                                                              "PATH": "/usr/bin:/bin"})
        if out.returncode == 0:
            event: dict[str, Any] = json.loads(out.stdout[out.stdout.index("{"):])
            assert event["version"] == "2.0" and event["routeKey"] == "$default"
            return event
    return hand_built_event()


@contextlib.contextmanager
def cold_started_api(pg_url: str, redis_prefix: str, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """Imports functions/api/app.py like a cold start: configuration only from the environment."""
    monkeypatch.chdir(tmp_path)  # no .env file
    for name, value in {"DATABASE_URL": pg_url, "REDIS_URL": REDIS_URL, "REDIS_KEY_PREFIX": redis_prefix,
                        "LLM_PROVIDER": "echo", "FLUSH_INTERVAL_SECONDS": "0", "POWERTOOLS_TRACE_DISABLED": "true",
                        "POWERTOOLS_SERVICE_NAME": "aikit"}.items():
        monkeypatch.setenv(name, value)
    for name in ("STRIPE_SECRET_KEY", "DATABASE_SECRET_ARN", "STRIPE_SECRET_ARN", "ADMIN_TOKEN_SECRET_ARN",
                 "LLM_SECRET_ARN"):
        monkeypatch.delenv(name, raising=False)
    with imported_api_handler(monkeypatch) as module:
        yield module


@contextlib.contextmanager
def imported_api_handler(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """functions/api/app.py imported afresh, as a cold start does, with the environment and cwd as they are."""
    monkeypatch.setattr(aikit.runtime, "_runtime", None)
    get_settings.cache_clear()
    spec = importlib.util.spec_from_file_location(f"api_lambda_{uuid.uuid4().hex[:8]}", HANDLER_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        yield module
    finally:
        get_settings.cache_clear()
