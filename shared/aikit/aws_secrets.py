"""Secrets Manager -> environment overrides for Settings: no secret value sits in a Lambda's environment.

The template sets only ARNs and endpoints:
  DATABASE_SECRET_ARN (+ DATABASE_HOST, DATABASE_PORT, DATABASE_NAME)  -> DATABASE_URL
      secret JSON {"username", "password"} (+ "host", "port", "dbname" from the RDS attachment)
  STRIPE_SECRET_ARN       -> STRIPE_SECRET_KEY, STRIPE_WEBHOOK_SECRET, STRIPE_EVENT_DESTINATION_SECRET
                             JSON {"secret_key", "webhook_secret", "event_destination_secret"}
  ADMIN_TOKEN_SECRET_ARN  -> ADMIN_TOKEN                                 JSON {"token"} or a plain string
  LLM_SECRET_ARN          -> OPENAI_API_KEY, ANTHROPIC_API_KEY           JSON {"openai_api_key", ...}
Unset or empty *_ARN variables are skipped, so outside AWS this is a no-op.

Values come from Powertools `parameters.get_secret`, cached for MAX_AGE_SECONDS: a cold start reads each
secret once, a warm container rereads it after rotation at most that late. The boto3 client is created on
first use (moto can patch it; clear_cache() drops it), and Powertools' parameters (which import boto3) only
when an ARN is set: outside AWS this module costs nothing at import.

Database password rotation: the database secret is also registered with aikit.db.engine, so a connection
refused for authentication rereads the secret (forced) and retries. SnapStart: refresh_after_snapstart_restore()
rereads every secret after a restore (the snapshot may be days old).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any
from urllib.parse import quote

from aikit.db.engine import use_credentials
from aikit.errors import SecretResolutionError
from aikit.settings import get_settings

MAX_AGE_SECONDS = 300
DEFAULT_DATABASE_NAME = "aikit"
# RDS Proxy requires TLS and presents an ACM certificate that the default trust store verifies.
DEFAULT_SSLMODE = "verify-full"

# JSON field in the secret -> environment variable
_STRIPE_FIELDS = {"secret_key": "STRIPE_SECRET_KEY", "webhook_secret": "STRIPE_WEBHOOK_SECRET",
                  "event_destination_secret": "STRIPE_EVENT_DESTINATION_SECRET"}
_LLM_FIELDS = {"openai_api_key": "OPENAI_API_KEY", "anthropic_api_key": "ANTHROPIC_API_KEY"}
_ADMIN_FIELDS = ("token", "admin_token")


def resolve_secret_settings(
    environ: Mapping[str, str] = os.environ, *, force_fetch: bool = False
) -> dict[str, str]:
    """Environment overrides built from the secrets named by the *_ARN variables in `environ`."""
    overrides: dict[str, str] = {}

    db_arn = _arn(environ, "DATABASE_SECRET_ARN")
    if db_arn:
        overrides["DATABASE_URL"] = _database_url(db_arn, environ, force_fetch)

    stripe_arn = _arn(environ, "STRIPE_SECRET_ARN")
    if stripe_arn:
        data = _json_secret(stripe_arn, "STRIPE_SECRET_ARN", force_fetch)
        overrides.update(_fields(data, _STRIPE_FIELDS, "STRIPE_SECRET_ARN", required=("secret_key",)))

    admin_arn = _arn(environ, "ADMIN_TOKEN_SECRET_ARN")
    if admin_arn:
        overrides["ADMIN_TOKEN"] = _admin_token(admin_arn, force_fetch)

    llm_arn = _arn(environ, "LLM_SECRET_ARN")
    if llm_arn:
        data = _json_secret(llm_arn, "LLM_SECRET_ARN", force_fetch)
        overrides.update(_fields(data, _LLM_FIELDS, "LLM_SECRET_ARN", required=()))

    return overrides


def apply_secret_settings(
    environ: MutableMapping[str, str] = os.environ, *, force_fetch: bool = False
) -> list[str]:
    """Writes the overrides into `environ` (before Settings are built) and returns the names that changed.

    Cheap to call on every invocation: the secrets are cached. When a value changed (first call, rotation),
    the cached get_settings() is dropped so the next call sees it.
    """
    overrides = resolve_secret_settings(environ, force_fetch=force_fetch)
    changed = sorted(name for name, value in overrides.items() if environ.get(name) != value)
    if changed:
        environ.update(overrides)
        get_settings.cache_clear()
    return changed


def clear_cache() -> None:
    """Forgets cached secret values and the Secrets Manager client (tests; forced rereads)."""
    if "aws_lambda_powertools.utilities.parameters" in sys.modules:
        from aws_lambda_powertools.utilities import parameters

        parameters.clear_caches()  # type: ignore[no-untyped-call]


def refresh_after_snapstart_restore() -> bool:
    """Under SnapStart, registers a hook that rereads every secret after each restore; True if registered.

    snapshot_restore_py exists only in Lambda runtimes with SnapStart: elsewhere this does nothing.
    """
    try:
        from snapshot_restore_py import register_after_restore  # type: ignore[import-not-found]
    except ImportError:
        return False
    register_after_restore(_reread_secrets)
    return True


def _reread_secrets() -> None:
    changed = apply_secret_settings(force_fetch=True)
    if changed:
        from aikit.observability import logger

        logger.info("secrets_reread_after_restore", extra={"changed": changed})


def _arn(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def _fetch(arn: str, variable: str, force_fetch: bool, *, as_json: bool) -> Any:
    from aws_lambda_powertools.utilities import parameters

    try:
        if as_json:
            return parameters.get_secret(
                arn, transform="json", max_age=MAX_AGE_SECONDS, force_fetch=force_fetch
            )
        return parameters.get_secret(arn, max_age=MAX_AGE_SECONDS, force_fetch=force_fetch)
    except parameters.exceptions.TransformParameterError:
        raise SecretResolutionError(f"the secret in {variable} is not a JSON object") from None
    except Exception as exc:  # GetParameterError, missing region or credentials
        # The AWS error names the secret and the reason (not found, access denied); it never holds the value.
        raise SecretResolutionError(f"cannot read the secret in {variable}: {exc}") from None


def _json_secret(arn: str, variable: str, force_fetch: bool) -> dict[str, Any]:
    data = _fetch(arn, variable, force_fetch, as_json=True)
    if not isinstance(data, dict):
        raise SecretResolutionError(f"the secret in {variable} is not a JSON object")
    return data


def _fields(
    data: Mapping[str, Any], mapping: Mapping[str, str], variable: str, required: tuple[str, ...]
) -> dict[str, str]:
    out: dict[str, str] = {}
    for field, env_name in mapping.items():
        value = data.get(field)
        if isinstance(value, str) and value.strip():
            out[env_name] = value.strip()
        elif field in required:
            raise SecretResolutionError(f"the secret in {variable} lacks a non-empty {field!r}")
    return out


def _database_url(arn: str, environ: Mapping[str, str], force_fetch: bool) -> str:
    data = _json_secret(arn, "DATABASE_SECRET_ARN", force_fetch)
    for field in ("username", "password"):
        if not isinstance(data.get(field), str) or not data[field]:
            raise SecretResolutionError(f"the secret in DATABASE_SECRET_ARN lacks a non-empty {field!r}")
    # The proxy endpoint from the environment wins over the cluster host the RDS attachment writes.
    host = environ.get("DATABASE_HOST", "").strip() or str(data.get("host") or "")
    if not host:
        raise SecretResolutionError(
            "DATABASE_HOST is not set and the secret in DATABASE_SECRET_ARN has no 'host'"
        )
    port = environ.get("DATABASE_PORT", "").strip() or str(data.get("port") or 5432)
    if not port.isdigit():
        raise SecretResolutionError("DATABASE_PORT must be a number")
    name = environ.get("DATABASE_NAME", "").strip() or str(data.get("dbname") or DEFAULT_DATABASE_NAME)
    sslmode = environ.get("DATABASE_SSLMODE", DEFAULT_SSLMODE).strip()
    query = f"?sslmode={quote(sslmode)}" if sslmode and sslmode != "disable" else ""
    user = quote(data["username"], safe="")
    password = quote(data["password"], safe="")
    use_credentials((host, int(port), name), lambda force: _database_login(arn, force))
    return f"postgresql://{user}:{password}@{host}:{port}/{quote(name, safe='')}{query}"


def _database_login(arn: str, force_fetch: bool) -> dict[str, str]:
    data = _json_secret(arn, "DATABASE_SECRET_ARN", force_fetch)
    return {"user": str(data.get("username") or ""), "password": str(data.get("password") or "")}


def _admin_token(arn: str, force_fetch: bool) -> str:
    raw = _fetch(arn, "ADMIN_TOKEN_SECRET_ARN", force_fetch, as_json=False)
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except ValueError:
            raise SecretResolutionError("the secret in ADMIN_TOKEN_SECRET_ARN is not valid JSON") from None
        for field in _ADMIN_FIELDS:
            value = data.get(field) if isinstance(data, dict) else None
            if isinstance(value, str) and value.strip():
                return value.strip()
        raise SecretResolutionError("the secret in ADMIN_TOKEN_SECRET_ARN lacks a non-empty 'token'")
    if not stripped:
        raise SecretResolutionError("the secret in ADMIN_TOKEN_SECRET_ARN is empty")
    return stripped
