"""All configuration, read once from the environment (and `.env`)."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

from aikit.errors import PriceTableError, SettingsError
from aikit.pricing import PriceBook, build_price_book

_ROUTER_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def router_specs(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


ADMIN_TOKEN_MIN_LENGTH = 32
# A relative SQLite path (the default ./aikit.db included) is resolved against the project directory: the
# nearest directory from the working directory up that holds a .env or pyproject.toml, else the working
# directory; AIKIT_HOME, when set, is that directory. So `aikit migrate`, `aikit serve` and `aikit keys` agree
# on one database file whichever subdirectory they run from.
PROJECT_MARKERS = (".env", "pyproject.toml")


def project_dir() -> Path:
    home = os.environ.get("AIKIT_HOME")
    if home:
        return Path(home).expanduser().resolve()
    cwd = Path.cwd()
    for folder in (cwd, *cwd.parents):
        if any((folder / marker).is_file() for marker in PROJECT_MARKERS):
            return folder
    return cwd


def embedded_sqlite_url(url: str) -> str:
    """`sqlite:///relative/path` made absolute against project_dir(); other URLs unchanged."""
    prefix, _, rest = url.partition(":///")
    if not prefix.startswith("sqlite") or not rest or rest.startswith((":memory:", "/")) or "?mode=memory" in rest:
        return url
    return f"{prefix}:///{(project_dir() / rest).resolve()}"


def _check_port(url: str) -> None:
    """A non-numeric or out-of-range port is named at start, not as a traceback on the first query."""
    try:
        port = urlsplit(url).port
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535") from None
    if port == 0:
        raise ValueError("has a port that is not a number from 1 to 65535")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # Storage. The defaults are the embedded first-try setup of `make run`.
    database_url: str = "sqlite:///./aikit.db"
    redis_url: str = "memory://"  # memory:// is an in-process Redis substitute (fakeredis)
    redis_cluster: bool = False  # use RedisCluster (ElastiCache Serverless is cluster-only)
    redis_key_prefix: str = Field(default="aikit", pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    # Usage buffers are spread over this many hash slots; never lower it while buffers hold data.
    redis_usage_shards: int = Field(default=16, ge=1, le=1024)
    redis_timeout_seconds: float = Field(default=0.5, gt=0)

    # Stripe.
    stripe_secret_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_metered_price_id: str | None = None
    stripe_metering_enabled: bool = True
    stripe_meter_event_name: str = "api_tokens"
    stripe_api_base: str | None = None  # tests point the SDK at a local Stripe-compatible server
    stripe_max_network_retries: int = Field(default=2, ge=0, le=10)
    stripe_timeout_seconds: float = Field(default=10.0, gt=0)
    stripe_report_window_seconds: int = Field(default=300, ge=60, le=86400)
    stripe_success_url: str = "http://127.0.0.1:8000/billing/success"
    stripe_cancel_url: str = "http://127.0.0.1:8000/billing/cancel"
    stripe_portal_return_url: str = "http://127.0.0.1:8000/"

    # Pricing (aikit.pricing). With a price table, only priced models are served and Stripe gets one cost meter
    # (integer 1e-12 currency units per event); without one, one token meter, every token one unit.
    # PRICE_TABLE: JSON {"model or glob*": {"input": r, "cached_input": r, "output": r}}, per million tokens.
    price_table: dict[str, Any] = Field(default_factory=dict)
    price_table_file: str | None = None  # a JSON file of the same shape; PRICE_TABLE wins for a model in both
    price_currency: str = Field(default="usd", pattern=r"^[a-z]{3}$")
    stripe_cost_event_name: str = Field(default="aikit_cost", pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    _price_book: PriceBook | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _pricing(self) -> Settings:
        self._price_book = build_price_book(self.price_table, self.price_table_file, self.price_currency)
        return self

    @property
    def price_book(self) -> PriceBook | None:
        """The validated price book; None when no price table is configured (one token meter)."""
        # Read without BaseModel.__getattr__'s private-attribute lookup: this runs twice per metered request.
        book: PriceBook | None = cast("dict[str, Any]", self.__pydantic_private__)["_price_book"]
        return book

    # LLM providers.
    llm_provider: Literal["echo", "openai", "anthropic", "bedrock"] = "echo"
    llm_default_model: str | None = None
    llm_embedding_model: str | None = None  # of POST /v1/embeddings calls naming none; else the provider's
    llm_timeout_seconds: float = Field(default=60.0, gt=0)  # per read from the upstream
    # Total time one LLM call may take, streams included; keep it below the function's timeout so a call cut
    # off here still ends cleanly (504, or a final SSE error event) and is metered for what the upstream bills.
    llm_deadline_seconds: float = Field(default=25.0, gt=0)
    openai_api_key: str | None = None
    openai_base_url: str = "https://api.openai.com/v1"
    anthropic_api_key: str | None = None
    anthropic_base_url: str = "https://api.anthropic.com"
    anthropic_version: str = "2023-06-01"
    bedrock_region: str | None = None
    bedrock_endpoint_url: str | None = None

    # Access and limits.
    admin_token: str | None = None
    key_cache_ttl_seconds: float = Field(default=5.0, ge=0, le=300)
    default_rpm: int = Field(default=60, ge=0)
    default_rpd: int = Field(default=10_000, ge=0)
    default_monthly_tokens: int | None = Field(default=1_000_000, ge=0)
    # What the limiter does when Redis cannot be reached: let requests through, or refuse them.
    rate_limit_fail_mode: Literal["open", "closed"] = "open"
    # Invalid API keys one client address may present per minute before it gets 429s (slows key guessing).
    auth_failures_per_minute: int = Field(default=20, ge=1)
    # The output cap of a metered call without max_tokens on a key with a monthly quota: sent to the provider
    # as max_tokens and reserved against the quota with the input's upper bound while the call runs.
    quota_reserve_tokens: int = Field(default=4096, ge=1)

    # Hostile traffic: what one request or one slow client may take from the server (aikit serve and Lambda).
    # Request bodies are counted while they arrive, before parsing and before auth: a longer one is a 413.
    # API Gateway refuses bodies above 10 MB on its own; this stays well under it.
    max_request_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=10 * 1000 * 1000)
    # A body that has not fully arrived this long after its headers is a 408 (slow-drip uploads).
    body_read_timeout_seconds: float = Field(default=30.0, gt=0)
    # aikit serve: a connection that has not sent complete request headers this long after it opened (or after
    # its previous response) is closed; idle keep-alive connections are closed after keep_alive_seconds.
    header_read_timeout_seconds: float = Field(default=10.0, gt=0)
    keep_alive_seconds: int = Field(default=5, ge=1)
    # aikit serve: requests handled at once; beyond it new connections get 503 at once instead of queueing.
    server_concurrency_limit: int = Field(default=128, ge=1)
    # A response the client stops reading (a stalled stream) is abandoned after this long, and metered.
    send_stall_timeout_seconds: float = Field(default=30.0, gt=0)
    # Wrong admin tokens one client address may present per minute before it gets 429s.
    admin_failures_per_minute: int = Field(default=10, ge=1)

    # Subscription lifecycle.
    past_due_grace_days: int = Field(default=7, ge=0)
    on_subscription_deleted: Literal["off", "free_tier"] = "off"
    free_tier_rpm: int = Field(default=10, ge=0)
    free_tier_rpd: int = Field(default=200, ge=0)
    free_tier_monthly_tokens: int = Field(default=50_000, ge=0)
    email_backend: Literal["log", "ses"] = "log"
    email_from: str = "billing@example.com"

    # Flush.
    flush_interval_seconds: int = Field(default=300, ge=0)  # 0 turns off the in-process flush of `make run`
    flush_batch_size: int = Field(default=5000, ge=1, le=100_000)
    flush_time_budget_seconds: float = Field(default=240.0, gt=0)

    log_level: str = "INFO"
    # uvicorn's access log (one line per request) for `aikit serve`: off by default (issue 16), as under Lambda
    # Web Adapter (functions/api/run.sh), where API Gateway logs requests.
    access_log: bool = False

    # Your own endpoints: comma-separated `module:attribute` of FastAPI APIRouters, mounted by `aikit serve`,
    # `make run` and the API Lambda beside the built-in routes (API key required unless the router opts out).
    aikit_routers: str = ""

    # Stripe event destination for thin events (meter-event error reports), delivered to the same
    # POST /v1/webhooks/stripe; its own signing secret (the snapshot webhook keeps STRIPE_WEBHOOK_SECRET).
    stripe_event_destination_secret: str | None = None
    # The account's invoice finalization grace period (Stripe: 1 h by default, up to 72 h in Billing settings).
    stripe_finalization_grace_seconds: int = Field(default=3600, ge=0, le=72 * 3600)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if value.startswith("postgres://"):
            value = "postgresql://" + value.removeprefix("postgres://")
        if value.startswith("postgresql://"):
            value = "postgresql+pg8000://" + value.removeprefix("postgresql://")
        if not (value.startswith("sqlite") or value.startswith("postgresql+pg8000://")):
            raise ValueError("must be a sqlite:/// or postgresql:// URL")
        if value.startswith("postgresql"):
            _check_port(value)
        return embedded_sqlite_url(value)

    @field_validator("admin_token")
    @classmethod
    def _admin_token(cls, value: str | None) -> str | None:
        # Guessable tokens guard every key: a short one is refused at start rather than served.
        if value is not None and value != "" and len(value) < ADMIN_TOKEN_MIN_LENGTH:
            raise ValueError(f"must be at least {ADMIN_TOKEN_MIN_LENGTH} characters (e.g. `openssl rand -hex 32`)")
        return value or None

    @field_validator("stripe_report_window_seconds")
    @classmethod
    def _window(cls, value: int) -> int:
        # Windows must tile a UTC day, so a window never straddles two days (reconcile compares per day).
        if 86400 % value:
            raise ValueError("must divide 86400 (a day) evenly, e.g. 60, 300, 900, 3600")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://", "memory://")):
            raise ValueError("must be a redis://, rediss://, unix:// or memory:// URL")
        return value

    @field_validator("aikit_routers")
    @classmethod
    def _routers(cls, value: str) -> str:
        for spec in router_specs(value):
            if not _ROUTER_SPEC.fullmatch(spec):
                raise ValueError(f"{spec!r} is not module:attribute (e.g. myapp.routes:router)")
        return value

    @property
    def routers(self) -> list[str]:
        return router_specs(self.aikit_routers)

    @property
    def stripe_enabled(self) -> bool:
        return bool(self.stripe_secret_key)

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith("postgresql")


def load_settings(**overrides: object) -> Settings:
    """Build settings; a bad value raises SettingsError with one line naming the variable."""
    # .env of the project directory, as for the embedded database: the same settings from any subdirectory.
    overrides.setdefault("_env_file", project_dir() / ".env")
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, PriceTableError):  # one line per bad entry, each naming its setting
            raise SettingsError("\n".join(f"invalid setting {line}" for line in cause.lines)) from None
        name = str(first["loc"][0]).upper() if first["loc"] else "settings"
        raise SettingsError(f"invalid setting {name}: {first['msg']}") from None
    except SourceError as exc:
        # Raised before validation when a value cannot be decoded (e.g. PRICE_TABLE that is not JSON).
        field = str(exc).split('"')[1] if '"' in str(exc) else "settings"
        raise SettingsError(f"invalid setting {field.upper()}: {exc.__cause__ or exc}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
