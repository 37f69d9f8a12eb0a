"""Shared fixtures: every test session gets its own Postgres database and its own Redis key space.

REDIS_URL / TEST_DATABASE_ADMIN_URL override the machine's services (127.0.0.1:6379 and :5432).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from aikit.api.app import create_app
from aikit.db.engine import get_engine
from aikit.db.migrate import upgrade
from aikit.keys import IssuedKey, create_key
from aikit.runtime import Runtime
from aikit.settings import Settings, load_settings

ADMIN_URL = os.environ.get("TEST_DATABASE_ADMIN_URL", "postgresql+pg8000://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"  # ADMIN_TOKEN must have 32+ characters


def _create_database(name: str) -> str:
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def _drop_database(name: str) -> None:
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@contextlib.contextmanager
def migrated_database(label: str = "test") -> Iterator[str]:
    """A fresh Postgres database with the schema applied; dropped afterwards."""
    name = f"aikit_{label}_{uuid.uuid4().hex[:10]}"
    url = _create_database(name)
    try:
        upgrade(url)
        yield url
    finally:
        get_engine(url).dispose()
        _drop_database(name)


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


def make_settings(database_url: str, redis_prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": REDIS_URL,
        "redis_key_prefix": redis_prefix,
        "admin_token": ADMIN_TOKEN,
        "llm_provider": "echo",
        "stripe_secret_key": None,
        "flush_interval_seconds": 0,
        "_env_file": None,
    }
    values.update(overrides)
    return load_settings(**values)


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


def issue_key(settings: Settings, **kwargs: Any) -> IssuedKey:
    kwargs.setdefault("email", f"{uuid.uuid4().hex[:8]}@example.com")
    with Session(get_engine(settings.database_url)) as session:
        issued = create_key(session, settings, **kwargs)
        session.commit()
    return issued


@pytest.fixture
def api_key(settings: Settings) -> IssuedKey:
    return issue_key(settings, rpm=1000, rpd=100_000, monthly_tokens=10_000_000)


def read_sdk_stream(stream: Any) -> tuple[str, Any]:
    """The text and the final usage chunk's usage of an openai SDK chat stream."""
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    return text, usage
