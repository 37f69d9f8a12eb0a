"""Settings for tests: the machine's Redis, the admin token, and `make_settings` (echo LLM, no Stripe, no
background flush, no .env file).

TEST_REDIS_URL overrides the machine's Redis (127.0.0.1:6379).
"""

from __future__ import annotations

import os
from typing import Any

from aikit.settings import Settings, load_settings

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"  # ADMIN_TOKEN must have 32+ characters


def make_settings(database_url: str, redis_prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": REDIS_URL,
        "redis_key_prefix": redis_prefix,
        "admin_token": ADMIN_TOKEN,
        "llm_provider": "echo",
        "stripe_secret_key": None,
        "flush_interval_seconds": 0,
        "_env_file": None,
    }
    values.update(overrides)
    return load_settings(**values)
