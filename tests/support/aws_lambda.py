"""Driving the Lambda handlers in-process: a Lambda context, HTTP API proxy events, invoking a handler
module and reading its answer.
"""

from __future__ import annotations

import base64
import copy
import json
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


HANDLER_FILE = ROOT / "functions" / "api" / "app.py"


SAM = ROOT / ".venv-sam" / "bin" / "sam"


class FakeLambdaContext:
    function_name = "aikit-api"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:aikit-api"
    memory_limit_in_mb = 512
    log_group_name = "/aws/lambda/aikit-api"
    log_stream_name = "2026/11/27/[$LATEST]0123456789abcdef"

    def __init__(self) -> None:
        self.aws_request_id = str(uuid.uuid4())

    def get_remaining_time_in_millis(self) -> int:
        return 29_000


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
    response: dict[str, Any] = module.handler(event, FakeLambdaContext())
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
    function_name = "aikit-flush"
    function_version = "$LATEST"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:aikit-flush"
    log_group_name = "/aws/lambda/aikit-flush"
    log_stream_name = "2026/01/01/[$LATEST]0123456789abcdef"

    def __init__(self, remaining_ms: int) -> None:
        self.remaining_ms = remaining_ms
        self.aws_request_id = str(uuid.uuid4())

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms
