"""The `aikit` command as an operator runs it: a subprocess of the installed entry point, configured only by
environment variables."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from aikit.api.app import create_app
from aikit.db.engine import get_engine
from aikit.runtime import Runtime
from tests.support.cli import aikit, base_env, out_json
from tests.support.servers import AIKIT, free_port
from tests.support.settings import make_settings


def test_migrate_then_create_list_and_revoke_keys(pg_url: str, redis_prefix: str, tmp_path: Path) -> None:
    env = base_env(DATABASE_URL=pg_url)
    assert out_json(aikit("migrate", env=env, cwd=tmp_path)) == {"migrated": True}

    email = f"cli-{tmp_path.name}@example.com"
    created = out_json(aikit("keys", "create", "--email", email, "--customer", f"cus_{uuid.uuid4().hex[:14]}",
                             "--rpm", "2", "--rpd", "50", "--monthly-tokens", "1000", env=env, cwd=tmp_path))
    assert created["api_key"].startswith("ak_") and created["api_key_id"].startswith("key_")
    with get_engine(pg_url).connect() as conn:
        row = conn.execute(text("SELECT rpm_limit, rpd_limit, monthly_token_limit, key_hash FROM api_keys "
                                "WHERE id = :id"), {"id": created["api_key_id"]}).one()
    assert (row.rpm_limit, row.rpd_limit, row.monthly_token_limit) == (2, 50, 1000)
    assert created["api_key"] not in row.key_hash  # only the hash is stored

    # The printed key works against the API, with the limits given on the command line.
    settings = make_settings(pg_url, redis_prefix)
    with TestClient(create_app(runtime=Runtime(settings))) as client:
        def chat() -> httpx.Response:
            return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {created['api_key']}"},
                               json={"messages": [{"role": "user", "content": "hi"}]})

        first = chat()
        assert first.status_code == 200, first.text
        assert first.headers["X-RateLimit-Limit-Requests"] == "2"
        assert first.headers["X-RateLimit-Limit-Tokens"] == "1000"
        assert [chat().status_code, chat().status_code] == [200, 429]

        listed = out_json(aikit("keys", "list", env=env, cwd=tmp_path))
        mine = [k for k in listed if k["api_key_id"] == created["api_key_id"]]
        assert mine == [{"api_key_id": created["api_key_id"], "prefix": created["prefix"], "email": email,
                         "status": "active", "allowed_models": None}]
        assert "api_key" not in json.dumps(listed).replace("api_key_id", "")  # secrets are never listed

        revoked = out_json(aikit("keys", "revoke", created["api_key_id"], env=env, cwd=tmp_path))
        assert revoked == {"api_key_id": created["api_key_id"], "status": "revoked"}
        listed = out_json(aikit("keys", "list", env=env, cwd=tmp_path))
        assert [k["status"] for k in listed if k["api_key_id"] == created["api_key_id"]] == ["revoked"]
        fresh = TestClient(create_app(runtime=Runtime(settings)))  # a new instance: no cached lookup
        with fresh:
            r = fresh.post("/v1/chat/completions", headers={"Authorization": f"Bearer {created['api_key']}"},
                           json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401 and r.json()["error"]["code"] == "revoked_api_key"

    missing = aikit("keys", "revoke", "key_doesnotexist", env=env, cwd=tmp_path)
    assert missing.returncode != 0 and "key_doesnotexist" in missing.stderr


def test_keys_create_defaults_come_from_settings(tmp_path: Path) -> None:
    env = base_env(DATABASE_URL=f"sqlite:///{tmp_path}/aikit.db", DEFAULT_RPM="7", DEFAULT_RPD="70",
                   DEFAULT_MONTHLY_TOKENS="700")
    out_json(aikit("migrate", env=env, cwd=tmp_path))
    created = out_json(aikit("keys", "create", "--email", "d@example.com", env=env, cwd=tmp_path))
    with get_engine(f"sqlite:///{tmp_path}/aikit.db").connect() as conn:
        row = conn.execute(text("SELECT rpm_limit, rpd_limit, monthly_token_limit FROM api_keys WHERE id = :id"),
                           {"id": created["api_key_id"]}).one()
    assert tuple(row) == (7, 70, 700)
    again = aikit("keys", "create", "--email", "d@example.com", "--customer", "cus_a", env=env, cwd=tmp_path)
    assert again.returncode == 0
    clash = aikit("keys", "create", "--email", "d@example.com", "--customer", "cus_b", env=env, cwd=tmp_path)
    assert clash.returncode != 0 and "Traceback" not in clash.stderr
    assert "another Stripe customer" in clash.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DEFAULT_RPM", "abc"),
        ("DATABASE_URL", "mysql://x"),
        ("REDIS_URL", "http://localhost:6379"),
        ("LLM_PROVIDER", "gpt"),
        ("RATE_LIMIT_FAIL_MODE", "sometimes"),
        ("REDIS_TIMEOUT_SECONDS", "-1"),
        ("PRICE_TABLE", "not-json"),
    ],
)
def test_a_malformed_setting_exits_non_zero_with_one_line_naming_it(
        tmp_path: Path, variable: str, value: str) -> None:
    env = base_env(**{"DATABASE_URL": f"sqlite:///{tmp_path}/aikit.db", variable: value})
    result = aikit("keys", "list", env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr


def test_serve_answers_healthz_and_stops_on_sigterm(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/aikit.db"
    env = base_env(DATABASE_URL=db)
    out_json(aikit("migrate", env=env, cwd=tmp_path))
    created = out_json(aikit("keys", "create", "--email", "serve@example.com", env=env, cwd=tmp_path))
    port = free_port()
    proc = subprocess.Popen([AIKIT, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                health = httpx.get(base + "/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "aikit serve did not come up"
                time.sleep(0.1)
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        r = httpx.post(base + "/v1/chat/completions", headers={"Authorization": f"Bearer {created['api_key']}"},
                       json={"messages": [{"role": "user", "content": "served by aikit serve"}]}, timeout=10)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo: served by aikit serve"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        output = proc.stdout.read() if proc.stdout else ""
        if proc.stdout:
            proc.stdout.close()
    # A clean shutdown; uvicorn then re-raises the signal it caught, so the exit status may say SIGTERM.
    assert code in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    assert "Traceback" not in output


def test_requeue_parked_puts_parked_reports_back_with_their_identifiers(tmp_path: Path) -> None:
    import datetime as dt

    from sqlalchemy import create_engine, select

    from aikit.db.migrate import upgrade
    from aikit.db.models import MeterReport

    url = f"sqlite:///{tmp_path}/aikit.db"
    upgrade(url)
    engine = create_engine(url)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with engine.begin() as conn:
        for rid, customer in (("aikit-a", "cus_A"), ("aikit-b", "cus_B")):
            conn.execute(MeterReport.__table__.insert().values(
                id=rid, customer_id=customer, window_start=start, window_end=start + dt.timedelta(minutes=5),
                value=10, last_usage_ts=start, status="parked", attempts=1, last_error="permanent: x",
                created_at=start))
    result = aikit("requeue-parked", "--customer", "cus_A", env=base_env(DATABASE_URL=url), cwd=tmp_path)
    assert out_json(result) == {"requeued": 1}
    with engine.connect() as conn:
        rows = dict(conn.execute(select(MeterReport.id, MeterReport.status)).all())
    engine.dispose()
    assert rows == {"aikit-a": "pending", "aikit-b": "parked"}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--email", "not-an-email"], "invalid --email 'not-an-email'"),
        (["--email", "ok@example.com", "--customer", "cus-bad id"], "invalid --customer"),
        (["--email", "ok@example.com", "--rpm", "-3"], "invalid --rpm -3: Input should be greater than or equal to 0"),
        (["--email", "ok@example.com", "--rpd", "-1"], "invalid --rpd -1"),
        (["--email", "ok@example.com", "--rpm", str(2**31)], "invalid --rpm"),
        (["--email", "ok@example.com", "--monthly-tokens", "-5"], "invalid --monthly-tokens -5"),
        (["--email", "ok@example.com", "--name", "n" * 201], "invalid --name"),
    ],
)
def test_keys_create_validates_like_the_admin_api(tmp_path: Path, args: list[str], fragment: str) -> None:
    url = f"sqlite:///{tmp_path}/aikit.db"
    env = base_env(DATABASE_URL=url)
    out_json(aikit("migrate", env=env, cwd=tmp_path))
    result = aikit("keys", "create", *args, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]
    with get_engine(url).connect() as conn:  # nothing was stored
        assert conn.execute(text("SELECT count(*) FROM api_keys")).scalar_one() == 0
