"""The layers' precise sleep (``layers._timer.sleep``) on the real clock: never early, cancellable, no fd leak.

Speed is not asserted here (bench/fidelity measures how close sleeps come to
their target); these check what must hold on any machine.
"""

from __future__ import annotations

import os
import time

import trio
import trio.testing

from interposer.fuse_worker.layers._timer import sleep


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_sleep_never_returns_before_its_time() -> None:
    async def main() -> list[tuple[float, float]]:
        out = []
        for seconds in (0.0002, 0.0011, 0.003, 0.0):
            start = time.monotonic()
            await sleep(seconds)
            out.append((seconds, time.monotonic() - start))
        return out

    before = _open_fds()
    for asked, took in trio.run(main):
        assert took >= asked
    assert _open_fds() == before


def test_a_sleeping_task_holds_only_itself() -> None:
    woke: list[float] = []

    async def one(seconds: float, nursery: trio.Nursery) -> None:
        await sleep(seconds)
        woke.append(seconds)
        nursery.cancel_scope.cancel()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 30.0, nursery)
            nursery.start_soon(one, 0.001, nursery)

    before = _open_fds()
    trio.run(main)
    assert woke == [0.001] and _open_fds() == before


def test_a_cancelled_sleep_closes_its_timer() -> None:
    async def main() -> bool:
        with trio.move_on_after(0.01) as scope:
            await sleep(30)
        return scope.cancelled_caught

    before = _open_fds()
    assert trio.run(main)
    assert _open_fds() == before


def test_under_mockclock_it_is_virtual_time() -> None:
    async def main() -> float:
        await sleep(3600)
        return trio.current_time()

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == 3600
