"""The billing state of one HTTP request: who pays, and the admission of each metered call against the key's
limits. The API's auth step creates it; it implements `CallGate` for the `LLM` facade.

Round trips: the request is counted against requests per minute/day lazily, in the same script that admits
its first metered call (one Redis round trip before the LLM call; the usage record is the one after). Each
further call of the request only reserves against the monthly quota (nothing at all for a key without one).
A request that made no metered call is counted once when it ends (`finish`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch

from aikit.errors import ApiError, RateLimited
from aikit.keys import KeyInfo
from aikit.limits import RateLimiter
from aikit.llm import LLM, BoundLLM
from aikit.llm.base import ChatRequest, Provider
from aikit.llm.context import Admitted, Caller
from aikit.metering.base import new_request_id
from aikit.observability import RATE_LIMITED, REQUESTS, emit
from aikit.pricing import PriceBook


def check_model(model: str, key: KeyInfo, book: PriceBook | None) -> None:
    """The model gate, before any limit is counted or upstream call made: with a price table only priced models
    are served (404 model_not_found), and a key with an allow-list only gets the models on it (403)."""
    if book is not None and not book.priced(model):
        raise ApiError(404, f"model {model!r} has no price, so it is not served; add it (or a pattern matching "
                       "it) to PRICE_TABLE or PRICE_TABLE_FILE", code="model_not_found", param="model")
    allowed = key.allowed_models
    if allowed is not None and not any(model == p or fnmatch.fnmatchcase(model, p) for p in allowed):
        raise ApiError(403, f"model {model!r} is not allowed for this API key (allowed: {', '.join(allowed)})",
                       code="model_not_allowed", param="model")


class MeteredRequest:
    __slots__ = ("_admitting", "_book", "_calls", "_counted", "_default_max_tokens", "_limiter", "_llm", "_tried",
                 "caller", "headers", "key", "request_id")

    def __init__(self, key: KeyInfo, limiter: RateLimiter, llm: LLM, default_max_tokens: int,
                 request_id: str | None = None, price_book: PriceBook | None = None) -> None:
        self.key = key
        self.caller = Caller(key.api_key_id, key.customer_id, key.quota_period_start)
        self.request_id = request_id or new_request_id()
        self.headers: dict[str, str] = {}  # the rate-limit headers of the latest admitted call
        self._limiter = limiter
        self._llm = llm
        # The output cap of a call without max_tokens on a key with a quota, so its reservation is a bound.
        self._default_max_tokens = default_max_tokens
        self._calls = 0
        self._counted = False
        self._tried = False  # a metered call was attempted (admitted or refused)
        self._admitting: asyncio.Event | None = None
        self._book = price_book

    @property
    def llm(self) -> BoundLLM:
        return BoundLLM(self._llm, self)

    def new_call_id(self) -> str:
        """The first call's usage event carries the request id (X-Request-Id); later ones a suffix."""
        self._calls += 1
        return self.request_id if self._calls == 1 else f"{self.request_id}.{self._calls}"

    async def admit(self, call_id: str, req: Admitted, provider: Provider) -> Admitted:
        check_model(req.model, self.key, self._book)  # a refused model is not a tried call: nothing counted
        self._tried = True
        quota = self.key.monthly_tokens is not None
        reserve = 0
        if quota:
            if isinstance(req, ChatRequest) and req.output_limit is None:
                req = dataclasses.replace(req, max_tokens=self._default_max_tokens)
            reserve = provider.reserve_tokens(req)  # a chat's input bound and output cap; an embedding's input
        while self._admitting is not None:  # another call of this request is counting it: its outcome decides
            await self._admitting.wait()
        count = not self._counted
        if not count and not quota:
            return req
        if count:
            self._admitting = asyncio.Event()
        try:
            decision = await self._limiter.admit(self.key, call_id, reserve, count_request=count)
        finally:
            if count and self._admitting is not None:
                self._admitting.set()
                self._admitting = None
        if not decision.allowed:
            emit(RATE_LIMITED, limit=decision.limit_hit or "unknown")
            raise RateLimited(decision)
        if decision.headers:
            self.headers = decision.headers
        if count:
            self._counted = True
            emit(REQUESTS)
        return req

    async def release(self, call_id: str) -> None:
        if self.key.monthly_tokens is not None:
            await self._limiter.release(self.key, call_id)

    async def finish(self) -> None:
        """The request ended: if no metered call counted it (it made none), count it once now."""
        if self._counted or self._tried:
            return  # counted by its first metered call, or refused (a refused request is not counted)
        self._counted = True
        await self._limiter.count(self.key)
        emit(REQUESTS)
