"""The lean request loop's primitives (``_session_loop``), driven by trio directly.

On a real mount, ``tests/worker/test_passthrough_mount.py`` checks that requests
are still served concurrently with it; here, that it bounds how long other tasks
wait and that its lock hands over like a lock.
"""

from __future__ import annotations

import os

import trio
import trio.testing

from interposer.fuse_worker._session_loop import MAX_REQUESTS_WITHOUT_YIELD, LeanLowlevel, ReaderLock


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
