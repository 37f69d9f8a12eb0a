"""The API Lambda in-process: functions/api/app.py loaded from its file as Lambda would, invoked with API Gateway
HTTP API (payload 2.0) events and a Lambda-shaped context, against real Postgres and Redis."""

from __future__ import annotations

import base64
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
import redis

import aikit.runtime
from aikit.flush import Flusher
from aikit.keys import IssuedKey
from aikit.runtime import Runtime
from aikit.settings import get_settings
from tests.conftest import REDIS_URL, issue_key, make_settings

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


def _hand_built_event() -> dict[str, Any]:
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


@pytest.fixture(scope="module")
def event_template() -> dict[str, Any]:
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
    return _hand_built_event()


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


@pytest.fixture
def lambda_module(pg_url: str, redis_prefix: str, tmp_path: Path,
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


def pending_tokens(runtime: Runtime, api_key_id: str) -> int:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    values = client.hgetall(runtime.layout.pending(api_key_id))
    client.close()
    return sum(int(v) for k, v in values.items() if k.endswith("|t"))


def stream_entries(runtime: Runtime, api_key_id: str) -> list[dict[str, str]]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    entries = client.xrange(runtime.layout.stream(runtime.layout.shard_of(api_key_id)))
    client.close()
    return [fields for _, fields in entries if fields["k"] == api_key_id]


@pytest.fixture
def key(pg_url: str, redis_prefix: str) -> IssuedKey:
    return issue_key(make_settings(pg_url, redis_prefix), rpm=100, rpd=1000, monthly_tokens=100_000)


def test_handler_is_wrapped_mangum_without_lifespan(lambda_module: ModuleType) -> None:
    wrapped = getattr(lambda_module.handler, "__wrapped__", lambda_module.handler)
    assert type(wrapped).__name__ == "Mangum"
    assert wrapped.lifespan == "off"


def test_healthz(lambda_module: ModuleType, event_template: dict[str, Any]) -> None:
    response = invoke(lambda_module, http_event(event_template, "GET", "/healthz"))
    assert response["statusCode"] == 200
    assert json.loads(body_of(response)) == {"status": "ok"}


def test_chat_completion_through_the_handler_is_metered(lambda_module: ModuleType, event_template: dict[str, Any],
                                                        key: IssuedKey) -> None:
    runtime: Runtime = lambda_module.app.state.runtime
    auth = {"Authorization": f"Bearer {key.api_key}"}
    body = {"model": "echo-1", "messages": [{"role": "user", "content": "one two three"}]}
    response = invoke(lambda_module, http_event(event_template, "POST", "/v1/chat/completions", body, auth))
    assert response["statusCode"] == 200, body_of(response)
    reply = json.loads(body_of(response))
    assert reply["choices"][0]["message"]["content"] == "echo: one two three"
    assert reply["usage"]["total_tokens"] == 7
    assert header(response, "x-ratelimit-limit-requests") == "100"
    request_id = header(response, "x-request-id")
    # A base64-encoded body (API Gateway sends binary content that way) works the same; a warm container
    # answers from its key cache.
    again = invoke(lambda_module, http_event(event_template, "POST", "/v1/chat/completions", body, auth, b64=True))
    assert again["statusCode"] == 200, body_of(again)
    assert [e["r"] for e in stream_entries(runtime, key.api_key_id)] == [request_id, header(again, "x-request-id")]
    assert pending_tokens(runtime, key.api_key_id) == 14

    summary = Flusher(runtime.settings).run()
    assert summary.ok and summary.rows_inserted == 2
    assert pending_tokens(runtime, key.api_key_id) == 0


def test_errors_through_the_handler(lambda_module: ModuleType, event_template: dict[str, Any],
                                    key: IssuedKey) -> None:
    body = {"messages": [{"role": "user", "content": "x"}]}
    missing = invoke(lambda_module, http_event(event_template, "POST", "/v1/chat/completions", body))
    assert missing["statusCode"] == 401
    assert json.loads(body_of(missing))["error"]["code"] == "missing_api_key"
    bad = invoke(lambda_module, http_event(event_template, "POST", "/v1/chat/completions", {"messages": []},
                                           {"Authorization": f"Bearer {key.api_key}"}))
    assert bad["statusCode"] == 422
    assert json.loads(body_of(bad))["error"]["param"] == "messages"


def test_streaming_through_mangum_is_buffered_whole_and_metered(
        lambda_module: ModuleType, event_template: dict[str, Any], key: IssuedKey) -> None:
    runtime: Runtime = lambda_module.app.state.runtime
    body = {"model": "echo-1", "messages": [{"role": "user", "content": "alpha beta gamma"}], "stream": True,
            "stream_options": {"include_usage": True}}
    response = invoke(lambda_module, http_event(event_template, "POST", "/v1/chat/completions", body,
                                                {"Authorization": f"Bearer {key.api_key}"}))
    assert response["statusCode"] == 200
    assert (header(response, "content-type") or "").startswith("text/event-stream")
    # Mangum never streams: the whole SSE body comes back in one response.
    events = [line.removeprefix("data: ") for line in body_of(response).split("\n\n") if line]
    assert events[-1] == "data: [DONE]".removeprefix("data: ")
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "echo: alpha beta gamma"
    usage = chunks[-1]["usage"]
    assert usage["total_tokens"] == 3 + 4
    # Metered before the handler returned (a frozen Lambda runs nothing afterwards).
    entries = stream_entries(runtime, key.api_key_id)
    assert [e["r"] for e in entries] == [header(response, "x-request-id")]
    assert pending_tokens(runtime, key.api_key_id) == 7


def test_the_sample_event_in_the_repository_works(lambda_module: ModuleType, key: IssuedKey) -> None:
    event = json.loads((ROOT / "events" / "chat_completions.json").read_text())
    event["headers"]["authorization"] = f"Bearer {key.api_key}"
    response = invoke(lambda_module, event)
    assert response["statusCode"] == 200, body_of(response)
    assert json.loads(body_of(response))["choices"][0]["message"]["content"] == "echo: Say hello"
