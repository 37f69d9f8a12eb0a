"""A Meter that keeps what it is given, for tests of the LLM layer.
"""

from __future__ import annotations

import asyncio

from aikit.metering.base import Meter, UsageEvent


class MemoryMeter(Meter):
    """A fake recorder of the Meter interface; `delay` makes each record take that long."""

    def __init__(self, delay: float = 0.0) -> None:
        self.events: list[UsageEvent] = []
        self.delay = delay
        self.entered = asyncio.Event()

    async def record_event(self, event: UsageEvent) -> None:
        self.entered.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        self.events.append(event)

    def usages(self) -> list[tuple[int, int, int]]:
        """What was metered: input, output and cached input tokens."""
        return [(e.input_tokens, e.output_tokens, e.cached_tokens) for e in self.events]
