"""Test databases: a fresh migrated Postgres database per session, module or test, and emptying one.

TEST_DATABASE_ADMIN_URL overrides the machine's Postgres (127.0.0.1:5432).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

from sqlalchemy import create_engine, text

from aikit.db.engine import get_engine
from aikit.db.migrate import upgrade

ADMIN_URL = os.environ.get("TEST_DATABASE_ADMIN_URL", "postgresql+pg8000://postgres@127.0.0.1:5432/postgres")


def create_database(name: str) -> str:
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_database(name: str) -> None:
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@contextlib.contextmanager
def migrated_database(label: str = "test") -> Iterator[str]:
    """A fresh Postgres database with the schema applied; dropped afterwards."""
    name = f"aikit_{label}_{uuid.uuid4().hex[:10]}"
    url = create_database(name)
    try:
        upgrade(url)
        yield url
    finally:
        get_engine(url).dispose()
        drop_database(name)


TABLES = ("meter_reports", "usage_daily", "api_key_usage", "subscriptions", "api_keys", "users", "stripe_events")


def module_database() -> Iterator[str]:
    """One migrated database per test module; each test empties it first (cheaper than one per test)."""
    with migrated_database("flush") as url:
        yield url


def empty_database(url: str) -> None:
    with get_engine(url).begin() as conn:
        for table in TABLES:
            conn.execute(text(f"DELETE FROM {table}"))
