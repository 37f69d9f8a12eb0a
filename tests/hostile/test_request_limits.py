"""Issue 15 in process: the body limit under Lambda (the Mangum handler), request ids on every error and no
internals in them, settings refused at start, and every CLI failure one line with exit 2."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fastapi.testclient import TestClient

from aikit.api.app import create_app
from aikit.errors import SettingsError
from aikit.runtime import Runtime
from aikit.settings import embedded_sqlite_url, load_settings
from tests.support.api import bearer, issue_key
from tests.support.aws_lambda import body_of, header, http_event, invoke
from tests.support.cli import aikit, base_env, out_json
from tests.support.hostile import assert_clean
from tests.support.servers import free_port
from tests.support.settings import ADMIN_TOKEN, make_settings

CHAT = {"model": "echo-1", "messages": [{"role": "user", "content": "one two three"}]}


# --- the same limit under Lambda -------------------------------------------------------------------------


@pytest.mark.parametrize("b64", [False, True])
def test_the_mangum_handler_refuses_an_oversized_event_before_auth(
        lambda_module: ModuleType, event_template: dict[str, Any], pg_url: str, redis_prefix: str,
        b64: bool) -> None:
    key = issue_key(make_settings(pg_url, redis_prefix), rpm=100, rpd=100)
    big = {"model": "echo-1", "messages": [{"role": "user", "content": "a " * (5 * 1024 * 1024 // 2)}]}
    for auth in ({}, bearer(key.api_key), bearer("ak_" + uuid.uuid4().hex)):
        response = invoke(lambda_module, http_event(event_template, "POST", "/v1/chat/completions", big, auth,
                                                    b64=b64))
        assert response["statusCode"] == 413, body_of(response)[:300]
        error = json.loads(body_of(response))["error"]
        assert error["code"] == "request_too_large" and "MAX_REQUEST_BODY_BYTES" in error["message"]
        assert error["request_id"] == header(response, "X-Request-Id")
    # Under the limit the same handler serves, billed under the id the response names.
    ok = invoke(lambda_module, http_event(event_template, "POST", "/v1/chat/completions", CHAT,
                                          bearer(key.api_key), b64=b64))
    assert ok["statusCode"] == 200 and json.loads(body_of(ok))["usage"]["total_tokens"] == 3 + 4
    assert (header(ok, "X-Request-Id") or "").startswith("req_")


def test_a_lower_limit_is_counted_while_the_body_arrives(pg_url: str, redis_prefix: str) -> None:
    settings = make_settings(pg_url, redis_prefix, max_request_body_bytes=4096)
    with TestClient(create_app(runtime=Runtime(settings))) as client:
        # No Content-Length to trust: a generator body is sent chunked.
        r = client.post("/v1/chat/completions", content=(b"x" * 1024 for _ in range(8)),
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 401  # small: on to auth


# --- errors: the request id, and nothing internal -------------------------------------------------------


def assert_names_request(r: Any) -> None:
    rid = r.headers.get("X-Request-Id")
    assert rid and rid.startswith("req_"), dict(r.headers)
    assert r.json()["error"]["request_id"] == rid


INTERNALS = ("Network error", "ConnectError", "Errno", "127.0.0.1", "pg8000", "Can't create a connection",
             "Traceback", "sqlalchemy", "localhost")


def assert_no_internals(r: Any, secrets: list[str]) -> None:
    assert_clean(r, secrets)
    found = [s for s in INTERNALS if s in r.text]
    assert not found, (found, r.text[:300])


def test_client_errors_carry_the_request_id(client: TestClient) -> None:
    for r in (client.post("/v1/chat/completions", json=CHAT),  # 401
              client.post("/v1/chat/completions", json=CHAT, headers=bearer("ak_" + uuid.uuid4().hex)),
              client.get("/v1/nowhere"),  # 404
              client.get("/v1/admin/keys", headers=bearer("wrong"))):  # 401
        assert r.status_code in (401, 404)
        assert_names_request(r)


def test_stripe_and_database_failures_reach_clients_without_their_internals(pg_url: str,
                                                                             redis_prefix: str) -> None:
    dead = free_port()  # nothing listens there
    stripe_down = make_settings(pg_url, redis_prefix, stripe_secret_key="sk_test_" + uuid.uuid4().hex,
                                stripe_api_base=f"http://127.0.0.1:{dead}", stripe_max_network_retries=0,
                                stripe_metered_price_id="price_x", stripe_timeout_seconds=2)
    key = issue_key(stripe_down, rpm=100, rpd=100)
    with TestClient(create_app(runtime=Runtime(stripe_down)), raise_server_exceptions=False) as client:
        r = client.post("/v1/billing/checkout", headers=bearer(key.api_key))
        assert r.status_code == 502 and r.json()["error"]["code"] == "stripe_error"
        assert_names_request(r)
        assert_no_internals(r, [key.api_key, stripe_down.stripe_secret_key or ""])

    db_down = make_settings(f"postgresql+pg8000://postgres@127.0.0.1:{dead}/aikit", redis_prefix)
    with TestClient(create_app(runtime=Runtime(db_down)), raise_server_exceptions=False) as client:
        for r in (client.post("/v1/chat/completions", json=CHAT, headers=bearer(key.api_key)),
                  client.get("/v1/admin/keys", headers=bearer(ADMIN_TOKEN))):
            assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable", r.text
            assert_names_request(r)
            assert_no_internals(r, [key.api_key, ADMIN_TOKEN])


# --- settings refused at start ---------------------------------------------------------------------------


def test_a_short_admin_token_or_a_bad_database_port_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^invalid setting ADMIN_TOKEN: .*at least 32 characters"):
        load_settings(admin_token="x" * 31, _env_file=None)
    assert load_settings(admin_token="x" * 32, _env_file=None).admin_token == "x" * 32
    assert load_settings(admin_token="", _env_file=None).admin_token is None  # unset: the admin API is off
    for url in ("postgresql://u@db:abc/aikit", "postgresql://u@db:99999/aikit", "postgresql://u@db:0/aikit"):
        with pytest.raises(SettingsError, match=r"^invalid setting DATABASE_URL: .*port") as caught:
            load_settings(database_url=url, _env_file=None)
        assert "\n" not in str(caught.value)


def test_relative_sqlite_paths_resolve_against_the_project_directory(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    (project / "src" / "deeper").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    monkeypatch.delenv("AIKIT_HOME", raising=False)
    monkeypatch.chdir(project / "src" / "deeper")
    assert embedded_sqlite_url("sqlite:///./aikit.db") == f"sqlite:///{project.resolve()}/aikit.db"
    assert embedded_sqlite_url("sqlite:////abs/aikit.db") == "sqlite:////abs/aikit.db"
    assert embedded_sqlite_url("sqlite:///:memory:") == "sqlite:///:memory:"
    monkeypatch.setenv("AIKIT_HOME", str(tmp_path / "home"))
    assert embedded_sqlite_url("sqlite:///aikit.db") == f"sqlite:///{(tmp_path / 'home').resolve()}/aikit.db"


# --- the CLI ---------------------------------------------------------------------------------------------


def one_line_exit_2(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("command", "settings", "fragments"), [
    (["serve", "--port", "1"], {"ADMIN_TOKEN": "short"}, ["ADMIN_TOKEN", "32"]),
    (["keys", "list"], {"DATABASE_URL": "postgresql://postgres@127.0.0.1:abc/aikit"}, ["DATABASE_URL", "port"]),
    (["keys", "list"], {"DATABASE_URL": "postgresql://postgres:pw-secret@127.0.0.1:{dead}/aikit"},
     ["cannot connect to the database"]),
    (["migrate"], {"DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/aikit_missing_{uid}"},
     ["database does not exist", "aikit_missing_"]),
    (["migrate"], {"DATABASE_URL": "sqlite:////nonexistent-{uid}/dir/aikit.db"},
     ["cannot open the SQLite database", "directory does not exist"]),
    (["keys", "list"], {"DATABASE_URL": "sqlite:///{tmp}/not-migrated.db"}, ["run `aikit migrate`"]),
])
def test_cli_failures_are_one_line_and_exit_2(tmp_path: Path, command: list[str], settings: dict[str, str],
                                              fragments: list[str]) -> None:
    values = {k: v.format(dead=free_port(), uid=uuid.uuid4().hex[:8], tmp=tmp_path) for k, v in settings.items()}
    line = one_line_exit_2(aikit(*command, env=base_env(**values), cwd=tmp_path), *fragments)
    assert "pw-secret" not in line


def test_the_default_embedded_database_is_the_same_from_any_subdirectory(tmp_path: Path) -> None:
    project = tmp_path / "myapp"
    deeper = project / "app" / "routes"
    deeper.mkdir(parents=True)
    (project / ".env").write_text("LLM_PROVIDER=echo\n")
    env = base_env()  # no DATABASE_URL: the default ./aikit.db
    assert out_json(aikit("migrate", env=env, cwd=project)) == {"migrated": True}
    created = out_json(aikit("keys", "create", "--email", "sub@example.com", env=env, cwd=deeper))
    listed = out_json(aikit("keys", "list", env=env, cwd=project / "app"))
    assert [k["api_key_id"] for k in listed] == [created["api_key_id"]]
    assert (project / "aikit.db").exists() and not (deeper / "aikit.db").exists()
