"""Helpers of the Redis fault tests (a real redis-server stopped, killed or answering errors): settings
against that server, outages, and what reached Postgres.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aikit.db.engine import get_engine
from aikit.db.models import ApiKeyUsage, MeterReport, Subscription, UsageDaily
from aikit.keys import IssuedKey
from aikit.runtime import Runtime
from aikit.settings import Settings
from tests.support.api import chat, issue_key
from tests.support.servers import RedisProcess
from tests.support.settings import make_settings

# Flushing "as of" a moment long ago seals no report, so no test here ever calls Stripe.
LONG_AGO = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
TIMEOUT = 0.2  # REDIS_TIMEOUT_SECONDS for these tests
TOKENS = 3 + 4  # echo: "hello there world" -> 3 input words, "echo: hello there world" -> 4 output words


def fault_settings(pg_url: str, proc: RedisProcess, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": proc.url,
        "redis_timeout_seconds": TIMEOUT,
        # Billable usage, so the fallback must also fill the Stripe outbox.
        "stripe_secret_key": "sk_test_fault_tests",
        "stripe_api_base": "http://127.0.0.1:9",  # never reached: see LONG_AGO
        **overrides,
    }
    return make_settings(pg_url, "faults", **values)


@contextlib.contextmanager
def outage(proc: RedisProcess, kind: str) -> Iterator[None]:
    """Redis unreachable ("kill": connection refused) or unresponsive ("stop": every command times out)."""
    assert proc.proc is not None
    if kind == "kill":
        proc.kill()
    else:
        os.kill(proc.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if kind == "kill":
            proc.start()  # same port and directory: the AOF is replayed
        else:
            os.kill(proc.proc.pid, signal.SIGCONT)


def serve_requests(client: TestClient, key: IssuedKey, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        r = chat(client, key)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["total_tokens"] == TOKENS
        ids.append(r.headers["X-Request-Id"])
    return ids


def usage_rows(runtime: Runtime, key: IssuedKey) -> dict[str, tuple[int, bool]]:
    with runtime.engine.connect() as conn:
        rows = conn.execute(select(ApiKeyUsage.request_id, ApiKeyUsage.tokens, ApiKeyUsage.billable)
                            .where(ApiKeyUsage.api_key_id == key.api_key_id)).all()
    return {r.request_id: (r.tokens, r.billable) for r in rows}


def rollup(runtime: Runtime, key: IssuedKey) -> tuple[int, int]:
    with runtime.engine.connect() as conn:
        row = conn.execute(select(func.coalesce(func.sum(UsageDaily.requests), 0),
                                  func.coalesce(func.sum(UsageDaily.tokens), 0))
                           .where(UsageDaily.api_key_id == key.api_key_id)).one()
    return int(row[0]), int(row[1])


def outbox_total(runtime: Runtime, customer: str) -> int:
    with runtime.engine.connect() as conn:
        total = conn.execute(select(func.coalesce(func.sum(MeterReport.value), 0))
                             .where(MeterReport.customer_id == customer)).scalar_one()
    return int(total)


def new_paying_key(settings: Settings, **limits: int) -> tuple[IssuedKey, str]:
    """A key of a paying customer (an active subscription, as the webhooks would have stored it)."""
    customer = "cus_" + uuid.uuid4().hex[:14]
    with Session(get_engine(settings.database_url)) as session:
        session.add(Subscription(id="sub_" + uuid.uuid4().hex[:14], customer_id=customer, status="active"))
        session.commit()
    limits = {"rpm": 1000, "rpd": 10_000, "monthly_tokens": 1_000_000, **limits}
    return issue_key(settings, customer_id=customer, **limits), customer
