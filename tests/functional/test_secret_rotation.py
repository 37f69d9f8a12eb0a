"""Database password rotation against a Postgres that checks passwords (scram-sha-256, a throwaway cluster)
and the secret in Secrets Manager (moto): a running function whose engine was built from the old secret keeps
connecting after the password and the secret change, by reading the secret again on the refused login; a
secret that does not match fails plainly, once, without a loop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from aikit import aws_secrets
from aikit.db import engine as db_engine
from aikit.db.engine import get_engine
from aikit.settings import load_settings
from tests.support.servers import free_port

FIRST, SECOND = "first-Passw0rd", "second-Passw0rd"


def _run_as_postgres(*args: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=120)


@pytest.fixture(scope="module")
def scram_postgres() -> Iterator[int]:
    root = tempfile.mkdtemp(prefix="aikit-rotation-pg-", dir="/tmp")
    shutil.chown(root, "postgres")
    data, pwfile = os.path.join(root, "data"), os.path.join(root, "pw")
    with open(pwfile, "w") as f:
        f.write(FIRST)
    shutil.chown(pwfile, "postgres")
    port = free_port()
    _run_as_postgres("initdb", "-D", data, "-A", "scram-sha-256", "-U", "postgres", f"--pwfile={pwfile}")
    _run_as_postgres("pg_ctl", "-D", data, "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off",
                     "-l", os.path.join(root, "log"), "-w", "start")
    try:
        yield port
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", "pg_ctl", "-D", data, "-w", "stop", "-m", "immediate"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)


def _environ(arn: str, port: int) -> dict[str, str]:
    return {"DATABASE_SECRET_ARN": arn, "DATABASE_HOST": "127.0.0.1", "DATABASE_PORT": str(port),
            "DATABASE_NAME": "postgres", "DATABASE_SSLMODE": "disable"}


def _select_one(url: str) -> int:
    with get_engine(url).connect() as conn:
        return int(conn.execute(text("SELECT 1")).scalar_one())


def test_a_rotated_password_is_read_again_on_the_refused_login(scram_postgres: int, secretsmanager: Any) -> None:
    arn = secretsmanager.create_secret(Name="aikit/db-rotation", SecretString=json.dumps(
        {"username": "postgres", "password": FIRST}))["ARN"]
    environ = _environ(arn, scram_postgres)
    url = load_settings(database_url=aws_secrets.resolve_secret_settings(environ)["DATABASE_URL"],
                        _env_file=None).database_url
    address = ("127.0.0.1", scram_postgres, "postgres")
    try:
        assert _select_one(url) == 1

        # Secrets Manager rotation: the database password changes, then the secret's current version.
        with get_engine(url).connect() as conn:
            conn.execute(text(f"ALTER ROLE postgres PASSWORD '{SECOND}'"))
            conn.commit()
        secretsmanager.put_secret_value(SecretId=arn,
                                        SecretString=json.dumps({"username": "postgres", "password": SECOND}))
        get_engine(url).dispose()  # new connections from here on, with the engine built from the old URL

        assert _select_one(url) == 1  # refused with FIRST (cached), read the secret again, in with SECOND
        assert _select_one(url) == 1

        # A secret that does not open the database: one refusal, then a plain error, no loop.
        secretsmanager.put_secret_value(SecretId=arn, SecretString=json.dumps({"username": "postgres",
                                                                        "password": "wrong-one"}))
        aws_secrets.clear_cache()
        get_engine(url).dispose()
        with pytest.raises(DBAPIError) as info:
            _select_one(url)
        assert db_engine.is_auth_failure(info.value.orig)
    finally:
        db_engine.use_credentials(address, None)
        get_engine(url).dispose()


def test_without_a_secret_the_url_credentials_are_used_as_they_are(scram_postgres: int) -> None:
    url = f"postgresql+pg8000://postgres:wrong@127.0.0.1:{scram_postgres}/postgres"
    with pytest.raises(DBAPIError) as info:
        _select_one(url)
    assert db_engine.is_auth_failure(info.value.orig)
    get_engine(url).dispose()
