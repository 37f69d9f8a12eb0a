"""Helpers of the artifact tests: the settings of a Lambda run as environment variables, and the tokens that
reached Postgres."""

from __future__ import annotations

from sqlalchemy import create_engine, func, select

from aikit.db.models import ApiKeyUsage
from tests.support.settings import REDIS_URL


def lambda_settings_env(pg_url: str, redis_prefix: str, **extra: str) -> dict[str, str]:
    return {"DATABASE_URL": pg_url, "REDIS_URL": REDIS_URL, "REDIS_KEY_PREFIX": redis_prefix, "LLM_PROVIDER": "echo",
            **extra}


def tokens_in_postgres(pg_url: str, api_key_id: str) -> int:
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        total = conn.execute(select(func.coalesce(func.sum(ApiKeyUsage.tokens), 0))
                             .where(ApiKeyUsage.api_key_id == api_key_id)).scalar_one()
    engine.dispose()
    return int(total)
