"""Database engines, one per URL per process, created lazily."""

from __future__ import annotations

import ssl
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    parsed = make_url(url)
    connect_args: dict[str, Any] = {}
    # pg8000 takes an SSLContext, not libpq's sslmode; RDS Proxy requires TLS.
    sslmode = parsed.query.get("sslmode")
    if sslmode is not None:
        parsed = parsed.difference_update_query(["sslmode"])
        if sslmode in ("require", "verify-ca", "verify-full"):
            context = ssl.create_default_context()
            if sslmode == "require":  # encrypt, but don't verify (libpq's meaning)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            connect_args["ssl_context"] = context
    # Small pool: one Lambda container serves one request at a time; RDS Proxy multiplexes.
    return create_engine(parsed, connect_args=connect_args, pool_size=5, max_overflow=5, pool_pre_ping=True,
                         pool_recycle=300)
