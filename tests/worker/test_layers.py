"""Layers in isolation: a fake backend call and trio's MockClock (virtual time)."""

from __future__ import annotations

import errno
import random

import pyfuse3
import pytest
import trio
import trio.testing

from interposer.fuse_worker import Op, Stack
from interposer.fuse_worker.layers import TokenBucket
from interposer.proto import DelayLayer, FaultLayer, Policy, ThrottleLayer

MIB = 1 << 20


class FakeBackend:
    """Stands in for the backend: records calls, returns the bytes asked for."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def call(self, op: Op):
        async def run() -> bytes:
            self.calls.append(op.path)
            return b"x" * op.size
        return run


async def serve(stack: Stack, backend: FakeBackend, op: Op):
    chain = stack.chains.get(op.name)
    call = backend.call(op)
    return await (call() if chain is None else chain(op, call))


def run_virtual(fn, *args):
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(fn, *args, clock=clock)


def test_ops_no_layer_targets_have_no_chain() -> None:
    stack = Stack(Policy(layers=[DelayLayer(delay_s=0.1, ops=frozenset({"read"}))]), 1)
    assert set(stack.chains) == {"read"}
    assert Stack(Policy(), 1).chains == {}
    # throttle layers only ever apply to data ops, even with ops left empty
    assert set(Stack(Policy(layers=[ThrottleLayer(rate_bytes_per_s=MIB)]), 1).chains) == {"read", "write"}


def test_delay_holds_matching_ops_for_the_configured_time() -> None:
    stack = Stack(Policy(layers=[DelayLayer(delay_s=0.25, ops=frozenset({"read"}), path_glob="/slow/*")]), 1)
    backend = FakeBackend()

    async def main() -> tuple[float, float, Op, Op]:
        slow, fast = Op("read", 2, "/slow/a", size=10), Op("read", 3, "/fast/b", size=10)
        t0 = trio.current_time()
        await serve(stack, backend, slow)
        t1 = trio.current_time()
        await serve(stack, backend, fast)
        return t1 - t0, trio.current_time() - t1, slow, fast

    slow_s, fast_s, slow, fast = run_virtual(main)
    assert slow_s == pytest.approx(0.25)
    assert fast_s == 0
    assert slow.delay_ns == 250_000_000 and fast.delay_ns == 0
    assert backend.calls == ["/slow/a", "/fast/b"]


def test_a_delayed_op_does_not_hold_up_others() -> None:
    stack = Stack(Policy(layers=[DelayLayer(delay_s=5, path_glob="/slow")]), 1)
    backend = FakeBackend()
    finished: list[tuple[str, float]] = []

    async def one(path: str) -> None:
        await serve(stack, backend, Op("read", 2, path, size=1))
        finished.append((path, trio.current_time()))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "/slow")
            nursery.start_soon(one, "/fast")

    run_virtual(main)
    assert finished == [("/fast", 0), ("/slow", 5)]


def test_fault_fails_before_the_backend_with_the_errno() -> None:
    stack = Stack(Policy(layers=[FaultLayer(errno="ENOSPC", ops=frozenset({"write"}))]), 1)
    backend = FakeBackend()
    op = Op("write", 2, "/f", size=4)

    with pytest.raises(pyfuse3.FUSEError) as info:
        trio.run(serve, stack, backend, op)
    assert info.value.errno == errno.ENOSPC
    assert op.fault == "ENOSPC"
    assert backend.calls == []
    assert stack.layers[0].statistics().injected == 1


def test_fault_probability_is_respected() -> None:
    stack = Stack(Policy(layers=[FaultLayer(probability=0.3)]), 1, rng=random.Random(7))
    backend = FakeBackend()
    n = 20_000

    async def main() -> int:
        failures = 0
        for i in range(n):
            try:
                await serve(stack, backend, Op("read", 2, f"/f{i}", size=1))
            except pyfuse3.FUSEError:
                failures += 1
        return failures

    failures = trio.run(main)
    sigma = (n * 0.3 * 0.7) ** 0.5
    assert abs(failures - n * 0.3) < 4 * sigma
    assert len(backend.calls) == n - failures


def test_layers_apply_in_policy_order() -> None:
    # The fault layer comes first, so a failed op is never delayed.
    stack = Stack(Policy(layers=[FaultLayer(), DelayLayer(delay_s=1)]), 1)
    op = Op("read", 2, "/f", size=1)

    async def main() -> float:
        with pytest.raises(pyfuse3.FUSEError):
            await serve(stack, FakeBackend(), op)
        return trio.current_time()

    assert run_virtual(main) == 0 and op.delay_ns == 0


def test_token_bucket_admits_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate_bytes_per_s=1000, burst_bytes=500)
    assert bucket.reserve(500, 0.0) == 0  # the burst
    assert bucket.reserve(100, 0.0) == pytest.approx(0.1)
    assert bucket.reserve(100, 0.0) == pytest.approx(0.2)  # queued behind the first waiter
    assert bucket.reserve(100, 10.0) == 0  # idle time refills up to the burst only


def test_throttle_sustains_the_configured_rate_shared_by_reads_and_writes() -> None:
    rate = 20 * MIB
    stack = Stack(Policy(layers=[ThrottleLayer(rate_bytes_per_s=rate)]), 1)
    backend = FakeBackend()
    block, per_worker = 64 * 1024, 200

    async def worker(name: str) -> None:
        for _ in range(per_worker):
            await serve(stack, backend, Op(name, 2, "/f", size=block))

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            for name in ("read", "read", "read", "write"):
                nursery.start_soon(worker, name)
        return trio.current_time()

    elapsed = run_virtual(main)
    moved = 4 * per_worker * block
    burst = stack.layers[0].bucket.burst_bytes
    assert elapsed == pytest.approx((moved - burst) / rate, rel=0.01)
    stats = stack.layers[0].statistics()
    assert stats.ops == 4 * per_worker and stats.bytes == moved and stats.wait_s_total > 0


def test_throttle_serves_waiters_in_arrival_order() -> None:
    stack = Stack(Policy(layers=[ThrottleLayer(rate_bytes_per_s=1000, burst_bytes=1)]), 1)
    order: list[int] = []

    async def one(i: int) -> None:
        await serve(stack, FakeBackend(), Op("read", 2, "/f", size=100))
        order.append(i)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(one, i)
                await trio.sleep(0.001)

    run_virtual(main)
    assert order == list(range(10))
