"""The layers' precise sleep (``layers._timer.sleep``) on the real clock: on time or late (early only by its compensation), cancellable, no fd leak.

Speed is not asserted here (bench/fidelity measures how close sleeps come to
their target); these check what must hold on any machine.
"""

from __future__ import annotations

import json
import os
import time

import trio
import trio.testing

import pytest

from interposer.fuse_worker import Op, Stack
from interposer.fuse_worker.layers import _timer, delay, throttle
from interposer.proto import decode_policy
from interposer.fuse_worker.layers._timer import MAX_COMPENSATION_S, WakeCompensation, sleep


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_sleep_never_returns_before_its_time_unless_compensated() -> None:
    _timer.configure("round-trip")  # configured, but only sleeps that ask for it are shortened
    async def main() -> list[tuple[float, float]]:
        out = []
        for seconds in (0.0002, 0.0011, 0.003, 0.0):
            start = time.monotonic()
            await sleep(seconds)
            out.append((seconds, time.monotonic() - start))
        return out

    before = _open_fds()
    try:
        for asked, took in trio.run(main):
            assert took >= asked
    finally:
        _timer.configure("off")
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


class _LoopPasses(trio.abc.Instrument):
    """Counts the passes of trio's run loop (one I/O wait each): tasks resumed in one pass were woken together."""

    def __init__(self) -> None:
        self.passes = 0

    def after_io_wait(self, timeout: float) -> None:
        self.passes += 1


def test_concurrent_sleeps_share_one_timer_and_wake_in_deadline_order() -> None:
    """64 sleeps of shuffled lengths: no more descriptors than one sleep; each wakes at or after its time."""
    seconds = [0.0005 + 0.0001 * i for i in range(64)]

    def run(asked_list: list[float]) -> tuple[list[tuple[float, float, int]], int]:
        woke: list[tuple[float, float, int]] = []  # (when due, when it woke: monotonic s; loop pass it ran in)
        fds: list[int] = []
        loop = _LoopPasses()

        async def one(due_ns: int) -> None:
            # The queue's own deadlines, all from one clock reading: a sleep() would take its own,
            # and the CPU taken away between two tasks' readings would shuffle deadlines 0.1 ms apart.
            queue = _timer.current_queue()
            assert queue is not None
            await queue.sleep_until(due_ns)
            woke.append((due_ns / 1e9, time.monotonic(), loop.passes))

        async def main() -> None:
            start_ns = time.monotonic_ns() + 100_000_000  # every sleeper parks before the first is due
            async with trio.open_nursery() as nursery:
                for asked in asked_list:
                    nursery.start_soon(one, start_ns + round(asked * 1e9))
                await trio.testing.wait_all_tasks_blocked()  # every sleeper has parked
                fds.append(_open_fds())

        trio.run(main, instruments=[loop])
        return woke, fds[0]

    before = _open_fds()
    _, fds_one_sleeper = run([0.01])
    woke, fds_64_sleepers = run(seconds[::7] + [s for i, s in enumerate(seconds) if i % 7])
    assert fds_64_sleepers == fds_one_sleeper
    assert len(woke) == len(seconds)
    assert all(at >= due for due, at, _ in woke)
    # In deadline order: no sleeper resumes in a later loop pass than one due after it.
    # Sleepers one timer expiry serves (all that a stalled VM let pass at once) resume in
    # the same pass, in trio's order; passes, not wake-up times, so that the VM taking the
    # CPU away in the middle of a pass does not look like a late wake-up.
    by_due = sorted(woke)
    assert all(a_pass <= b_pass for i, (_, _, a_pass) in enumerate(by_due) for _, _, b_pass in by_due[i + 1:]), \
        [(round(due * 1e3, 3), loop_pass) for due, _, loop_pass in by_due]
    assert _open_fds() == before


def test_a_cancelled_earliest_sleep_does_not_hold_up_later_ones() -> None:
    woke: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def later() -> None:
                await sleep(0.003)
                woke.append(0.003)

            nursery.start_soon(later)
            with trio.move_on_after(0.0005):
                await sleep(0.001)  # the timer is armed for this one, then it is cancelled
            woke.append(-1.0)

    start = time.monotonic()
    trio.run(main)
    assert woke == [-1.0, 0.003] and time.monotonic() - start < 1.0


def test_a_sleep_reports_how_late_the_loop_resumed_it() -> None:
    # A task that holds the event loop (here a blocking 30 ms call) makes every
    # sleeper due meanwhile resume late: the delay the application sees grows by it.
    async def main() -> tuple[int, int]:
        async def hog() -> None:
            await trio.sleep(0)
            time.sleep(0.03)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hog)
            late_ns = await sleep(0.001)
        return late_ns, await sleep(0.0)

    late_ns, checkpoint_late_ns = trio.run(main)
    assert late_ns >= 25_000_000 and checkpoint_late_ns == 0


def test_under_mockclock_lateness_is_virtual_too() -> None:
    clock = trio.testing.MockClock()

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            result: list[int] = []

            async def sleeper() -> None:
                result.append(await sleep(0.002))

            nursery.start_soon(sleeper)
            await trio.testing.wait_all_tasks_blocked()
            clock.jump(0.005)  # the sleeper's deadline passed 3 ms ago when it runs again
        return result[0]

    assert trio.run(main, clock=clock) == 3_000_000


@pytest.mark.parametrize("mode", ["add", "floor"])
def test_a_delayed_op_carries_its_lateness(mode: str) -> None:
    stack = Stack(decode_policy(json.dumps({"layers": [{"type": "delay", "delay_s": 0.002, "mode": mode}]})), 1)
    ops = [Op("read", 2, "/f", size=4096), Op("read", 2, "/f", size=4096)]
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> None:
        async def call() -> bytes:
            return b"x" * 4096

        await stack.chains["read"](ops[0], call)  # nothing else to run: the clock jumps to its deadline
        clock.autojump_threshold = float("inf")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stack.chains["read"], ops[1], call)
            await trio.testing.wait_all_tasks_blocked()
            clock.jump(0.0035)  # it resumes 1.5 ms after its 2 ms

    trio.run(main, clock=clock)
    assert [op.delay_ns for op in ops] == [2_000_000, 2_000_000]
    assert ops[0].delay_late_ns == 0 and ops[1].delay_late_ns == pytest.approx(1_500_000, abs=1)


def test_under_mockclock_it_is_virtual_time() -> None:
    async def main() -> float:
        await sleep(3600)
        return trio.current_time()

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == 3600


def test_compensation_learns_the_wake_lateness_and_arms_early_by_it() -> None:
    worker, round_trip, off = WakeCompensation("worker"), WakeCompensation("round-trip"), WakeCompensation("off")
    for _ in range(200):  # a steady 150 µs late wake-up
        for c in (worker, round_trip, off):
            c.observe(150e-6)
    assert worker.lead_s(0.002) == pytest.approx(150e-6, rel=0.01)
    assert round_trip.lead_s(0.002) == pytest.approx(300e-6, rel=0.01)
    assert off.lead_s(0.002) == 0.0
    # an `add` delay makes up the worker's own wake-up only, whatever the mode
    assert round_trip.lead_s(0.002, own_wake_only=True) == pytest.approx(150e-6, rel=0.01)
    assert worker.lead_s(0.002, own_wake_only=True) == pytest.approx(150e-6, rel=0.01)
    assert off.lead_s(0.002, own_wake_only=True) == 0.0
    # never more than half the sleep
    assert round_trip.lead_s(0.0004) == pytest.approx(0.0002)


def test_compensation_ignores_early_wakes_and_caps_stalls() -> None:
    c = WakeCompensation("round-trip")
    c.observe(-0.5)
    assert c.lateness_s == 0.0
    for _ in range(200):
        c.observe(0.25)  # a stalled VM, not an ordinary wake-up
    assert c.lateness_s == pytest.approx(MAX_COMPENSATION_S, rel=0.01)
    assert c.lead_s(1.0) == MAX_COMPENSATION_S


def test_round_trip_adds_the_application_wait_up_to_twice_an_idle_wake_up() -> None:
    saturated = WakeCompensation("round-trip")
    for _ in range(200):
        saturated.observe(60e-6, idle=True)  # the loop was idle at the deadline: a wake-up
        saturated.observe(400e-6, idle=False)  # it was busy with requests: queued behind them
    assert saturated.idle_wake_s == pytest.approx(60e-6, rel=0.01)
    # its own lateness in full, the application's wait capped at two idle wake-ups
    assert saturated.lead_s(0.01) == pytest.approx(saturated.lateness_s + 2 * 60e-6, rel=0.01)
    assert saturated.lead_s(0.01, own_wake_only=True) == pytest.approx(saturated.lateness_s, rel=0.01)
    loaded = WakeCompensation("round-trip")
    for _ in range(200):
        loaded.observe(60e-6, idle=True)
        loaded.observe(90e-6, idle=False)
    # below the cap the application is taken to wait as long as the worker
    assert loaded.lead_s(0.01) == pytest.approx(2 * loaded.lateness_s, rel=0.01)
    worker = WakeCompensation("worker")
    for _ in range(200):
        worker.observe(400e-6, idle=False)
    assert worker.lead_s(0.01) == pytest.approx(400e-6, rel=0.01)


def test_a_timer_served_after_the_loop_took_other_work_is_not_an_idle_wake_up() -> None:
    c = _timer.configure("round-trip")
    try:
        deadline_ns = time.monotonic_ns()
        _timer.note_loop_busy()  # a FUSE request taken after the deadline, before the timer was served
        _timer.observe_wake(300_000, deadline_ns)
        assert c.idle_wake_s == 0.0 and c.lateness_s == pytest.approx(300e-6 * _timer.LATENESS_GAIN)
        _timer.observe_wake(50_000, time.monotonic_ns())  # nothing taken since its deadline
        assert c.idle_wake_s == pytest.approx(50e-6 * _timer.LATENESS_GAIN)
    finally:
        _timer.configure("off")


def test_an_unknown_compensation_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="wake compensation 'always'"):
        _timer.configure("always")


def test_a_compensated_sleep_ends_at_most_its_lead_early() -> None:
    async def main(c: WakeCompensation) -> list[tuple[float, float, float]]:
        out = []
        for _ in range(20):
            lead = c.lead_s(0.002)
            start = time.monotonic()
            await sleep(0.002, compensate=True)
            out.append((0.002, lead, time.monotonic() - start))
        return out

    c = _timer.configure("round-trip")
    try:
        for asked, lead, took in trio.run(main, c):
            assert took >= asked - lead
        assert c.lateness_s > 0.0  # it measured its wake-ups
    finally:
        _timer.configure("off")


@pytest.mark.parametrize(("layer", "compensated"), [
    ({"type": "delay", "delay_s": 0.002, "mode": "add"}, (True, True)),     # the worker's own wake-up
    ({"type": "delay", "delay_s": 0.002, "mode": "floor"}, (True, False)),  # a total-latency target
    ({"type": "throttle", "iops": 1, "burst_ops": 1}, (False, False)),      # a rate limit is never exceeded
])
def test_delays_are_compensated_and_throttle_waits_are_not(monkeypatch, layer: dict, compensated: tuple) -> None:
    # A delay's time includes the wake-up after it (an uncompensated 2 ms `add` added
    # 2.2 ms); an `add` op pays the application's wake-up without the delay too, so only
    # the worker's is made up; a throttle wait shortened would let the rate exceed the limit.
    calls: list[tuple[bool, bool]] = []

    async def recording_sleep(seconds: float, *, compensate: bool = False, own_wake_only: bool = False) -> int:
        calls.append((compensate, own_wake_only))
        await trio.sleep(seconds)
        return 0

    monkeypatch.setattr(delay, "sleep", recording_sleep)
    monkeypatch.setattr(throttle, "sleep", recording_sleep)
    stack = Stack(decode_policy(json.dumps({"layers": [layer]})), 1)

    async def main() -> None:
        async def call() -> bytes:
            return b"x" * 4096
        for _ in range(3):
            await stack.chains["read"](Op("read", 2, "/f", size=4096), call)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert calls and set(calls) == {compensated}
