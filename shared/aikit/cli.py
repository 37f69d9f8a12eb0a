"""`aikit` command line: serve, migrate, keys, flush, reconcile, stripe setup."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any

from aikit.errors import AikitError, ClientError, SettingsError
from aikit.settings import Settings, get_settings


def _print(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))  # noqa: T201


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from aikit.server import serve

    # uvicorn re-raises the Ctrl-C it caught after its clean shutdown: that is the asked-for stop.
    with contextlib.suppress(KeyboardInterrupt):
        serve(settings, args.host, args.port)
    return 0


def cmd_migrate(_: argparse.Namespace, settings: Settings) -> int:
    from aikit.db.migrate import upgrade

    upgrade(settings.database_url)
    _print({"migrated": True})
    return 0


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)  # noqa: T201
    return 2


# The operator's own input is wrong (a setting, a refused key): the message is the whole story, one line per
# problem (a price table names each bad entry). Any other failure is named with its type (describe_failure).
INPUT_ERRORS = (SettingsError, ClientError)


def _input_error(exc: AikitError) -> int:
    for line in exc.message.splitlines():
        _error(line)
    return 2


# The admin API's body field -> this command's option, for error messages.
_KEY_OPTIONS = {"email": "--email", "customer_id": "--customer", "name": "--name", "rpm": "--rpm", "rpd": "--rpd",
                "monthly_tokens": "--monthly-tokens", "allowed_models": "--allowed-models"}


def _key_request(args: argparse.Namespace) -> Any:
    """The options checked exactly as POST /v1/admin/keys checks its body; a bad one raises ValueError."""
    from pydantic import ValidationError

    from aikit.api.routes.admin import CreateKeyBody

    values = {"email": args.email, "customer_id": args.customer, "name": args.name, "rpm": args.rpm,
              "rpd": args.rpd, "monthly_tokens": args.monthly_tokens}
    if args.allowed_models is not None:  # comma-separated names or glob patterns
        values["allowed_models"] = [m.strip() for m in args.allowed_models.split(",")]
    try:
        return CreateKeyBody(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "email"
        raise ValueError(f"invalid {_KEY_OPTIONS.get(field, field)} {values.get(field)!r}: {first['msg']}") from None


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from aikit.db.engine import get_engine
    from aikit.db.models import ApiKey, User
    from aikit.keys import create_key, revoke_key

    if args.keys_command == "create":
        try:
            body = _key_request(args)
        except ValueError as exc:
            return _error(str(exc))
    with Session(get_engine(settings.database_url)) as session:
        if args.keys_command == "create":
            issued = create_key(session, settings, email=str(body.email), customer_id=body.customer_id,
                                name=body.name, rpm=body.rpm, rpd=body.rpd, monthly_tokens=body.monthly_tokens,
                                allowed_models=body.allowed_models)  # KeyRefused: an input error (main)
            session.commit()
            _print({"api_key": issued.api_key, "api_key_id": issued.api_key_id, "prefix": issued.prefix})
            return 0
        if args.keys_command == "revoke":
            found = revoke_key(session, args.api_key_id)
            session.commit()
            if not found:
                return _error(f"no API key {args.api_key_id}")
            _print({"api_key_id": args.api_key_id, "status": "revoked"})
            return 0
        rows = session.execute(select(ApiKey, User).join(User, User.id == ApiKey.user_id)).all()
        _print([{"api_key_id": k.id, "prefix": k.prefix, "email": u.email, "status": k.status,
                 "allowed_models": json.loads(k.allowed_models) if k.allowed_models else None} for k, u in rows])
        return 0


def cmd_flush(_: argparse.Namespace, settings: Settings) -> int:
    from aikit.flush import run_flush

    summary = run_flush(settings)
    _print(summary.as_dict())
    return 0 if summary.ok else 1


def cmd_requeue(args: argparse.Namespace, settings: Settings) -> int:
    from aikit.outbox import requeue_parked

    count = requeue_parked(settings, customer_id=args.customer, report_ids=args.report_id or None)
    _print({"requeued": count})
    return 0


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from aikit.reconcile import reconcile

    report = reconcile(settings, since=args.since)
    _print(report.as_dict())
    return 0 if report.ok else 1


def cmd_stripe(args: argparse.Namespace, settings: Settings) -> int:
    from aikit.stripe_gateway import gateway_from_settings, setup_spec

    gateway = gateway_from_settings(settings)
    if gateway is None:
        print("error: STRIPE_SECRET_KEY is not set", file=sys.stderr)  # noqa: T201
        return 2
    spec = setup_spec(settings)
    result = gateway.ensure_setup(event_name=spec.event_name, spec=spec)
    out: dict[str, object] = {"meter_id": result.meter_id, "product_id": result.product_id,
                              "price_id": result.price_id, "created": result.created,
                              "STRIPE_METERED_PRICE_ID": result.price_id, "event_name": spec.event_name}
    if settings.price_book is not None:
        # The price book is applied per usage event at metering time; Stripe only converts units to money.
        out["unit"] = f"1e-12 {spec.currency.upper()}"
        out["unit_amount_decimal"] = spec.unit_amount_decimal
        out["models"] = {m: {t: str(v) for t, v in zip(("input", "cached_input", "output"), r.per_million,
                                                          strict=True)}
                         for m, r in settings.price_book.entries().items()}
    _print(out)
    return 0


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aikit", description="Usage-based billing for LLM APIs")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=cmd_serve)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)

    keys = sub.add_parser("keys", help="manage API keys")
    ks = keys.add_subparsers(dest="keys_command", required=True)
    create = ks.add_parser("create", help="create a key (printed once)")
    create.add_argument("--email", required=True)
    create.add_argument("--customer", help="Stripe customer id (cus_...)")
    create.add_argument("--name")
    create.add_argument("--rpm", type=int)
    create.add_argument("--rpd", type=int)
    create.add_argument("--monthly-tokens", type=int, dest="monthly_tokens")
    create.add_argument("--allowed-models", dest="allowed_models",
                        help="comma-separated models (or glob patterns such as gpt-4o*) this key may call")
    revoke = ks.add_parser("revoke", help="revoke a key")
    revoke.add_argument("api_key_id")
    ks.add_parser("list", help="list keys")
    keys.set_defaults(func=cmd_keys)

    sub.add_parser("flush", help="run one flush and print a JSON summary").set_defaults(func=cmd_flush)
    requeue = sub.add_parser("requeue-parked", help="send parked Stripe reports again (same identifiers)")
    requeue.add_argument("--customer", help="only this Stripe customer's reports")
    requeue.add_argument("--report-id", action="append", dest="report_id", help="only this report (repeatable)")
    requeue.set_defaults(func=cmd_requeue)
    rec = sub.add_parser("reconcile", help="compare Postgres usage with Stripe's meter totals")
    rec.add_argument("--since", type=_date)
    rec.set_defaults(func=cmd_reconcile)
    stripe = sub.add_parser("stripe", help="Stripe helpers")
    ss = stripe.add_subparsers(dest="stripe_command", required=True)
    ss.add_parser("setup", help="create the billing meter, product and metered price if missing")
    stripe.set_defaults(func=cmd_stripe)
    return p


def _where(url: str) -> str:
    """The database a URL names, without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "DATABASE_URL"


def _database_failure(exc: Exception, url: str) -> str:
    from sqlalchemy.exc import InterfaceError, OperationalError

    from aikit.api.errors import sqlstate

    state = sqlstate(exc) if hasattr(exc, "orig") else ""  # type: ignore[arg-type]
    detail = str(getattr(exc, "orig", exc)).splitlines()[0] if str(getattr(exc, "orig", exc)) else ""
    where = _where(url)
    if state == "3D000":
        return f"database does not exist: {where} (create it, then run `aikit migrate`)"
    if state == "42P01" or "no such table" in detail:
        return f"the database has no aikit tables: run `aikit migrate` (DATABASE_URL={where})"
    if url.startswith("sqlite") and "unable to open database file" in detail:
        return f"cannot open the SQLite database {where}: its directory does not exist or is not writable"
    if state.startswith("28"):
        return f"the database refused the login: {where} (check DATABASE_URL's user and password)"
    if isinstance(exc, (OperationalError, InterfaceError)):
        return f"cannot connect to the database {where}: {detail[:200]}"
    return f"database error ({type(getattr(exc, 'orig', exc)).__name__}) on {where}"


def describe_failure(exc: Exception, settings: Settings) -> str:
    """One line naming what went wrong, for a command that failed with `exc`."""
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError):
        return _database_failure(exc, settings.database_url)
    text = (str(exc).splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        from aikit.aws_secrets import apply_secret_settings

        apply_secret_settings()  # DATABASE_SECRET_ARN etc., when run against a deployed stack
        settings = get_settings()
    except SettingsError as exc:
        return _input_error(exc)
    try:
        code: int = args.func(args, settings)
    except INPUT_ERRORS as exc:  # e.g. AIKIT_ROUTERS naming a module that cannot be imported
        return _input_error(exc)
    except Exception as exc:  # no traceback for an operator's mistake: one line naming it
        return _error(describe_failure(exc, settings))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
