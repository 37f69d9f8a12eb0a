"""Migrate Lambda: the DatabaseMigration custom resource runs `alembic upgrade head` through RDS Proxy on
every deploy that ships a new layer. Invoked by hand (`aws lambda invoke --function-name
<MigrateFunctionName>`) it just migrates."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from aikit.aws_secrets import apply_secret_settings
from aikit.db.migrate import upgrade
from aikit.observability import lambda_entry, logger, redact
from aikit.settings import load_settings

PHYSICAL_ID = "aikit-database-migration"  # stable, so an update never "replaces" (deletes) the resource
ANSWER_MARGIN_SECONDS = 30.0  # stop retrying in time to answer CloudFormation
RETRY_PAUSE_SECONDS = 10.0


def _migrate(context: Any) -> None:
    apply_secret_settings()
    url = load_settings().database_url
    while True:
        try:
            upgrade(url)
            return
        except Exception:
            # A just-created proxy can refuse connections for a few minutes; alembic is transactional on
            # Postgres, so trying again is safe.
            if context.get_remaining_time_in_millis() / 1000 < ANSWER_MARGIN_SECONDS + RETRY_PAUSE_SECONDS:
                raise
            logger.warning("migration_retry", exc_info=True)
            time.sleep(RETRY_PAUSE_SECONDS)


def _answer(event: dict[str, Any], status: str, reason: str) -> None:
    body = json.dumps({
        "Status": status,
        "Reason": reason[:1000],
        "PhysicalResourceId": event.get("PhysicalResourceId") or PHYSICAL_ID,
        "StackId": event["StackId"],
        "RequestId": event["RequestId"],
        "LogicalResourceId": event["LogicalResourceId"],
        "Data": {},
    }).encode()
    request = urllib.request.Request(  # noqa: S310 - CloudFormation's pre-signed https S3 URL
        event["ResponseURL"], data=body, method="PUT",
        headers={"Content-Type": "", "Content-Length": str(len(body))},
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        response.read()


@lambda_entry
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    if "ResponseURL" not in event:
        _migrate(context)
        return {"migrated": True}
    status, reason = "SUCCESS", "migrated"
    try:
        if event.get("RequestType") in ("Create", "Update"):
            _migrate(context)
        else:
            reason = "nothing to undo"
    except Exception as exc:
        logger.exception("migration_failed")
        status = "FAILED"
        reason = redact(f"migration failed: {type(exc).__name__}: {exc}; "
                        f"see log group {context.log_group_name}")
    _answer(event, status, reason)
    return {"Status": status}
