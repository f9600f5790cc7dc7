"""The lean request loop's primitives (``_session_loop``), driven by trio directly.

On a real mount, ``tests/worker/test_passthrough_mount.py`` checks that requests
are still served concurrently with it; here, that it bounds how long other tasks
wait and that its lock hands over like a lock.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from interposer.fuse_worker._session_loop import MAX_REQUESTS_WITHOUT_YIELD, LeanLowlevel, ReaderLock
from interposer.fuse_worker.layers import _timer


def test_wait_readable_yields_after_a_bounded_run_of_ready_requests() -> None:
    """An fd that is always readable (a queue that never empties) must not starve other tasks."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"x")
    lowlevel = LeanLowlevel()
    runs_between: list[int] = []

    async def main() -> None:
        other_ran = 0

        async def other_task() -> None:
            nonlocal other_ran
            while True:
                other_ran += 1
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            await trio.sleep(0)
            streak = 0
            for _ in range(10 * MAX_REQUESTS_WITHOUT_YIELD):
                before = other_ran
                await lowlevel.wait_readable(read_end)
                if other_ran == before:
                    streak += 1
                else:
                    runs_between.append(streak)
                    streak = 0
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert runs_between, "the other task never ran"
    # After MAX_REQUESTS_WITHOUT_YIELD fast returns the reader yields; trio's
    # scheduler (randomised on purpose) may run the other task on that yield or
    # on the next one.
    assert max(runs_between) <= 2 * MAX_REQUESTS_WITHOUT_YIELD + 1, runs_between
    assert min(runs_between) >= MAX_REQUESTS_WITHOUT_YIELD - 1, "it yields more often than needed"


def test_wait_readable_waits_through_trio_when_nothing_is_queued() -> None:
    read_end, write_end = os.pipe()
    lowlevel = LeanLowlevel()

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            async def feed() -> None:
                await trio.sleep(1.0)
                os.write(write_end, b"x")
            nursery.start_soon(feed)
            start = trio.current_time()
            await lowlevel.wait_readable(read_end)
            return trio.current_time() - start

    try:
        waited = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))
    finally:
        os.close(read_end)
        os.close(write_end)
    assert waited >= 1.0


def test_reader_lock_is_exclusive_and_hands_over_on_release() -> None:
    lock = ReaderLock()
    order: list[str] = []

    async def holder(name: str, hold_s: float) -> None:
        async with lock:
            order.append(f"{name} in")
            await trio.sleep(hold_s)
            order.append(f"{name} out")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder, "a", 1.0)
            await trio.sleep(0.1)
            nursery.start_soon(holder, "b", 1.0)
            nursery.start_soon(holder, "c", 1.0)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))
    assert order[:2] == ["a in", "a out"]
    assert len(order) == 6
    for i in range(0, 6, 2):  # never two holders at once
        assert order[i].endswith(" in") and order[i + 1] == order[i].replace(" in", " out")


@pytest.fixture
def pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


def _count_trio_waits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the reader's waits that go through trio's ``wait_readable`` (epoll)."""
    calls: list[int] = []
    real = trio.lowlevel.wait_readable

    async def counting(fd: int) -> None:
        calls.append(fd)
        await real(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting)
    return calls


@pytest.mark.parametrize("busy_poll_s", [0.0, 1.0])
def test_busy_poll_takes_a_request_arriving_within_the_window_without_sleeping(
        pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch, busy_poll_s: float) -> None:
    read_end, write_end = pipe
    trio_waits = _count_trio_waits(monkeypatch)
    threading.Timer(0.005, os.write, (write_end, b"x")).start()  # the application's next request
    trio.run(LeanLowlevel(busy_poll_s).wait_readable, read_end)
    assert len(trio_waits) == (0 if busy_poll_s else 1)


async def _trio_sleep_20ms() -> None:
    await trio.sleep(0.02)


async def _timer_sleep_20ms() -> None:
    await _timer.sleep(0.02)


@pytest.mark.parametrize("sleep", [_trio_sleep_20ms, _timer_sleep_20ms], ids=["trio deadline", "layer timer"])
def test_busy_poll_never_holds_the_loop_past_a_due_sleep(
        pipe: tuple[int, int], sleep: Callable[[], Awaitable[None]]) -> None:
    """A delayed request's timer (or any trio deadline) ends the window: the sleeper wakes on time."""
    read_end, write_end = pipe

    async def sleeper_then_request() -> None:
        await sleep()
        os.write(write_end, b"x")

    async def main() -> float:
        start = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleeper_then_request)
            await trio.testing.wait_all_tasks_blocked()  # the sleeper's deadline is set
            await LeanLowlevel(busy_poll_s=5.0).wait_readable(read_end)
        return time.monotonic() - start

    assert trio.run(main) < 1.0  # not the 5 s window


def test_busy_poll_stops_when_another_thread_queues_a_callback(pipe: tuple[int, int]) -> None:
    """The bus thread and the blocking-I/O threads reach the loop by callbacks; they must not wait for a window."""
    read_end, write_end = pipe

    async def main() -> float:
        token = trio.lowlevel.current_trio_token()
        threading.Timer(0.02, token.run_sync_soon, (os.write, write_end, b"x")).start()
        start = time.monotonic()
        await LeanLowlevel(busy_poll_s=5.0).wait_readable(read_end)
        return time.monotonic() - start

    assert trio.run(main) < 1.0
