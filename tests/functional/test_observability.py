"""Observability: EMF metric records, log redaction, the Lambda wrapper, and secret resolution against moto."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from aikit import aws_secrets, observability
from aikit.aws_secrets import apply_secret_settings, resolve_secret_settings
from aikit.errors import SecretResolutionError
from aikit.observability import (
    ALL_METRICS,
    EVENTS_FLUSHED,
    FLUSH_DURATION,
    FLUSH_LAG,
    MAX_SERIES,
    MAX_VALUES,
    METER_FALLBACKS,
    PARKED_BATCHES,
    REQUESTS,
    STRIPE_ERRORS,
    TOKENS_METERED,
    WEBHOOK_EVENTS,
    WEBHOOK_SIGNATURE_FAILURES,
    asgi_entry,
    emit,
    flush_metrics,
    lambda_entry,
    logger,
    metrics,
)
from aikit.settings import load_settings
from tests.support.aws_lambda import LambdaContext
from tests.support.emf import emf_records

# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def out(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """Starts every test with empty metric buffers and an empty captured stdout."""
    flush_metrics()
    capsys.readouterr()
    yield capsys
    flush_metrics()


def log_records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{") and '"level"' in line]


def definitions(record: dict[str, Any]) -> tuple[str, list[list[str]], dict[str, str]]:
    block = record["_aws"]["CloudWatchMetrics"][0]
    return block["Namespace"], block["Dimensions"], {m["Name"]: m["Unit"] for m in block["Metrics"]}


def find(records: list[dict[str, Any]], metric: str, dimensions: list[str]) -> dict[str, Any]:
    for record in records:
        _, dims, units = definitions(record)
        # CloudWatch identifies a series by its set of dimensions; their order does not matter.
        if metric in units and len(dims) == 1 and sorted(dims[0]) == sorted(dimensions):
            return record
    raise AssertionError(f"no EMF record with {metric} and dimensions {dimensions}: {records}")


fake_context = functools.partial(LambdaContext, "aikit-test-fn", aws_request_id="req-0001",
                                 log_group_name="/aikit/test/fn", log_stream_name="2026/01/01/[$LATEST]abc")


# ---------------------------------------------------------------------------------------------- metrics


def test_plain_metrics_are_one_emf_record_with_names_units_and_the_service_dimension(out: Any) -> None:
    emit(TOKENS_METERED, 1500)
    emit(TOKENS_METERED, 500)
    emit(REQUESTS)
    emit(FLUSH_DURATION, 12.5)  # default unit by name: Milliseconds
    emit(FLUSH_LAG, 42)  # Seconds
    emit(EVENTS_FLUSHED, 7, unit="Count")
    emit(METER_FALLBACKS)
    flush_metrics()

    records = emf_records(out.readouterr().out)
    record = find(records, TOKENS_METERED, ["service"])
    namespace, _, units = definitions(record)
    assert namespace == "aikit"
    assert record["service"] == "aikit"
    assert units == {TOKENS_METERED: "Count", REQUESTS: "Count", FLUSH_DURATION: "Milliseconds",
                     FLUSH_LAG: "Seconds", EVENTS_FLUSHED: "Count", METER_FALLBACKS: "Count"}
    assert record[TOKENS_METERED] == [2000.0]  # counts are summed per process between writes
    assert record[FLUSH_DURATION] == [12.5]
    assert record[FLUSH_LAG] == [42.0]


def test_dimensions_get_their_own_record_and_never_leak_into_other_metrics(out: Any) -> None:
    emit(STRIPE_ERRORS, kind="rate_limit")
    emit(STRIPE_ERRORS, kind="rate_limit")
    emit(STRIPE_ERRORS, kind="invalid_request_error")
    emit(WEBHOOK_EVENTS, type="invoice.paid", outcome="applied")
    emit(REQUESTS)
    flush_metrics()

    records = emf_records(out.readouterr().out)
    by_kind = find(records, STRIPE_ERRORS, ["service", "kind"])
    assert by_kind["kind"] == "rate_limit"
    assert by_kind[STRIPE_ERRORS] == [2.0]
    assert definitions(by_kind)[2] == {STRIPE_ERRORS: "Count"}  # nothing else rides on this record
    other_kind = [r for r in records if r.get("kind") == "invalid_request_error"]
    assert len(other_kind) == 1 and other_kind[0][STRIPE_ERRORS] == [1.0]

    webhook = find(records, WEBHOOK_EVENTS, ["service", "type", "outcome"])
    assert (webhook["type"], webhook["outcome"]) == ("invoice.paid", "applied")
    assert "kind" not in webhook and STRIPE_ERRORS not in webhook

    # The totals (what the alarms and dashboards read) count every value, without breakdown dimensions.
    totals = find(records, REQUESTS, ["service"])
    assert totals[STRIPE_ERRORS] == [3.0]
    assert totals[WEBHOOK_EVENTS] == [1.0]
    assert "kind" not in totals and "type" not in totals


def test_alarm_metrics_reach_the_service_only_series_even_with_dimensions(out: Any) -> None:
    # template.yaml alarms on {service=aikit} for these three; callers may add dimensions freely.
    emit(WEBHOOK_SIGNATURE_FAILURES, reason="bad_signature")
    emit(PARKED_BATCHES, customer="cus_1")
    emit(FLUSH_LAG, 901, region="x")
    flush_metrics()
    totals = find(emf_records(out.readouterr().out), WEBHOOK_SIGNATURE_FAILURES, ["service"])
    assert totals[PARKED_BATCHES] == [1.0]
    assert totals[FLUSH_LAG] == [901.0]
    assert definitions(totals)[2][FLUSH_LAG] == "Seconds"


def test_memory_stays_bounded_and_stdout_gets_few_records(out: Any) -> None:
    for i in range(10_000):
        emit(REQUESTS)
        emit(STRIPE_ERRORS, kind="rate_limit")
        emit(WEBHOOK_EVENTS, type=f"type.{i % 500}", outcome="applied")  # 500 distinct breakdowns
        emit(FLUSH_DURATION, i % 7)  # a distribution: its values are kept, 100 per record at most
        assert metrics.series_count() <= MAX_SERIES
        assert metrics.held_values() <= MAX_VALUES
    text = out.readouterr().out
    records = emf_records(text)
    assert 0 < len(records) <= 40_000 // 50  # batches, not a line per value
    flush_metrics()
    records += emf_records(out.readouterr().out)
    totals = [r for r in records if definitions(r)[1] == [["service"]]]
    # Totals keep every value even when breakdowns had to be skipped.
    assert sum(sum(r.get(WEBHOOK_EVENTS, [])) for r in totals) == 10_000
    assert sum(sum(r.get(STRIPE_ERRORS, [])) for r in totals) == 10_000
    assert sum(len(r.get(FLUSH_DURATION, [])) for r in totals) == 10_000
    assert all(len(r.get(FLUSH_DURATION, [])) <= MAX_VALUES for r in totals)
    by_kind = [r for r in records if r.get("kind") == "rate_limit"]
    assert sum(sum(r[STRIPE_ERRORS]) for r in by_kind) == 10_000
    warnings = [r for r in log_records(text) if r["message"] == "metric breakdowns dropped"]
    assert len(warnings) <= 1


def test_a_long_running_process_writes_metrics_at_least_every_interval(
    out: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    emit(REQUESTS)
    assert emf_records(out.readouterr().out) == []  # buffered
    monkeypatch.setattr(observability, "WRITE_INTERVAL_SECONDS", 0.0)
    emit(REQUESTS)
    emit(STRIPE_ERRORS, kind="api_error")
    records = emf_records(out.readouterr().out)
    assert find(records, REQUESTS, ["service"])[REQUESTS] == [2.0]
    assert find(records, STRIPE_ERRORS, ["service", "kind"])[STRIPE_ERRORS] == [1.0]


def test_aikit_serve_writes_buffered_metrics_every_interval_even_when_quiet(
    out: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anyio

    from aikit.server import write_metrics_forever

    emit(TOKENS_METERED, 7)  # buffered: no later emit will come to trigger a write
    assert emf_records(out.readouterr().out) == []
    monkeypatch.setattr(observability, "WRITE_INTERVAL_SECONDS", 0.05)

    async def quiet_period() -> None:
        with anyio.move_on_after(0.3):
            await write_metrics_forever()

    anyio.run(quiet_period)
    assert find(emf_records(out.readouterr().out), TOKENS_METERED, ["service"])[TOKENS_METERED] == [7.0]


def test_a_bad_metric_is_dropped_with_a_warning_and_never_raises(out: Any) -> None:
    emit(REQUESTS, 1, unit="Parsecs")
    emit(STRIPE_ERRORS, "not a number", kind="k")  # type: ignore[arg-type]
    text = out.readouterr().out
    warnings = [r for r in log_records(text) if r["message"] == "metric dropped"]
    assert {w["metric"] for w in warnings} == {REQUESTS, STRIPE_ERRORS}


def test_metric_names_are_the_documented_ones() -> None:
    assert set(ALL_METRICS) == {
        "TokensMetered", "Requests", "RateLimited", "FlushDuration", "EventsFlushed", "StripeErrors",
        "ParkedBatches", "FlushLagSeconds", "WebhookEvents", "WebhookSignatureFailures", "MeterFallbacks",
        "StripeAuthFailures",
    }


# ---------------------------------------------------------------------------------------------- Lambda wrapper


def test_lambda_entry_adds_context_flushes_metrics_and_never_logs_the_event(out: Any) -> None:
    marker = "event-marker-7f3a9"

    @lambda_entry
    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        logger.info("handling")
        emit(TOKENS_METERED, 10)
        emit(STRIPE_ERRORS, kind="api_error")
        return {"ok": True}

    event = {"requestContext": {"requestId": "rid-123"}, "headers": {"x-marker": marker}}
    assert handler(event, fake_context()) == {"ok": True}

    text = out.readouterr().out
    assert marker not in text
    logs = [r for r in log_records(text) if r["message"] == "handling"]
    assert logs and logs[0]["function_name"] == "aikit-test-fn"
    assert logs[0]["correlation_id"] == "rid-123"
    records = emf_records(text)  # flushed by the wrapper, no explicit flush here
    assert find(records, TOKENS_METERED, ["service"])[TOKENS_METERED] == [10.0]
    assert find(records, STRIPE_ERRORS, ["service", "kind"])["kind"] == "api_error"


def test_lambda_entry_wraps_callable_objects_like_mangum(out: Any) -> None:
    class App:
        def __call__(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
            return {"statusCode": 200, "body": event["body"]}

    handler = lambda_entry(App())
    assert handler({"body": "hi"}, fake_context()) == {"statusCode": 200, "body": "hi"}


def test_lambda_entry_lets_errors_through_and_still_flushes(out: Any) -> None:
    @lambda_entry
    def handler(event: dict[str, Any], context: Any) -> None:
        emit(PARKED_BATCHES)
        raise RuntimeError("flush failed")

    with pytest.raises(RuntimeError, match="flush failed"):
        handler({}, fake_context())
    assert find(emf_records(out.readouterr().out), PARKED_BATCHES, ["service"])[PARKED_BATCHES] == [1.0]


def test_asgi_entry_writes_metrics_before_the_last_byte_and_logs_lwa_request_ids(out: Any) -> None:
    # Under Lambda Web Adapter the invocation ends with the response: whatever is written after it may wait
    # for the next thaw, or never be written.
    import anyio

    sent: list[tuple[str, str]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        logger.info("streaming")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        emit(TOKENS_METERED, 42)  # metered at the end of the stream
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def send(message: Any) -> None:
        sent.append((message["type"], out.readouterr().out))

    async def receive() -> Any:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "headers": [
        (b"x-amzn-request-context", json.dumps({"requestId": "apigw-req-1"}).encode()),
        (b"x-amzn-lambda-context", json.dumps({"request_id": "lambda-req-1"}).encode())]}
    anyio.run(asgi_entry(app), scope, receive, send)

    (_, before_start), (_, before_first), (_, before_last) = sent
    assert emf_records(before_first) == []
    assert find(emf_records(before_last), TOKENS_METERED, ["service"])[TOKENS_METERED] == [42.0]
    (log,) = [r for r in log_records(before_start) if r["message"] == "streaming"]
    assert (log["correlation_id"], log["function_request_id"]) == ("apigw-req-1", "lambda-req-1")


def test_tracing_is_off_outside_lambda_and_importing_never_loads_xray(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    monkeypatch.delenv("LAMBDA_TASK_ROOT", raising=False)
    assert observability.tracer() is None
    monkeypatch.setenv("LAMBDA_TASK_ROOT", "/var/task")
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    assert observability.tracer() is None
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "false")
    monkeypatch.setenv("AWS_LAMBDA_EXEC_WRAPPER", "/opt/bootstrap")  # Lambda Web Adapter runs uvicorn
    assert observability.tracer() is None
    monkeypatch.delenv("AWS_LAMBDA_EXEC_WRAPPER")
    # A cold start with tracing on pays for X-Ray only when a handler is wrapped, never at import.
    code = ("import sys, aikit.observability as o; "
            "assert 'aws_xray_sdk' not in sys.modules, 'imported X-Ray'; "
            "print('ok')")
    env = {k: v for k, v in __import__("os").environ.items() if k != "POWERTOOLS_TRACE_DISABLED"}
    env["LAMBDA_TASK_ROOT"] = "/var/task"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr


def test_tracing_on_in_lambda_patches_only_the_listed_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    import aws_xray_sdk.core

    patched: list[Any] = []
    monkeypatch.setattr(aws_xray_sdk.core, "patch", lambda modules, **kw: patched.append(list(modules)))
    monkeypatch.setenv("LAMBDA_TASK_ROOT", "/var/task")
    monkeypatch.delenv("POWERTOOLS_TRACE_DISABLED", raising=False)
    monkeypatch.setattr(observability, "_tracer", None)
    active = observability.tracer()
    assert active is not None and observability.tracer() is active
    assert patched == [list(observability.TRACED_MODULES)]
    monkeypatch.setattr(observability, "_tracer", None)


# ---------------------------------------------------------------------------------------------- redaction

FAKE_SECRETS = [
    "sk_live_51AbCdEfGhIjKlMnOpQrStUv",
    "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
    "rk_live_restrictedKey123456",
    "whsec_1234567890abcdefABCDEF",
    "ak_live_9f8e7d6c5b4a39281706",
    "sk-proj-AbCdEf0123456789GhIjKlMn",
    "opaque-bearer-token-0123456789",
    "hunter2-db-password",
    "admin-token-zyxw9876",
]


def test_api_keys_and_authorization_values_never_reach_the_log(out: Any) -> None:
    sk_live, sk_test, rk, whsec, ak, openai, bearer, password, admin = FAKE_SECRETS
    logger.info("calling stripe with %s", sk_live)
    logger.info(f"key={ak} and Authorization: Bearer {bearer}")
    logger.info("headers", extra={"headers": {"Authorization": f"Bearer {ak}", "x-api-key": openai}})
    logger.info("raw json", extra={"body": json.dumps({"secret_key": sk_test, "webhook_secret": whsec})})
    logger.warning("db", extra={"url": f"postgresql://aikit_admin:{password}@proxy.example:5432/aikit"})
    logger.info({"admin_token": admin, "restricted": rk})
    try:
        raise ValueError(f"bad key {sk_live}")
    except ValueError:
        logger.exception("failure")
    # Child loggers of "aikit" (logging.getLogger(__name__) in aikit modules) go through the same handler.
    logging.getLogger("aikit.some_module").warning("child logger saw %s", ak)

    text = out.readouterr().out
    for secret in FAKE_SECRETS:
        assert secret not in text, secret
    records = log_records(text)
    assert len(records) == 8
    assert any("[REDACTED]" in json.dumps(r) for r in records)
    assert any(r["message"] == "child logger saw ak_[REDACTED]" for r in records)
    assert "proxy.example:5432/aikit" in text  # only the password part of the URL goes


def test_redaction_leaves_ordinary_text_alone(out: Any) -> None:
    logger.info("usage", extra={"input_tokens": 1500, "model": "gpt-4o-mini", "task_id": "task_123456789",
                                "customer_id": "cus_123", "price": "price_abc123", "path": "/v1/chat/completions"})
    record = log_records(out.readouterr().out)[0]
    assert record["input_tokens"] == 1500
    assert record["task_id"] == "task_123456789"
    assert record["customer_id"] == "cus_123"
    assert record["price"] == "price_abc123"


# ---------------------------------------------------------------------------------------------- secrets (moto)

DB_PASSWORD = "p@ss/w0rd:with%odd"


def make_secrets(client: Any) -> dict[str, str]:
    db = client.create_secret(Name="aikit/db", SecretString=json.dumps({
        "username": "aikit_admin", "password": DB_PASSWORD, "engine": "postgres",
        "host": "cluster.example", "port": 5432, "dbname": "aikit"}))
    stripe = client.create_secret(Name="aikit/stripe", SecretString=json.dumps({
        "secret_key": "sk_test_moto123", "webhook_secret": "whsec_moto456"}))
    admin = client.create_secret(Name="aikit/admin", SecretString=json.dumps({"token": "admin-from-secret"}))
    llm = client.create_secret(Name="aikit/llm", SecretString=json.dumps({"openai_api_key": "sk-moto-openai"}))
    return {"DATABASE_SECRET_ARN": db["ARN"], "STRIPE_SECRET_ARN": stripe["ARN"],
            "ADMIN_TOKEN_SECRET_ARN": admin["ARN"], "LLM_SECRET_ARN": llm["ARN"]}


def test_secret_arns_become_settings_overrides(secretsmanager: Any) -> None:
    environ = {**make_secrets(secretsmanager), "DATABASE_HOST": "proxy.example", "DATABASE_PORT": "5432"}
    overrides = resolve_secret_settings(environ)
    assert overrides == {
        "DATABASE_URL": "postgresql://aikit_admin:p%40ss%2Fw0rd%3Awith%25odd@proxy.example:5432/aikit"
                        "?sslmode=verify-full",
        "STRIPE_SECRET_KEY": "sk_test_moto123",
        "STRIPE_WEBHOOK_SECRET": "whsec_moto456",
        "ADMIN_TOKEN": "admin-from-secret",
        "OPENAI_API_KEY": "sk-moto-openai",
    }
    # Settings take them as they are; the proxy host wins over the cluster host in the secret.
    settings = load_settings(database_url=overrides["DATABASE_URL"],
                             stripe_secret_key=overrides["STRIPE_SECRET_KEY"])
    assert settings.is_postgres and settings.stripe_enabled
    assert settings.database_url.startswith("postgresql+pg8000://aikit_admin:")
    assert "@proxy.example:5432/aikit" in settings.database_url


def test_secrets_are_cached_until_max_age_or_a_forced_fetch(secretsmanager: Any) -> None:
    environ = make_secrets(secretsmanager)
    assert resolve_secret_settings(environ)["STRIPE_SECRET_KEY"] == "sk_test_moto123"
    secretsmanager.put_secret_value(SecretId=environ["STRIPE_SECRET_ARN"], SecretString=json.dumps(
        {"secret_key": "sk_test_rotated", "webhook_secret": "whsec_rotated"}))
    assert resolve_secret_settings(environ)["STRIPE_SECRET_KEY"] == "sk_test_moto123"  # cached
    fresh = resolve_secret_settings(environ, force_fetch=True)
    assert (fresh["STRIPE_SECRET_KEY"], fresh["STRIPE_WEBHOOK_SECRET"]) == ("sk_test_rotated", "whsec_rotated")


def test_apply_writes_the_environment_once_and_reports_names_only(secretsmanager: Any) -> None:
    environ = {"STRIPE_SECRET_ARN": make_secrets(secretsmanager)["STRIPE_SECRET_ARN"], "UNRELATED": "1"}
    assert apply_secret_settings(environ) == ["STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET"]
    assert environ["STRIPE_SECRET_KEY"] == "sk_test_moto123"
    assert apply_secret_settings(environ) == []  # nothing changed on a warm call


def test_plain_string_admin_token_secret(secretsmanager: Any) -> None:
    arn = secretsmanager.create_secret(Name="aikit/admin-plain", SecretString="  plain-admin-token \n")["ARN"]
    assert resolve_secret_settings({"ADMIN_TOKEN_SECRET_ARN": arn}) == {"ADMIN_TOKEN": "plain-admin-token"}


def test_snapstart_restore_rereads_the_secrets(secretsmanager: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    hooks: list[Any] = []
    fake = types.ModuleType("snapshot_restore_py")
    fake.register_after_restore = hooks.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "snapshot_restore_py", fake)
    arn = make_secrets(secretsmanager)["STRIPE_SECRET_ARN"]
    monkeypatch.setenv("STRIPE_SECRET_ARN", arn)
    monkeypatch.delenv("STRIPE_SECRET_KEY", raising=False)
    apply_secret_settings()  # the init phase, before the snapshot
    assert aws_secrets.refresh_after_snapstart_restore() is True
    secretsmanager.put_secret_value(SecretId=arn, SecretString=json.dumps({"secret_key": "sk_test_after_restore"}))

    (hook,) = hooks
    hook()  # what Lambda runs after restoring the snapshot: the cached value is not trusted

    import os

    assert os.environ["STRIPE_SECRET_KEY"] == "sk_test_after_restore"
    monkeypatch.delenv("STRIPE_SECRET_KEY")


def test_without_snapstart_no_restore_hook_is_registered() -> None:
    assert aws_secrets.refresh_after_snapstart_restore() is False


def test_no_arns_is_a_no_op_without_touching_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    aws_secrets.clear_cache()
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    assert resolve_secret_settings({}) == {}
    assert resolve_secret_settings({"STRIPE_SECRET_ARN": "", "DATABASE_SECRET_ARN": "  "}) == {}
    environ: dict[str, str] = {}
    assert apply_secret_settings(environ) == [] and environ == {}


def test_missing_secret_names_the_variable(secretsmanager: Any) -> None:
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:aikit/nope-AbCdEf"
    with pytest.raises(SecretResolutionError, match="STRIPE_SECRET_ARN"):
        resolve_secret_settings({"STRIPE_SECRET_ARN": arn})


def test_incomplete_or_malformed_secrets_fail_without_revealing_values(secretsmanager: Any) -> None:
    no_password = secretsmanager.create_secret(Name="aikit/db-broken",
                                    SecretString=json.dumps({"username": "u", "host": "h"}))["ARN"]
    with pytest.raises(SecretResolutionError, match="'password'"):
        resolve_secret_settings({"DATABASE_SECRET_ARN": no_password})

    not_json = secretsmanager.create_secret(Name="aikit/stripe-plain", SecretString="sk_test_notjson123")["ARN"]
    with pytest.raises(SecretResolutionError, match="not a JSON object") as info:
        resolve_secret_settings({"STRIPE_SECRET_ARN": not_json})
    assert "sk_test_notjson123" not in str(info.value)

    no_key = secretsmanager.create_secret(Name="aikit/stripe-empty",
                               SecretString=json.dumps({"webhook_secret": "whsec_only"}))["ARN"]
    with pytest.raises(SecretResolutionError, match="'secret_key'") as info:
        resolve_secret_settings({"STRIPE_SECRET_ARN": no_key})
    assert "whsec_only" not in str(info.value)

    no_host = secretsmanager.create_secret(Name="aikit/db-nohost",
                                SecretString=json.dumps({"username": "u", "password": "p"}))["ARN"]
    with pytest.raises(SecretResolutionError, match="DATABASE_HOST"):
        resolve_secret_settings({"DATABASE_SECRET_ARN": no_host})
