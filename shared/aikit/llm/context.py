"""Who is calling, for metering: the API's auth dependency sets it, the `LLM` facade reads it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    api_key_id: str
    customer_id: str | None = None


current_caller: ContextVar[Caller | None] = ContextVar("aikit_current_caller", default=None)


@contextmanager
def use_caller(caller: Caller | None) -> Iterator[Caller | None]:
    """Set the caller for the code inside the block, restoring the previous one after it."""
    token = current_caller.set(caller)
    try:
        yield caller
    finally:
        current_caller.reset(token)
