"""Fixtures shared by every test directory: every test session gets its own Postgres database and its own Redis
key space. Fixtures only: the helpers they use live in tests/support/.

TEST_REDIS_URL / TEST_DATABASE_ADMIN_URL override the machine's services (127.0.0.1:6379 and :5432).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from aikit.api.app import create_app
from aikit.keys import IssuedKey
from aikit.runtime import Runtime
from aikit.settings import Settings
from tests.support.api import issue_key
from tests.support.aws_lambda import cold_started_api, http_api_event_template
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
    return http_api_event_template()


@pytest.fixture
def lambda_module(pg_url: str, redis_prefix: str, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """functions/api/app.py imported like a cold start: configuration only from the environment."""
    with cold_started_api(pg_url, redis_prefix, tmp_path, monkeypatch) as module:
        yield module


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def key(pg_url: str, redis_prefix: str) -> IssuedKey:
    """A key with small limits (modules that need other limits declare their own `key`)."""
    return issue_key(make_settings(pg_url, redis_prefix), rpm=100, rpd=1000, monthly_tokens=100_000)
