"""template.yaml: lint-clean (sam validate --lint + cfn-lint, no warnings) and built the way aikit needs it;
samconfig.toml, the sample events and the migration custom resource's handler."""

from __future__ import annotations

import ast
import functools
import http.server
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect

from aikit import observability
from aikit.settings import Settings
from tests.support.aws_lambda import LambdaContext
from tests.support.db import create_database, drop_database
from tests.support.template import resources, template

ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS = ("ApiFunction", "WebhookFunction", "FlushFunction", "MigrateFunction")


# ---------------------------------------------------------------------------------------------- loading




def of_type(kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in resources().items() if r["Type"] == kind}


def function(name: str) -> dict[str, Any]:
    fn = resources()[name]
    assert fn["Type"] == "AWS::Serverless::Function"
    props: dict[str, Any] = fn["Properties"]
    return props


def environment(name: str) -> dict[str, Any]:
    """The environment a function ends up with: Globals merged with its own variables."""
    merged = dict(template()["Globals"]["Function"]["Environment"]["Variables"])
    merged.update(function(name).get("Environment", {}).get("Variables", {}))
    return merged


def dashboard_source(streaming: bool = True) -> str:
    """The dashboard body as written, with the API widgets of one ApiStreaming branch put in."""
    body, variables = resources()["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    condition, rest_widgets, http_widgets = variables["ApiWidgets"]["Fn::If"]
    assert condition == "StreamApi"
    widgets = (rest_widgets if streaming else http_widgets)["Fn::Sub"]
    return str(body.replace("${ApiWidgets}", widgets))


def dashboard(streaming: bool = True) -> dict[str, Any]:
    substituted = re.sub(r"\$\{[^}]+\}", "X", dashboard_source(streaming))
    data: dict[str, Any] = json.loads(substituted)
    return data


def when(value: Any, streaming: bool) -> Any:
    """A property's value in one ApiStreaming branch ({"Fn::If": ["StreamApi", a, b]} -> a or b)."""
    if isinstance(value, dict) and "Fn::If" in value and value["Fn::If"][0] == "StreamApi":
        return value["Fn::If"][1 if streaming else 2]
    return value


# ---------------------------------------------------------------------------------------------- lint


def test_sam_validate_lint_and_cfn_lint_are_clean() -> None:
    result = subprocess.run(["bash", str(ROOT / "infra" / "lint.sh")], capture_output=True, text=True,
                            timeout=900, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "valid SAM Template" in output
    assert not re.search(r"^[EWI]\d{4}\b", output, re.MULTILINE), output


# ---------------------------------------------------------------------------------------------- shape


def test_serverless_python312_with_the_four_functions() -> None:
    assert template()["Transform"] == "AWS::Serverless-2016-10-31"
    globals_ = template()["Globals"]["Function"]
    assert globals_["Runtime"] == "python3.12"
    assert set(globals_["Architectures"]) <= {"x86_64", "arm64"}
    assert globals_["Tracing"] == {"Ref": "Tracing"}
    assert template()["Parameters"]["Tracing"]["Default"] == "Active"
    for name, code_uri in zip(FUNCTIONS, ("functions/api/", "functions/webhook/", "functions/flush/",
                                          "functions/migrate/"), strict=True):
        props = function(name)
        assert props["CodeUri"] == code_uri
        assert when(props["Handler"], streaming=False) == "app.handler"
        # The handler file exists and defines `handler` (checked without importing it).
        source = (ROOT / code_uri / "app.py").read_text()
        names = {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name)}
        names |= {node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
        assert "handler" in names, f"{code_uri}app.py defines no handler"


def test_streaming_rest_api_or_buffered_http_api_and_the_webhook_on_the_http_api() -> None:
    params = template()["Parameters"]
    assert params["ApiStreaming"]["Default"] == "true"
    api = function("ApiFunction")
    assert "Events" not in api  # wired by explicit, conditional resources below
    # Streaming: a regional REST API whose integration streams (InvokeWithResponseStream) for up to 15 minutes.
    rest = resources()["RestApi"]
    assert (rest["Type"], rest["Condition"]) == ("AWS::Serverless::Api", "StreamApi")
    assert rest["Properties"]["EndpointConfiguration"] == {"Type": "REGIONAL"}
    (method,) = rest["Properties"]["DefinitionBody"]["paths"]["/{proxy+}"].values()
    integration = method["x-amazon-apigateway-integration"]
    assert integration["type"] == "aws_proxy" and integration["responseTransferMode"] == "STREAM"
    uri, target = integration["uri"]["Fn::Sub"]
    assert uri.endswith("/2021-11-15/functions/${Target}/response-streaming-invocations")
    assert target == {"Target": {"Ref": "ApiFunction.Alias"}}
    timeouts = template()["Mappings"]["StreamingTimeouts"]
    assert integration["timeoutInMillis"] == {
        "Fn::FindInMap": ["StreamingTimeouts", {"Ref": "ApiTimeoutSeconds"}, "IntegrationMillis"]}
    assert set(timeouts) == {str(v) for v in params["ApiTimeoutSeconds"]["AllowedValues"]}
    assert max(params["ApiTimeoutSeconds"]["AllowedValues"]) == 900 == params["ApiTimeoutSeconds"]["Default"]
    for seconds, row in timeouts.items():
        assert row["IntegrationMillis"] == int(seconds) * 1000 <= 900_000
    assert resources()["RestApiInvokePermission"]["Properties"]["FunctionName"] == {"Ref": "ApiFunction.Alias"}
    # ... served by run.sh (uvicorn) behind Lambda Web Adapter, which streams.
    assert when(api["Handler"], streaming=True) == "run.sh"
    assert when(api["Timeout"], streaming=True) == {"Ref": "ApiTimeoutSeconds"}
    env = environment("ApiFunction")
    assert when(env["AWS_LAMBDA_EXEC_WRAPPER"], True) == "/opt/bootstrap"
    assert when(env["AWS_LWA_INVOKE_MODE"], True) == "response_stream"
    assert when(env["AWS_LWA_READINESS_CHECK_PATH"], True) == "/healthz"
    assert when(env["PORT"], True) == "8080"
    (lwa,) = [when(layer, True) for layer in api["Layers"]]
    assert ":753240598075:layer:LambdaAdapterLayerArm64:" in lwa["Fn::Sub"]
    assert template()["Globals"]["Function"]["Architectures"] == ["arm64"]
    # Buffered: the HTTP API's $default route to the same function through Mangum, inside the 30 s limit.
    assert when(api["Handler"], streaming=False) == "app.handler"
    assert when(api["Timeout"], streaming=False) <= 29
    for name in ("AWS_LAMBDA_EXEC_WRAPPER", "AWS_LWA_INVOKE_MODE", "PORT"):
        assert when(env[name], False) == {"Ref": "AWS::NoValue"}
    assert when(api["Layers"][0], False) == {"Ref": "AWS::NoValue"}
    route = resources()["HttpApiDefaultRoute"]
    assert route["Condition"] == "BufferApi" and route["Properties"]["RouteKey"] == "$default"
    integration = resources()["HttpApiDefaultIntegration"]["Properties"]
    assert integration["IntegrationUri"] == {"Ref": "ApiFunction.Alias"}
    assert integration["TimeoutInMillis"] <= 29_000
    # The webhook: Mangum on the HTTP API in both modes.
    assert resources()["HttpApi"]["Type"] == "AWS::Serverless::HttpApi"
    assert "Condition" not in resources()["HttpApi"]
    (hook,) = function("WebhookFunction")["Events"].values()
    assert hook["Type"] == "HttpApi"
    assert hook["Properties"]["ApiId"] == {"Ref": "HttpApi"}
    assert (hook["Properties"]["Path"], hook["Properties"]["Method"]) == ("/v1/webhooks/stripe", "POST")
    assert function("WebhookFunction").get("Timeout", template()["Globals"]["Function"]["Timeout"]) <= 29


def test_llm_calls_end_before_the_function_does_in_both_modes() -> None:
    """LLM_DEADLINE_SECONDS (total) and LLM_TIMEOUT_SECONDS (per read) stay below the function's timeout, with
    time left to meter a call cut off at its deadline."""
    env = environment("ApiFunction")
    api = function("ApiFunction")
    assert int(when(env["LLM_DEADLINE_SECONDS"], False)) <= when(api["Timeout"], False) - 4
    assert int(when(env["LLM_TIMEOUT_SECONDS"], False)) <= when(api["Timeout"], False) - 4
    rows = template()["Mappings"]["StreamingTimeouts"]
    for key, name in (("LlmDeadline", "LLM_DEADLINE_SECONDS"), ("LlmReadTimeout", "LLM_TIMEOUT_SECONDS")):
        assert when(env[name], True) == {"Fn::FindInMap": ["StreamingTimeouts", {"Ref": "ApiTimeoutSeconds"}, key]}
        for seconds, row in rows.items():
            assert 0 < row[key] <= int(seconds) - 10, (seconds, key)


def test_concurrency_reservations_are_off_by_default_and_the_webhook_can_be_protected() -> None:
    params = template()["Parameters"]
    # Any reservation fails deploys in accounts whose quota leaves fewer than 100 unreserved executions.
    assert params["ReserveFlushConcurrency"]["Default"] == "false"
    assert params["WebhookReservedConcurrency"]["Default"] == 0
    assert params["ApiReservedConcurrency"]["Default"] == 0
    assert function("WebhookFunction")["ReservedConcurrentExecutions"] == {
        "Fn::If": ["ReserveWebhook", {"Ref": "WebhookReservedConcurrency"}, {"Ref": "AWS::NoValue"}]}
    assert function("ApiFunction")["ReservedConcurrentExecutions"] == {
        "Fn::If": ["CapApi", {"Ref": "ApiReservedConcurrency"}, {"Ref": "AWS::NoValue"}]}
    assert function("FlushFunction")["ReservedConcurrentExecutions"]["Fn::If"][0] == "ReserveFlush"


def test_snapstart_is_optional_on_published_versions() -> None:
    assert template()["Parameters"]["SnapStart"]["Default"] == "false"
    for name, condition in (("ApiFunction", "SnapStartApi"), ("WebhookFunction", "UseSnapStart")):
        props = function(name)
        assert props["AutoPublishAlias"] == "live"
        assert props["SnapStart"] == {"ApplyOn": {"Fn::If": [condition, "PublishedVersions", "None"]}}
    # Lambda Web Adapter is not a managed-runtime handler: SnapStart only for the Mangum API.
    assert template()["Conditions"]["SnapStartApi"] == {
        "Fn::And": [{"Fn::Condition": "UseSnapStart"}, {"Fn::Condition": "BufferApi"}]}


def test_bedrock_permission_is_scoped_to_models_and_inference_profiles() -> None:
    (statement,) = [p for p in function("ApiFunction")["Policies"]
                    if isinstance(p, dict) and p.get("Fn::If", [None])[0] == "UseBedrock"]
    (grant,) = statement["Fn::If"][1]["Statement"]
    assert set(grant["Action"]) == {"bedrock:InvokeModel", "bedrock:InvokeModelWithResponseStream"}
    arns = [r["Fn::Sub"] for r in grant["Resource"]]
    assert all(re.search(r":(foundation-model|inference-profile|application-inference-profile)/\*$", a) for a in arns)
    assert "*" not in json.dumps(grant["Resource"]).replace("/*", "").replace("bedrock:*::", "")


def test_flush_runs_every_five_minutes_with_retries_and_a_dead_letter_queue() -> None:
    flush = function("FlushFunction")
    (schedule,) = flush["Events"].values()
    assert schedule["Type"] == "Schedule"
    props = schedule["Properties"]
    assert props["Schedule"] == "rate(5 minutes)"
    assert props["RetryPolicy"]["MaximumRetryAttempts"] >= 1
    assert props["DeadLetterConfig"] == {"Arn": {"Fn::GetAtt": ["FlushDeadLetterQueue", "Arn"]}}
    assert resources()["FlushDeadLetterQueue"]["Type"] == "AWS::SQS::Queue"
    assert flush["Timeout"] >= 300 - 60
    assert int(environment("FlushFunction")["FLUSH_TIME_BUDGET_SECONDS"]) < flush["Timeout"]

    # EventBridge may write to the queue, only for this rule.
    policy = resources()["FlushDeadLetterQueuePolicy"]["Properties"]
    assert policy["Queues"] == [{"Ref": "FlushDeadLetterQueue"}]
    (statement,) = policy["PolicyDocument"]["Statement"]
    assert statement["Principal"] == {"Service": "events.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage"
    source_arn = statement["Condition"]["ArnEquals"]["aws:SourceArn"]["Fn::Sub"]
    assert source_arn.endswith("rule/" + props["Name"]["Fn::Sub"])


def test_aikit_ships_as_a_layer_built_from_the_package_by_the_makefile() -> None:
    layer = resources()["AikitLayer"]
    assert layer["Type"] == "AWS::Serverless::LayerVersion"
    assert layer["Metadata"]["BuildMethod"] == "makefile"
    assert layer["Metadata"]["BuildArchitecture"] == "arm64"
    assert (ROOT / layer["Metadata"]["ContextPath"] / "Makefile").read_text().count("\nbuild-AikitLayer:") == 1
    assert "python3.12" in layer["Properties"]["CompatibleRuntimes"]
    assert template()["Globals"]["Function"]["Layers"] == [{"Ref": "AikitLayer"}]
    for name in FUNCTIONS:
        if name != "ApiFunction":
            assert "Layers" not in function(name)  # nobody replaces the Globals layer list


def test_one_dependency_source_the_pyproject() -> None:
    # No hand-kept requirements beside pyproject.toml: the layer is built from the package.
    assert not list((ROOT / "shared").rglob("requirements*.txt"))
    assert not list((ROOT / "functions").rglob("requirements*.txt"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = _requirement_names(project)
    assert {"fastapi", "mangum", "redis", "stripe", "aws-lambda-powertools", "sqlalchemy", "pg8000", "alembic",
            "pydantic", "pydantic-settings", "httpx", "uvicorn", "fakeredis"} <= names
    assert not names & {"pytest", "moto"}
    # Extras the code needs at run time are runtime dependencies: e-mail validation, the X-Ray SDK.
    assert any(re.match(r"pydantic\[[^\]]*email", line) for line in project)
    assert any(re.match(r"aws-lambda-powertools\[[^\]]*tracer", line) for line in project)


def _requirement_names(lines: list[str]) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_network_security_groups_admit_only_the_lambdas() -> None:
    sgs = of_type("AWS::EC2::SecurityGroup")
    lambda_sg = {"Fn::If": ["CreateLambdaSecurityGroup", {"Fn::GetAtt": ["LambdaSecurityGroup", "GroupId"]},
                            {"Ref": "ExistingLambdaSecurityGroupId"}]}
    expected = {
        "RedisSecurityGroup": (6379, lambda_sg),
        "DbProxySecurityGroup": (5432, lambda_sg),
        "DbSecurityGroup": (5432, {"Fn::GetAtt": ["DbProxySecurityGroup", "GroupId"]}),
    }
    for name, (port, source) in expected.items():
        (rule,) = sgs[name]["Properties"]["SecurityGroupIngress"]
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", port, port), name
        assert rule["SourceSecurityGroupId"] == source, name
        assert "CidrIp" not in rule, name
    for name, sg in sgs.items():
        for rule in sg["Properties"].get("SecurityGroupIngress", []):
            assert rule.get("CidrIp") != "0.0.0.0/0", name
    # A created VPC has two private subnets behind a NAT gateway (Stripe egress) and two public ones.
    assert {"PrivateSubnetA", "PrivateSubnetB", "PublicSubnetA", "PublicSubnetB", "NatGateway"} <= set(resources())
    for name in ("PrivateSubnetA", "PrivateSubnetB", "NatGateway", "Vpc"):
        assert resources()[name]["Condition"] == "CreateVpc"
    assert resources()["PrivateDefaultRoute"]["Properties"]["NatGatewayId"] == {"Ref": "NatGateway"}
    vpc_config = template()["Globals"]["Function"]["VpcConfig"]
    assert vpc_config["SubnetIds"]["Fn::If"][0] == "CreateVpc"


def test_serverless_cache_is_cluster_mode_over_tls() -> None:
    cache = resources()["RedisCache"]
    assert cache["Type"] == "AWS::ElastiCache::ServerlessCache"
    assert cache["Properties"]["Engine"] in {"valkey", "redis"}
    env = template()["Globals"]["Function"]["Environment"]["Variables"]
    assert env["REDIS_URL"]["Fn::Sub"].startswith("rediss://${RedisCache.Endpoint.Address}")
    assert env["REDIS_CLUSTER"] == "true"


def test_aurora_serverless_v2_behind_a_tls_only_proxy() -> None:
    cluster = resources()["DbCluster"]["Properties"]
    assert cluster["Engine"] == "aurora-postgresql"
    assert {"MinCapacity", "MaxCapacity"} <= set(cluster["ServerlessV2ScalingConfiguration"])
    assert cluster["StorageEncrypted"] is True
    assert "{{resolve:secretsmanager:" in cluster["MasterUserPassword"]["Fn::Sub"]
    assert resources()["DbInstance"]["Properties"]["DBInstanceClass"] == "db.serverless"
    assert resources()["DbSecret"]["Properties"]["GenerateSecretString"]["GenerateStringKey"] == "password"
    proxy = resources()["DbProxy"]["Properties"]
    assert proxy["RequireTLS"] is True
    assert proxy["EngineFamily"] == "POSTGRESQL"
    assert proxy["Auth"][0]["SecretArn"] == {"Ref": "DbSecret"}
    env = template()["Globals"]["Function"]["Environment"]["Variables"]
    assert env["DATABASE_SECRET_ARN"] == {"Ref": "DbSecret"}
    assert env["DATABASE_HOST"] == {"Fn::GetAtt": ["DbProxy", "Endpoint"]}


def test_migrations_run_as_a_custom_resource_after_the_database_is_reachable() -> None:
    migration = resources()["DatabaseMigration"]
    assert migration["Type"].startswith("Custom::")
    assert migration["Properties"]["ServiceToken"] == {"Fn::GetAtt": ["MigrateFunction", "Arn"]}
    assert migration["Properties"]["LayerVersion"] == {"Ref": "AikitLayer"}  # new code -> migrate again
    assert {"DbProxyTargetGroup", "DbInstance", "NatRouteReady"} <= set(migration["DependsOn"])
    # Deleted before the NAT route it answers CloudFormation through (when the stack creates the VPC).
    ready = resources()["NatRouteReady"]
    assert ready["Type"] == "AWS::CloudFormation::WaitConditionHandle"
    assert ready["Metadata"]["NatRoute"] == {"Fn::If": ["CreateVpc", {"Ref": "PrivateDefaultRoute"}, ""]}
    # CloudFormation invokes the function asynchronously: never a second migration and answer.
    assert function("MigrateFunction")["EventInvokeConfig"]["MaximumRetryAttempts"] == 0


# ---------------------------------------------------------------------------------------------- secrets


SECRETISH = re.compile(r"SECRET_KEY|WEBHOOK_SECRET|PASSWORD|TOKEN$|API_KEY|^DATABASE_URL$")


def test_no_secret_values_in_plain_environment_variables() -> None:
    for name in FUNCTIONS:
        for var, value in environment(name).items():
            if var.endswith("_ARN"):
                # A reference to a secret, or "" for "this function reads no such secret".
                assert isinstance(value, dict) or value == "", f"{name}.{var} must reference a secret"
                continue
            assert not SECRETISH.search(var), f"{name}: {var} would put a secret value in the environment"
            assert not re.search(r"\b(sk|rk|whsec|ak)_\w+", json.dumps(value)), f"{name}.{var}"
    # Secret parameters are ARNs, never values.
    for pname in template()["Parameters"]:
        assert not SECRETISH.search(pname.upper()), pname


SECRET_SOURCES = {"DATABASE_SECRET_ARN": "DbSecret", "STRIPE_SECRET_ARN": "StripeSecretArn",
                  "ADMIN_TOKEN_SECRET_ARN": "AdminTokenSecret", "LLM_SECRET_ARN": "LlmSecretArn"}


def test_each_function_may_read_exactly_the_secrets_its_environment_names() -> None:
    # A function given an ARN it may not read fails on its cold start (aikit.aws_secrets reads every one).
    expected = {
        "ApiFunction": set(SECRET_SOURCES),
        "WebhookFunction": {"DATABASE_SECRET_ARN", "STRIPE_SECRET_ARN"},
        "FlushFunction": {"DATABASE_SECRET_ARN", "STRIPE_SECRET_ARN"},
        "MigrateFunction": {"DATABASE_SECRET_ARN"},
    }
    for name in FUNCTIONS:
        policies = json.dumps(function(name)["Policies"])
        named = {var for var in SECRET_SOURCES if environment(name).get(var, "") != ""}
        assert named == expected[name], name
        for var, source in SECRET_SOURCES.items():
            granted = f'"SecretArn": {{"Ref": "{source}"}}' in policies
            assert granted == (var in named), (name, var)


def test_environment_variables_are_settings_or_known_plumbing() -> None:
    fields = {f.upper() for f in Settings.model_fields}
    plumbing = {"POWERTOOLS_SERVICE_NAME", "POWERTOOLS_METRICS_NAMESPACE", "POWERTOOLS_TRACE_DISABLED",
                "AIKIT_ENVIRONMENT", "DATABASE_SECRET_ARN", "DATABASE_HOST", "DATABASE_PORT", "DATABASE_NAME",
                "STRIPE_SECRET_ARN", "ADMIN_TOKEN_SECRET_ARN", "LLM_SECRET_ARN",
                # Lambda Web Adapter's (read by /opt/bootstrap and run.sh)
                "AWS_LAMBDA_EXEC_WRAPPER", "AWS_LWA_INVOKE_MODE", "AWS_LWA_READINESS_CHECK_PATH", "PORT"}
    for name in FUNCTIONS:
        unknown = set(environment(name)) - fields - plumbing
        assert not unknown, f"{name}: {unknown} are neither Settings fields nor read by aikit.aws_secrets"


# ---------------------------------------------------------------------------------------------- observability


@pytest.mark.parametrize("streaming", [True, False], ids=["rest-api", "http-api"])
def test_dashboard_shows_every_custom_metric_and_the_aws_health_metrics(streaming: bool) -> None:
    board = dashboard(streaming)
    body = json.dumps(board)
    for metric in observability.ALL_METRICS:
        assert f'\\"{metric}\\"' in body or f'"{metric}"' in body, f"{metric} is not on the dashboard"
    metric_rows = [row for w in board["widgets"] if w["type"] == "metric" for row in w["properties"]["metrics"]]
    plain = {(row[0], row[1]) for row in metric_rows if isinstance(row[0], str)}
    # REST API metrics carry ApiName and Stage; HTTP API metrics ApiId.
    api = [("AWS/ApiGateway", "5XXError"), ("AWS/ApiGateway", "4XXError")] if streaming else [
        ("AWS/ApiGateway", "5xx"), ("AWS/ApiGateway", "4xx")]
    dims = ["ApiName", "X-api", "Stage", "live"] if streaming else ["ApiId", "X"]
    gateway_rows = [row for row in metric_rows if row[0] == "AWS/ApiGateway"]
    assert gateway_rows and all(row[2:6 if streaming else 4] == dims for row in gateway_rows)
    for expected in [*api, ("AWS/ApiGateway", "Latency"), ("AWS/ApiGateway", "Count"),
                     ("AWS/Lambda", "Errors"), ("AWS/Lambda", "Throttles"), ("AWS/Lambda", "Duration"),
                     ("AWS/RDS", "CPUUtilization"), ("AWS/RDS", "DatabaseConnections"),
                     ("AWS/RDS", "ServerlessDatabaseCapacity"),
                     ("AWS/SQS", "ApproximateNumberOfMessagesVisible")]:
        assert expected in plain, expected
    raw = dashboard_source(streaming)
    for fn in ("ApiFunction", "FlushFunction", "WebhookFunction"):
        for metric in ("Errors", "Throttles", "Duration"):
            assert re.search(rf'"AWS/Lambda", "{metric}", "FunctionName", "\$\{{{fn}\}}"', raw), (fn, metric)
    assert "AWS/ElastiCache" in raw and "${RedisCache}" in raw
    # Every ${...} names a resource, parameter or pseudo parameter.
    known = set(resources()) | set(template()["Parameters"])
    for ref in re.findall(r"\$\{([^}.]+)(?:\.[^}]+)?\}", raw):
        assert ref.startswith("AWS::") or ref in known, ref


def _alarm(name: str) -> dict[str, Any]:
    alarm = resources()[name]
    assert alarm["Type"] == "AWS::CloudWatch::Alarm"
    props: dict[str, Any] = alarm["Properties"]
    assert props["AlarmActions"] == [{"Ref": "AlarmTopic"}], name
    return props


def test_alarms_go_to_the_sns_topic() -> None:
    assert resources()["AlarmTopic"]["Type"] == "AWS::SNS::Topic"
    subscription = resources()["AlarmEmailSubscription"]
    assert subscription["Condition"] == "HasAlarmEmail"
    assert subscription["Properties"]["Endpoint"] == {"Ref": "AlarmEmail"}

    flush_errors = _alarm("FlushErrorsAlarm")
    assert (flush_errors["Namespace"], flush_errors["MetricName"]) == ("AWS/Lambda", "Errors")
    assert flush_errors["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": "FlushFunction"}}]

    service_dims = [{"Name": "service", "Value": observability.SERVICE}]
    lag = _alarm("FlushLagAlarm")
    assert (lag["Namespace"], lag["MetricName"], lag["Dimensions"]) == (
        observability.NAMESPACE, observability.FLUSH_LAG, service_dims)
    assert (lag["Threshold"], lag["ComparisonOperator"]) == (900, "GreaterThanThreshold")

    parked = _alarm("ParkedBatchesAlarm")
    assert (parked["MetricName"], parked["Dimensions"]) == (observability.PARKED_BATCHES, service_dims)
    assert (parked["Threshold"], parked["ComparisonOperator"]) == (0, "GreaterThanThreshold")

    signatures = _alarm("WebhookSignatureFailuresAlarm")
    assert (signatures["MetricName"], signatures["Dimensions"]) == (
        observability.WEBHOOK_SIGNATURE_FAILURES, service_dims)

    api = _alarm("Api5xxRateAlarm")
    stats = {m["Id"]: m["MetricStat"]["Metric"] for m in api["Metrics"] if "MetricStat" in m}
    rest_dims = [{"Name": "ApiName", "Value": {"Fn::Sub": "${AWS::StackName}-api"}},
                 {"Name": "Stage", "Value": "live"}]
    assert resources()["RestApi"]["Properties"]["Name"] == {"Fn::Sub": "${AWS::StackName}-api"}
    assert resources()["RestApi"]["Properties"]["StageName"] == "live"
    for streaming, errors in ((True, "5XXError"), (False, "5xx")):
        dims = rest_dims if streaming else [{"Name": "ApiId", "Value": {"Ref": "HttpApi"}}]
        assert when(stats["errors"]["MetricName"], streaming) == errors
        assert when(stats["requests"]["MetricName"], streaming) == "Count"
        assert when(stats["errors"]["Dimensions"], streaming) == dims
        assert when(stats["requests"]["Dimensions"], streaming) == dims
    (rate,) = [m for m in api["Metrics"] if m["Id"] == "rate"]
    assert "errors / requests" in rate["Expression"]

    dlq = _alarm("FlushDeadLetterAlarm")
    assert dlq["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert dlq["Dimensions"] == [{"Name": "QueueName",
                                  "Value": {"Fn::GetAtt": ["FlushDeadLetterQueue", "QueueName"]}}]


# ---------------------------------------------------------------------------------------------- samconfig


def test_samconfig_has_default_dev_and_prod_deploy_settings() -> None:
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    params = template()["Parameters"]
    stacks = set()
    for env in ("default", "dev", "prod"):
        deploy = config[env]["deploy"]["parameters"]
        assert set(deploy["capabilities"].split()) == {"CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND"}
        assert deploy["resolve_s3"] is True
        assert config[env]["global"]["parameters"]["region"]
        stacks.add(config[env]["global"]["parameters"]["stack_name"])
        overrides = dict(re.findall(r'(\w+)="([^"]*)"', deploy["parameter_overrides"]))
        assert overrides, env
        for key, value in overrides.items():
            assert key in params, f"{env}: unknown parameter {key}"
            allowed = params[key].get("AllowedValues")
            assert allowed is None or value in [str(a) for a in allowed], f"{env}: {key}={value}"
    assert stacks == {"aikit-dev", "aikit-prod"}
    prod = dict(re.findall(r'(\w+)="([^"]*)"', config["prod"]["deploy"]["parameters"]["parameter_overrides"]))
    assert prod["Environment"] == "prod"


# ---------------------------------------------------------------------------------------------- events


def _event(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / "events" / name).read_text())
    return data


def test_sample_events_match_the_routes_and_the_schedule() -> None:
    chat = _event("chat_completions.json")
    assert (chat["requestContext"]["http"]["method"], chat["rawPath"]) == ("POST", "/v1/chat/completions")
    assert json.loads(chat["body"])["messages"]
    assert chat["version"] == "2.0"
    health = _event("healthz.json")
    assert (health["requestContext"]["http"]["method"], health["rawPath"]) == ("GET", "/healthz")
    hook = _event("stripe_webhook.json")
    assert (hook["requestContext"]["http"]["method"], hook["rawPath"]) == ("POST", "/v1/webhooks/stripe")
    assert "stripe-signature" in hook["headers"]
    assert json.loads(hook["body"])["type"].startswith("customer.subscription.")
    scheduled = _event("flush_scheduled.json")
    assert (scheduled["source"], scheduled["detail-type"]) == ("aws.events", "Scheduled Event")


def test_healthz_event_drives_the_real_api_handler() -> None:
    # A fresh interpreter: importing the handler builds the app and its process-wide runtime.
    script = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('api_app', 'functions/api/app.py')\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "class Ctx:\n"
        "    function_name = 'api'; memory_limit_in_mb = 1024; aws_request_id = 'r1'\n"
        "    invoked_function_arn = 'arn:aws:lambda:us-east-1:123456789012:function:api'\n"
        "    def get_remaining_time_in_millis(self): return 29000\n"
        "event = json.load(open('events/healthz.json'))\n"
        "sys.stderr.write(json.dumps(module.handler(event, Ctx())))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_ARN")}
    env.update({"DATABASE_URL": "sqlite:///:memory:", "REDIS_URL": "memory://", "FLUSH_INTERVAL_SECONDS": "0"})
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stderr.strip().splitlines()[-1])
    assert response["statusCode"] == 200
    assert json.loads(response["body"]) == {"status": "ok"}


# ---------------------------------------------------------------------------------------------- migrate handler



def _load_migrate_handler() -> Any:
    spec = importlib.util.spec_from_file_location("aikit_migrate_function", ROOT / "functions/migrate/app.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.handler


class _ResponseCatcher(http.server.BaseHTTPRequestHandler):
    answers: list[dict[str, Any]] = []

    def do_PUT(self) -> None:
        length = int(self.headers["Content-Length"])
        type(self).answers.append(json.loads(self.rfile.read(length)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def cloudformation() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A local stand-in for CloudFormation's pre-signed response URL."""
    answers: list[dict[str, Any]] = []
    handler = type("Catcher", (_ResponseCatcher,), {"answers": answers})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/response?sig=x", answers
    server.shutdown()
    server.server_close()


@pytest.fixture
def blank_database() -> Iterator[str]:
    """A database with no schema at all, dropped afterwards."""
    name = f"aikit_migrate_{uuid.uuid4().hex[:10]}"
    yield create_database(name)
    drop_database(name)


migrate_context = functools.partial(LambdaContext, "aikit-migrate", remaining_ms=300_000, aws_request_id="req-migrate",
                                    log_group_name="/aikit/test/migrate")


def _cfn_event(url: str, request_type: str) -> dict[str, Any]:
    return {"RequestType": request_type, "ResponseURL": url, "StackId": "arn:aws:cloudformation:stack/aikit",
            "RequestId": str(uuid.uuid4()), "LogicalResourceId": "DatabaseMigration",
            "ResourceType": "Custom::DatabaseMigration", "ResourceProperties": {"LayerVersion": "arn:1"}}


@pytest.fixture
def no_secret_arns(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.endswith("_SECRET_ARN"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("no_secret_arns")
def test_migration_custom_resource_migrates_and_answers_cloudformation(
    cloudformation: tuple[str, list[dict[str, Any]]], blank_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, answers = cloudformation
    monkeypatch.setenv("DATABASE_URL", blank_database)
    handler = _load_migrate_handler()

    assert handler(_cfn_event(url, "Create"), migrate_context()) == {"Status": "SUCCESS"}
    (answer,) = answers
    assert answer["Status"] == "SUCCESS"
    assert answer["PhysicalResourceId"] == "aikit-database-migration"
    assert answer["LogicalResourceId"] == "DatabaseMigration"
    assert answer["StackId"] == "arn:aws:cloudformation:stack/aikit"
    engine = create_engine(blank_database)
    assert "alembic_version" in inspect(engine).get_table_names()
    engine.dispose()

    # An update migrates again (a no-op here) and keeps the physical id, so CloudFormation deletes nothing.
    event = {**_cfn_event(url, "Update"), "PhysicalResourceId": answer["PhysicalResourceId"]}
    handler(event, migrate_context())
    assert answers[-1]["Status"] == "SUCCESS"
    assert answers[-1]["PhysicalResourceId"] == "aikit-database-migration"

    # Invoked by hand (no ResponseURL) it just migrates.
    assert handler({}, migrate_context()) == {"migrated": True}


@pytest.mark.usefixtures("no_secret_arns")
def test_migration_failure_is_reported_to_cloudformation_without_the_password(
    cloudformation: tuple[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, answers = cloudformation
    monkeypatch.setenv("DATABASE_URL", "postgresql://aikit:hunter2-secret@127.0.0.1:1/aikit")
    handler = _load_migrate_handler()
    # Little time left: no retries, the answer must still go out.
    assert handler(_cfn_event(url, "Create"), migrate_context(remaining_ms=5_000)) == {"Status": "FAILED"}
    (answer,) = answers
    assert answer["Status"] == "FAILED"
    assert answer["Reason"].startswith("migration failed")
    assert "hunter2-secret" not in answer["Reason"]

    # Deleting the stack never touches the database.
    handler(_cfn_event(url, "Delete"), migrate_context())
    assert answers[-1]["Status"] == "SUCCESS"
