"""libpq's sslmode in DATABASE_URL becomes a pg8000 SSL context (RDS Proxy requires TLS)."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import InterfaceError

from aikit.db.engine import get_engine
from tests.support.db import ADMIN_URL


def test_sslmode_disable_is_dropped_and_connects() -> None:
    engine = get_engine(ADMIN_URL + "?sslmode=disable")
    assert "sslmode" not in str(engine.url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1


def test_sslmode_require_asks_the_server_for_tls() -> None:
    # The test server has no TLS: asking for it must fail loudly, never fall back to plaintext.
    engine = get_engine(ADMIN_URL + "?sslmode=require")
    with pytest.raises(InterfaceError, match="SSL"):
        engine.connect()
