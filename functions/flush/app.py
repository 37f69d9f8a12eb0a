"""Flush Lambda: run by EventBridge every five minutes; stops before the Lambda's time limit."""

from typing import Any

from aikit.aws_secrets import apply_secret_settings
from aikit.flush import run_flush
from aikit.observability import lambda_entry
from aikit.settings import get_settings

SAFETY_MARGIN_SECONDS = 20.0


@lambda_entry
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    apply_secret_settings()
    budget = context.get_remaining_time_in_millis() / 1000 - SAFETY_MARGIN_SECONDS
    summary = run_flush(get_settings(), time_budget=max(1.0, budget))
    if not summary.ok:
        # Fail the invocation so the error alarm sees it; the next scheduled run picks the work up.
        raise RuntimeError(f"flush failed: {summary.errors}")
    return summary.as_dict()
