"""Regenerates events/*.json from `sam local generate-event`, adapted to aikit's routes.

Run: .venv/bin/python infra/gen_events.py   (creates .venv-sam first if needed)
The events feed `sam local invoke -e events/<name>.json` (needs Docker) and handler tests. The webhook event's
Stripe-Signature is a placeholder: sign the body with your webhook secret to get one that verifies.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAM = ROOT / ".venv-sam" / "bin" / "sam"
EVENTS = ROOT / "events"
FAKE_API_KEY = "ak_test_REPLACE_WITH_A_KEY_FROM_aikit_keys_create"


def generate(*args: str) -> dict[str, Any]:
    env = {**os.environ, "SAM_CLI_TELEMETRY": "0"}
    out = subprocess.run([str(SAM), "local", "generate-event", *args], check=True, capture_output=True,
                         text=True, env=env).stdout
    data: dict[str, Any] = json.loads(out)
    return data


def http_event(method: str, path: str, body: str | None, headers: dict[str, str]) -> dict[str, Any]:
    event = generate("apigateway", "http-api-proxy", "--method", method, "--path", path.lstrip("/"),
                     "--body", body or "")
    # The sample carries a JWT authorizer, client certificate, cookies and query strings aikit does not use.
    for key in ("cookies", "pathParameters", "stageVariables", "queryStringParameters"):
        event.pop(key, None)
    event["rawQueryString"] = ""
    ctx = event["requestContext"]
    ctx.pop("authorizer", None)
    ctx.pop("authentication", None)
    ctx["http"]["userAgent"] = "aikit-sample-event"
    event["headers"] = {"host": ctx["domainName"], "user-agent": "aikit-sample-event", **headers}
    if body is None:
        event.pop("body", None)
        event["isBase64Encoded"] = False
    else:
        # Plain text is easier to edit than the generator's base64.
        assert base64.b64decode(event["body"]).decode() == body
        event["body"] = body
        event["isBase64Encoded"] = False
        event["headers"]["content-length"] = str(len(body.encode()))
    return event


def main() -> int:
    if not SAM.exists():
        subprocess.run(["bash", str(ROOT / "infra" / "sam-venv.sh")], check=True)
    EVENTS.mkdir(exist_ok=True)

    chat_body = json.dumps({"model": "echo-1", "messages": [{"role": "user", "content": "Say hello"}],
                            "max_tokens": 64})
    webhook_body = json.dumps({
        "id": "evt_sample_subscription_updated", "object": "event", "api_version": "2025-03-31.basil",
        "created": 1700000000, "type": "customer.subscription.updated", "livemode": False,
        "data": {"object": {"id": "sub_sample", "object": "subscription", "customer": "cus_sample",
                            "status": "active", "items": {"object": "list", "data": [
                                {"id": "si_sample", "price": {"id": "price_sample"},
                                 "current_period_start": 1700000000, "current_period_end": 1702592000}]}}},
    }, separators=(",", ":"))

    # A route of your own, mounted with AIKIT_ROUTERS=examples.summarize:router.
    summarize_body = json.dumps({"text": "Stripe bills each customer for the tokens their API key used this month."})

    events = {
        "chat_completions.json": http_event("POST", "/v1/chat/completions", chat_body, {
            "content-type": "application/json", "authorization": f"Bearer {FAKE_API_KEY}"}),
        "summarize.json": http_event("POST", "/v1/summarize", summarize_body, {
            "content-type": "application/json", "authorization": f"Bearer {FAKE_API_KEY}"}),
        "healthz.json": http_event("GET", "/healthz", None, {}),
        "stripe_webhook.json": http_event("POST", "/v1/webhooks/stripe", webhook_body, {
            "content-type": "application/json; charset=utf-8",
            "stripe-signature": "t=1700000000,v1=REPLACE_WITH_A_SIGNATURE_OF_THIS_BODY"}),
    }
    events["stripe_webhook.json"]["routeKey"] = "POST /v1/webhooks/stripe"
    events["stripe_webhook.json"]["requestContext"]["routeKey"] = "POST /v1/webhooks/stripe"

    scheduled = generate("cloudwatch", "scheduled-event")
    scheduled["resources"] = ["arn:aws:events:us-east-1:123456789012:rule/aikit-dev-flush"]
    scheduled["time"] = "2026-01-01T00:05:00Z"
    events["flush_scheduled.json"] = scheduled

    for name, event in events.items():
        (EVENTS / name).write_text(json.dumps(event, indent=2) + "\n")
        print(f"wrote events/{name}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
