"""Fixtures for the tests of the built artifacts (see builds.py): built once per session, cached across runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from aikit.keys import IssuedKey
from tests.artifact import builds
from tests.support.api import issue_key
from tests.support.settings import make_settings


@pytest.fixture(scope="session")
def sam_build() -> Path:
    return builds.sam_build()


@pytest.fixture(scope="session")
def layer(sam_build: Path) -> Path:
    return sam_build / "AikitLayer" / "python"


@pytest.fixture(scope="session")
def runtime_venv() -> Path:
    return builds.runtime_venv()


@pytest.fixture(scope="session")
def plain_venv() -> Path:
    return builds.plain_install()


@pytest.fixture
def key(pg_url: str, redis_prefix: str) -> IssuedKey:
    return issue_key(make_settings(pg_url, redis_prefix), rpm=100, rpd=1000, monthly_tokens=100_000)
