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
    sslmode = parsed.query.get("sslmode")
    if sslmode is not None:
        parsed = parsed.difference_update_query(["sslmode"])
    tls = _Tls(sslmode if isinstance(sslmode, str) else None)
    # Sized for the request path's worker threads (key lookups, quota catch-ups, the Redis-down fallback): a
    # connection checked in beyond pool_size is closed, so a pool smaller than the steady concurrency opens a
    # connection per request. LIFO keeps the busy few warm and lets the rest age out (pool_recycle).
    engine = create_engine(parsed, connect_args=tls.connect_args(), pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW,
                           pool_use_lifo=True, pool_pre_ping=True, pool_recycle=300)

    @event.listens_for(engine, "do_connect")
    def _current_credentials(dialect: Any, _record: Any, cargs: tuple[Any, ...], cparams: dict[str, Any]) -> Any:
        return tls.connect(dialect, cargs, cparams)

    return engine


POOL_SIZE = 10
POOL_OVERFLOW = 10


class _Tls:
    """pg8000 takes an SSLContext, not libpq's sslmode; RDS Proxy requires TLS. The context is built once per
    engine: given none, pg8000 builds one per connection (loading the CA bundle each time) to try TLS first.
    Without an sslmode (libpq's default, "prefer") TLS is tried with the shared context and, once a server has
    refused it, this engine connects without."""

    def __init__(self, sslmode: str | None) -> None:
        self.sslmode = sslmode or "prefer"
        self.refused = False
        self.context: ssl.SSLContext | None = None
        if self.sslmode in ("prefer", "allow", "require", "verify-ca", "verify-full"):
            self.context = ssl.create_default_context()
            if self.sslmode not in ("verify-ca", "verify-full"):  # encrypt, but don't verify (libpq's meaning)
                self.context.check_hostname = False
                self.context.verify_mode = ssl.CERT_NONE

    def connect_args(self) -> dict[str, Any]:
        if self.sslmode == "disable":
            return {"ssl_context": False}
        return {} if self.context is None else {"ssl_context": self.context}

    def connect(self, dialect: Any, cargs: tuple[Any, ...], cparams: dict[str, Any]) -> Any:
        optional = self.sslmode in ("prefer", "allow")
        if optional and self.refused:
            cparams["ssl_context"] = False
        try:
            return _connect(dialect, cargs, cparams) or dialect.connect(*cargs, **cparams)
        except Exception as exc:
            # Not `self.refused`: another thread may have set it while this one was connecting with TLS.
            if not optional or cparams.get("ssl_context") is False or "Server refuses SSL" not in str(exc):
                raise
            self.refused = True
            cparams["ssl_context"] = False
            return _connect(dialect, cargs, cparams) or dialect.connect(*cargs, **cparams)
