"""Every endpoint of the app's OpenAPI schema, fuzzed by schemathesis (valid and invalid inputs), with and
without credentials: never a 500, never a stack trace or a file path, never a secret in an answer."""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from aikit.runtime import Runtime
from aikit.settings import load_settings
from tests.support.api import bearer, full_app
from tests.support.hostile import Env, assert_clean, billing_env
from tests.support.settings import ADMIN_TOKEN, REDIS_URL

EXAMPLES = 25  # per operation and mode: the whole file stays well under a minute


@pytest.fixture(scope="module")
def fuzz_env(pg_url: str) -> Iterator[Env]:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    with billing_env(pg_url, prefix) as (env, _client):
        yield env
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()


# The schema is loaded at import (schemathesis parametrizes at collection); the app's runtime is a placeholder
# until `live_app` puts the real one in (routes read `app.state.runtime` on every request).
APP = full_app(Runtime(load_settings(_env_file=None)))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES,
                                deterministic=True)


SEEN: dict[str, Counter[int]] = defaultdict(Counter)  # operation -> statuses answered
# Operations whose valid examples must get through to the handler at least once (else the fuzz only
# exercised validation and auth).
MUST_SUCCEED = ("POST /v1/chat/completions", "GET /v1/usage", "GET /v1/admin/keys", "POST /v1/admin/keys",
                "POST /v1/billing/checkout")


@pytest.fixture(scope="module")
def live_app(fuzz_env: Env) -> Iterator[Env]:
    placeholder = APP.state.runtime
    APP.state.runtime = fuzz_env.runtime
    yield fuzz_env
    APP.state.runtime = placeholder
    for name in MUST_SUCCEED:
        if name in SEEN:
            assert any(200 <= s < 300 for s in SEEN[name]), f"{name} never succeeded: {dict(SEEN[name])}"


def credentials(path: str, env: Env) -> dict[str, str]:
    """The credential the route wants: the admin token for /v1/admin, else a subscribed API key."""
    if path.startswith("/v1/admin"):
        return bearer(ADMIN_TOKEN)
    return bearer(env.key.api_key)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_500_no_trace_no_secret(case: Any, live_app: Env) -> None:
    for headers in (credentials(case.path, live_app), {}):
        response = case.call(headers={**(case.headers or {}), **headers})
        SEEN[f"{case.method.upper()} {case.path}"][response.status_code] += 1
        assert_clean(response, live_app.secrets)


def test_schema_covers_every_route() -> None:
    """The fuzz above reaches every route the app serves (a new route gets fuzzed without anyone asking)."""
    paths = set(schema.raw_schema["paths"])
    for route in ("/v1/chat/completions", "/v1/usage", "/v1/admin/keys", "/v1/admin/keys/{api_key_id}/revoke",
                  "/v1/admin/usage", "/v1/billing/checkout", "/v1/billing/portal", "/v1/webhooks/stripe"):
        assert route in paths, f"{route} is not in the OpenAPI schema"
