"""The artifacts `sam build` makes, tested where Lambda meets them: a clean Python 3.12 holding only the built
layer (on its path, as /opt/python) and boto3 (as the runtime provides) imports every handler and serves one
request through each, against real Redis and Postgres. Any ImportError fails here."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
import stripe
from sqlalchemy import create_engine, inspect, text

from aikit.keys import IssuedKey
from tests.artifact.builds import FUNCTIONS, ROOT, invoke, lambda_env
from tests.fakes.stripe_server import FakeStripe
from tests.support.artifact import lambda_settings_env, tokens_in_postgres
from tests.support.db import ADMIN_URL

# The first test builds the artifacts (sam build, venvs) in its setup: minutes on a clean checkout.
pytestmark = pytest.mark.timeout(1800)

EVENTS = ROOT / "events"
WEBHOOK_SECRET = "whsec_artifact_test"


def event(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EVENTS / name).read_text())
    return data


# ---------------------------------------------------------------------------------------------- the layer


def test_layer_ships_the_package_with_bytecode_and_no_tests_requirements_or_boto3(layer: Path) -> None:
    names = {p.name for p in layer.iterdir()}
    assert {"aikit", "fastapi", "mangum", "uvicorn", "pydantic", "email_validator", "aws_xray_sdk", "stripe",
            "sqlalchemy", "pg8000", "redis", "fakeredis", "alembic"} <= names
    # The Lambda runtime's boto3/botocore are used by every function, consistently.
    assert not names & {"boto3", "botocore", "s3transfer", "bin"}
    assert not list(layer.parent.rglob("requirements*.txt"))
    assert not [p for p in layer.rglob("*") if p.is_dir() and p.name == "tests"]
    assert not list((layer / "aikit").rglob("test_*.py"))
    assert (layer / "aikit" / "db" / "migrations" / "env.py").exists()
    assert list((layer / "aikit" / "db" / "migrations" / "versions").glob("*.py"))
    # Every module has bytecode that Python uses without checking the source (/opt is read-only on Lambda):
    # PEP 552 flags 0b01 = hash-based, unchecked.
    sources = list(layer.rglob("*.py"))
    assert len(sources) > 1000
    missing = [s for s in sources
               if not (s.parent / "__pycache__" / f"{s.stem}.cpython-312.pyc").exists()]
    assert not missing, missing[:10]
    for source in (layer / "aikit").rglob("*.py"):
        pyc = (source.parent / "__pycache__" / f"{source.stem}.cpython-312.pyc").read_bytes()
        assert int.from_bytes(pyc[4:8], "little") == 0b01, source


def test_the_layer_holds_exactly_the_packages_modules_and_functions_only_their_code(sam_build: Path,
                                                                                  layer: Path) -> None:
    shipped = {p.relative_to(layer / "aikit") for p in (layer / "aikit").rglob("*.py")}
    source = {p.relative_to(ROOT / "shared" / "aikit") for p in (ROOT / "shared" / "aikit").rglob("*.py")}
    assert shipped == source  # nothing stale from an earlier build, nothing missing
    for function in FUNCTIONS:
        files = {p.name for p in (sam_build / function).iterdir()}
        expected = {"app.py", "run.sh"} if function == "ApiFunction" else {"app.py"}
        assert files == expected, (function, files)
    assert (sam_build / "ApiFunction" / "run.sh").stat().st_mode & 0o111  # Lambda Web Adapter executes it


@pytest.mark.parametrize("function", FUNCTIONS)
def test_every_handler_imports_in_a_clean_runtime_with_tracing_on(
        sam_build: Path, runtime_venv: Path, function: str) -> None:
    # Tracing: Active, as deployed: the X-Ray SDK must come from the layer and patch without error.
    env = lambda_env(sam_build / function, function, DATABASE_URL="sqlite:///:memory:", REDIS_URL="memory://",
                     POWERTOOLS_TRACE_DISABLED="false", DRIVER_IMPORT_ONLY="1",
                     _X_AMZN_TRACE_ID="Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=0",
                     AWS_XRAY_DAEMON_ADDRESS=f"127.0.0.1:{_free_udp_port()}", AWS_XRAY_CONTEXT_MISSING="IGNORE_ERROR")
    result = invoke(sam_build, runtime_venv, function, {}, env)
    assert result.foreign == []
    assert "Traceback" not in result.stderr, result.stderr


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------- one request each


def test_api_and_flush_handlers_serve_a_metered_chat_and_move_it_to_postgres(
        sam_build: Path, runtime_venv: Path, pg_url: str, redis_prefix: str, key: IssuedKey) -> None:
    env = lambda_env(sam_build / "ApiFunction", "aikit-api", **lambda_settings_env(pg_url, redis_prefix))
    health = invoke(sam_build, runtime_venv, "ApiFunction", event("healthz.json"), env)
    assert (health.result["statusCode"], json.loads(health.result["body"])) == (200, {"status": "ok"})

    chat_event = event("chat_completions.json")
    chat_event["headers"]["authorization"] = f"Bearer {key.api_key}"
    chat = invoke(sam_build, runtime_venv, "ApiFunction", chat_event, env)
    assert chat.result["statusCode"] == 200, chat.result
    reply = json.loads(chat.result["body"])
    assert reply["choices"][0]["message"]["content"] == "echo: Say hello"
    tokens = reply["usage"]["total_tokens"]
    # The invocation wrote its metrics before returning (a frozen Lambda writes nothing later).
    (record,) = [r for r in chat.emf_records() if "TokensMetered" in r]
    assert record["TokensMetered"] == [float(tokens)]

    flush_env = lambda_env(sam_build / "FlushFunction", "aikit-flush", **lambda_settings_env(pg_url, redis_prefix))
    flushed = invoke(sam_build, runtime_venv, "FlushFunction", event("flush_scheduled.json"), flush_env,
                     remaining_ms=290_000)
    assert flushed.result["ok"] and flushed.result["rows_inserted"] >= 1, flushed.result
    assert tokens_in_postgres(pg_url, key.api_key_id) == tokens


def test_webhook_handler_verifies_and_applies_a_signed_stripe_event(
        sam_build: Path, runtime_venv: Path, pg_url: str, redis_prefix: str) -> None:
    hook = event("stripe_webhook.json")
    body = hook["body"]
    hook["headers"]["stripe-signature"] = stripe.WebhookSignature.generate_signature_header(body, WEBHOOK_SECRET)
    with FakeStripe() as fake:
        env = lambda_env(sam_build / "WebhookFunction", "aikit-webhook",
                         **lambda_settings_env(pg_url, redis_prefix, STRIPE_SECRET_KEY=fake.api_key,
                                        STRIPE_API_BASE=fake.url, STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET))
        good = invoke(sam_build, runtime_venv, "WebhookFunction", hook, env)
        forged = dict(hook, headers={**hook["headers"], "stripe-signature": "t=1,v1=forged"})
        bad = invoke(sam_build, runtime_venv, "WebhookFunction", forged, env)
    assert good.result["statusCode"] == 200, good.result
    assert bad.result["statusCode"] == 400, bad.result
    assert any("WebhookSignatureFailures" in r for r in bad.emf_records())


def test_migrate_handler_migrates_an_empty_database(sam_build: Path, runtime_venv: Path) -> None:
    name = f"aikit_artifact_{uuid.uuid4().hex[:10]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        env = lambda_env(sam_build / "MigrateFunction", "aikit-migrate", DATABASE_URL=url)
        result = invoke(sam_build, runtime_venv, "MigrateFunction", {}, env, remaining_ms=300_000)
        assert result.result == {"migrated": True}
        engine = create_engine(url)
        assert {"alembic_version", "api_key_usage", "api_keys"} <= set(inspect(engine).get_table_names())
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
