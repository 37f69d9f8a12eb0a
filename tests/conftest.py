"""Shared fixtures: every test session gets its own Postgres database and its own Redis key space.

REDIS_URL / TEST_DATABASE_ADMIN_URL override the machine's services (127.0.0.1:6379 and :5432).
"""

from __future__ import annotations

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
from fastapi.testclient import TestClient

import aikit.runtime
from aikit.api.app import create_app
from aikit.keys import IssuedKey
from aikit.runtime import Runtime
from aikit.settings import Settings, get_settings
from tests.support.api import issue_key
from tests.support.aws_lambda import HANDLER_FILE, SAM, hand_built_event
from tests.support.db import migrated_database
from tests.support.settings import REDIS_URL, make_settings


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, migrated Postgres database for this test session."""
    with migrated_database() as url:
        yield url


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """A fresh, migrated Postgres database for one test (for totals that must start from zero)."""
    with migrated_database() as url:
        yield url


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A Redis key space of this test's own, deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
def settings(pg_url: str, redis_prefix: str) -> Settings:
    return make_settings(pg_url, redis_prefix)


@pytest.fixture
def runtime(settings: Settings) -> Runtime:
    return Runtime(settings)


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime=runtime)) as c:
        yield c


@pytest.fixture
def api_key(settings: Settings) -> IssuedKey:
    return issue_key(settings, rpm=1000, rpd=100_000, monthly_tokens=10_000_000)



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
    return hand_built_event()


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
