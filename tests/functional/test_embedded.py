"""The embedded first-try setup of `make run`: SQLite + the in-process Redis substitute (memory://) + the echo
provider. Migrate, create a key, chat, and the flush drains the usage into SQLite exactly."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from aikit.api.app import create_app
from aikit.db.engine import get_engine
from aikit.db.migrate import upgrade
from aikit.db.models import ApiKeyUsage, UsageDaily
from aikit.flush import Flusher
from aikit.keys import IssuedKey, create_key
from aikit.redis_client import make_sync_redis
from aikit.runtime import Runtime
from aikit.server import create_server_app
from aikit.settings import Settings, load_settings
from tests.support.api import chat
from tests.support.redis import pending_tokens
from tests.support.servers import AIKIT, aikit_serve, serve_app


@pytest.fixture
def embedded(tmp_path: Path) -> Settings:
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path}/aikit.db",
        redis_url="memory://",
        # memory:// is one substitute server per process: a prefix of its own keeps tests apart.
        redis_key_prefix=f"e{uuid.uuid4().hex[:10]}",
        llm_provider="echo",
        stripe_secret_key=None,
        flush_interval_seconds=0,
        _env_file=None,
    )
    upgrade(settings.database_url)
    return settings


def new_key(settings: Settings, **limits: Any) -> IssuedKey:
    with Session(get_engine(settings.database_url)) as session:
        issued = create_key(session, settings, email=f"{uuid.uuid4().hex[:8]}@example.com", **limits)
        session.commit()
    return issued


def stored(settings: Settings, api_key_id: str) -> tuple[int, int, int, int]:
    """(rows, row tokens, rollup requests, rollup tokens) in SQLite."""
    with get_engine(settings.database_url).connect() as conn:
        rows, tokens = conn.execute(select(func.count(), func.coalesce(func.sum(ApiKeyUsage.tokens), 0))
                                    .where(ApiKeyUsage.api_key_id == api_key_id)).one()
        requests, daily = conn.execute(select(func.coalesce(func.sum(UsageDaily.requests), 0),
                                              func.coalesce(func.sum(UsageDaily.tokens), 0))
                                       .where(UsageDaily.api_key_id == api_key_id)).one()
    return int(rows), int(tokens), int(requests), int(daily)


def test_migrate_creates_the_schema_and_is_idempotent(embedded: Settings) -> None:
    upgrade(embedded.database_url)  # a second run changes nothing
    with get_engine(embedded.database_url).connect() as conn:
        tables = {r[0] for r in conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))}
    assert {"users", "api_keys", "api_key_usage", "usage_daily", "meter_reports", "alembic_version"} <= tables


def test_chat_is_metered_and_the_flush_drains_into_sqlite_exactly(embedded: Settings) -> None:
    runtime = Runtime(embedded)
    key = new_key(embedded, rpm=100, rpd=1000, monthly_tokens=100_000)
    other = new_key(embedded)
    total = 0
    with TestClient(create_app(runtime=runtime)) as client:
        for i in range(1, 6):
            r = chat(client, key, " ".join(["w"] * i))
            assert r.status_code == 200, r.text
            assert r.json()["usage"] == {"prompt_tokens": i, "completion_tokens": i + 1, "total_tokens": 2 * i + 1,
                                         "prompt_tokens_details": {"cached_tokens": 0}}
            total += 2 * i + 1
        with client.stream("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {key.api_key}"},
                           json={"messages": [{"role": "user", "content": "a b c"}], "stream": True}) as s:
            assert s.status_code == 200
            assert s.read().decode().rstrip().endswith("data: [DONE]")
        total += 3 + 4
        assert chat(client, other, "x").status_code == 200
        assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                           headers={"Authorization": "Bearer ak_unknown"}).status_code == 401

    # Written to SQLite before each call returned: nothing waits in the in-process substitute.
    assert stored(embedded, key.api_key_id) == (6, total, 6, total)
    assert stored(embedded, other.api_key_id) == (1, 3, 1, 3)
    assert pending_tokens(runtime, key.api_key_id, make_sync_redis(embedded)) == 0
    with get_engine(embedded.database_url).connect() as conn:
        day = conn.execute(select(UsageDaily.date).where(UsageDaily.api_key_id == key.api_key_id)).scalar_one()
    assert str(day) == dt.datetime.now(dt.UTC).date().isoformat()
    summary = Flusher(embedded).run()
    assert summary.ok, summary.errors
    assert summary.events_read == summary.rows_inserted == 0  # nothing buffered, nothing doubled
    assert stored(embedded, key.api_key_id) == (6, total, 6, total)


def test_limits_hold_on_the_embedded_redis(embedded: Settings) -> None:
    runtime = Runtime(embedded)
    key = new_key(embedded, rpm=2, rpd=100)
    with TestClient(create_app(runtime=runtime)) as client:
        assert [chat(client, key, "hello there world").status_code for _ in range(3)] == [200, 200, 429]
    assert stored(embedded, key.api_key_id) == (2, 2 * 7, 2, 2 * 7)


def test_the_served_app_has_stored_each_call_when_it_answers(embedded: Settings) -> None:
    """`aikit serve` (make run) driven with the openai SDK: the usage is in SQLite by the time the answer is."""
    settings = embedded.model_copy(update={"flush_interval_seconds": 1})
    key = new_key(settings)
    with serve_app(create_server_app(settings)) as base:
        sdk = openai.OpenAI(api_key=key.api_key, base_url=base + "/v1", max_retries=0)
        reply = sdk.chat.completions.create(model="echo-1", messages=[{"role": "user", "content": "one two"}])
        assert reply.usage is not None and reply.usage.total_tokens == 2 + 3
        assert stored(settings, key.api_key_id) == (1, 5, 1, 5)


def cli(tmp_path: Path, env: dict[str, str], *args: str) -> Any:
    result = subprocess.run([AIKIT, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_stopping_make_run_loses_nothing_and_a_flush_from_another_shell_agrees(tmp_path: Path,
                                                                                stop: signal.Signals) -> None:
    """The embedded default as a user meets it: chat, stop the server (Ctrl-C, SIGTERM or a crash), `aikit flush`
    from another shell, start again: every token is still there, and the monthly quota remembers it."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update({"DATABASE_URL": f"sqlite:///{tmp_path}/aikit.db", "REDIS_URL": "memory://", "LLM_PROVIDER": "echo",
                "FLUSH_INTERVAL_SECONDS": "3600", "POWERTOOLS_METRICS_DISABLED": "true"})
    cli(tmp_path, env, "migrate")
    key = cli(tmp_path, env, "keys", "create", "--email", "first@example.com", "--monthly-tokens", "40")
    headers = {"Authorization": f"Bearer {key['api_key']}"}
    body = {"messages": [{"role": "user", "content": "one two three four five"}]}  # 5 in + 6 out
    with aikit_serve(env, cwd=tmp_path, stop=stop) as base:
        told = [httpx.post(base + "/v1/chat/completions", headers=headers, json=body, timeout=10) for _ in range(3)]
        assert [r.status_code for r in told] == [200, 200, 200]

    flushed = cli(tmp_path, env, "flush")
    assert flushed["ok"] is True and flushed["rows_inserted"] == 0  # every row was already in SQLite
    assert stored_in(env, key["api_key_id"]) == (3, 33, 3, 33)

    with aikit_serve(env, cwd=tmp_path) as base:
        usage = httpx.get(base + "/v1/usage", headers=headers, timeout=10).json()
        assert (usage["tokens_used"], usage["requests"]) == (33, 3)
        # 33 of 40 used: the next call is admitted, the one after it is refused from the remembered quota.
        assert httpx.post(base + "/v1/chat/completions", headers=headers, json=body, timeout=10).status_code == 200
        assert httpx.post(base + "/v1/chat/completions", headers=headers, json=body, timeout=10).status_code == 429
    assert stored_in(env, key["api_key_id"]) == (4, 44, 4, 44)


def stored_in(env: dict[str, str], api_key_id: str) -> tuple[int, int, int, int]:
    return stored(load_settings(database_url=env["DATABASE_URL"], _env_file=None), api_key_id)
