"""What a metered request is, and the small interface everything that records usage implements."""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


def new_request_id() -> str:
    # 128 random bits as 32 hex digits, the shape of uuid4().hex at a fifth of its cost (it runs per request).
    return "req_" + os.urandom(16).hex()


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One metered request. `request_id` makes every write of it idempotent downstream."""

    request_id: str
    api_key_id: str
    customer_id: str | None
    model: str
    input_tokens: int  # billable input, cached tokens included
    output_tokens: int
    cached_tokens: int = 0  # the part of input_tokens served from the provider's cache
    ts: float = field(default_factory=time.time)  # Unix seconds, when the usage happened
    # The start of the key's quota period the tokens count against (KeyInfo.quota_period_start); None lets
    # a meter that keeps quota counters look it up.
    quota_period_start: int | None = None
    # What the event costs in 1e-12 currency units (aikit.pricing), fixed when it is recorded: a later rate
    # change never rewrites it. 0 without a price table (the token meter bills tokens).
    cost: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class Meter(ABC):
    """Records usage events durably; implementations must never lose or double-count one."""

    @abstractmethod
    async def record_event(self, event: UsageEvent) -> None: ...

    async def record(
        self,
        api_key_id: str,
        tokens: int,
        customer_id: str | None,
        *,
        request_id: str | None = None,
        model: str = "unknown",
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        cached_tokens: int = 0,
        ts: float | None = None,
        quota_period_start: int | None = None,
    ) -> UsageEvent:
        """The documented entry point: `meter.record(api_key_id, tokens, customer_id, ...)`."""
        if input_tokens is None and output_tokens is None:
            input_tokens, output_tokens = 0, tokens
        input_tokens = input_tokens or 0
        output_tokens = output_tokens if output_tokens is not None else tokens - input_tokens
        if input_tokens < 0 or output_tokens < 0 or input_tokens + output_tokens != tokens:
            raise ValueError("tokens must equal input_tokens + output_tokens, all non-negative")
        event = UsageEvent(
            request_id=request_id or new_request_id(),
            api_key_id=api_key_id,
            customer_id=customer_id,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_tokens=cached_tokens,
            ts=time.time() if ts is None else ts,
            quota_period_start=quota_period_start,
        )
        await self.record_event(event)
        return event
