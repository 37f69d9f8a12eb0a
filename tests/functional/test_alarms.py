"""The alarms in template.yaml watch metrics the code really emits: EMF records from a real flush (a parked
report) and real webhook deliveries (bad signatures) are put into CloudWatch (moto) the way CloudWatch Logs
turns EMF lines into metrics, and each custom-metric alarm's own query must then see the data and breach."""

from __future__ import annotations

import datetime as dt
import operator
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from fastapi.testclient import TestClient
from moto import mock_aws

from aikit.api.app import create_app
from aikit.flush import Flusher
from aikit.observability import NAMESPACE, flush_metrics
from aikit.runtime import Runtime
from tests.fakes.stripe_server import FakeStripe
from tests.support.billing import Billing
from tests.support.emf import emf_records
from tests.support.settings import make_settings
from tests.support.template import resources

COMPARE = {"GreaterThanThreshold": operator.gt, "GreaterThanOrEqualToThreshold": operator.ge,
           "LessThanThreshold": operator.lt, "LessThanOrEqualToThreshold": operator.le}


def put_emf(cloudwatch: Any, records: list[dict[str, Any]]) -> None:
    """What CloudWatch Logs does with an EMF line: one datapoint per value, per declared dimension set."""
    for record in records:
        stamp = dt.datetime.fromtimestamp(record["_aws"]["Timestamp"] / 1000, dt.UTC)
        for block in record["_aws"]["CloudWatchMetrics"]:
            for dims in block["Dimensions"]:
                dimensions = [{"Name": d, "Value": str(record[d])} for d in dims]
                for metric in block["Metrics"]:
                    values = record[metric["Name"]]
                    for value in values if isinstance(values, list) else [values]:
                        cloudwatch.put_metric_data(Namespace=block["Namespace"], MetricData=[{
                            "MetricName": metric["Name"], "Dimensions": dimensions, "Timestamp": stamp,
                            "Value": float(value), "Unit": metric.get("Unit", "None")}])


def custom_alarms() -> dict[str, dict[str, Any]]:
    return {name: r["Properties"] for name, r in resources().items()
            if r["Type"] == "AWS::CloudWatch::Alarm" and r["Properties"].get("Namespace") == NAMESPACE}


def alarm_value(cloudwatch: Any, alarm: dict[str, Any]) -> float | None:
    end = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
    stats = cloudwatch.get_metric_statistics(
        Namespace=alarm["Namespace"], MetricName=alarm["MetricName"], Dimensions=alarm["Dimensions"],
        StartTime=end - dt.timedelta(seconds=int(alarm["Period"]) * 2), EndTime=end,
        Period=int(alarm["Period"]), Statistics=[alarm["Statistic"]])
    points = [p[alarm["Statistic"]] for p in stats["Datapoints"]]
    return max(points) if points else None


@pytest.fixture
def cloudwatch() -> Iterator[Any]:
    with mock_aws():
        yield boto3.client("cloudwatch", region_name="us-east-1")


def test_custom_alarms_see_the_metrics_the_code_emits_and_breach_on_faults(
        billing: Billing, fake: FakeStripe, cloudwatch: Any, capsys: pytest.CaptureFixture[str]) -> None:
    flush_metrics()
    capsys.readouterr()
    # A flush whose report Stripe refuses for good (unknown customer): ParkedBatches, FlushLagSeconds.
    fake.rules["customer"] = "sync"
    unknown = billing.customer(in_stripe=False)
    billing.record(billing.key(unknown), unknown, 3, billable=False)
    # ... and one Stripe accepts, then rejects in an error report: MeterEventsRejected.
    rejected = billing.customer()
    fake.inject("async_reject", customer=rejected)
    billing.record(billing.key(rejected), rejected, 2, billable=False)
    summary = billing.flush()
    assert (summary.reports_parked, summary.reports_sent) == (1, 1)
    # A flush whose Stripe key is refused (401): it stops sending, StripeAuthFailures.
    waiting = billing.customer()
    billing.record(billing.key(waiting), waiting, 2, billable=False)
    fake.refused_keys["sk_test_revoked_alarms"] = 401
    refused = Flusher(billing.settings.model_copy(update={"stripe_secret_key": "sk_test_revoked_alarms"}))
    try:
        assert refused.run(now=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).sending_stopped
    finally:
        refused.close()
    # Forged webhook deliveries, more than the alarm's default threshold of 10 in five minutes.
    settings = make_settings(billing.settings.database_url, billing.settings.redis_key_prefix,
                             stripe_secret_key=fake.api_key, stripe_api_base=fake.url,
                             stripe_webhook_secret="whsec_test_alarms",
                             stripe_event_destination_secret="whsec_test_alarms_destination")
    with TestClient(create_app(runtime=Runtime(settings))) as client:
        fake.event_destination(lambda body, headers: client.post("/v1/webhooks/stripe", content=body,
                                                                 headers=headers).status_code,
                               "whsec_test_alarms_destination")
        assert [status for _, status in fake.deliver_events()] == [200]
        for _ in range(12):
            r = client.post("/v1/webhooks/stripe", content=b'{"id": "evt_1"}',
                            headers={"Stripe-Signature": "t=1,v1=forged", "Content-Type": "application/json"})
            assert r.status_code == 400
    flush_metrics()
    put_emf(cloudwatch, emf_records(capsys.readouterr().out))

    alarms = custom_alarms()
    assert set(alarms) >= {"FlushLagAlarm", "ParkedBatchesAlarm", "WebhookSignatureFailuresAlarm",
                           "MeterEventsRejectedAlarm", "StripeAuthFailuresAlarm"}
    for name, alarm in alarms.items():
        value = alarm_value(cloudwatch, alarm)
        assert value is not None, f"{name} watches {alarm['MetricName']} {alarm['Dimensions']}: no such data"
        threshold = alarm["Threshold"]
        if isinstance(threshold, dict):  # !Ref to a parameter: its default
            threshold = resources_parameter_default(threshold["Ref"])
        breached = COMPARE[alarm["ComparisonOperator"]](value, float(threshold))
        expected = name != "FlushLagAlarm"  # the buffer was seconds old, not 15 minutes
        assert breached is expected, f"{name}: {alarm['Statistic']} {value} vs {threshold}"


def resources_parameter_default(name: str) -> float:
    from tests.support.template import template

    return float(template()["Parameters"][name]["Default"])
