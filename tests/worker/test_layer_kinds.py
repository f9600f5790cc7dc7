"""Fault kinds, delay distributions, IOPS, quota, metadata and expiry, with a fake backend and MockClock."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import random
import stat

import pyfuse3
import pytest
import trio
import trio.testing

from interposer.fuse_worker import Op, Stack, Telemetry
from interposer.fuse_worker.layers import QuotaContext, Usage, sampler, walk_usage
from interposer.proto import (
    DelayLayer,
    FaultLayer,
    MetadataLayer,
    Policy,
    ProfileLayer,
    QuotaLayer,
    ThrottleLayer,
)
from interposer.proto.policy import (
    LognormalDistribution,
    NormalDistribution,
    ParetoDistribution,
    UniformDistribution,
)

DATA = bytes(range(256)) * 16  # 4 KiB, no two neighbouring bytes equal


async def serve(stack: Stack, op: Op, reply=None):
    """Run ``op`` through ``stack`` over a fake backend returning ``reply`` (default: data/size)."""
    async def call():
        if reply is not None:
            return reply
        if op.name == "read":
            return DATA[: op.size]
        if op.name == "write":
            return op.size if op.short_size < 0 else op.short_size
        return None
    chain = stack.chains.get(op.name)
    return await (call() if chain is None else chain(op, call))


def run(fn, *args):
    return trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))


def _errnos(stack: Stack, n: int, name: str = "read") -> list[int]:
    async def main() -> list[int]:
        out = []
        for _ in range(n):
            try:
                await serve(stack, Op(name, 2, "/f", size=100))
                out.append(0)
            except pyfuse3.FUSEError as exc:
                out.append(exc.errno)
        return out
    return trio.run(main)


# ---- fault -------------------------------------------------------------------------

def test_weighted_errnos_follow_their_weights() -> None:
    stack = Stack(Policy(layers=[FaultLayer(errnos={"EIO": 3, "ENOSPC": 1})]), 1, rng=random.Random(1))
    results = _errnos(stack, 8000)
    eio = results.count(errno.EIO)
    assert set(results) == {errno.EIO, errno.ENOSPC}
    assert abs(eio - 6000) < 4 * math.sqrt(8000 * 0.75 * 0.25)


def test_every_nth_and_after_bytes() -> None:
    nth = Stack(Policy(layers=[FaultLayer(every_nth=3)]), 1)
    assert [e != 0 for e in _errnos(nth, 9)] == [False, False, True] * 3
    after = Stack(Policy(layers=[FaultLayer(after_bytes=250, ops=frozenset({"read"}))]), 1)
    # 100-byte reads: 0, 100, 200 bytes seen before the first three; the 4th has seen 300
    assert [e != 0 for e in _errnos(after, 5)] == [False, False, False, True, True]


def test_after_bytes_counts_what_reads_returned() -> None:
    # 1 MiB reads of a 100-byte file: 100 bytes, then nothing (the end of the file), ...
    stack = Stack(Policy(layers=[FaultLayer(after_bytes=250, ops=frozenset({"read"}))]), 1)

    async def main() -> list[bool]:
        failed = []
        for reply in (b"r" * 100, b"", b"", b"r" * 100, b"r" * 100, b"", b"r"):
            try:
                await serve(stack, Op("read", 2, "/f", size=1 << 20), reply=reply)
                failed.append(False)
            except pyfuse3.FUSEError:
                failed.append(True)
        return failed

    assert trio.run(main) == [False] * 5 + [True, True]  # 250 bytes were passed only by the 5th
    assert stack.layers[0].statistics().bytes_seen == 300


def test_on_open_fails_opens_only() -> None:
    stack = Stack(Policy(layers=[FaultLayer(on="open", errno="EACCES")]), 1)
    assert set(stack.chains) == {"open", "create", "opendir"}
    assert _errnos(stack, 1, "open") == [errno.EACCES]
    assert not stack.needs_direct_io("/f")


def test_short_read_returns_a_prefix_and_is_recorded() -> None:
    stack = Stack(Policy(layers=[FaultLayer(kind="short_read", short_ratio=0.25)]), 3)
    op = Op("read", 2, "/f", offset=0, size=4096)
    data = trio.run(serve, stack, op)
    assert data == DATA[:1024]
    assert op.fault == "short_read" and op.injected[0].result == 1024
    telemetry = Telemetry(volume="vol")
    telemetry.record(op, 0, len(data), 123, 1, revision=3)
    [record] = telemetry.take_faults(10)
    assert (record.kind, record.op, record.path, record.result, record.volume, record.policy_revision,
            record.time_ns, record.layer) == ("short_read", "read", "/f", 1024, "vol", 3, 123, 0)


def test_short_write_passes_fewer_bytes_down() -> None:
    stack = Stack(Policy(layers=[FaultLayer(kind="short_write")]), 1)
    assert set(stack.chains) == {"write"}
    op = Op("write", 2, "/f", size=1000)
    assert trio.run(serve, stack, op) == 500
    assert op.short_size == 500 and op.injected[0].kind == "short_write"


@pytest.mark.parametrize("mode", ["zero", "random"])
def test_corrupt_alters_a_bounded_number_of_bytes(mode: str) -> None:
    stack = Stack(Policy(layers=[FaultLayer(kind="corrupt", corrupt_bytes=5, corrupt_mode=mode)]), 1,
                  rng=random.Random(3))
    data = trio.run(serve, stack, Op("read", 2, "/f", size=4096))
    changed = [i for i in range(4096) if data[i] != DATA[i]]
    assert len(data) == 4096
    # zeroing a byte that already was 0 changes nothing
    assert len(changed) == 5 or (mode == "zero" and len(changed) >= 4)
    if mode == "zero":
        assert all(data[i] == 0 for i in changed)
    assert hashlib.sha256(data).digest() != hashlib.sha256(DATA).digest()


def test_an_errno_fault_is_a_fault_record_with_its_layer_index() -> None:
    stack = Stack(Policy(layers=[DelayLayer(delay_s=0), FaultLayer(errno="EROFS")]), 1)
    op = Op("write", 2, "/f", size=1, pid=42, uid=7)
    with pytest.raises(pyfuse3.FUSEError):
        trio.run(serve, stack, op)
    telemetry = Telemetry()
    telemetry.record(op, errno.EROFS, 0, 1, 1)
    [record] = telemetry.take_faults(10)
    assert (record.kind, record.errno, record.layer, record.pid, record.uid) == ("errno", "EROFS", 1, 42, 7)


def test_fault_records_are_bounded_and_drops_counted() -> None:
    telemetry = Telemetry(fault_capacity=2)
    for _ in range(3):
        op = Op("read", 2, "/f")
        op.inject(0, "errno", "EIO")
        telemetry.record(op, errno.EIO, 0, 0, 0)
    assert len(telemetry.faults) == 2 and telemetry.faults_dropped_total == 1 and telemetry.faults_total == 3


# ---- delay distributions ---------------------------------------------------------------

def _ks_statistic(samples: list[float], cdf) -> float:
    """Kolmogorov-Smirnov D = sup |F_n(x) - F(x)| (Kolmogorov 1933)."""
    xs = sorted(samples)
    n = len(xs)
    return max(max((i + 1) / n - cdf(x), cdf(x) - i / n) for i, x in enumerate(xs))


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


# Critical value of D at alpha = 0.001 for large n: 1.95 / sqrt(n) (Smirnov's asymptotic table).
KS_CRITICAL = 1.95


@pytest.mark.parametrize(("dist", "cdf"), [
    (UniformDistribution(min_s=0.001, max_s=0.005), lambda x: min(1, max(0, (x - 0.001) / 0.004))),
    (NormalDistribution(mean_s=0.010, stddev_s=0.002), lambda x: _phi((x - 0.010) / 0.002)),
    (LognormalDistribution(median_s=0.002, sigma=0.5), lambda x: _phi(math.log(x / 0.002) / 0.5) if x > 0 else 0),
    (ParetoDistribution(scale_s=0.001, alpha=1.5), lambda x: 1 - (0.001 / x) ** 1.5 if x >= 0.001 else 0),
])
def test_delay_distributions_pass_a_ks_test(dist, cdf) -> None:
    n = 4000
    draw = sampler(dist, random.Random(11), max_s=60)
    d = _ks_statistic([draw() for _ in range(n)], cdf)
    assert d < KS_CRITICAL / math.sqrt(n)
    # and the test can fail: the same samples against a shifted distribution are rejected
    shifted = [draw() * 1.5 for _ in range(n)]
    assert _ks_statistic(shifted, cdf) > KS_CRITICAL / math.sqrt(n)


def test_delay_draws_are_capped_and_reproducible_with_a_seed() -> None:
    spec = DelayLayer(distribution=ParetoDistribution(scale_s=0.5, alpha=0.5), max_s=2.0, seed=5)
    stacks = [Stack(Policy(layers=[spec]), 1) for _ in range(2)]

    async def main(stack: Stack) -> list[int]:
        ops = [Op("read", 2, "/f", size=1) for _ in range(50)]
        for op in ops:
            await serve(stack, op)
        return [op.delay_ns for op in ops]

    first, second = run(main, stacks[0]), run(main, stacks[1])
    assert first == second and max(first) == 2_000_000_000 and min(first) >= 500_000_000


def test_delay_probability() -> None:
    stack = Stack(Policy(layers=[DelayLayer(delay_s=1, probability=0.2, seed=1)]), 1)

    async def main() -> int:
        ops = [Op("read", 2, "/f", size=1) for _ in range(5000)]
        for op in ops:
            await serve(stack, op)
        return sum(op.delay_ns > 0 for op in ops)

    assert abs(run(main) - 1000) < 4 * math.sqrt(5000 * 0.2 * 0.8)


# ---- throttle IOPS ------------------------------------------------------------------------

def test_iops_bucket_sustains_the_rate_and_reports_waits() -> None:
    stack = Stack(Policy(layers=[ThrottleLayer(iops=100, burst_ops=1)]), 1)
    ops = [Op("write" if i % 2 else "read", 2, "/f", size=4096) for i in range(201)]

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            for op in ops:
                nursery.start_soon(serve, stack, op)
        return trio.current_time()

    assert run(main) == pytest.approx(2.0)  # 200 ops after the 1-op burst at 100/s
    assert sum(op.throttle_ns for op in ops) > 0 and stack.layers[0].statistics().waited == 200


def test_separate_read_and_write_buckets_with_two_layers() -> None:
    stack = Stack(Policy(layers=[ThrottleLayer(iops=10, burst_ops=1, ops=frozenset({"read"})),
                                 ThrottleLayer(iops=10, burst_ops=1, ops=frozenset({"write"}))]), 1)

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            for i in range(21):
                nursery.start_soon(serve, stack, Op("read", 2, "/f", size=1))
                nursery.start_soon(serve, stack, Op("write", 2, "/f", size=1))
        return trio.current_time()

    assert run(main) == pytest.approx(2.0)  # each direction has its own 10 IOPS


def test_iops_and_bandwidth_together_wait_for_the_slower() -> None:
    stack = Stack(Policy(layers=[ThrottleLayer(iops=1000, burst_ops=1, rate_bytes_per_s=1 << 20,
                                               burst_bytes=1)]), 1)

    async def main() -> float:
        for _ in range(16):
            await serve(stack, Op("write", 2, "/f", size=1 << 16))
        return trio.current_time()

    assert run(main) == pytest.approx(1.0, rel=0.01)  # 1 MiB at 1 MiB/s; IOPS would allow 16 ms


def test_reads_are_charged_what_they_returned_and_nothing_at_the_end_of_the_file() -> None:
    # `dd bs=1M` of a 100 KiB file: a 1 MiB read returning 100 KiB, then one returning nothing.
    # A device moves 100 KiB; charging what was asked (2 MiB) made small files 20x too slow.
    stack = Stack(Policy(layers=[ThrottleLayer(rate_bytes_per_s=1 << 20, burst_bytes=1),
                                 ThrottleLayer(iops=1, burst_ops=1)]), 1)
    moved, end = Op("read", 2, "/f", size=1 << 20), Op("read", 2, "/f", size=1 << 20)

    async def main() -> tuple[float, float]:
        await serve(stack, Op("read", 2, "/f", size=100 << 10), reply=b"p" * (100 << 10))  # fills the buckets
        start = trio.current_time()
        await serve(stack, moved, reply=b"p" * (100 << 10))
        middle = trio.current_time()
        await serve(stack, end, reply=b"")
        return middle - start, trio.current_time() - middle

    moved_s, end_s = run(main)
    assert moved_s == pytest.approx(1.0)  # 1 op at 1 IOPS (100 KiB at 1 MiB/s: 0.1 s)
    assert end_s == 0 and end.throttle_ns == 0  # neither its 1 MiB nor an op
    assert stack.layers[0].statistics().bytes == 200 << 10


def test_iops_count_in_max_io_bytes_units() -> None:
    async def main(size: int) -> float:
        stack = Stack(Policy(layers=[ThrottleLayer(iops=100, burst_ops=1, max_io_bytes=256 << 10)]), 1)
        for _ in range(10):
            await serve(stack, Op("write", 2, "/f", size=size))
        return trio.current_time()

    assert run(main, 1 << 20) == pytest.approx(0.39)  # 4 units each: 40 ops at 100/s, less the 1-op burst
    assert run(main, (256 << 10) + 1) == pytest.approx(0.19)  # just over one unit counts two
    assert run(main, 4096) == pytest.approx(0.09)


@pytest.mark.parametrize(("requests", "ops"), [
    ([(0, 32 << 10)] * 8, 1),                      # 8 contiguous 32 KiB writes: one 256 KiB unit
    ([(0, 32 << 10)] * 9, 2),
    ([(0, 4096)] * 8, 8),                          # under 32 KiB: each counts one
    ([(0, (1 << 20) - 4096), (0, 4096)], 4),       # a 1 MiB I/O the kernel cut at an unaligned buffer
    ([(0, 512 << 10), (0, 4096)], 3),              # not cut there: the 4 KiB request counts on its own
    ([(0, 1 << 20), (4096, 1 << 20)], 8),          # not contiguous (the 2nd skips 4 KiB)
    ([(0, 96 << 10), (0, 96 << 10), (0, 96 << 10)], 2),  # 288 KiB in a row
])
def test_contiguous_requests_merge_into_max_io_bytes_units(requests: list[tuple[int, int]], ops: int) -> None:
    # requests: (gap before it, size); IOPS 1 with no burst: the run time in s is the ops counted, less 1
    stack = Stack(Policy(layers=[ThrottleLayer(iops=1, burst_ops=1, max_io_bytes=256 << 10)]), 1)

    async def main() -> float:
        offset = 0
        for gap, size in requests:
            offset += gap
            await serve(stack, Op("write", 2, "/f", offset=offset, size=size))
            offset += size
        await serve(stack, Op("write", 2, "/f", offset=1 << 40, size=1))  # waits for every op before it
        return trio.current_time()

    assert run(main) == pytest.approx(ops)


@pytest.mark.parametrize(("offsets", "seconds"), [
    ([i * 4096 for i in range(8)], 8.0),             # 4 KiB in a row, under 32 KiB: a whole 1 MiB credit each
    ([i * (256 << 10) for i in range(8)], 2.0),      # 256 KiB sequential: merged into 2 MiB of units
])
def test_charge_units_spends_a_whole_unit_per_unmerged_io(offsets: list[int], seconds: float) -> None:
    # EBS HDD: an I/O of 1 MiB or less spends a 1 MiB credit; sequential ones (>= 32 KiB) merge.
    mib = 1 << 20
    stack = Stack(Policy(layers=[ThrottleLayer(rate_bytes_per_s=mib, burst_bytes=mib, max_io_bytes=mib,
                                               charge_units=True)]), 1)
    size = offsets[1] - offsets[0]

    async def main() -> float:
        await serve(stack, Op("read", 2, "/f", offset=1 << 40, size=mib), reply=b"p" * mib)  # empties the bucket
        start = trio.current_time()
        for offset in offsets:
            await serve(stack, Op("read", 2, "/f", offset=offset, size=size), reply=b"p" * size)
        return trio.current_time() - start

    assert run(main) == pytest.approx(seconds)


def test_burst_balance_sets_how_full_the_bucket_starts() -> None:
    mib = 1 << 20

    async def main(balance: float) -> float:
        stack = Stack(Policy(layers=[ThrottleLayer(rate_bytes_per_s=mib, burst_bytes=10 * mib,
                                                   burst_balance=balance)]), 1)
        await trio.sleep(100)  # a full bucket is full however long it waits; the balance counts from the first op
        start = trio.current_time()
        for _ in range(10):
            await serve(stack, Op("read", 2, "/f", size=mib), reply=b"p" * mib)
        return trio.current_time() - start

    assert run(main, 1.0) == 0  # 10 MiB of burst: no wait
    assert run(main, 0.5) == pytest.approx(5.0)  # 5 MiB of burst, the rest at 1 MiB/s
    assert run(main, 0.0) == pytest.approx(10.0)


def test_burst_balance_reports_how_full_the_policy_sized_buckets_are() -> None:
    # gp2-like: 10 credits earned at 1 per second, half full at the start.
    stack = Stack(Policy(layers=[ThrottleLayer(iops=1, burst_ops=10, burst_balance=0.5)]), 1)
    credits = stack.layers[0]

    async def spend() -> list[float | None]:
        seen = [credits.burst_balance(trio.current_time())]  # before the first op: as configured
        for _ in range(4):
            await serve(stack, Op("read", 2, "/f", size=4096))
        seen.append(credits.burst_balance(trio.current_time()))  # 4 of the 5 spent
        await trio.sleep(3)
        seen.append(credits.burst_balance(trio.current_time()))  # 3 earned back
        await trio.sleep(100)
        seen.append(credits.burst_balance(trio.current_time()))  # full, no more
        return seen

    assert run(spend) == [pytest.approx(0.5), pytest.approx(0.1), pytest.approx(0.4), 1.0]
    # a default bucket (50 ms of the rate) empties and fills many times a second: not reported
    assert Stack(Policy(layers=[ThrottleLayer(iops=1)]), 1).layers[0].burst_balance(0.0) is None


def test_a_failed_op_is_charged_what_it_asked() -> None:
    stack = Stack(Policy(layers=[ThrottleLayer(rate_bytes_per_s=1 << 20, burst_bytes=1),
                                 FaultLayer(errno="EIO")]), 1)

    async def main() -> float:
        for _ in range(4):
            with pytest.raises(pyfuse3.FUSEError):
                await serve(stack, Op("read", 2, "/f", size=256 << 10))
        return trio.current_time()

    assert run(main) == pytest.approx(1.0, rel=0.01)


def test_profile_expands_into_its_layers() -> None:
    stack = Stack(Policy(layers=[ProfileLayer(name="gp3")]), 1)
    assert [type(layer).__name__ for layer in stack.layers] == ["Throttle", "Delay"]
    assert stack.layers[0].ops_bucket.rate_bytes_per_s == 3000 and stack.needs_direct_io("/x")


# ---- expiry ----------------------------------------------------------------------------------

def test_expired_layers_drop_out_and_runtimes_survive() -> None:
    policy = Policy(layers=[FaultLayer(expires_after_s=10), DelayLayer(delay_s=1, expires_at=2000.0),
                            ThrottleLayer(iops=5)])
    stack = Stack(policy, 4, applied_at_s=1000.0, now_s=1000.0)
    assert len(stack.layers) == 3 and stack.next_expiry_s == 1010.0
    later = stack.expire(1010.0)
    assert [type(layer).__name__ for layer in later.layers] == ["Delay", "Throttle"]
    assert later.next_expiry_s == 2000.0 and later.revision == 4 and later.layers[1] is stack.layers[2]
    assert later.expire(2000.0).next_expiry_s is None
    assert len(Stack(policy, 4, applied_at_s=1000.0, now_s=5000.0).layers) == 1


def test_expiry_task_installs_the_reduced_stack_on_time() -> None:
    from interposer.fuse_worker._expiry import expire_layers

    class Ops:
        def __init__(self, stack: Stack) -> None:
            self.stack, self.stack_changed = stack, trio.Event()

        def install(self, stack: Stack, replacing: Stack | None = None) -> bool:
            if replacing is not None and self.stack is not replacing:
                return False
            self.stack = stack
            self.stack_changed.set()
            self.stack_changed = trio.Event()
            return True

    async def main() -> list[tuple[float, int]]:
        wall = lambda: 1000.0 + trio.current_time()  # noqa: E731 - wall clock follows the mock clock
        ops = Ops(Stack(Policy(layers=[FaultLayer(expires_after_s=5), FaultLayer(expires_after_s=8)]), 1,
                        applied_at_s=1000.0, now_s=1000.0))
        seen = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(expire_layers, ops, wall)
            for _ in range(2):
                await ops.stack_changed.wait()
                seen.append((trio.current_time(), len(ops.stack.layers)))
            nursery.cancel_scope.cancel()
        return seen

    assert run(main) == [(5.0, 1), (8.0, 0)]


# ---- quota ------------------------------------------------------------------------------------

class FakeFs:
    """A backend with a few files: getattr/lookup/forget as the quota layer uses them."""

    def __init__(self) -> None:
        self.sizes = {2: 100}  # ino → size
        self.forgotten: list = []

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino, attrs.st_mode, attrs.st_nlink, attrs.st_size = ino, stat.S_IFREG | 0o644, 1, self.sizes[ino]
        return attrs

    async def getattr(self, ino, ctx):
        return self._attrs(ino)

    async def lookup(self, parent_ino, name, ctx):
        return self._attrs(2)

    async def forget(self, inode_list):
        self.forgotten.extend(inode_list)


def test_quota_refuses_growth_past_the_limit_and_counts_frees() -> None:
    fs = FakeFs()
    context = QuotaContext(fs, lambda: Usage(100, 1))
    stack = Stack(Policy(layers=[QuotaLayer(bytes=1000, inodes=2, errno="EDQUOT")]), 1, quota=context)

    async def main() -> None:
        assert await serve(stack, Op("write", 2, "/f", offset=100, size=800)) == 800  # 900 used
        fs.sizes[2] = 900
        with pytest.raises(pyfuse3.FUSEError) as info:
            await serve(stack, Op("write", 2, "/f", offset=900, size=101))
        assert info.value.errno == errno.EDQUOT
        assert await serve(stack, Op("write", 2, "/f", offset=0, size=900)) == 900  # overwrite: no growth
        assert await serve(stack, Op("mkdir", 1, "/d")) is None  # 2 inodes
        with pytest.raises(pyfuse3.FUSEError):
            await serve(stack, Op("create", 1, "/g"))
        await serve(stack, Op("unlink", 1, "/f"))  # frees 900 bytes and an inode
        assert fs.forgotten == [(2, 1)]
        sv = pyfuse3.StatvfsData()
        sv.f_frsize, sv.f_bfree, sv.f_bavail, sv.f_ffree, sv.f_favail = 100, 10**9, 10**9, 10**9, 10**9
        out = await serve(stack, Op("statfs", 1, "/"), reply=sv)
        assert (out.f_blocks, out.f_bavail, out.f_files, out.f_favail) == (10, 10, 2, 1)

    trio.run(main)
    assert stack.layers[0].statistics() == type(stack.layers[0].statistics())(bytes_used=0, inodes_used=1, refused=2)


def test_quota_usage_survives_a_new_revision_and_stops_without_quota() -> None:
    measured = []
    context = QuotaContext(FakeFs(), lambda: measured.append(1) or Usage(0, 0))
    Stack(Policy(layers=[QuotaLayer(bytes=10)]), 1, quota=context)
    Stack(Policy(layers=[QuotaLayer(bytes=20)]), 2, quota=context)
    assert len(measured) == 1
    Stack(Policy(), 3, quota=context)
    Stack(Policy(layers=[QuotaLayer(bytes=20)]), 4, quota=context)
    assert len(measured) == 2


def test_walk_usage_counts_bytes_once_per_inode(tmp_path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"x" * 300)
    os.link(tmp_path / "d" / "a", tmp_path / "b")
    os.symlink("d/a", tmp_path / "s")
    usage = walk_usage(str(tmp_path))
    assert (usage.bytes_used, usage.inodes_used) == (300, 3)  # d, a (=b), s


# ---- metadata ----------------------------------------------------------------------------------

def test_metadata_overrides_and_jitters_attributes() -> None:
    stack = Stack(Policy(layers=[MetadataLayer(mode=0o600, uid=1234, size=7, mtime=1e9, time_jitter_s=2,
                                               path_glob="/meta/*", seed=3)]), 1)
    assert "read" not in stack.chains and not stack.needs_direct_io("/meta/x")

    def attrs() -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_mode, a.st_uid, a.st_size, a.st_atime_ns = stat.S_IFREG | 0o644, 0, 100, 5 * 10**9
        return a

    async def main():
        hit = await serve(stack, Op("getattr", 2, "/meta/x"), reply=attrs())
        miss = await serve(stack, Op("getattr", 2, "/other"), reply=attrs())
        _, created = await serve(stack, Op("create", 1, "/meta/y"), reply=(None, attrs()))
        return hit, miss, created

    hit, miss, created = trio.run(main)
    assert stat.S_ISREG(hit.st_mode) and stat.S_IMODE(hit.st_mode) == 0o600
    assert (hit.st_uid, hit.st_size) == (1234, 7) and created.st_uid == 1234
    assert abs(hit.st_mtime_ns - 10**18) <= 2 * 10**9 and abs(hit.st_atime_ns - 5 * 10**9) <= 2 * 10**9
    assert hit.st_mtime_ns != 10**18 or hit.st_atime_ns != 5 * 10**9
    assert (miss.st_uid, miss.st_size) == (0, 100)


def test_read_charge_meters_reads_at_a_share_of_their_bytes() -> None:
    # EFS Bursting/Provisioned: a read is metered at a third of its bytes, a write at all of them
    mib = 1 << 20
    layer = ThrottleLayer(rate_bytes_per_s=mib, burst_bytes=mib, burst_balance=0.0, read_charge=1 / 3)

    async def main(name: str) -> float:
        stack = Stack(Policy(layers=[layer]), 1)
        start = trio.current_time()
        for _ in range(6):
            await serve(stack, Op(name, 2, "/f", size=mib), reply=b"p" * mib if name == "read" else mib)
        return trio.current_time() - start

    assert run(main, "read") == pytest.approx(2.0)  # 6 MiB metered as 2 MiB at 1 MiB/s
    assert run(main, "write") == pytest.approx(6.0)


def test_read_iops_charge_makes_reads_and_writes_share_one_budget() -> None:
    # pd-standard: 1.5 write and 0.75 read IOPS per GiB from one budget, so a read costs two writes' share
    layer = ThrottleLayer(iops=100, burst_ops=1, burst_balance=0.0, read_iops_charge=2.0)

    async def main(names: list[str]) -> float:
        stack = Stack(Policy(layers=[layer]), 1)
        start = trio.current_time()
        for name in names:
            await serve(stack, Op(name, 2, "/f", size=4096), reply=b"p" * 4096 if name == "read" else 4096)
        return trio.current_time() - start

    assert run(main, ["write"] * 100) == pytest.approx(1.0)  # 100 writes/s alone
    assert run(main, ["read"] * 100) == pytest.approx(2.0)  # 50 reads/s alone
    assert run(main, ["read", "write"] * 50) == pytest.approx(1.5)  # a mix: 50 reads and 50 writes in 1.5 s
