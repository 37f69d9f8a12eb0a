"""Fixtures for the tests of the built artifacts (see builds.py): built once per session, cached across runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.artifact import builds


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


