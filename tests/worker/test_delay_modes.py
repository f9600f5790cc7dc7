"""Delay modes on trio's MockClock: ``add`` (the draw on top of the op) and ``floor`` (the draw as a target).

A fidelity run measured a fixed 2 ms delay at p50 2.31 ms at QD1: in ``add`` mode
the backend's own service time comes on top. ``floor`` mode makes the draw the
op's total latency, as a device with that latency would have; these tests pin
both semantics down in virtual time, where the backend's service time is exact.
"""

from __future__ import annotations

import errno
import math
import os
import random
import stat
import statistics
from types import SimpleNamespace

import msgspec.structs
import pyfuse3
import pytest
import trio
import trio.testing

from interposer.fuse_worker import Op, Stack
from interposer.fuse_worker.layers import quantile, sampler
from interposer.proto import DelayLayer, FaultLayer, Policy, ProfileLayer
from interposer.proto.policy import (
    AttrCache,
    FixedDistribution,
    LognormalDistribution,
    NormalDistribution,
    ParetoDistribution,
    UniformDistribution,
)
from interposer.proto.profiles import PROFILES, expand_profile


def run(fn, *args):
    return trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))


async def timed(stack: Stack, op: Op, service_s: float, fail: bool = False) -> float:
    """Serve ``op`` over a backend that takes ``service_s`` (and fails with EIO if ``fail``); return the latency."""
    async def call() -> bytes | pyfuse3.EntryAttributes:
        await trio.sleep(service_s)
        if fail:
            raise pyfuse3.FUSEError(errno.EIO)
        return pyfuse3.EntryAttributes() if op.name in ("lookup", "getattr") else b"x" * op.size

    start = trio.current_time()
    try:
        await stack.chains[op.name](op, call)
    except pyfuse3.FUSEError:
        pass
    return trio.current_time() - start


@pytest.mark.parametrize(("mode", "service_s", "latency_s", "slept_s"), [
    ("add", 0.003, 0.013, 0.010),
    ("add", 0.015, 0.025, 0.010),
    ("floor", 0.003, 0.010, 0.007),   # raised to the target
    ("floor", 0.015, 0.015, 0.0),     # already slower than the target: nothing added
    ("floor", 0.010, 0.010, 0.0),
])
def test_add_puts_the_draw_on_top_and_floor_raises_the_latency_to_it(mode, service_s, latency_s, slept_s) -> None:
    stack = Stack(Policy(layers=[DelayLayer(delay_s=0.010, mode=mode)]), 1)
    op = Op("read", 2, "/f", size=4096)
    assert run(timed, stack, op, service_s) == pytest.approx(latency_s)
    assert op.delay_ns == pytest.approx(slept_s * 1e9, abs=1)
    assert stack.layers[0].statistics().delay_s_total == pytest.approx(slept_s)


def test_floor_holds_a_failed_op_too() -> None:
    stack = Stack(Policy(layers=[DelayLayer(delay_s=0.010, mode="floor")]), 1)
    op = Op("read", 2, "/f", size=1)
    assert run(timed, stack, op, 0.002, True) == pytest.approx(0.010)


def test_floor_counts_the_layers_below_but_not_those_above() -> None:
    # A delay of 5 ms below the floor layer is part of the op's service time; one above is not.
    below = Stack(Policy(layers=[DelayLayer(delay_s=0.010, mode="floor"), DelayLayer(delay_s=0.005)]), 1)
    above = Stack(Policy(layers=[DelayLayer(delay_s=0.005), DelayLayer(delay_s=0.010, mode="floor")]), 1)
    assert run(timed, below, Op("read", 2, "/f", size=1), 0.001) == pytest.approx(0.010)
    assert run(timed, above, Op("read", 2, "/f", size=1), 0.001) == pytest.approx(0.015)


def test_floor_does_not_hold_a_read_that_returned_nothing() -> None:
    # A read at the end of the file never reaches a device; through a direct-I/O mount it
    # reaches the worker (the second read(2) of every whole-file read), and holding it to the
    # target doubled the emulated cost of reading small files.
    floor = Stack(Policy(layers=[DelayLayer(delay_s=0.010, mode="floor")]), 1)
    added = Stack(Policy(layers=[DelayLayer(delay_s=0.010)]), 1)
    at_end = Op("read", 2, "/f", size=0)  # the fake backend returns op.size bytes: none
    assert run(timed, floor, at_end, 0.001) == pytest.approx(0.001) and at_end.delay_ns == 0
    assert run(timed, floor, Op("read", 2, "/f", size=1), 0.001) == pytest.approx(0.010)
    assert run(timed, added, Op("read", 2, "/f", size=0), 0.001) == pytest.approx(0.011)  # add mode: every op


@pytest.mark.parametrize("mode", ["add", "floor"])
def test_skip_sequential_delays_only_the_requests_that_jump(mode: str) -> None:
    # A disk pays seek + rotation when the head moves: the first request of a file and any
    # jump are held, a request continuing the previous one of its file is not.
    stack = Stack(Policy(layers=[DelayLayer(delay_s=0.010, mode=mode, skip_sequential=True)]), 1)
    requests = [  # (name, inode, offset, size), served one after another
        ("read", 2, 0, 4096),          # first of file 2
        ("read", 2, 4096, 4096),       # continues it
        ("read", 3, 0, 1 << 20),       # first of file 3: its own stream
        ("read", 2, 8192, 4096),       # file 2 still continues, though file 3 came in between
        ("write", 3, 1 << 20, 4096),   # a write continuing a read of the same file
        ("read", 2, 0, 4096),          # back to the start: a jump
        ("read", 2, 8192, 4096),       # skips 4 KiB: a jump
        ("getattr", 2, 0, 0),          # not a read or write: always held
    ]

    async def main() -> list[bool]:
        held = []
        for name, ino, offset, size in requests:
            op = Op(name, ino, "/f", offset=offset, size=size)
            held.append(await timed(stack, op, 0.001) >= 0.010)
        return held

    assert run(main) == [True, False, True, False, False, True, True, True]
    assert stack.layers[0].statistics().delayed == 5


def test_skip_sequential_counts_a_stream_in_flight_together() -> None:
    # 16 requests of one stream issued at once (QD16 sequential) arrive in order while the
    # first is still being served: only that first one jumps.
    stack = Stack(Policy(layers=[DelayLayer(delay_s=0.010, mode="floor", skip_sequential=True)]), 1)

    async def main() -> list[float]:
        latencies: list[float] = []

        async def one(i: int) -> None:
            latencies.append(await timed(stack, Op("read", 2, "/f", offset=i << 20, size=1 << 20), 0.001))

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(one, i)
                await trio.sleep(0)  # arrival order = offset order
        return sorted(latencies)

    assert run(main) == [pytest.approx(0.001)] * 15 + [pytest.approx(0.010)]


def test_floor_probability_and_glob() -> None:
    stack = Stack(Policy(layers=[DelayLayer(delay_s=1.0, mode="floor", probability=0.25, path_glob="/slow/*",
                                            seed=4)]), 1)

    async def main() -> tuple[list[float], float]:
        slow = [await timed(stack, Op("read", 2, "/slow/x", size=1), 0.1) for _ in range(4000)]
        return slow, await timed(stack, Op("read", 2, "/fast", size=1), 0.1)

    slow, fast = run(main)
    held = sum(1 for t in slow if t == pytest.approx(1.0))
    assert fast == pytest.approx(0.1) and all(t == pytest.approx(0.1) or t == pytest.approx(1.0) for t in slow)
    assert abs(held - 1000) < 4 * math.sqrt(4000 * 0.25 * 0.75)


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _ks_statistic(samples: list[float], cdf, cdf_left) -> float:
    """Kolmogorov-Smirnov D = sup |F_n(x) - F(x)| (Kolmogorov 1933) for an F with atoms.

    ``cdf(x)`` = P(X <= x), ``cdf_left(x)`` = P(X < x); tied samples are one step of
    F_n. With atoms the usual critical values are conservative.
    """
    xs = sorted(round(x, 12) for x in samples)  # MockClock sums leave 1e-19 s of float noise
    n, d, i = len(xs), 0.0, 0
    while i < n:
        j = i
        while j < n and xs[j] == xs[i]:
            j += 1
        d = max(d, abs(j / n - cdf(xs[i])), abs(i / n - cdf_left(xs[i])))
        i = j
    return d


# Critical value of D at alpha = 0.001 for large n: 1.95 / sqrt(n) (Smirnov's asymptotic table).
KS_CRITICAL = 1.95


def test_floor_latencies_follow_max_of_draw_and_service_time_ks() -> None:
    """With a log-normal target (median 1 ms, sigma 0.5) and a 0.6 ms backend, latency = max(draw, 0.6 ms)."""
    median, sigma, service = 0.001, 0.5, 0.0006
    stack = Stack(Policy(layers=[DelayLayer(distribution=LognormalDistribution(median_s=median, sigma=sigma),
                                            mode="floor", seed=21)]), 1)
    n = 3000

    async def main() -> list[float]:
        return [await timed(stack, Op("read", 2, "/f", size=1), service) for _ in range(n)]

    latencies = run(main)

    def cdf(x: float) -> float:  # P(max(D, s) <= x): an atom of P(D <= s) at s
        return 0.0 if x < service else _phi(math.log(x / median) / sigma)

    def cdf_left(x: float) -> float:  # P(max(D, s) < x)
        return 0.0 if x <= service else _phi(math.log(x / median) / sigma)

    assert _ks_statistic(latencies, cdf, cdf_left) < KS_CRITICAL / math.sqrt(n)
    # and the test can fail: "add" latencies (draw + service) are rejected against the same CDF
    draw = sampler(LognormalDistribution(median_s=median, sigma=sigma), random.Random(21), 60)
    added = [draw() + service for _ in range(n)]
    assert _ks_statistic(added, cdf, cdf_left) > KS_CRITICAL / math.sqrt(n)


def test_a_fault_below_a_floor_is_held_to_the_target() -> None:
    stack = Stack(Policy(layers=[DelayLayer(delay_s=0.004, mode="floor"), FaultLayer(errno="EIO")]), 1)
    op = Op("read", 2, "/f", size=1)
    assert run(timed, stack, op, 0.0) == pytest.approx(0.004) and op.fault == "EIO"


# ---- quantiles (the fidelity bench's targets) --------------------------------------------------

@pytest.mark.parametrize("dist", [
    FixedDistribution(delay_s=0.002),
    UniformDistribution(min_s=0.0085, max_s=0.0085 + 60 / 7200),
    NormalDistribution(mean_s=0.040, stddev_s=0.002),
    NormalDistribution(mean_s=0.0005, stddev_s=0.001),  # draws below 0 become 0
    LognormalDistribution(median_s=0.001, sigma=0.3),
    ParetoDistribution(scale_s=0.001, alpha=1.5),
])
@pytest.mark.parametrize("probability", [1.0, 0.4])
@pytest.mark.parametrize("q", [0.5, 0.99])
def test_quantile_matches_the_draws_of_the_layer(dist, probability: float, q: float) -> None:
    """Binomial check: about ``q`` of the layer's draws are <= ``quantile(q)`` (4 sigma band)."""
    stack = Stack(Policy(layers=[DelayLayer(distribution=dist, probability=probability, max_s=0.05, seed=9)]), 1)
    n = 10_000

    async def main() -> list[float]:
        ops = [Op("read", 2, "/f") for _ in range(n)]
        for op in ops:
            await stack.chains["read"](op, trio.lowlevel.checkpoint)
        return [op.delay_ns / 1e9 for op in ops]

    draws = run(main)
    value = quantile(dist, q, max_s=0.05, probability=probability)
    below = sum(1 for d in draws if d <= value + 1e-9)
    if isinstance(dist, FixedDistribution) or value == 0.0:
        assert below >= q * n  # an atom at the value: at least q of the draws
    else:
        assert abs(below - q * n) < 4 * math.sqrt(n * q * (1 - q))


def test_quantile_known_values() -> None:
    assert quantile(LognormalDistribution(median_s=0.001, sigma=0.3), 0.5) == pytest.approx(0.001)
    assert quantile(LognormalDistribution(median_s=0.001, sigma=0.3), 0.99) == pytest.approx(
        0.001 * math.exp(0.3 * 2.3263478740408408))
    assert quantile(UniformDistribution(min_s=1.0, max_s=3.0), 0.25) == pytest.approx(1.5)
    assert quantile(ParetoDistribution(scale_s=0.1, alpha=1.0), 0.99) == pytest.approx(10.0)
    assert quantile(ParetoDistribution(scale_s=0.1, alpha=1.0), 0.99, max_s=2.0) == 2.0
    assert quantile(FixedDistribution(delay_s=0.5), 0.5, probability=0.4) == 0.0  # 60 % are not delayed
    with pytest.raises(ValueError, match="q=1"):
        quantile(FixedDistribution(delay_s=0.5), 1.0)


# ---- profiles ----------------------------------------------------------------------------------

def test_device_profiles_use_floor_and_the_wan_profile_adds() -> None:
    modes = {name: {layer.mode for layer in expand_profile(ProfileLayer(name=name)) if isinstance(layer, DelayLayer)}
             for name in PROFILES}
    assert modes == {"gp3": {"floor"}, "gp2": {"floor"}, "io2": {"floor"}, "st1": {"floor"},
                     "pd-standard": {"floor"}, "pd-balanced": {"floor"}, "pd-ssd": {"floor"},
                     "premium-ssd": {"floor"}, "premium-ssd-v2": {"floor"}, "efs": {"floor"},
                     "filestore-basic-hdd": {"floor"}, "filestore-basic-ssd": {"floor"}, "filestore-zonal": {"floor"},
                     "s3": {"floor"}, "s3-express": {"floor"}, "gcs": {"floor", "add"}, "azure-blob": {"floor", "add"},
                     "hdd-7200": {"floor"}, "wan-nfs": {"add"}}


def test_gp3_at_qd1_is_its_latency_not_latency_plus_service_time() -> None:
    """gp3 on a backend taking 0.3 ms: p50 latency ~1 ms (the target), not ~1.3 ms."""
    stack = Stack(Policy(layers=[ProfileLayer(name="gp3")]), 1, rng=random.Random(5))
    n = 2000

    async def main() -> list[float]:
        return sorted([await timed(stack, Op("read", 2, "/f", size=4096), 0.0003) for _ in range(n)])

    latencies = run(main)
    p50 = latencies[n // 2]
    assert 0.00095 < p50 < 0.00105


# ---- one system call, one floor ----------------------------------------------------------------

#: Latency floors as the efs profile sets them: metadata reads 1 ms, namespace changes 2.7 ms.
_NFS_LIKE = [DelayLayer(ops=frozenset({"getattr", "lookup"}), delay_s=0.001, mode="floor"),
             DelayLayer(ops=frozenset({"create", "mkdir"}), delay_s=0.0027, mode="floor")]
#: Time between one request's answer and the kernel's next request of the same call, seconds.
_KERNEL_GAP_S = 0.00002


async def _request(stack: Stack, name: str, path: str, pid: int, missing: bool = False) -> None:
    async def call() -> None:
        await trio.sleep(0.0001)  # the backend's own time, inside every floor
        if missing:
            raise pyfuse3.FUSEError(errno.ENOENT)

    try:
        await stack.chains[name](Op(name, 1, path, pid=pid), call)
    except pyfuse3.FUSEError:
        pass


async def _open_creat(stack: Stack, pid: int, gap_s: float = _KERNEL_GAP_S, created: str = "/d/f") -> float:
    """What the kernel sends for ``open("/d/f", O_CREAT)`` after a create in /d: GETATTR, LOOKUP, CREATE."""
    start = trio.current_time()
    await _request(stack, "getattr", "/d", pid)
    await trio.sleep(gap_s)
    await _request(stack, "lookup", "/d/f", pid, missing=True)
    await trio.sleep(gap_s)
    await _request(stack, "create", created, pid)
    return trio.current_time() - start


def test_a_floor_spans_the_requests_the_kernel_sends_for_one_create() -> None:
    # NFSv4 answers open(O_CREAT) with one OPEN: the call takes the create's 2.7 ms, not 1 + 1 + 2.7.
    assert run(_open_creat, Stack(Policy(layers=_NFS_LIKE), 1), 42) == pytest.approx(0.0027)


@pytest.mark.parametrize(("pid", "gap_s", "created", "expected_s"), [
    # no caller known: nothing links the requests; each pays its floor
    (0, _KERNEL_GAP_S, "/d/f", 0.001 + _KERNEL_GAP_S + 0.001 + _KERNEL_GAP_S + 0.0027),
    # gaps longer than the kernel takes: separate calls
    (42, 0.002, "/d/f", 0.001 + 0.002 + 0.001 + 0.002 + 0.0027),
    # a create of another name than the one looked up: GETATTR and LOOKUP are one call (the
    # lookup's floor has passed: its backend time only), the create pays its own floor
    (42, _KERNEL_GAP_S, "/d/g", 0.001 + _KERNEL_GAP_S + 0.0001 + _KERNEL_GAP_S + 0.0027),
])
def test_requests_of_separate_calls_each_pay_their_floor(pid: int, gap_s: float, created: str,
                                                         expected_s: float) -> None:
    assert run(_open_creat, Stack(Policy(layers=_NFS_LIKE), 1), pid, gap_s, created) == pytest.approx(expected_s)


def test_a_cached_lookup_still_links_the_create_to_its_getattr() -> None:
    # An NFS client trusts a name it looked up (lookup_cache_s): a later open(O_CREAT) of it sends no
    # LOOKUP, and the GETATTR + CREATE the kernel sends here are still one OPEN, one 2.7 ms floor.
    layers = [msgspec.structs.replace(_NFS_LIKE[0], lookup_cache_s=30.0), _NFS_LIKE[1]]

    async def looked_up_then_created(stack: Stack) -> float:
        await _request(stack, "lookup", "/d/f", 41, missing=True)  # a stat that found nothing: paid
        await trio.sleep(1)
        return await _open_creat(stack, 42)

    assert run(looked_up_then_created, Stack(Policy(layers=layers), 1)) == pytest.approx(0.0027)


def test_a_lookup_that_finds_the_name_ends_the_chain() -> None:
    async def stat_then_mkdir() -> float:
        start = trio.current_time()
        await _request(stack, "lookup", "/d/f", 42)  # found: a stat, not the start of a create
        await trio.sleep(_KERNEL_GAP_S)
        await _request(stack, "mkdir", "/d/f", 42)
        return trio.current_time() - start

    stack = Stack(Policy(layers=_NFS_LIKE), 1)
    assert run(stat_then_mkdir) == pytest.approx(0.001 + _KERNEL_GAP_S + 0.0027)


@pytest.mark.parametrize(("open_pid", "gap_s", "expected_s"), [
    # NFSv4 opens an unseen name with one OPEN: LOOKUP + OPEN from one thread at once are one 1 ms floor
    # (the open's floor has passed when it comes: its backend time only)
    (42, _KERNEL_GAP_S, 0.001 + _KERNEL_GAP_S + 0.0001),
    # another thread's open, or one well after the lookup, is its own call
    (43, _KERNEL_GAP_S, 0.001 + _KERNEL_GAP_S + 0.001),
    (42, 0.002, 0.001 + 0.002 + 0.001),
])
def test_an_open_of_a_name_its_lookup_just_found_is_one_floor(open_pid: int, gap_s: float,
                                                                expected_s: float) -> None:
    layers = [DelayLayer(ops=frozenset({"lookup", "open"}), delay_s=0.001, mode="floor")]

    async def open_unseen(stack: Stack) -> float:
        start = trio.current_time()
        await _request(stack, "lookup", "/d/f", 42)
        await trio.sleep(gap_s)
        await _request(stack, "open", "/d/f", open_pid)
        return trio.current_time() - start

    assert run(open_unseen, Stack(Policy(layers=layers), 1)) == pytest.approx(expected_s)


def test_an_nfsv3_like_floor_charges_each_request_of_a_call() -> None:
    # NFSv3 has no OPEN: LOOKUP, ACCESS and CREATE are round trips of their own (RFC 1813)
    v3 = [msgspec.structs.replace(layer, one_floor_per_call=False) for layer in _NFS_LIKE]
    assert run(_open_creat, Stack(Policy(layers=v3), 1), 42) == pytest.approx(
        0.001 + _KERNEL_GAP_S + 0.001 + _KERNEL_GAP_S + 0.0027)


def test_only_efs_pays_one_floor_per_call() -> None:
    # NFSv4 opens in one OPEN; NFSv3 (Filestore) has no OPEN; Mountpoint's open sends a HeadObject of its own
    for name, per_call in (("efs", True), ("filestore-basic-hdd", False), ("filestore-basic-ssd", False),
                           ("filestore-zonal", False), ("s3", False), ("s3-express", False), ("gcs", False)):
        floors = [layer for layer in expand_profile(ProfileLayer(name=name))
                  if isinstance(layer, DelayLayer) and layer.mode == "floor"]
        assert floors and {layer.one_floor_per_call for layer in floors} == {per_call}, name


# ---- write-behind: the latency of buffered writes paid at close or fsync ------------------------

#: A write latency floor of 2.7 ms whose writes are buffered, as the efs profile's.
_WRITE_BEHIND = DelayLayer(ops=frozenset({"write"}), delay_s=0.0027, mode="floor", write_behind="buffered")
#: The backend's own time of each request, seconds.
_SERVICE_S = 0.0001


async def _served(stack: Stack, name: str, ino: int = 7, flags: int = os.O_WRONLY, path: str = "/ckpt") -> float:
    """Serve one request of file ``ino`` (opened with ``flags``) at ``path``; its latency, seconds."""
    op = Op(name, ino, path, size=4096 if name == "write" else 0, open_flags=flags)
    return await timed(stack, op, _SERVICE_S)


def test_write_behind_holds_no_write_and_the_next_close_once_for_all_of_them() -> None:
    async def main() -> tuple[list[float], float, float]:
        stack = Stack(Policy(layers=[_WRITE_BEHIND]), 1)
        writes = [await _served(stack, "write") for _ in range(100)]
        return writes, await _served(stack, "flush"), await _served(stack, "flush")

    writes, first_close, second_close = run(main)
    assert writes == [pytest.approx(_SERVICE_S)] * 100  # taken by the client's page cache
    assert first_close == pytest.approx(0.0027)  # the writes sent and acknowledged: one round, a floor
    assert second_close == pytest.approx(_SERVICE_S)  # nothing written since: nothing to send


def test_write_behind_charges_fsync_like_close_and_each_file_its_own() -> None:
    async def main() -> list[float]:
        stack = Stack(Policy(layers=[_WRITE_BEHIND]), 1)
        await _served(stack, "write", ino=7)
        return [await _served(stack, "fsync", ino=8),  # another file: not written
                await _served(stack, "fsync", ino=7),
                await _served(stack, "flush", ino=7)]  # synced already: close sends nothing

    assert run(main) == [pytest.approx(_SERVICE_S), pytest.approx(0.0027), pytest.approx(_SERVICE_S)]


@pytest.mark.parametrize("flag", [os.O_SYNC, os.O_DSYNC, os.O_DIRECT])
def test_buffered_write_behind_holds_each_write_of_a_file_opened_o_sync_or_o_direct(flag: int) -> None:
    async def main() -> list[float]:
        stack = Stack(Policy(layers=[_WRITE_BEHIND]), 1)
        flags = os.O_WRONLY | flag
        return [await _served(stack, "write", flags=flags) for _ in range(3)] + [await _served(stack, "flush", flags=flags)]

    assert run(main) == [pytest.approx(0.0027)] * 3 + [pytest.approx(_SERVICE_S)]


@pytest.mark.parametrize("flag", [os.O_SYNC, os.O_DIRECT])
def test_write_behind_true_defers_o_sync_and_o_direct_writes_too(flag: int) -> None:
    # Mountpoint for Amazon S3 buffers every write into upload parts; only fsync or close waits
    layer = DelayLayer(ops=frozenset({"write"}), delay_s=0.0027, mode="floor", write_behind=True)

    async def main() -> list[float]:
        stack = Stack(Policy(layers=[layer]), 1)
        flags = os.O_WRONLY | flag
        return [await _served(stack, "write", flags=flags) for _ in range(3)] + [await _served(stack, "flush", flags=flags)]

    assert run(main) == [pytest.approx(_SERVICE_S)] * 3 + [pytest.approx(0.0027)]


def test_write_behind_holds_the_close_of_a_writer_not_of_a_reader_of_the_file() -> None:
    # NFS flushes on close only what a descriptor opened for writing may have dirtied
    async def main() -> list[float]:
        stack = Stack(Policy(layers=[_WRITE_BEHIND]), 1)
        await _served(stack, "write", flags=os.O_RDWR)
        return [await _served(stack, "flush", flags=os.O_RDONLY), await _served(stack, "flush", flags=os.O_RDWR)]

    assert run(main) == [pytest.approx(_SERVICE_S), pytest.approx(0.0027)]


def test_write_behind_leaves_files_outside_its_glob_alone() -> None:
    layer = DelayLayer(ops=frozenset({"write"}), delay_s=0.0027, mode="floor", write_behind=True, path_glob="/ckpt/**")

    async def main() -> list[float]:
        stack = Stack(Policy(layers=[layer]), 1)
        await _served(stack, "write", path="/logs/a")
        return [await _served(stack, "flush", path="/logs/a")]

    assert run(main) == [pytest.approx(_SERVICE_S)]


def test_write_behind_still_holds_a_flush_its_ops_name() -> None:
    # flush among the layer's own ops: every close is held, written or not
    layer = DelayLayer(ops=frozenset({"write", "flush"}), delay_s=0.0027, mode="add", write_behind=True)

    async def main() -> list[float]:
        stack = Stack(Policy(layers=[layer]), 1)
        return [await _served(stack, "flush"), await _served(stack, "write"), await _served(stack, "fsync"),
                await _served(stack, "fsync")]

    assert run(main) == [pytest.approx(0.0027 + _SERVICE_S), pytest.approx(_SERVICE_S),
                         pytest.approx(0.0027 + _SERVICE_S), pytest.approx(_SERVICE_S)]


def test_efs_streams_a_sequential_read_and_defers_its_writes() -> None:
    async def main() -> tuple[list[float], list[float], float]:
        stack = Stack(Policy(layers=[ProfileLayer(name="efs")]), 1, rng=random.Random(3))
        reads = [await timed(stack, Op("read", 9, "/data", offset=i * 131072, size=131072), _SERVICE_S)
                 for i in range(8)]
        writes = [await _served(stack, "write") for _ in range(8)]
        return reads, writes, await _served(stack, "flush")

    reads, writes, close = run(main)
    assert reads[0] > 0.0005  # the stream's first READ waits for the ~1 ms round trip
    assert max(reads[1:]) < 0.0005  # readahead has the next ones in flight (throttle: 1,500 MiB/s)
    assert max(writes) < 0.0005
    assert close > 0.001  # ~2.7 ms: the writes sent, acknowledged


def test_filestore_basic_hdd_holds_data_at_disk_latency_and_metadata_at_the_round_trip() -> None:
    async def main() -> tuple[list[float], list[float], float]:
        stack = Stack(Policy(layers=[ProfileLayer(name="filestore-basic-hdd")]), 1, rng=random.Random(5))
        reads = [await timed(stack, Op("read", 9, "/data", offset=i * 1048576, size=4096), _SERVICE_S)
                 for i in range(20)]  # random: none continues the one before
        lookups = [await _served(stack, "lookup", path=f"/data-{i}") for i in range(20)]
        await trio.sleep(10)
        again = await _served(stack, "lookup", path="/data-0")  # the NFS client still trusts the name
        writes = [await _served(stack, "write") for _ in range(4)]
        return reads, lookups, again, sum(writes) + await _served(stack, "flush")

    reads, lookups, again, write_and_close = run(main)
    assert 0.003 < statistics.median(reads) < 0.008  # log-normal, median 5 ms: the server's disks
    assert 0.0007 < statistics.median(lookups) < 0.0014  # median 1 ms: answered from the server's memory
    assert again == pytest.approx(_SERVICE_S)  # within acdirmin (30 s): no LOOKUP sent
    assert 0.001 < write_and_close < 0.030  # the writes wait in the client's page cache for the close


def test_a_lookup_cache_holds_each_path_once_per_ttl() -> None:
    layer = DelayLayer(ops=frozenset({"lookup", "read"}), delay_s=0.020, mode="floor", lookup_cache_s=60.0)

    async def main() -> list[float]:
        stack = Stack(Policy(layers=[layer]), 1)
        times = [await _served(stack, "lookup", path="/a")]  # paid: fills the client's cache
        await trio.sleep(30)
        times += [await _served(stack, "lookup", path="/a"),  # 30 s later: cached
                  await _served(stack, "lookup", path="/b"),  # another name: paid
                  await timed(stack, Op("read", 9, "/a", size=4096), _SERVICE_S)]  # not a lookup: held as ever
        await trio.sleep(31)  # 61 s after /a was paid for: expired
        times.append(await _served(stack, "lookup", path="/a"))
        return times

    first, cached, other, read, expired = run(main)
    assert first == pytest.approx(0.020) and other == pytest.approx(0.020) and read == pytest.approx(0.020)
    assert cached == pytest.approx(_SERVICE_S)
    assert expired == pytest.approx(0.020)


def test_gcs_pays_a_request_per_lookup_but_not_per_getattr_or_open() -> None:
    # Cloud Storage FUSE: a lookup is a stat-object request, its metadata cache answers getattr and open
    async def main() -> tuple[dict[str, float], Stack]:
        stack = Stack(Policy(layers=[ProfileLayer(name="gcs")]), 1, rng=random.Random(6))
        times = {name: await _served(stack, name, flags=os.O_RDONLY, path="/train/shard-0")
                 for name in ("lookup", "readdir", "open")}
        times["write"] = await _served(stack, "write", ino=8)
        times["close after writing"] = await _served(stack, "flush", ino=8)
        return times, stack

    times, stack = run(main)
    assert times["lookup"] > 0.004 and times["readdir"] > 0.004  # log-normal, median 20 ms: p1 ~6 ms
    assert "getattr" not in stack.chains  # no layer acts on it
    # only the staged-writes layer sees an open, to learn the object's size; it holds none (tests/worker/
    # test_staged_writes.py: a change to an existing object waits at its first write)
    assert times["open"] == pytest.approx(_SERVICE_S)
    assert times["write"] == pytest.approx(_SERVICE_S)  # staged in a local file
    assert times["close after writing"] > 0.004  # the upload


def _listed_entry(position: int) -> tuple[bytes, pyfuse3.EntryAttributes]:
    """Entry ``position`` of a listing: "shard-<position>", inode 1000 + position."""
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = 1000 + position
    return f"shard-{position}".encode(), attrs


async def _listed(stack: Stack, objects: int, per_request: int = 200, path: str = "/train") -> list[float]:
    """List a directory of ``objects`` entries (plus "." and "..") as the kernel does: readdir requests of
    ``per_request`` entries from offset 0, then one that finds the end; each request's latency, seconds."""
    positions, offset, latencies = objects + 2, 0, []
    while True:
        replied = min(per_request, positions - offset)
        op = Op("readdir", 5, path, offset=offset)

        async def call(first: int = offset, replied: int = replied) -> list:
            await trio.sleep(_SERVICE_S)
            return [_listed_entry(i) for i in range(first, first + replied)]

        start = trio.current_time()
        await stack.chains["readdir"](op, call)
        latencies.append(trio.current_time() - start)
        if replied == 0:
            return latencies
        offset += replied


@pytest.mark.parametrize(("objects", "page", "held"), [
    (0, None, [0]),  # "." and "..", then the end: one request
    (1000, None, [0, 1, 2, 3, 4, 5]),  # every request with entries (an NFS client's READDIRPLUS), not the end
    (1000, 500, [0, 2]),  # the listing's start, and the request reaching object 500, the second page
    (1000, 1000, [0]),  # one page holds it all
    (2500, 1000, [0, 5, 10]),  # objects 1000 and 2000 are in the 6th and 11th requests
])
def test_a_floor_holds_a_listing_once_per_page_and_never_its_end(objects: int, page: int | None,
                                                                 held: list[int]) -> None:
    layer = DelayLayer(ops=frozenset({"readdir"}), mode="floor", delay_s=0.020, list_page_entries=page)

    async def main() -> tuple[list[float], list[float]]:
        stack = Stack(Policy(layers=[layer]), 1)
        return await _listed(stack, objects), await _listed(stack, objects)  # a second listing: a rewind

    for latencies in run(main):
        assert [i for i, latency in enumerate(latencies) if latency > 2 * _SERVICE_S] == held
        assert all(latency == pytest.approx(0.020 if i in held else _SERVICE_S) for i, latency in enumerate(latencies))


def test_an_add_delay_holds_every_readdir_of_a_listing() -> None:
    # a chaos experiment's delay acts on every request it matches, the last one too
    async def main() -> list[float]:
        return await _listed(Stack(Policy(layers=[DelayLayer(ops=frozenset({"readdir"}), delay_s=0.020)]), 1), 10)

    assert run(main) == [pytest.approx(0.020 + _SERVICE_S)] * 2


def test_a_listing_fills_the_lookup_cache_of_a_client_that_caches_what_it_lists() -> None:
    # gcsfuse's stat cache takes every object a listing returns (fastStatBucket.ListObjects): a lookup of a
    # listed name within its 60 s is answered from it, as a data loader opening every shard after an ls
    async def main() -> tuple[float, float, float]:
        stack = Stack(Policy(layers=[ProfileLayer(name="gcs")]), 1, rng=random.Random(4))
        await _listed(stack, 10)
        listed = await _served(stack, "lookup", path="/train/shard-5")
        unlisted = await _served(stack, "lookup", path="/train/other")
        await trio.sleep(61)
        return listed, unlisted, await _served(stack, "lookup", path="/train/shard-6")

    listed, unlisted, expired = run(main)
    assert listed == pytest.approx(_SERVICE_S)
    assert unlisted > 2 * _SERVICE_S and expired > 2 * _SERVICE_S


def test_a_listing_fills_the_attribute_cache_of_an_nfs_client() -> None:
    # an NFS READDIRPLUS brings each entry's attributes: the client's attribute cache answers a getattr of a
    # listed file for acregmin (3 s)
    async def main() -> tuple[float, float, float]:
        stack = Stack(Policy(layers=[ProfileLayer(name="efs")]), 1, rng=random.Random(4))
        await _listed(stack, 10)
        listed = await _served(stack, "getattr", ino=1005)
        unlisted = await _served(stack, "getattr", ino=999)
        await trio.sleep(4)
        return listed, unlisted, await _served(stack, "getattr", ino=1006)

    listed, unlisted, expired = run(main)
    assert listed == pytest.approx(_SERVICE_S)
    assert unlisted > 2 * _SERVICE_S and expired > 2 * _SERVICE_S


@pytest.mark.parametrize(("profile", "objects", "requests"), [
    ("s3", 2500, 3),  # ListObjectsV2: 1,000 keys a request
    ("gcs", 2500, 1),  # gcsfuse: 5,000 objects a request
    ("azure-blob", 12_000, 3),  # List Blobs: 5,000 blobs a request
    ("efs", 1000, 6),  # the NFS client: a READDIRPLUS per buffer, as FUSE's
])
def test_object_stores_list_a_directory_in_pages(profile: str, objects: int, requests: int) -> None:
    async def main() -> list[float]:
        return await _listed(Stack(Policy(layers=[ProfileLayer(name=profile)]), 1, rng=random.Random(3)), objects)

    latencies = run(main)
    assert sum(latency > 2 * _SERVICE_S for latency in latencies) == requests
    assert latencies[0] > 2 * _SERVICE_S and latencies[-1] == pytest.approx(_SERVICE_S)


@pytest.mark.parametrize(("profile", "requests"), [
    # gcsfuse on a bucket without hierarchical namespace: rename = copy + delete of the source, rmdir = list +
    # delete of the placeholder, mkdir = one placeholder object
    ("gcs", {"rename": 2, "rmdir": 2, "mkdir": 1}),
    # blobfuse2, block blobs: rename = StartCopyFromURL + delete of the source (2025); rmdir = list + delete of
    # the marker blob; mkdir = the marker blob + the listing of libfuse's getattr after it
    # (component/azstorage/block_blob.go, component/libfuse)
    ("azure-blob", {"rename": 2, "rmdir": 2, "mkdir": 2}),
])
def test_object_store_namespace_changes_wait_for_each_request_one_after_the_other(profile: str,
                                                                                  requests: dict[str, int]) -> None:
    n = 1500

    async def main() -> dict[str, list[float]]:
        stack = Stack(Policy(layers=[ProfileLayer(name=profile)]), 1, rng=random.Random(11))
        return {name: sorted([await _served(stack, name, path=f"/ckpt/{i}") for i in range(n)]) for name in requests}

    times = run(main)
    for name, count in requests.items():
        for q in (0.5, 0.9):
            assert times[name][int(q * n)] == pytest.approx(_requests_quantile(count, q), rel=0.06), (name, q)


def _requests_quantile(requests: int, q: float) -> float:
    """The ``q``-quantile of ``requests`` independent request latencies (log-normal, median 20 ms, sigma 0.5) added
    up, seconds, from 200,000 draws."""
    draws = random.Random(12)
    sums = sorted(sum(draws.lognormvariate(math.log(0.020), 0.5) for _ in range(requests)) for _ in range(200_000))
    return sums[int(q * len(sums))]


def test_wan_nfs_charges_a_round_trip_per_close_after_writes_not_per_write() -> None:
    async def main() -> tuple[list[float], float, float]:
        stack = Stack(Policy(layers=[ProfileLayer(name="wan-nfs")]), 1, rng=random.Random(4))
        writes = [await _served(stack, "write") for _ in range(10)]  # 40 KiB: the link paces it in 3 ms
        return writes, await _served(stack, "flush"), await _served(stack, "flush")

    writes, close, clean_close = run(main)
    assert sum(writes) < 0.040  # 0.4 s if each paid the 40 ms round trip
    assert 0.030 < close < 0.050
    assert clean_close == pytest.approx(_SERVICE_S)  # NFSv3 sends nothing for a clean close


def test_a_buffered_only_sequential_skip_holds_each_direct_read() -> None:
    # an NFS client's readahead serves a buffered stream; each O_DIRECT read goes to the server
    layer = DelayLayer(ops=frozenset({"read"}), delay_s=0.001, mode="floor", skip_sequential="buffered")

    async def main(flags: int) -> list[float]:
        stack = Stack(Policy(layers=[layer]), 1)
        return [await timed(stack, Op("read", 5, "/f", offset=i * 4096, size=4096, open_flags=flags), _SERVICE_S)
                for i in range(4)]

    assert run(main, os.O_RDONLY) == [pytest.approx(0.001)] + [pytest.approx(_SERVICE_S)] * 3
    assert run(main, os.O_RDONLY | os.O_DIRECT) == [pytest.approx(0.001)] * 4


async def _stat(stack: Stack, ino: int, ctime_ns: int = 1, name: str = "getattr", mode: int = stat.S_IFREG) -> float:
    """Serve a ``getattr`` of ``ino`` (or a ``lookup`` finding it) whose attributes carry ``ctime_ns``; its latency."""
    attrs = SimpleNamespace(st_ino=ino, st_mode=mode | 0o644, st_ctime_ns=ctime_ns, st_mtime_ns=ctime_ns, st_size=10)

    async def call() -> SimpleNamespace:
        await trio.sleep(_SERVICE_S)
        return attrs

    start = trio.current_time()
    await stack.chains[name](Op(name, 1 if name == "lookup" else ino, "/f"), call)
    return trio.current_time() - start


@pytest.mark.parametrize("mode", ["add", "floor"])
def test_an_attribute_cache_holds_a_getattr_only_when_an_nfs_client_would_send_one(mode: str) -> None:
    """nfs(5) and fs/nfs/inode.c: 3 s at first, doubled while unchanged, back to 3 s on a change, 60 s at most."""
    layer = DelayLayer(ops=frozenset({"getattr", "lookup"}), delay_s=0.010, mode=mode, attr_cache=AttrCache())
    held = pytest.approx(0.010 + (_SERVICE_S if mode == "add" else 0.0))
    unheld = pytest.approx(_SERVICE_S)

    async def main() -> dict[str, float]:
        stack = Stack(Policy(layers=[layer]), 1)
        t = {"first": await _stat(stack, 7)}
        await trio.sleep(2.5)
        t["2.5 s later, within 3 s"] = await _stat(stack, 7)
        await trio.sleep(1.0)
        t["3.5 s: expired, unchanged"] = await _stat(stack, 7)  # now 6 s
        await trio.sleep(5.5)
        t["5.5 s later, within 6 s"] = await _stat(stack, 7)
        await trio.sleep(1.0)
        t["6.5 s: expired, changed"] = await _stat(stack, 7, ctime_ns=2)  # back to 3 s
        await trio.sleep(3.5)
        t["3.5 s after the change"] = await _stat(stack, 7, ctime_ns=2)
        for _ in range(8):  # unchanged: 6, 12, 24, 48, then 60 s at most
            await trio.sleep(61)
            await _stat(stack, 7, ctime_ns=2)
        await trio.sleep(59)
        t["59 s after, at the cap"] = await _stat(stack, 7, ctime_ns=2)
        await trio.sleep(2)
        t["61 s after: past the cap"] = await _stat(stack, 7, ctime_ns=2)
        t["a directory, first"] = await _stat(stack, 5, mode=stat.S_IFDIR)
        await trio.sleep(20)
        t["the directory 20 s later (acdirmin 30)"] = await _stat(stack, 5, mode=stat.S_IFDIR)
        t["a lookup (brings attributes)"] = await _stat(stack, 9, name="lookup")
        await trio.sleep(2)
        t["its inode's getattr 2 s later"] = await _stat(stack, 9)
        return t

    t = run(main)
    assert t == {
        "first": held, "2.5 s later, within 3 s": unheld, "3.5 s: expired, unchanged": held,
        "5.5 s later, within 6 s": unheld, "6.5 s: expired, changed": held, "3.5 s after the change": held,
        "59 s after, at the cap": unheld, "61 s after: past the cap": held, "a directory, first": held,
        "the directory 20 s later (acdirmin 30)": unheld, "a lookup (brings attributes)": held,
        "its inode's getattr 2 s later": unheld,
    }
