from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from aikit.deadlines import within

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    def run_on_loop(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(coro)

    return run_on_loop


def test_a_wait_past_its_deadline_raises_timeout_error_on_time(run: Callable[..., Any]) -> None:
    async def main() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError), within(0.05) as waited:
            await asyncio.sleep(5)
        return waited.expired(), loop.time() - start

    expired, elapsed = run(main())
    assert expired
    assert 0.048 <= elapsed < 1.0


def test_a_wait_that_ends_in_time_is_not_cancelled_later(run: Callable[..., Any]) -> None:
    async def main() -> tuple[bool, str]:
        with within(0.02) as waited:
            await asyncio.sleep(0)
        await asyncio.sleep(0.1)  # past the deadline: nothing may cancel the task now
        return waited.expired(), "finished"

    assert run(main()) == (False, "finished")


def test_a_shorter_deadline_set_after_a_longer_one_fires_on_time(run: Callable[..., Any]) -> None:
    async def long_wait(started: asyncio.Event) -> str:
        with within(10):
            started.set()
            await asyncio.sleep(0.3)
        return "long wait untouched"

    async def main() -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        started = asyncio.Event()
        long_task = asyncio.create_task(long_wait(started))
        await started.wait()
        start = loop.time()
        with pytest.raises(TimeoutError), within(0.05):
            await asyncio.sleep(5)
        elapsed = loop.time() - start
        return await long_task, elapsed

    outcome, elapsed = run(main())
    assert outcome == "long wait untouched"
    assert 0.048 <= elapsed < 0.25


def test_each_of_many_concurrent_deadlines_fires_at_its_own_time(run: Callable[..., Any]) -> None:
    async def wait(seconds: float) -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            with within(seconds):
                await asyncio.sleep(5)
        except TimeoutError:
            return loop.time() - start
        raise AssertionError("not timed out")

    async def main() -> list[float]:
        return await asyncio.gather(*(wait(s) for s in (0.3, 0.05, 0.2, 0.1, 0.05)))

    for seconds, elapsed in zip((0.3, 0.05, 0.2, 0.1, 0.05), run(main()), strict=True):
        assert seconds - 0.002 <= elapsed < seconds + 0.2


def test_deadlines_one_after_another_each_fire(run: Callable[..., Any]) -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        elapsed = []
        for _ in range(3):  # each after the last one fired and left no deadline behind
            start = loop.time()
            with pytest.raises(TimeoutError), within(0.02):
                await asyncio.sleep(1)
            elapsed.append(loop.time() - start)
        return elapsed

    assert all(0.018 <= seconds < 0.5 for seconds in run(main()))


def test_a_deadline_expires_once(run: Callable[..., Any]) -> None:
    cancels: list[asyncio.CancelledError] = []

    async def goes_on_waiting() -> None:
        with within(0.02):
            for _ in range(3):  # a block that goes on waiting after its deadline is not cancelled again
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError as exc:
                    cancels.append(exc)
            raise asyncio.CancelledError  # what the expired block would have raised

    async def main() -> int:
        with pytest.raises(TimeoutError):
            await goes_on_waiting()
        return len(cancels)

    assert run(main()) == 1


async def cancelled_from_elsewhere(waiter: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> bool:
    """Runs `waiter` as a task, cancels it once it has entered its deadline, and says it ended cancelled."""
    entered = asyncio.Event()
    task = asyncio.create_task(waiter(entered))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return task.cancelled()


def test_a_cancellation_from_elsewhere_stays_a_cancellation(run: Callable[..., Any]) -> None:
    async def waiter(entered: asyncio.Event) -> None:
        with within(10):
            entered.set()
            await asyncio.sleep(5)

    assert run(cancelled_from_elsewhere(waiter))


def test_a_cancellation_from_elsewhere_wins_over_an_expired_deadline(run: Callable[..., Any]) -> None:
    async def waiter(entered: asyncio.Event) -> None:
        with within(0.05):
            entered.set()
            try:
                await asyncio.sleep(5)
            finally:
                await asyncio.sleep(0.1)  # the deadline expires while the task winds down from the cancel

    assert run(cancelled_from_elsewhere(waiter))


def test_nested_deadlines_each_raise_for_their_own_block(run: Callable[..., Any]) -> None:
    async def main() -> list[str]:
        seen = []
        with within(10) as outer:
            with pytest.raises(TimeoutError), within(0.02) as inner:
                await asyncio.sleep(5)
            seen.append(f"inner expired={inner.expired()} outer expired={outer.expired()}")
        with pytest.raises(TimeoutError), within(0.05) as outer, within(10) as inner:
            await asyncio.sleep(5)
        seen.append(f"inner expired={inner.expired()} outer expired={outer.expired()}")
        return seen

    assert run(main()) == ["inner expired=True outer expired=False", "inner expired=False outer expired=True"]


def test_the_task_can_wait_again_after_a_deadline_expired(run: Callable[..., Any]) -> None:
    async def main() -> int:
        with pytest.raises(TimeoutError), within(0.01):
            await asyncio.sleep(5)
        await asyncio.sleep(0.01)  # no cancellation left pending on the task
        with within(1):
            await asyncio.sleep(0.01)
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    assert run(main()) == 0


def test_a_loop_that_used_deadlines_is_not_kept_alive(run: Callable[..., Any]) -> None:
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        with pytest.raises(TimeoutError), within(0.01):
            await asyncio.sleep(5)
        with within(10):  # its timer still armed when the loop closes
            await asyncio.sleep(0)

    run(main())
    gc.collect()
    assert loops[0]() is None


def test_a_deadline_needs_a_task() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError, match="inside a task"):
            loop.run_until_complete(_outside_a_task(loop))
    finally:
        loop.close()


async def _outside_a_task(loop: asyncio.AbstractEventLoop) -> None:
    # A callback, not a task, runs `within`.
    failure: asyncio.Future[BaseException | None] = loop.create_future()

    def callback() -> None:
        try:
            within(1)
        except BaseException as exc:
            failure.set_result(exc)
        else:
            failure.set_result(None)

    loop.call_soon(callback)
    raised = await failure
    if raised is not None:
        raise raised
