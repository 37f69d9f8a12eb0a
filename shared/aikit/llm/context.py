"""Who pays for a metered call, and the request it runs in.

The API's auth step builds the request's billing state (a `CallGate`: the caller, built once from the key,
and the admission of each call against the key's limits) and puts it in the `RequestScope` that the API
sets for every HTTP request; `llm.chat(..., track_tokens=True)` finds it there. Outside the API a caller can
be given explicitly (`caller=Caller(...)`) or for a block of code (`use_caller`); such calls are metered but
not limited.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from aikit.llm.base import ChatRequest, EmbeddingRequest, Provider

if TYPE_CHECKING:
    from aikit.llm import LLM


@dataclass(frozen=True, slots=True)
class Caller:
    api_key_id: str
    customer_id: str | None = None
    # The start of the key's quota period (KeyInfo.quota_period_start), so usage lands in the quota counter
    # the limiter reads; None lets the meter look it up from the key.
    quota_period_start: int | None = None


# What a gate admits: a chat or an embeddings call (the same limits, quota reservation and metering).
Admitted = TypeVar("Admitted", ChatRequest, EmbeddingRequest)


class CallGate(Protocol):
    """A request's billing state, as the `LLM` facade uses it around each metered call."""

    @property
    def caller(self) -> Caller: ...

    def new_call_id(self) -> str:
        """A fresh id for one metered call: its quota reservation and its usage event share it."""
        ...

    async def admit(self, call_id: str, req: Admitted, provider: Provider) -> Admitted:
        """Check the limits and reserve the call's worst case; returns the request to send (a chat's output
        cap set when the reservation needs one). Raises when a limit refuses the call."""
        ...

    async def release(self, call_id: str) -> None:
        """Give the reservation back: the call produced nothing to bill."""
        ...


class LLMSource(Protocol):
    @property
    def llm(self) -> LLM: ...


class RequestScope:
    """One HTTP request as the LLM layer sees it. `gate` is set by the auth step; a route whose router opted
    out of auth has none, and its first metered call runs `authenticate` (the same check) instead."""

    __slots__ = ("authenticate", "gate", "source")

    def __init__(self, source: LLMSource | None = None,
                 authenticate: Callable[[], Awaitable[CallGate]] | None = None) -> None:
        self.source = source
        self.authenticate = authenticate
        self.gate: CallGate | None = None


current_request: ContextVar[RequestScope | None] = ContextVar("aikit_current_request", default=None)
current_caller: ContextVar[Caller | None] = ContextVar("aikit_current_caller", default=None)


@contextmanager
def use_caller(caller: Caller | None) -> Iterator[Caller | None]:
    """Set the caller for the code inside the block, restoring the previous one after it."""
    token = current_caller.set(caller)
    try:
        yield caller
    finally:
        current_caller.reset(token)
