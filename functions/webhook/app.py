"""Webhook Lambda: only POST /v1/webhooks/stripe, behind API Gateway (HTTP API), through Mangum."""

import stripe  # noqa: F401 - every delivery verifies a signature with it: loaded at init, inside a SnapStart snapshot
from mangum import Mangum

from aikit.api.routes.webhooks import create_webhook_app
from aikit.aws_secrets import apply_secret_settings, refresh_after_snapstart_restore
from aikit.observability import lambda_entry

apply_secret_settings()
refresh_after_snapstart_restore()
app = create_webhook_app()
handler = lambda_entry(Mangum(app, lifespan="off"))
