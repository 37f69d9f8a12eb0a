"""Pricing per model and token type (aikit.pricing), end to end on the strict local Stripe.

Requests go through the API to the real OpenAI provider pointed at FakeOpenAI (which reports cached tokens),
the flush reports the cost meter to FakeStripe through the real stripe SDK, and FakeStripe computes the invoice
from its prices and meter totals. Every expected figure is computed here, independently, from PRICES with
Decimal: Σ tokens * rate per model and token type.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as redis_lib
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from stripe import StripeClient

from aikit import cli
from aikit.api.app import create_app
from aikit.db.engine import get_engine
from aikit.db.migrate import upgrade
from aikit.db.models import ApiKeyUsage, MeterReport, Subscription
from aikit.flush import Flusher
from aikit.keys import IssuedKey
from aikit.reconcile import reconcile
from aikit.runtime import Runtime
from aikit.settings import Settings, get_settings, load_settings
from aikit.stripe_gateway import StripeGateway, setup_spec
from tests.fakes.llm_servers import FakeOpenAI, openai_server
from tests.fakes.stripe_server import FakeStripe
from tests.support.api import issue_key
from tests.support.billing import WINDOW, billing_settings, settings_env
from tests.support.cli import base_env
from tests.support.db import empty_database
from tests.support.servers import AIKIT
from tests.support.settings import ADMIN_TOKEN

COST_EVENT = "aikit_cost"
# USD per million tokens. gpt-4o-mini is exact (beats gpt-4o*), gpt-4o-2024* is longer than gpt-4o* (wins).
PRICES: dict[str, dict[str, Any]] = {
    "gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.6},
    "gpt-4o*": {"input": 2.5, "cached_input": 1.25, "output": 10},
    "gpt-4o-2024*": {"input": 5, "cached_input": 2.5, "output": 15},
    "o3": {"input": "2", "cached_input": "0.5", "output": "8"},
    "claude-*": {"input": 3, "output": 15},  # cached input at the input rate
}
RATE_OF = {"gpt-4o-mini": "gpt-4o-mini", "gpt-4o": "gpt-4o*", "gpt-4o-2024-08-06": "gpt-4o-2024*", "o3": "o3",
           "claude-sonnet-4": "claude-*"}
MILLION = Decimal(1_000_000)


def usd(model: str, prompt: int, completion: int, cached: int, prices: dict[str, dict[str, Any]] = PRICES
        ) -> Decimal:
    """What one call costs, from the table alone."""
    rate = {k: Decimal(str(v)) for k, v in prices[RATE_OF[model]].items()}
    cached_rate = rate.get("cached_input", rate["input"])
    return ((prompt - cached) * rate["input"] + cached * cached_rate + completion * rate["output"]) / MILLION


def cents(amount: Decimal) -> int:
    """Stripe's rounding of an invoice line: to the cent, half up."""
    return int((amount * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with openai_server() as server:
        yield server


@dataclass
class Priced:
    settings: Settings
    fake: FakeStripe
    upstream: FakeOpenAI
    price_id: str = ""
    expected: dict[str, Decimal] = field(default_factory=dict)  # customer -> USD due
    tokens: dict[str, int] = field(default_factory=dict)

    def client(self) -> TestClient:
        return TestClient(create_app(runtime=Runtime(self.settings)))

    def customer(self, *, allowed_models: list[str] | None = None) -> tuple[str, IssuedKey]:
        customer = self.fake.add_customer()
        # The first billing period began a day ago: everything metered now lands on its invoice.
        self.fake.add_subscription(customer, self.price_id, start=int(self.fake.now()) - 86400)
        key = issue_key(self.settings, email=f"{customer}@example.com", customer_id=customer, rpm=100_000,
                        rpd=1_000_000, monthly_tokens=10**12, allowed_models=allowed_models)
        with Session(get_engine(self.settings.database_url)) as session:
            session.add(Subscription(id="sub_" + customer, customer_id=customer, status="active"))
            session.commit()
        self.expected[customer] = Decimal(0)
        self.tokens[customer] = 0
        return customer, key

    def call(self, client: TestClient, key: IssuedKey, customer: str, model: str, usage: tuple[int, int, int], *,
             stream: bool, prices: dict[str, dict[str, Any]] = PRICES) -> None:
        prompt, completion, cached = usage
        self.upstream.usage = {"prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": cached}
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key.api_key}"}, json=body)
        assert r.status_code == 200, r.text
        if stream:
            chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: {")]
            reported = next(c["usage"] for c in chunks if c.get("usage"))
        else:
            reported = r.json()["usage"]
        assert (reported["prompt_tokens"], reported["completion_tokens"]) == (prompt, completion)
        self.expected[customer] += usd(model, prompt, completion, cached, prices)
        self.tokens[customer] += prompt + completion

    def flush(self) -> None:
        flusher = Flusher(self.settings, sleep=lambda _: None)
        try:
            summary = flusher.run(now=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=WINDOW))
        finally:
            flusher.close()
        assert summary.ok, summary.errors

    def invoice(self, customer: str) -> tuple[int, int]:
        """(cost meter quantity, cents) of the customer's open invoice, as FakeStripe computes it."""
        [period] = [i for i in self.fake.invoices(customer) if i.status == "open"]
        [line] = period.lines
        assert line.event_name == COST_EVENT
        return line.quantity, period.amount


def priced_settings(database_url: str, prefix: str, fake: FakeStripe, upstream: FakeOpenAI,
                    prices: dict[str, dict[str, Any]] = PRICES) -> Settings:
    return billing_settings(database_url, prefix, fake, price_table=prices, llm_provider="openai",
                            openai_base_url=upstream.base_url, openai_api_key=FakeOpenAI.api_key)


@pytest.fixture
def priced(flush_db: str, redis_prefix: str, fake: FakeStripe, upstream: FakeOpenAI) -> Priced:
    empty_database(flush_db)
    upstream.reset()
    settings = priced_settings(flush_db, redis_prefix, fake, upstream)
    gateway = StripeGateway(settings)
    try:
        spec = setup_spec(settings)
        result = gateway.ensure_setup(event_name=spec.event_name, spec=spec)
    finally:
        gateway.close()
    return Priced(settings, fake, upstream, result.price_id)


MIX = [  # model, (prompt, completion, cached), stream
    ("gpt-4o-mini", (123_457, 45_679, 20_001), False),
    ("gpt-4o", (98_765, 4_321, 0), True),
    ("gpt-4o-2024-08-06", (7_777, 3_333, 1_111), False),
    ("o3", (333_333, 222_221, 111_111), True),
    ("claude-sonnet-4", (55_555, 9_999, 5_000), False),
    ("gpt-4o-mini", (1, 1, 0), True),
]


def test_the_invoice_equals_tokens_times_rates_across_models_streams_and_cached_tokens(priced: Priced) -> None:
    first, k1 = priced.customer()
    second, k2 = priced.customer()
    with priced.client() as client:
        for n, (model, usage, stream) in enumerate(MIX):
            priced.call(client, k1, first, model, usage, stream=stream)
            if n % 2:
                priced.call(client, k2, second, model, (usage[0] // 3, usage[1] // 7, usage[2] // 5), stream=not stream)
    priced.flush()

    for customer in (first, second):
        quantity, amount = priced.invoice(customer)
        due = priced.expected[customer]
        assert Decimal(quantity) / 10**12 == due  # the meter holds the exact cost in 1e-12 USD
        assert amount == cents(due) > 0  # Stripe's invoice, from its price and the meter total
    # One cost-meter event per customer for the window, whatever the number of requests and models.
    assert sorted(e.customer for e in priced.fake.meter_events) == sorted([first, second])
    assert {e.event_name for e in priced.fake.meter_events} == {COST_EVENT}

    # The usage the customer sees is what Stripe invoices, per model and token type.
    with priced.client() as client:
        body = client.get("/v1/usage", headers={"Authorization": f"Bearer {k1.api_key}"}).json()
    assert Decimal(body["cost"]) == priced.expected[first]
    assert body["tokens_used"] == priced.tokens[first]
    by_model = {m["model"]: m for m in body["by_model"]}
    mini = by_model["gpt-4o-mini"]["by_type"]
    assert (mini["input"]["tokens"], mini["cached_input"]["tokens"], mini["output"]["tokens"]) == (
        123_457 - 20_001 + 1, 20_001, 45_679 + 1)
    assert Decimal(by_model["o3"]["cost"]) == usd("o3", 333_333, 222_221, 111_111)
    assert sum(Decimal(m["cost"]) for m in body["by_model"]) == priced.expected[first]

    report = reconcile(priced.settings)
    assert report.ok, report.as_dict()
    cost = report.as_dict()["customers"][first]["cost"]
    assert Decimal(cost["stripe_money"]) == Decimal(cost["sent_money"]) == priced.expected[first]
    assert cost["tokens"] == priced.tokens[first]


def test_a_rate_change_applies_from_then_on_and_never_rewrites_history(
        priced: Priced, flush_db: str, redis_prefix: str) -> None:
    customer, key = priced.customer()
    with priced.client() as client:
        priced.call(client, key, customer, "o3", (100_000, 50_000, 10_000), stream=False)
    priced.flush()
    before = priced.invoice(customer)

    dearer = {**PRICES, "o3": {"input": 4, "cached_input": 1, "output": 16}}
    priced.settings = priced_settings(flush_db, redis_prefix, priced.fake, priced.upstream, dearer)
    with priced.client() as client:
        priced.call(client, key, customer, "o3", (100_000, 50_000, 10_000), stream=True, prices=dearer)
    priced.flush()

    quantity, amount = priced.invoice(customer)
    assert Decimal(quantity) / 10**12 == priced.expected[customer] == (
        usd("o3", 100_000, 50_000, 10_000) + usd("o3", 100_000, 50_000, 10_000, dearer))
    assert quantity > before[0] and amount == cents(priced.expected[customer])
    with get_engine(flush_db).connect() as conn:
        costs = sorted(conn.execute(select(ApiKeyUsage.cost)).scalars())
    assert costs == [int(usd("o3", 100_000, 50_000, 10_000) * 10**12),
                     int(usd("o3", 100_000, 50_000, 10_000, dearer) * 10**12)]


@pytest.mark.parametrize("stream", [False, True])
def test_an_unpriced_model_is_refused_before_the_upstream_and_nothing_is_billed(
        priced: Priced, stream: bool) -> None:
    _, key = priced.customer()
    body: dict[str, Any] = {"model": "gpt-5-turbo", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    with priced.client() as client:
        r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key.api_key}"}, json=body)
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "gpt-5-turbo" in error["message"] and "PRICE_TABLE" in error["message"]
    assert "PRICE_TABLE_FILE" in error["message"]
    assert priced.upstream.requests == []  # never sent upstream
    priced.flush()
    with get_engine(priced.settings.database_url).connect() as conn:
        assert conn.execute(select(func.count()).select_from(ApiKeyUsage)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(MeterReport)).scalar_one() == 0
    assert priced.fake.meter_events == []


def test_a_key_allow_list_refuses_other_models_with_403(priced: Priced) -> None:
    customer, key = priced.customer(allowed_models=["gpt-4o-mini", "claude-*"])
    with priced.client() as client:
        r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key.api_key}"},
                        json={"model": "o3", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "model_not_allowed" and "o3" in r.json()["error"]["message"]
        assert priced.upstream.requests == []
        priced.call(client, key, customer, "claude-sonnet-4", (10, 5, 0), stream=False)
        priced.call(client, key, customer, "gpt-4o-mini", (10, 5, 0), stream=True)
        listed = client.get("/v1/admin/keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    assert [k["allowed_models"] for k in listed["data"]] == [["gpt-4o-mini", "claude-*"]]
    assert len(priced.upstream.requests) == 2


def test_the_admin_api_takes_an_allow_list_and_refuses_a_bad_one(priced: Priced) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with priced.client() as client:
        ok = client.post("/v1/admin/keys", headers=admin, json={"email": "a@example.com", "allowed_models": ["o3"]})
        assert ok.status_code == 201, ok.text
        bad = client.post("/v1/admin/keys", headers=admin, json={"email": "b@example.com", "allowed_models": []})
        assert bad.status_code == 422 and "allowed_models" in bad.json()["error"]["message"]


def test_stripe_setup_twice_creates_nothing_the_second_time(
        priced: Priced, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # `priced` ran the setup once already (the cost meter, product and price exist).
    objects = (len(priced.fake.meters), len(priced.fake.products), len(priced.fake.prices))
    for name, value in settings_env(priced.settings).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PRICE_TABLE", json.dumps(PRICES))
    get_settings.cache_clear()
    try:
        capsys.readouterr()
        assert cli.main(["stripe", "setup"]) == 0
        out = json.loads(capsys.readouterr().out)
    finally:
        get_settings.cache_clear()
    assert out["created"] == [] and out["price_id"] == priced.price_id
    assert (out["event_name"], out["unit"], out["unit_amount_decimal"]) == (COST_EVENT, "1e-12 USD", "0.0000000001")
    assert out["models"]["gpt-4o-mini"] == {"input": "0.15", "cached_input": "0.075", "output": "0.6"}
    assert (len(priced.fake.meters), len(priced.fake.products), len(priced.fake.prices)) == objects
    price = priced.fake.prices[priced.price_id]
    assert (price["unit_amount_decimal"], price["currency"]) == ("0.0000000001", "usd")


def test_stripe_setup_from_scratch_prints_what_it_created(fake: FakeStripe, flush_db: str, redis_prefix: str,
                                                          upstream: FakeOpenAI) -> None:
    settings = priced_settings(flush_db, redis_prefix, fake, upstream)
    gateway = StripeGateway(settings)
    try:
        spec = setup_spec(settings)
        first = gateway.ensure_setup(event_name=spec.event_name, spec=spec)
        again = gateway.ensure_setup(event_name=spec.event_name, spec=spec)
    finally:
        gateway.close()
    assert first.created == ["meter", "product", "price"]
    assert again.created == [] and again.price_id == first.price_id


def test_bad_price_table_entries_each_get_one_line(tmp_path: Path) -> None:
    table = {"ok": {"input": 1, "output": 2}, "typo": {"inptu": 1, "output": 2}, "neg": {"input": -1, "output": 1},
             "fine": {"input": 0.0000001, "output": 1}, "word": {"input": "cheap", "output": 1}, "flat": 3}
    price_file = tmp_path / "prices.json"
    price_file.write_text(json.dumps({"file-model": {"input": 1}}))
    env = base_env(DATABASE_URL=f"sqlite:///{tmp_path}/aikit.db", PRICE_TABLE=json.dumps(table),
                   PRICE_TABLE_FILE=str(price_file))
    result = subprocess.run([AIKIT, "keys", "list"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 6, result.stderr  # one per bad entry; "ok" is fine
    for name in ("typo", "neg", "fine", "word", "flat", "file-model"):
        assert sum(f"'{name}'" in line for line in lines) == 1, (name, lines)
    assert all(line.startswith("error: invalid setting PRICE_TABLE") for line in lines)
    assert "Traceback" not in result.stderr


def test_without_a_price_table_everything_is_one_token_meter(flush_db: str, redis_prefix: str,
                                                             fake: FakeStripe) -> None:
    settings = billing_settings(flush_db, redis_prefix, fake)
    assert settings.price_book is None
    spec = setup_spec(settings)
    assert (spec.event_name, spec.lookup_key, spec.unit_amount_decimal) == ("api_tokens", "aikit_api_tokens",
                                                                            "0.0002")


def test_the_request_path_meter_stores_the_cost_in_the_stream(priced: Priced) -> None:
    """The Redis record carries the cost; the flush stores it as is (a rate change meanwhile changes nothing)."""
    customer, key = priced.customer()
    runtime = Runtime(priced.settings)

    async def go() -> None:
        try:
            await runtime.meter.record(key.api_key_id, 1_500, customer, model="gpt-4o", input_tokens=1_000,
                                       output_tokens=500, cached_tokens=400)
        finally:
            await runtime.aclose()

    anyio.run(go)
    client = redis_lib.Redis.from_url(priced.settings.redis_url, decode_responses=True)
    try:
        layout = runtime.layout
        [(_, entry)] = client.xrange(layout.stream(layout.shard_of(key.api_key_id)))
    finally:
        client.close()
    assert int(entry["p"]) == int(usd("gpt-4o", 1_000, 500, 400) * 10**12)


def test_the_embedded_meter_stores_the_cost_too(tmp_path: Path) -> None:
    """`make run`'s meter (memory://, SQLite) writes each event with its cost, and bills the cost meter."""
    settings = load_settings(database_url=f"sqlite:///{tmp_path}/aikit.db", redis_url="memory://",
                             redis_key_prefix=f"p{tmp_path.name[-20:].replace('_', '')}", price_table=PRICES,
                             stripe_secret_key="sk_test_x", flush_interval_seconds=0, _env_file=None)
    upgrade(settings.database_url)
    key = issue_key(settings, customer_id="cus_embedded1")
    runtime = Runtime(settings)

    async def go() -> None:
        try:
            await runtime.meter.record(key.api_key_id, 1_500, "cus_embedded1", model="claude-sonnet-4",
                                       input_tokens=1_000, output_tokens=500, cached_tokens=400)
        finally:
            await runtime.aclose()

    anyio.run(go)
    with get_engine(settings.database_url).connect() as conn:
        assert conn.execute(select(ApiKeyUsage.cost)).scalar_one() == int(
            usd("claude-sonnet-4", 1_000, 500, 400) * 10**12)
        report = conn.execute(select(MeterReport.meter, MeterReport.value)).one()
    assert tuple(report) == ("cost", int(usd("claude-sonnet-4", 1_000, 500, 400) * 10**12))


def test_the_admin_api_changes_a_key_allow_list(priced: Priced) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    customer, key = priced.customer()
    chat = {"model": "o3", "messages": [{"role": "user", "content": "hi"}]}
    with priced.client() as client:
        r = client.patch(f"/v1/admin/keys/{key.api_key_id}", headers=admin, json={"allowed_models": ["gpt-4o*"]})
        assert r.status_code == 200 and r.json()["allowed_models"] == ["gpt-4o*"], r.text
        refused = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key.api_key}"}, json=chat)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
        assert client.patch(f"/v1/admin/keys/{key.api_key_id}", headers=admin,
                            json={"allowed_models": None}).json()["allowed_models"] is None
        priced.call(client, key, customer, "o3", (10, 5, 0), stream=False)
        assert client.patch("/v1/admin/keys/key_nope", headers=admin, json={"allowed_models": None}).status_code == 404
        assert client.patch(f"/v1/admin/keys/{key.api_key_id}", headers=admin, json={}).status_code == 422


def test_cli_keys_create_takes_allowed_models(tmp_path: Path) -> None:
    env = base_env(DATABASE_URL=f"sqlite:///{tmp_path}/aikit.db")

    def aikit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([AIKIT, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)

    assert aikit("migrate").returncode == 0
    created = aikit("keys", "create", "--email", "m@example.com", "--allowed-models", "gpt-4o-mini, claude-*")
    assert created.returncode == 0, created.stderr
    listed = json.loads(aikit("keys", "list").stdout)
    assert [k["allowed_models"] for k in listed] == [["gpt-4o-mini", "claude-*"]]
    bad = aikit("keys", "create", "--email", "n@example.com", "--allowed-models", "gpt-4o,,o3")
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "--allowed-models" in bad.stderr


def test_reconcile_shows_cost_meter_drift_in_money(priced: Priced) -> None:
    customer, key = priced.customer()
    with priced.client() as client:
        priced.call(client, key, customer, "gpt-4o", (1_000, 100, 0), stream=False)
        admin = client.get("/v1/admin/usage", params={"customer_id": customer},
                           headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    priced.flush()
    assert Decimal(admin["cost"]) == priced.expected[customer]
    assert Decimal(admin["by_customer"][0]["cost"]) == priced.expected[customer]
    assert reconcile(priced.settings).ok
    sdk = StripeClient(priced.fake.api_key, base_addresses=priced.fake.base_addresses)  # type: ignore[arg-type]
    sdk.v1.billing.meter_events.create(params={
        "event_name": COST_EVENT, "payload": {"stripe_customer_id": customer, "value": "1250000000"},
        "identifier": "manual-extra-cost", "timestamp": int(priced.fake.now())})

    report = reconcile(priced.settings)

    assert not report.ok
    [drift] = report.drift
    assert (drift["check"], drift["meter"], drift["difference"]) == ("stripe_vs_sent", "cost", 1_250_000_000)
    assert drift["difference_money"] == "0.001250000000"  # USD
    assert Decimal(drift["expected_money"]) == priced.expected[customer] and drift["tokens"] == 1_100


def test_a_window_above_15_digits_is_split_into_events_stripe_takes(priced: Priced) -> None:
    """Stripe refuses meter event values of more than 15 digits: $1,000 in 1e-12 USD. A customer's window above
    that is sent as several events (identifiers fixed when it is sealed) that sum to it exactly."""
    customer, key = priced.customer()
    with priced.client() as client:  # o3 output at $8 per million: 300M tokens = $2,400 in one window
        for _ in range(3):
            priced.call(client, key, customer, "o3", (1_000, 100_000_000, 0), stream=False)
    priced.flush()

    events = [e for e in priced.fake.meter_events if e.customer == customer]
    assert len(events) == 3 and all(len(str(e.value)) <= 15 for e in events)
    assert sum(e.value for e in events) == int(priced.expected[customer] * 10**12)
    _, amount = priced.invoice(customer)
    assert amount == cents(priced.expected[customer]) == 240_000 + cents(Decimal(3 * 1_000 * 2) / 10**6)
    assert reconcile(priced.settings).ok
