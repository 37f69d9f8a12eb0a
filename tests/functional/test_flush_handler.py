"""The flush Lambda's handler (functions/flush/app.py), called in-process the way Lambda calls it: the
EventBridge scheduled event of `sam local generate-event cloudwatch scheduled-event` and a context with
get_remaining_time_in_millis. Settings come from the environment, as in Lambda."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from aikit.settings import get_settings
from tests.fakes.stripe_server import FakeStripe
from tests.support.aws_lambda import LambdaContext
from tests.support.billing import Billing, past_window_start, settings_env
from tests.support.db import empty_database
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
EVENT_FILE = ROOT / "events" / "flush_scheduled.json"
# What `sam local generate-event cloudwatch scheduled-event` prints (used when events/ has no copy).
SCHEDULED_EVENT: dict[str, Any] = {
    "id": "cdc73f9d-aea9-11e3-9d5a-835b769c0d9c",
    "detail-type": "Scheduled Event",
    "source": "aws.events",
    "account": "123456789012",
    "time": "1970-01-01T00:00:00Z",
    "region": "us-east-1",
    "resources": ["arn:aws:events:us-east-1:123456789012:rule/ExampleRule"],
    "detail": {},
}


def scheduled_event() -> dict[str, Any]:
    if EVENT_FILE.exists():
        event: dict[str, Any] = json.loads(EVENT_FILE.read_text())
        return event
    return dict(SCHEDULED_EVENT)


def load_handler() -> Any:
    spec = importlib.util.spec_from_file_location("aikit_flush_lambda_app", ROOT / "functions" / "flush" / "app.py")
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.handler


@pytest.fixture
def billing(flush_db: str, redis_prefix: str, fake: FakeStripe, monkeypatch: pytest.MonkeyPatch) -> Iterator[Billing]:
    empty_database(flush_db)
    h = Billing.create(flush_db, redis_prefix, fake)
    for name in ("DATABASE_SECRET_ARN", "STRIPE_SECRET_ARN", "ADMIN_TOKEN_SECRET_ARN", "LLM_SECRET_ARN"):
        monkeypatch.delenv(name, raising=False)  # no Secrets Manager here
    use_env(h, monkeypatch)
    yield h
    get_settings.cache_clear()


def use_env(h: Billing, monkeypatch: pytest.MonkeyPatch, **extra: str) -> None:
    for name, value in {**settings_env(h.settings), **extra}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()


def test_scheduled_event_flushes_and_bills_exactly_once(billing: Billing, fake: FakeStripe) -> None:
    customers = [billing.customer() for _ in range(3)]
    for n, customer in enumerate(customers):
        billing.record(billing.key(customer), customer, 40, ts=past_window_start() + n, seed=n)
    handler = load_handler()

    result = handler(scheduled_event(), LambdaContext("aikit-flush", remaining_ms=290_000))

    assert result["ok"] and not result["stopped_early"] and not result["skipped"]
    assert result["rows_inserted"] == 120 and result["reports_sent"] == result["stripe_calls"] == 3
    billing.assert_exact()
    again = handler(scheduled_event(), LambdaContext("aikit-flush", remaining_ms=290_000))
    assert again["ok"] and again["rows_inserted"] == 0 and again["stripe_calls"] == 0


def test_little_time_left_still_flushes_within_a_second(billing: Billing, fake: FakeStripe) -> None:
    customer = billing.customer()
    billing.record(billing.key(customer), customer, 30, ts=past_window_start() + 1)
    handler = load_handler()

    # 20 s are kept as a safety margin: one second of budget remains; enough for this much usage.
    result = handler(scheduled_event(), LambdaContext("aikit-flush", remaining_ms=20_500))

    assert result["ok"] and result["duration_ms"] < 5_000
    if result["stopped_early"]:  # a slow machine: the next invocation finishes the job
        result = handler(scheduled_event(), LambdaContext("aikit-flush", remaining_ms=290_000))
        assert result["ok"]
    billing.assert_exact()


def test_a_failed_flush_fails_the_invocation(billing: Billing, monkeypatch: pytest.MonkeyPatch) -> None:
    use_env(billing, monkeypatch, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", REDIS_TIMEOUT_SECONDS="0.2")
    handler = load_handler()

    with pytest.raises(RuntimeError, match="flush failed"):
        handler(scheduled_event(), LambdaContext("aikit-flush", remaining_ms=60_000))
