"""API keys: issued once, stored only as a SHA-256 hash, looked up by that hash through a short cache."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import queue
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from aikit.access import Access, access_for_customer
from aikit.db.models import ApiKey, User, as_utc
from aikit.errors import AikitError, KeyRefused
from aikit.observability import logger
from aikit.settings import Settings

KEY_PREFIX = "ak_"
_PREFIX_LEN = 11  # "ak_" + 8 characters: enough to tell keys apart in a list, useless to an attacker


def hash_key(secret: str) -> str:
    # Keys carry 256 bits of randomness, so a fast unsalted hash is safe and makes lookup an index probe.
    return hashlib.sha256(secret.encode()).hexdigest()


def new_id(kind: str) -> str:
    return f"{kind}_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the request path needs to know about a key; never contains the secret."""

    api_key_id: str
    user_id: str
    email: str
    customer_id: str | None
    active: bool
    access: Access
    access_reason: str
    rpm: int | None
    rpd: int | None
    monthly_tokens: int | None
    quota_period_start: int  # Unix seconds; the quota counter resets when this changes
    allowed_models: tuple[str, ...] | None = None  # names or glob patterns; None: every (priced) model


@dataclass(frozen=True, slots=True)
class IssuedKey:
    api_key: str
    api_key_id: str
    user_id: str
    prefix: str


def month_start(now: dt.datetime) -> dt.datetime:
    return now.astimezone(dt.UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def quota_period_start(user: User, now: dt.datetime) -> int:
    start = user.quota_period_start
    if start is not None:
        start = as_utc(start)
        # A paid invoice sets the period; it lapses after ~a month without a newer invoice.
        if now - start < dt.timedelta(days=32):
            return int(start.timestamp())
    return int(month_start(now).timestamp())


def create_key(
    session: Session,
    settings: Settings,
    *,
    email: str,
    customer_id: str | None = None,
    name: str | None = None,
    rpm: int | None = None,
    rpd: int | None = None,
    monthly_tokens: int | None = None,
    allowed_models: list[str] | None = None,
) -> IssuedKey:
    """Create a key (and its user, if new). Limits default from settings. Caller commits."""
    user = session.scalars(select(User).where(User.email == email)).first()
    if customer_id:
        # stripe_customer_id is unique: refuse here rather than fail on the constraint (a 500).
        owner = session.scalars(select(User.id).where(User.stripe_customer_id == customer_id)).first()
        if owner is not None and (user is None or owner != user.id):
            raise KeyRefused(f"Stripe customer {customer_id} is already linked to another user")
    if user is None:
        user = User(id=new_id("usr"), email=email, stripe_customer_id=customer_id)
        session.add(user)
    elif customer_id and user.stripe_customer_id not in (None, customer_id):
        raise KeyRefused(f"user {email} is already linked to another Stripe customer")
    elif customer_id:
        user.stripe_customer_id = customer_id
    session.flush()
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=new_id("key"),
        user_id=user.id,
        name=name,
        prefix=secret[:_PREFIX_LEN],
        key_hash=hash_key(secret),
        status="active",
        rpm_limit=settings.default_rpm if rpm is None else rpm,
        rpd_limit=settings.default_rpd if rpd is None else rpd,
        monthly_token_limit=settings.default_monthly_tokens if monthly_tokens is None else monthly_tokens,
        allowed_models=None if allowed_models is None else json.dumps(allowed_models),
    )
    session.add(key)
    session.flush()
    return IssuedKey(api_key=secret, api_key_id=key.id, user_id=user.id, prefix=key.prefix)


def revoke_key(session: Session, api_key_id: str) -> bool:
    key = session.get(ApiKey, api_key_id)
    if key is None:
        return False
    if key.status != "revoked":
        key.status = "revoked"
        key.revoked_at = dt.datetime.now(dt.UTC)
    return True


def load_key_info(session: Session, settings: Settings, key_hash: str) -> KeyInfo | None:
    row = session.execute(
        select(ApiKey, User).join(User, User.id == ApiKey.user_id).where(ApiKey.key_hash == key_hash)
    ).first()
    if row is None:
        return None
    key, user = row
    # The index probe found the row by hash; compare again in constant time as a belt-and-braces check.
    if not hmac.compare_digest(key.key_hash, key_hash):
        return None
    now = dt.datetime.now(dt.UTC)
    decision = access_for_customer(session, user.stripe_customer_id, settings, now)
    rpm, rpd, monthly = key.rpm_limit, key.rpd_limit, key.monthly_token_limit
    if decision.access is Access.FREE_TIER:
        rpm = _min(rpm, settings.free_tier_rpm)
        rpd = _min(rpd, settings.free_tier_rpd)
        monthly = _min(monthly, settings.free_tier_monthly_tokens)
    return KeyInfo(
        api_key_id=key.id,
        user_id=user.id,
        email=user.email,
        customer_id=user.stripe_customer_id,
        active=key.status == "active",
        access=decision.access,
        access_reason=decision.reason,
        rpm=rpm,
        rpd=rpd,
        monthly_tokens=monthly,
        quota_period_start=quota_period_start(user, now),
        allowed_models=parse_allowed_models(key.allowed_models),
    )


def parse_allowed_models(stored: str | None) -> tuple[str, ...] | None:
    """ApiKey.allowed_models (a JSON list) as a tuple; None when unset."""
    if stored is None:
        return None
    loaded = json.loads(stored)
    return tuple(str(m) for m in loaded) if isinstance(loaded, list) else None


def load_quota_period(session: Session, api_key_id: str, now: dt.datetime | None = None) -> int | None:
    """The quota period start of a key (as `KeyInfo.quota_period_start`), None for an unknown key."""
    user = session.scalars(select(User).join(ApiKey, ApiKey.user_id == User.id).where(ApiKey.id == api_key_id)
                           ).first()
    return None if user is None else quota_period_start(user, now or dt.datetime.now(dt.UTC))


def _min(a: int | None, b: int) -> int:
    return b if a is None else min(a, b)


# How long past its TTL a cached key answer may stand in for the database while the database is down.
STALE_KEY_SECONDS = 3600.0
# A cached answer is refreshed in the background once this share of its TTL has passed, so a busy key never
# expires under its requests: they keep the cached answer (never older than the TTL) while one refresh runs.
REFRESH_AHEAD = 0.8
# Threads that run the background refreshes of all keys (one refresh per key at a time).
REFRESH_THREADS = 2
# How long a caller waits for another caller's lookup of the same key before running its own.
FLIGHT_WAIT_SECONDS = 10.0
_DATABASE_DOWN: tuple[type[BaseException], ...] = (DBAPIError, OSError)


@dataclass(slots=True)
class _Entry:
    refresh_at: float  # monotonic: from here on a request starts a background refresh
    expires_at: float  # monotonic: from here on the answer is no longer used (except while the database is down)
    info: KeyInfo | None


class _StillRunning(AikitError):
    """A shared lookup did not finish within FLIGHT_WAIT_SECONDS. Control flow inside KeyCache (the waiter
    queries on its own), never raised out of it; an AikitError only so that everything aikit raises is one."""


class _Flight:
    """One database lookup of a key, shared by every caller that needs it while it runs (single-flight)."""

    __slots__ = ("_done", "_error", "_info", "claimed")

    def __init__(self) -> None:
        self.claimed = False  # someone runs it (under the cache's lock): a queued refresh, or a caller who
        # needed the answer before the refresh threads got to it
        self._done = threading.Event()
        self._info: KeyInfo | None = None
        self._error: BaseException | None = None

    def finish(self, info: KeyInfo | None, error: BaseException | None) -> None:
        self._info, self._error = info, error
        self._done.set()

    def wait(self, timeout: float | None = None) -> KeyInfo | None:
        if not self._done.wait(timeout):
            raise _StillRunning
        if self._error is not None:
            raise self._error
        return self._info


class KeyCache:
    """Per-process TTL cache of key lookups (misses included), so a revocation shows within the TTL.

    No thundering herd: a key in use is refreshed in the background from REFRESH_AHEAD of its TTL on (one
    refresh per key at a time, on REFRESH_THREADS threads), and concurrent lookups of a key that is not cached
    share one database query. A request waits for the database only for a key this instance has not seen
    within the TTL."""

    def __init__(self, engine: Engine, settings: Settings, max_entries: int = 10_000) -> None:
        self._engine = engine
        self._settings = settings
        self._ttl = settings.key_cache_ttl_seconds
        self._max = max_entries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._flights: dict[str, _Flight] = {}
        self._lock = threading.Lock()
        self._refreshes: queue.SimpleQueue[tuple[str, _Flight]] = queue.SimpleQueue()
        self._workers = 0

    def lookup(self, secret: str) -> KeyInfo | None:
        """The key's answer: from the cache while fresh, else from the database (one query per key at a time).
        Blocks: call it from a worker thread in async code."""
        digest = hash_key(secret)
        found, info = self._fresh(digest)
        if found:
            return info
        with self._lock:
            flight = self._flights.get(digest)
            if flight is None:
                flight = self._flights[digest] = _Flight()
            run, flight.claimed = not flight.claimed, True
        if run:
            self._fly(digest, flight)
            return flight.wait()
        try:
            return flight.wait(FLIGHT_WAIT_SECONDS)
        except _StillRunning:
            # The shared lookup is stuck (say a refresh thread frozen with the Lambda and its connection
            # gone): don't let every request for the key hang on it; forget it and query on our own.
            with self._lock:
                if self._flights.get(digest) is flight:
                    del self._flights[digest]
            return self._load(digest)

    def cached(self, secret: str) -> tuple[bool, KeyInfo | None]:
        """(found, answer) from the cache alone, without waiting for the database (a due refresh starts in the
        background)."""
        return self._fresh(hash_key(secret))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _fresh(self, digest: str) -> tuple[bool, KeyInfo | None]:
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(digest)
            if hit is None or hit.expires_at <= now:
                return False, None
            if hit.refresh_at > now or digest in self._flights:
                return True, hit.info
            flight = self._flights[digest] = _Flight()
            self._refreshes.put((digest, flight))
            start_worker = self._workers < REFRESH_THREADS
            if start_worker:
                self._workers += 1
        if start_worker:
            threading.Thread(target=self._refresh_forever, name="aikit-key-refresh", daemon=True).start()
        return True, hit.info

    def _refresh_forever(self) -> None:
        while True:
            digest, flight = self._refreshes.get()
            with self._lock:
                run, flight.claimed = not flight.claimed, True
            if not run:
                continue
            try:
                self._fly(digest, flight)
            except Exception as exc:  # the cached answer stands until its TTL ends
                logger.warning("key_refresh_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})

    def _fly(self, digest: str, flight: _Flight) -> None:
        """Runs the flight's lookup and hands its outcome to every waiter."""
        info: KeyInfo | None = None
        error: BaseException | None = None
        try:
            info = self._load(digest)
        except BaseException as exc:
            error = exc
        finally:
            with self._lock:
                if self._flights.get(digest) is flight:
                    del self._flights[digest]
            flight.finish(info, error)
        if error is not None:
            raise error

    def _load(self, digest: str) -> KeyInfo | None:
        # The answer is at least as new as the query's start: a revocation committed before it is seen, and
        # one committed after it shows once this entry expires, within the TTL.
        started = time.monotonic()
        try:
            with Session(self._engine) as session:
                info = load_key_info(session, self._settings, digest)
        except _DATABASE_DOWN:
            # Database down: a key this instance verified recently keeps its last known state (nothing can
            # revoke it meanwhile: revoking needs the database too). Unknown keys still fail.
            with self._lock:
                hit = self._entries.get(digest)
            if hit is not None and started - hit.expires_at < STALE_KEY_SECONDS:
                return hit.info
            raise
        with self._lock:
            current = self._entries.get(digest)
            if current is not None and current.expires_at > started + self._ttl:
                return info  # a later lookup (one that did not wait for this slow one) answered already
            self._entries[digest] = _Entry(started + self._ttl * REFRESH_AHEAD, started + self._ttl, info)
            self._entries.move_to_end(digest)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return info
