"""The LLM facade meters calls that were cut off while the upstream worked on them (a cancellation, the
deadline, a read timeout) for their input, and gives back the reservation of calls the upstream refused.
Driven with a provider that answers slowly, a recording meter and a recording gate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from aikit.llm import (
    LLM,
    Caller,
    ChatRequest,
    ChatResult,
    Provider,
    ProviderError,
    ProviderEvent,
    ProviderTimeout,
    StreamEnd,
    TextDelta,
    Usage,
)
from aikit.llm.base import estimate_tokens
from tests.support.meters import MemoryMeter

pytestmark = pytest.mark.anyio

CALLER = Caller("key_1", "cus_1", quota_period_start=1_700_000_000)
MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "x" * 40}]  # an estimated 10 input tokens


class SlowProvider(Provider):
    name = "slow"
    default_model = "slow-1"

    def __init__(self, delay: float, failure: ProviderError | None = None) -> None:
        self.delay = delay
        self.failure = failure

    async def chat(self, req: ChatRequest) -> ChatResult:
        await asyncio.sleep(self.delay)
        if self.failure:
            raise self.failure
        return ChatResult("id", req.model, "done", "stop", Usage(10, 1))

    async def stream(self, req: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        for word in ("one ", "two ", "three "):
            yield TextDelta(word)
            await asyncio.sleep(self.delay)
        yield StreamEnd("stop", Usage(10, 3))


class RecordingGate:
    """A request's billing state that admits everything and remembers what it was asked."""

    caller = CALLER

    def __init__(self) -> None:
        self.admitted: list[str] = []
        self.released: list[str] = []

    def new_call_id(self) -> str:
        return f"req_{len(self.admitted) + 1}"

    async def admit(self, call_id: str, req: ChatRequest, provider: Provider) -> ChatRequest:
        self.admitted.append(call_id)
        return req

    async def release(self, call_id: str) -> None:
        self.released.append(call_id)


def figures(meter: MemoryMeter) -> list[tuple[int, int, int | None]]:
    return [(e.input_tokens, e.output_tokens, e.quota_period_start) for e in meter.events]


async def test_a_cancelled_call_bills_its_input() -> None:
    meter = MemoryMeter()
    llm = LLM(SlowProvider(5.0), meter=meter)
    task = asyncio.ensure_future(llm.chat(MESSAGES, track_tokens=True, caller=CALLER))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert figures(meter) == [(10, 0, 1_700_000_000)]


async def test_the_deadline_ends_a_call_and_bills_its_input() -> None:
    meter = MemoryMeter()
    llm = LLM(SlowProvider(5.0), meter=meter, deadline_seconds=0.1)
    with pytest.raises(ProviderTimeout) as info:
        await llm.chat(MESSAGES, track_tokens=True, caller=CALLER)
    assert info.value.status == 504 and info.value.cut_off
    assert "deadline" in info.value.message
    assert figures(meter) == [(10, 0, 1_700_000_000)]


async def test_the_deadline_ends_a_stream_and_bills_what_was_generated() -> None:
    meter = MemoryMeter()
    llm = LLM(SlowProvider(0.3), meter=meter, deadline_seconds=0.45)
    seen: list[str] = []

    async def read() -> None:
        async for event in llm.stream(MESSAGES, track_tokens=True, caller=CALLER):
            if isinstance(event, TextDelta):
                seen.append(event.text)

    with pytest.raises(ProviderTimeout):
        await read()
    assert seen == ["one ", "two "]
    assert figures(meter) == [(10, max(2, estimate_tokens("one two ")), 1_700_000_000)]


@pytest.mark.parametrize("cut_off", [True, False])
async def test_a_timeout_bills_only_when_the_upstream_was_working(cut_off: bool) -> None:
    """A read timeout cut the call off (billed); a connect timeout or a timeout status never ran it."""
    meter, gate = MemoryMeter(), RecordingGate()
    llm = LLM(SlowProvider(0.0, ProviderTimeout(cut_off=cut_off)), meter=meter)
    req = ChatRequest(MESSAGES, "slow-1")
    with pytest.raises(ProviderTimeout):
        await llm._chat(req, _billing(gate), None)
    assert figures(meter) == ([(10, 0, 1_700_000_000)] if cut_off else [])
    assert gate.admitted == ["req_1"]
    assert gate.released == ([] if cut_off else ["req_1"])  # a metered call settles its reservation itself


async def test_a_refused_stream_releases_and_a_completed_one_records() -> None:
    meter, gate = MemoryMeter(), RecordingGate()
    refused = LLM(SlowProvider(0.0, ProviderError("upstream 500")), meter=meter)
    with pytest.raises(ProviderError):
        await refused._chat(ChatRequest(MESSAGES, "slow-1"), _billing(gate), None)
    assert (meter.events, gate.released) == ([], ["req_1"])
    ok = LLM(SlowProvider(0.0), meter=meter)
    events = [e async for e in ok._stream(ChatRequest(MESSAGES, "slow-1"), _billing(gate), None)]
    assert isinstance(events[-1], StreamEnd)
    assert [e.request_id for e in meter.events] == ["req_2"]
    assert gate.released == ["req_1"]


def test_estimates_count_non_latin_scripts_per_character() -> None:
    assert estimate_tokens("x" * 40) == 10
    assert estimate_tokens("敏捷的棕色狐狸") == 7
    assert estimate_tokens("ab🦊") == 1 + 1


def _billing(gate: RecordingGate) -> Any:
    from aikit.llm import _Billing

    return _Billing(gate.caller, gate)
