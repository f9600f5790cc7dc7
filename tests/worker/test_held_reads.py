"""Held READ replies (``_held_reads``): delay layers leave their holds to a reply the timer task sends.

The arithmetic of the holds is checked on trio's MockClock with ``Op.defer_holds``
set by hand (the backend's service time is then exact); the timer queue's timed
calls in a real trio run; what an application sees — the data, the latency, the
errors, a policy that stops delaying, a worker stopped while reads are held —
on real mounts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import threading
import time

import pyfuse3
import pytest
import trio
import trio.testing

from interposer.fuse_worker import Op, Stack
from interposer.fuse_worker.layers import _timer
from interposer.proto import DelayLayer, Policy, ThrottleLayer

MS = 1_000_000  # ns


def _serve_deferred(stack: Stack, service_s: float, fail: bool = False) -> tuple[Op, float, int]:
    """Serve a deferrable 4 KiB read over a backend taking ``service_s`` of virtual time.

    Returns the op, the virtual time the chain took, and the real ``time.monotonic_ns()``
    when it returned (the holds are due relative to it).
    """
    op = Op("read", 2, "/f", size=4096, defer_holds=True)

    async def call() -> bytes:
        await trio.sleep(service_s)
        if fail:
            raise pyfuse3.FUSEError(errno.EIO)
        return b"x" * 4096

    async def main() -> tuple[float, int]:
        start = trio.current_time()
        try:
            await stack.chains["read"](op, call)
        except pyfuse3.FUSEError:
            pass
        return trio.current_time() - start, time.monotonic_ns()

    took_s, returned_ns = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return op, took_s, returned_ns


def _due_ms(op: Op, returned_ns: int) -> float:
    return (op.reply_due_ns - returned_ns) / MS


@pytest.mark.parametrize(("layers", "service_s", "due_ms"), [
    ([DelayLayer(delay_s=0.010, mode="floor")], 0.003, 7.0),   # the floor counts from the request's start
    ([DelayLayer(delay_s=0.010, mode="floor")], 0.015, None),  # slower than the floor: no hold
    ([DelayLayer(delay_s=0.010)], 0.003, 10.0),                # add: after the backend call
    # Sleeping, an add of 5 ms below a 10 ms floor makes 5 + 3 ms, raised to 10: due 7 ms after the call.
    ([DelayLayer(delay_s=0.010, mode="floor"), DelayLayer(delay_s=0.005)], 0.003, 7.0),
    # An add of 5 ms above a 10 ms floor: 5 + 10 ms sleeping; here 10 - 3 + 5 after the call.
    ([DelayLayer(delay_s=0.005), DelayLayer(delay_s=0.010, mode="floor")], 0.003, 12.0),
    # Two adds: one after the other.
    ([DelayLayer(delay_s=0.004), DelayLayer(delay_s=0.006)], 0.001, 10.0),
])
def test_holds_left_to_the_reply_end_when_sleeping_ones_would(layers, service_s, due_ms) -> None:
    op, took_s, returned_ns = _serve_deferred(Stack(Policy(layers=layers), 1), service_s)
    assert took_s == pytest.approx(service_s)  # nothing slept in the request's task
    if due_ms is None:
        assert op.reply_due_ns == 0
    else:
        # Real time passes between the hold's reckoning and the return: a little less than due_ms remains.
        assert due_ms - 5 < _due_ms(op, returned_ns) <= due_ms
        assert op.reply_armed_ns <= op.reply_due_ns
        assert op.delay_ns > 0


def test_a_failed_read_is_held_too() -> None:
    op, took_s, returned_ns = _serve_deferred(Stack(Policy(layers=[DelayLayer(delay_s=0.010, mode="floor")]), 1),
                                              0.002, fail=True)
    assert took_s == pytest.approx(0.002)
    assert 3 < _due_ms(op, returned_ns) <= 8


def test_a_throttle_above_a_held_floor_charges_when_the_hold_ends() -> None:
    # gp3's order: the throttle above the latency floor. Sleeping, a read reaches the
    # throttle only when the floor's hold ends; held, the throttle's charge waits for it.
    stack = Stack(Policy(layers=[ThrottleLayer(iops=100, burst_ops=1), DelayLayer(delay_s=0.010, mode="floor")]), 1)
    throttle = stack.layers[0]
    ops = [Op("read", 2, "/f", size=4096, defer_holds=True) for _ in range(2)]

    async def call() -> bytes:
        return b"x" * 4096

    async def main() -> list[tuple[float, float]]:
        for op in ops:
            await stack.chains["read"](op, call)
        assert throttle.statistics().ops == 0  # nothing charged during the holds
        assert all(op.after_hold is not None and len(op.after_hold) == 1 for op in ops)
        await trio.sleep(0.010)  # the holds end
        return [op.after_hold.pop(0)() for op in ops]

    waits = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # Charged in turn when the holds ended: the first from the full bucket, the second 1/100 s later.
    assert waits == [(0.0, 0.0), (pytest.approx(0.010), 0.0)]
    assert throttle.statistics().ops == 2
    assert ops[1].throttle_ns == pytest.approx(10 * MS, abs=1000)


def test_a_throttle_wait_is_left_to_the_reply_too() -> None:
    stack = Stack(Policy(layers=[DelayLayer(delay_s=0.001), ThrottleLayer(iops=100, burst_ops=1)]), 1)
    ops = [Op("read", 2, "/f", size=4096, defer_holds=True) for _ in range(2)]

    async def call() -> bytes:
        return b"x" * 4096

    async def main() -> list[int]:
        for op in ops:
            await stack.chains["read"](op, call)
        return [time.monotonic_ns() for _ in ops]

    start_ns = time.monotonic_ns()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # The second read waits 10 ms for its token, then the 1 ms add comes on top; nothing slept.
    assert 0 < (ops[0].reply_due_ns - start_ns) / MS <= 1.0 + 5
    assert 10.0 < (ops[1].reply_due_ns - start_ns) / MS <= 11.0 + 5
    assert ops[0].after_hold is None and ops[1].after_hold is None


def test_timed_calls_run_in_deadline_order_and_pending_ones_run_on_demand() -> None:
    ran: list[tuple[str, int]] = []

    async def main() -> None:
        queue = _timer.current_queue()
        assert queue is not None
        now = time.monotonic_ns()
        queue.call_at(now + 30 * MS, lambda: ran.append(("b", time.monotonic_ns() - now)))
        queue.call_at(now + 10 * MS, lambda: ran.append(("a", time.monotonic_ns() - now)))
        queue.call_at(now + 20 * MS, lambda: 1 / 0)  # logged; the timer task lives on
        queue.call_at(now + 60_000 * MS, lambda: ran.append(("late", 0)))
        await _timer.sleep(0.050)
        assert [name for name, _ in ran] == ["a", "b"]
        assert ran[0][1] >= 10 * MS and ran[1][1] >= 30 * MS
        assert _timer.call_pending_now() == 1
        assert ran[-1][0] == "late"
        assert _timer.call_pending_now() == 0

    trio.run(main)


def test_pending_calls_run_until_none_is_left() -> None:
    # A held reply's next step may queue it again: at the end of a session all must have run.
    ran: list[str] = []

    async def main() -> None:
        queue = _timer.current_queue()
        assert queue is not None
        far = time.monotonic_ns() + 60_000 * MS
        queue.call_at(far, lambda: (ran.append("first"), queue.call_at(far, lambda: ran.append("second"))))
        assert _timer.call_pending_now() == 2

    trio.run(main)
    assert ran == ["first", "second"]


# ---- real mounts -------------------------------------------------------------------------------


def _policy(*layers: dict) -> str:
    return json.dumps({"layers": list(layers)})


def _timed_reads(path, block: int = 4096, count: int = 16) -> tuple[bytes, list[float]]:
    """Read ``count`` blocks of ``path`` with O_DIRECT (each reaches the worker); the data and each read's seconds."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        data, took = [], []
        for index in range(count):
            start = time.perf_counter()
            data.append(os.pread(fd, block, index * block))
            took.append(time.perf_counter() - start)
        return b"".join(data), took
    finally:
        os.close(fd)


def _held_reads_in_log(log: str) -> int:
    found = re.search(r"\((\d+) held reads answered by the timer\)", log)
    return int(found.group(1)) if found else 0


def test_held_reads_return_the_data_after_the_floor_and_run_concurrently(mount_worker) -> None:
    vol = mount_worker(policy=_policy({"type": "delay", "ops": ["read"], "mode": "floor", "delay_s": 0.05}))
    content = os.urandom(64 * 4096)
    for name in ("a", "b", "c", "d"):
        (vol.backing / name).write_bytes(content)
    data, took = _timed_reads(vol.mountpoint / "a")
    assert hashlib.sha256(data).digest() == hashlib.sha256(content[:16 * 4096]).digest()
    assert min(took) >= 0.049

    # Four readers of 8 held reads each: held replies park no reader, so they overlap.
    results: dict[str, tuple[bytes, list[float]]] = {}
    threads = [threading.Thread(target=lambda n=name: results.__setitem__(n, _timed_reads(
        vol.mountpoint / n, count=8))) for name in ("a", "b", "c", "d")]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    assert all(got == content[:8 * 4096] for got, _ in results.values())
    assert elapsed < 4 * 8 * 0.05 * 0.6, f"4 × 8 reads of 50 ms took {elapsed:.2f} s: held one after another?"

    assert vol.unmount() == 0
    assert _held_reads_in_log(vol.log()) >= 16 + 32, vol.log()[-2000:]


def test_held_reads_under_a_throttle_above_the_floor_keep_its_rate(mount_worker) -> None:
    # A profile's shape: IOPS limit above a latency floor, 4 readers in parallel.
    vol = mount_worker(policy=_policy({"type": "throttle", "iops": 50, "burst_ops": 1},
                                      {"type": "delay", "ops": ["read"], "mode": "floor", "delay_s": 0.005}))
    for index in range(4):
        (vol.backing / f"f{index}").write_bytes(os.urandom(256 * 4096))
    counts = [0] * 4
    stop = time.perf_counter() + 2.0

    def reader(index: int) -> None:
        fd = os.open(vol.mountpoint / f"f{index}", os.O_RDONLY | os.O_DIRECT)
        try:
            while time.perf_counter() < stop:
                os.pread(fd, 4096, counts[index] * 4096)
                counts[index] += 1
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # 50 reads/s for 2 s (plus the one the bucket holds, and the reads in flight at the end).
    assert 90 <= sum(counts) <= 108, counts
    assert vol.unmount() == 0
    assert _held_reads_in_log(vol.log()) >= 90


def test_an_injected_error_is_answered_after_the_hold(mount_worker) -> None:
    vol = mount_worker(policy=_policy({"type": "delay", "ops": ["read"], "mode": "floor", "delay_s": 0.05},
                                      {"type": "fault", "errno": "EIO", "ops": ["read"], "path_glob": "/bad"}))
    (vol.backing / "bad").write_bytes(b"x" * 8192)
    fd = os.open(vol.mountpoint / "bad", os.O_RDONLY | os.O_DIRECT)
    try:
        start = time.perf_counter()
        with pytest.raises(OSError) as caught:
            os.pread(fd, 4096, 0)
        assert caught.value.errno == errno.EIO
        assert time.perf_counter() - start >= 0.049
    finally:
        os.close(fd)


def test_reads_go_back_to_pyfuse3_when_the_delay_expires(mount_worker) -> None:
    vol = mount_worker(policy=_policy({"type": "delay", "ops": ["read"], "mode": "floor", "delay_s": 0.03,
                                       "expires_after_s": 1.5}))
    content = os.urandom(16 * 4096)
    (vol.backing / "f").write_bytes(content)
    data, took = _timed_reads(vol.mountpoint / "f", count=4)
    assert data == content[:4 * 4096] and min(took) >= 0.029
    time.sleep(2.0)
    data, took = _timed_reads(vol.mountpoint / "f")
    assert data == content and max(took) < 0.02
    assert vol.unmount() == 0
    assert _held_reads_in_log(vol.log()) == 4


def test_a_worker_stopped_while_reads_are_held_answers_them_and_exits_cleanly(mount_worker) -> None:
    vol = mount_worker(policy=_policy({"type": "delay", "ops": ["read"], "mode": "floor", "delay_s": 5.0}))
    (vol.backing / "f").write_bytes(b"y" * 4096)
    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(_timed_reads(vol.mountpoint / "f", count=1))
        except OSError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.5)  # the read is held
    vol.proc.send_signal(signal.SIGTERM)
    reader.join(timeout=4)
    assert not reader.is_alive(), "the held read was never answered"
    assert vol.proc.wait(timeout=10) == 0, vol.log()[-2000:]
    # Answered early with its data, or failed by the unmount: never left hanging.
    assert len(outcome) == 1
    got = outcome[0]
    assert isinstance(got, OSError) or got[0] == b"y" * 4096
