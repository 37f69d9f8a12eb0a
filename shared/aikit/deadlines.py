"""Deadlines for waits that almost never run out (a request body slow to arrive, a client that stops reading,
a provider call past LLM_DEADLINE_SECONDS), with asyncio.timeout's semantics and a fraction of its cost.

`asyncio.timeout` arms a timer for every wait and cancels it when the wait ends; on uvloop each timer is a
libuv handle opened and closed: 7 % of a billed request's instructions went to its four deadlines
(issue 16). Here every deadline of an event loop shares one timer, armed at the earliest deadline: a wait
that starts with a later deadline than the armed one (the common case: same timeouts, later start) arms
nothing, and a wait that ends removes itself from a set. When the timer fires it expires what is due and arms
itself again for the earliest deadline left, so a deadline still fires on time, not on a coarse tick.

    with within(seconds) as waited:
        await something()          # TimeoutError when `seconds` pass first; waited.expired() says it was us

An expired deadline cancels its task; leaving the block turns that cancellation into TimeoutError, exactly as
asyncio.timeout does: a cancellation from elsewhere stays a CancelledError (Task.cancelling/uncancel).
"""

from __future__ import annotations

import asyncio
import weakref
from types import TracebackType


class Deadline:
    __slots__ = ("_cancelling", "_expired", "_task", "_watch", "when")

    def __init__(self, watch: _LoopDeadlines, task: asyncio.Task[object], when: float) -> None:
        self._watch = watch
        self._task = task
        self._cancelling = task.cancelling()
        self._expired = False
        self.when = when

    def expired(self) -> bool:
        return self._expired

    def expire(self) -> None:
        self._expired = True
        self._task.cancel()

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._watch.active.discard(self)
        # Ours only when nobody else asked to cancel the task meanwhile (asyncio.Timeout.__aexit__'s rule).
        if (self._expired and self._task.uncancel() <= self._cancelling and exc_type is not None
                and issubclass(exc_type, asyncio.CancelledError)):
            raise TimeoutError from exc


# A timer may run a little before its time by the loop's clock (uvloop counts milliseconds): what is due
# within this much is due now, as asyncio's loop does with its clock resolution (no refire in a busy loop).
_CLOCK_SLACK = 0.001


class _LoopDeadlines:
    """The deadlines of one event loop and the time its timer is armed for. It refers neither to its loop nor
    to the timer (which refers to the loop): it is the loop's entry in a WeakKeyDictionary, and would otherwise
    keep every loop alive. A timer superseded by an earlier one is not cancelled, it fires harmlessly."""

    def __init__(self) -> None:
        self.active: set[Deadline] = set()
        self._armed_at = float("inf")

    def add(self, loop: asyncio.AbstractEventLoop, seconds: float) -> Deadline:
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a deadline must be used inside a task")
        when = loop.time() + seconds
        deadline = Deadline(self, task, when)
        self.active.add(deadline)
        if when < self._armed_at:
            self._arm(loop, when)
        return deadline

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._armed_at = when
        loop.call_at(when, self._fire, when)

    def _fire(self, armed_at: float) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time() + _CLOCK_SLACK
        due = [deadline for deadline in self.active if deadline.when <= now]
        for deadline in due:
            self.active.discard(deadline)  # expired once; its block's exit finds it gone
            deadline.expire()
        if armed_at != self._armed_at:
            return  # superseded: the earlier timer re-arms
        self._armed_at = float("inf")
        if self.active:
            self._arm(loop, min(deadline.when for deadline in self.active))


# One set of deadlines per running loop (a loop's timer cannot serve another); gone with its loop.
_loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopDeadlines] = weakref.WeakKeyDictionary()


def within(seconds: float) -> Deadline:
    """A deadline `seconds` from now for the current task (see the module's docstring)."""
    loop = asyncio.get_running_loop()
    deadlines = _loops.get(loop)
    if deadlines is None:
        deadlines = _loops[loop] = _LoopDeadlines()
    return deadlines.add(loop, seconds)
