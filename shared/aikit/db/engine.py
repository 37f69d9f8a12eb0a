"""Database engines, one per URL per process, created lazily.

Password rotation: aws_secrets registers where the credentials of a database come from (its Secrets Manager
secret). Every new connection to that host/port/database then uses the secret's current user and password,
and a connection refused for authentication (the secret rotated since it was read) reads the secret again
once, forced, and retries: running functions keep working across a rotation.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

# force_fetch -> {"user": ..., "password": ...}
CredentialSource = Callable[[bool], Mapping[str, str]]
DatabaseAddress = tuple[str, int, str]  # host, port, database

# SQLSTATE of a refused login: invalid_password, invalid_authorization_specification.
AUTH_FAILURE_CODES = frozenset({"28P01", "28000"})

_sources: dict[DatabaseAddress, CredentialSource] = {}
_sources_lock = threading.Lock()


def use_credentials(address: DatabaseAddress, source: CredentialSource | None) -> None:
    """Connections to `address` take their user and password from `source` (None: from the URL again)."""
    with _sources_lock:
        if source is None:
            _sources.pop(address, None)
        else:
            _sources[address] = source


def is_auth_failure(exc: BaseException) -> bool:
    first = exc.args[0] if exc.args else None
    if isinstance(first, dict):  # pg8000: the server's error fields
        return first.get("C") in AUTH_FAILURE_CODES
    return "password authentication failed" in str(exc)


def _connect(dialect: Any, cargs: tuple[Any, ...], cparams: dict[str, Any]) -> Any:
    address = (str(cparams.get("host", "")), int(cparams.get("port") or 5432), str(cparams.get("database", "")))
    source = _sources.get(address)
    if source is None:
        return None  # SQLAlchemy connects with the URL's credentials
    cparams.update(source(False))
    try:
        return dialect.connect(*cargs, **cparams)
    except Exception as exc:
        if not is_auth_failure(exc):
            raise
        fresh = dict(source(True))
        if all(cparams.get(k) == v for k, v in fresh.items()):
            raise  # the secret did not change: a real misconfiguration
        cparams.update(fresh)
        return dialect.connect(*cargs, **cparams)


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
    engine = create_engine(parsed, connect_args=connect_args, pool_size=5, max_overflow=5, pool_pre_ping=True,
                           pool_recycle=300)

    @event.listens_for(engine, "do_connect")
    def _current_credentials(dialect: Any, _record: Any, cargs: tuple[Any, ...], cparams: dict[str, Any]) -> Any:
        return _connect(dialect, cargs, cparams)

    return engine
