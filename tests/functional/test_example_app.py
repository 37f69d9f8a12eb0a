"""The example app (examples/summarize.py) run the way a user runs it: mounted with AIKIT_ROUTERS by `aikit serve`
(a real server on a real socket, configured only by environment variables) and by the API Lambda handler
(invoked with `sam local generate-event` payloads). Its two LLM calls per request are metered to the caller:
they show in GET /v1/usage, in api_key_usage after `aikit flush` (the seed's SQL), and in what Stripe
holds; its limits refuse with 429."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

import aikit.runtime
from aikit.db.engine import get_engine
from aikit.db.models import Subscription
from aikit.errors import SettingsError
from aikit.flush import Flusher
from aikit.keys import IssuedKey
from aikit.runtime import Runtime
from aikit.settings import Settings, get_settings
from aikit.stripe_gateway import StripeGateway
from tests.fakes.stripe_server import FakeStripe
from tests.support.api import issue_key
from tests.support.aws_lambda import HANDLER_FILE, body_of, header, http_event, imported_api_handler, invoke
from tests.support.billing import EVENT, WINDOW, billing_settings, settings_env
from tests.support.servers import AIKIT, aikit_serve, free_port

ROOT = Path(__file__).resolve().parents[2]
ROUTERS = "examples.summarize:router"
TEXT = "aikit meters every call of your own endpoints to the calling key"
# The seed's documented query, verbatim.
SEED_SQL = ("SELECT date, SUM(tokens) as total_tokens, COUNT(*) as requests FROM api_key_usage "
            "WHERE api_key_id = '{}' GROUP BY date ORDER BY date DESC;")


def words(value: str) -> int:
    return len(value.split())


def expected_tokens(text_: str) -> int:
    """The echo provider's counts for the example's two calls (input words + reply words, reply = "echo: " +
    the prompt's words, the title cut to 12 words)."""
    summary_in = words(f"Summarize: {text_}")
    summary_out = 1 + summary_in
    title_in = words("Title for:") + summary_out
    title_out = min(12, 1 + title_in)
    return summary_in + summary_out + title_in + title_out


@pytest.fixture
def stripe_settings(fresh_pg_url: str, redis_prefix: str, fake: FakeStripe) -> Settings:
    settings = billing_settings(fresh_pg_url, redis_prefix, fake, aikit_routers=ROUTERS)
    gateway = StripeGateway(settings)
    gateway.ensure_setup(event_name=EVENT)
    gateway.close()
    return settings


def paying_key(settings: Settings, fake: FakeStripe, **limits: int) -> tuple[IssuedKey, str]:
    customer = fake.add_customer()
    with Session(get_engine(settings.database_url)) as session:
        session.add(Subscription(id="sub_" + uuid.uuid4().hex[:14], customer_id=customer, status="active"))
        session.commit()
    limits = {"rpm": 1000, "rpd": 10_000, "monthly_tokens": 1_000_000, **limits}
    return issue_key(settings, customer_id=customer, **limits), customer


def seed_query(settings: Settings, api_key_id: str) -> list[tuple[Any, int, int]]:
    with get_engine(settings.database_url).connect() as conn:
        return [(r.date, int(r.total_tokens), int(r.requests))
                for r in conn.execute(text(SEED_SQL.format(api_key_id))).all()]


def serve_env(settings: Settings) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update(settings_env(settings))
    env.update({"AIKIT_ROUTERS": ROUTERS, "LLM_PROVIDER": "echo", "FLUSH_INTERVAL_SECONDS": "0",
                "POWERTOOLS_METRICS_DISABLED": "true", "REDIS_TIMEOUT_SECONDS": "5"})
    return env


def summarize(http: httpx.Client, key: IssuedKey | None, text_: str = TEXT) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key.api_key}"} if key else {}
    return http.post("/v1/summarize", json={"text": text_}, headers=headers)


def test_the_example_through_aikit_serve_is_metered_billed_and_limited(
        stripe_settings: Settings, fake: FakeStripe) -> None:
    settings = stripe_settings
    key, customer = paying_key(settings, fake)
    per_minute, _ = paying_key(settings, fake, rpm=2)
    tiny_quota, _ = paying_key(settings, fake, monthly_tokens=30)
    per_request = expected_tokens(TEXT)
    env = serve_env(settings)

    with aikit_serve(env, cwd=ROOT) as base, httpx.Client(base_url=base, timeout=10) as http:
        replies = [summarize(http, key) for _ in range(3)]
        for r in replies:
            assert r.status_code == 200, r.text
            assert r.json()["summary"] == f"echo: Summarize: {TEXT}"
            assert r.json()["tokens"] == per_request
            assert r.headers["X-Request-Id"].startswith("req_")
            assert r.headers["X-RateLimit-Limit-Requests"] == "1000"
        # Counted once per HTTP request, though each makes two metered calls.
        assert replies[-1].headers["X-RateLimit-Remaining-Requests"] == str(1000 - 3)

        usage = http.get("/v1/usage", headers={"Authorization": f"Bearer {key.api_key}"}).json()
        assert usage["tokens_used"] == 3 * per_request
        assert usage["requests"] == 6  # two LLM calls per request

        # Auth like the built-in routes.
        assert summarize(http, None).status_code == 401
        assert summarize(http, None).json()["error"]["code"] == "missing_api_key"
        bad = http.post("/v1/summarize", json={"text": TEXT}, headers={"Authorization": "Bearer ak_nope"})
        assert (bad.status_code, bad.json()["error"]["code"]) == (401, "invalid_api_key")

        # Its limits refuse with 429 and the same headers as /v1/chat/completions.
        codes = [summarize(http, per_minute).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        refused = summarize(http, per_minute)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert "requests per minute" in refused.json()["error"]["message"]
        assert refused.headers["X-RateLimit-Limit-Requests"] == "2"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert summarize(http, tiny_quota).status_code == 200  # 30 tokens: the first request fits...
        over = summarize(http, tiny_quota)
        assert over.status_code == 429 and "monthly token quota" in over.json()["error"]["message"]
        assert over.headers["X-RateLimit-Remaining-Tokens"] == "0"

        # The streamed variant (the MeteredLLM dependency form) is metered too.
        with http.stream("POST", "/v1/summarize/stream", json={"text": "stream me"},
                         headers={"Authorization": f"Bearer {key.api_key}"}) as s:
            assert s.status_code == 200
            streamed = s.read().decode()
        assert streamed == "echo: Summarize: stream me"
        usage = http.get("/v1/usage", headers={"Authorization": f"Bearer {key.api_key}"}).json()
        streamed_tokens = 3 + 4
        assert usage["tokens_used"] == 3 * per_request + streamed_tokens

    # `aikit flush` from the shell, then the seed's SQL.
    flushed = subprocess.run([AIKIT, "flush"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert flushed.returncode == 0, flushed.stderr
    assert json.loads(flushed.stdout)["ok"] is True
    [(_, total, calls)] = seed_query(settings, key.api_key_id)
    assert (total, calls) == (3 * per_request + streamed_tokens, 7)

    # Stripe holds the same tokens once the reporting window has ended.
    later = Flusher(settings).run(now=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2 * WINDOW))
    assert later.ok, later.errors
    assert fake.meter_totals(EVENT)[customer] == total


def test_a_bad_aikit_routers_value_stops_aikit_serve_with_one_line(stripe_settings: Settings) -> None:
    env = serve_env(stripe_settings)
    for value, fragment in (("examples.nowhere:router", "cannot import examples.nowhere"),
                            ("examples.summarize:nothing", "has no attribute nothing"),
                            ("examples.summarize:Document", "not a fastapi.APIRouter"),
                            ("not a spec", "module:attribute")):
        env["AIKIT_ROUTERS"] = value
        result = subprocess.run([AIKIT, "serve", "--port", str(free_port())], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "AIKIT_ROUTERS" in lines[0] and fragment in lines[0]


# ---------------------------------------------------------------------------------------- Lambda handler


@pytest.fixture
def handler(stripe_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """functions/api/app.py imported like a cold start, configured only from the environment."""
    for name, value in serve_env(stripe_settings).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    monkeypatch.chdir(ROOT)  # the function's code directory: the user's module is packaged beside the handler
    with imported_api_handler(monkeypatch) as module:
        yield module


def test_the_example_through_the_lambda_handler(handler: ModuleType, stripe_settings: Settings,
                                                fake: FakeStripe) -> None:
    settings = stripe_settings
    key, customer = paying_key(settings, fake)
    limited, _ = paying_key(settings, fake, rpm=1)
    event = json.loads((ROOT / "events" / "summarize.json").read_text())  # from `sam local generate-event`
    event["headers"]["authorization"] = f"Bearer {key.api_key}"
    document = json.loads(event["body"])["text"]

    first = invoke(handler, event)
    assert first["statusCode"] == 200, body_of(first)
    reply = json.loads(body_of(first))
    assert reply["tokens"] == expected_tokens(document)
    assert header(first, "x-ratelimit-limit-requests") == "1000"
    again = invoke(handler, http_event(event, "POST", "/v1/summarize", {"text": TEXT},
                                       {"Authorization": f"Bearer {key.api_key}"}, b64=True))
    assert again["statusCode"] == 200, body_of(again)
    missing = invoke(handler, http_event(event, "POST", "/v1/summarize", {"text": TEXT}))
    assert missing["statusCode"] == 401
    codes = [invoke(handler, http_event(event, "POST", "/v1/summarize", {"text": TEXT},
                                        {"Authorization": f"Bearer {limited.api_key}"}))["statusCode"]
             for _ in range(2)]
    assert codes == [200, 429]

    usage = invoke(handler, http_event(event, "GET", "/v1/usage", None, {"Authorization": f"Bearer {key.api_key}"}))
    total = expected_tokens(document) + expected_tokens(TEXT)
    assert json.loads(body_of(usage))["tokens_used"] == total

    runtime: Runtime = handler.app.state.runtime
    summary = Flusher(runtime.settings).run(now=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2 * WINDOW))
    assert summary.ok, summary.errors
    assert seed_query(settings, key.api_key_id)[0][1:] == (total, 4)
    assert fake.meter_totals(EVENT)[customer] == total


def test_a_bad_aikit_routers_value_fails_the_lambda_cold_start_with_one_line(
        stripe_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in serve_env(stripe_settings).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AIKIT_ROUTERS", "examples.summarize:router,examples.nowhere:router")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(aikit.runtime, "_runtime", None)
    get_settings.cache_clear()
    spec = importlib.util.spec_from_file_location(f"api_lambda_{uuid.uuid4().hex[:8]}", HANDLER_FILE)
    assert spec is not None and spec.loader is not None
    try:
        with pytest.raises(SettingsError) as info:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
    finally:
        get_settings.cache_clear()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("invalid setting AIKIT_ROUTERS: examples.nowhere:router: cannot import")
