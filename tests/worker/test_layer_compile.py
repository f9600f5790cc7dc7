"""What a policy compiles to: layers that can never act leave the chains, and the page-cache mode.

Issue #4's cost goal ("a stack of all layers configured to do nothing vs bare
passthrough, ≤ 10 % throughput loss") needs two things checked here: do-nothing
layers add no per-op handler (the ops go straight to the backend, as with no
policy) and do not turn FOPEN_DIRECT_IO on (the page cache stays on). The layers
that can act keep both.
"""

from __future__ import annotations

import os
import random

import pytest
import trio

from interposer.fuse_worker import InterposerOperations, MemoryBackend, Op, Stack, Telemetry
from interposer.fuse_worker._stack import ALL_OPS
from interposer.fuse_worker.layers.throttle import UNREACHABLE_BYTES_PER_S, UNREACHABLE_IOPS
from interposer.proto import DelayLayer, FaultLayer, MetadataLayer, Policy, ProfileLayer, QuotaLayer, ThrottleLayer
from interposer.proto.policy import (
    FixedDistribution,
    LognormalDistribution,
    NormalDistribution,
    UniformDistribution,
)

#: One layer of every kind configured so that it can never change an op.
DO_NOTHING = [
    FaultLayer(probability=0.0),
    FaultLayer(kind="corrupt", probability=0.0, path_glob="/data/*"),
    DelayLayer(delay_s=0.0),
    DelayLayer(distribution=FixedDistribution(delay_s=0.0), mode="floor"),
    DelayLayer(distribution=UniformDistribution(min_s=0.0, max_s=0.0)),
    DelayLayer(distribution=NormalDistribution(mean_s=0.0, stddev_s=0.0)),
    DelayLayer(distribution=LognormalDistribution(median_s=0.001, sigma=0.5), probability=0.0),
    DelayLayer(distribution=LognormalDistribution(median_s=0.001, sigma=0.5), max_s=0.0),
    ThrottleLayer(rate_bytes_per_s=UNREACHABLE_BYTES_PER_S, iops=UNREACHABLE_IOPS),
    ThrottleLayer(rate_bytes_per_s=1 << 50, ops=frozenset({"read"})),
    MetadataLayer(),
    MetadataLayer(time_jitter_s=0.0, readdir_order="backend", ops=frozenset({"getattr"})),
]


def test_layers_that_can_never_act_compile_to_no_chain_and_keep_the_page_cache() -> None:
    stack = Stack(Policy(layers=DO_NOTHING), 1)
    assert stack.chains == {}
    assert not stack.needs_direct_io("/data/x") and not stack.needs_direct_io("/other")
    # still listed (for status and expiry), just not in any chain
    assert len(stack.layers) == len(DO_NOTHING) and not any(layer.acts for layer in stack.layers)


@pytest.mark.parametrize(("layer", "chains", "direct_io"), [
    (FaultLayer(probability=1e-9), "all", True),
    (FaultLayer(kind="corrupt", probability=0.5), {"read"}, True),
    (FaultLayer(kind="short_write", probability=0.5), {"write"}, True),  # short counts need direct I/O
    (FaultLayer(errno="ENOSPC", ops=frozenset({"write"})), {"write"}, False),  # write(2) always reaches us
    (FaultLayer(on="open"), {"open", "create", "opendir"}, False),
    (DelayLayer(delay_s=1e-6), "all", True),
    (DelayLayer(delay_s=0.001, ops=frozenset({"write"})), {"write"}, False),
    (DelayLayer(distribution=NormalDistribution(mean_s=0.0, stddev_s=0.001), ops=frozenset({"read"})),
     {"read"}, True),
    (DelayLayer(distribution=LognormalDistribution(median_s=0.001, sigma=0.3), mode="floor"), "all", True),
    # just below the unreachable rates, or a small bucket: the throttle can make ops wait
    (ThrottleLayer(rate_bytes_per_s=UNREACHABLE_BYTES_PER_S - 1), {"read", "write"}, True),
    (ThrottleLayer(iops=UNREACHABLE_IOPS - 1), {"read", "write"}, True),
    (ThrottleLayer(rate_bytes_per_s=UNREACHABLE_BYTES_PER_S, burst_bytes=1 << 20), {"read", "write"}, True),
    (ThrottleLayer(iops=UNREACHABLE_IOPS, rate_bytes_per_s=1 << 20), {"read", "write"}, True),
    (ThrottleLayer(rate_bytes_per_s=1 << 20, ops=frozenset({"write"})), {"write"}, False),
    (MetadataLayer(uid=0), {"lookup", "getattr", "setattr", "create", "mkdir", "mknod", "symlink", "link"}, False),
    (MetadataLayer(readdir_order="shuffle"), {"opendir"}, False),
    (MetadataLayer(readdir_order="hash", time_jitter_s=1),
     {"lookup", "getattr", "setattr", "create", "mkdir", "mknod", "symlink", "link", "opendir"}, False),
    (ProfileLayer(name="gp3"), {"read", "write"}, True),
    (ProfileLayer(name="gp3", ops=frozenset({"write"})), {"write"}, False),
])
def test_a_layer_that_can_act_is_compiled_in(layer, chains, direct_io: bool) -> None:
    # A do-nothing stack around it changes neither its chains nor the cache mode.
    alone, among = Stack(Policy(layers=[layer]), 1), Stack(Policy(layers=[*DO_NOTHING, layer, *DO_NOTHING]), 1)
    for stack in (alone, among):
        assert set(stack.chains) == (ALL_OPS if chains == "all" else chains)
        assert stack.needs_direct_io("/f") is direct_io


def test_the_cache_mode_follows_the_glob_of_the_acting_layer() -> None:
    stack = Stack(Policy(layers=[DelayLayer(delay_s=0.001, ops=frozenset({"read"}), path_glob="/slow/*"),
                                 FaultLayer(probability=0.0, path_glob="/quiet/*")]), 1)
    assert stack.needs_direct_io("/slow/a") and not stack.needs_direct_io("/quiet/a")
    assert not stack.needs_direct_io("/fast")


def test_do_nothing_ops_reach_the_backend_unchanged() -> None:
    stack = Stack(Policy(layers=DO_NOTHING), 1)
    calls: list[Op] = []

    async def main() -> None:
        for name in ("read", "write", "getattr", "opendir"):
            op = Op(name, 2, "/data/x", size=4096)

            async def call(op: Op = op) -> bytes:
                calls.append(op)
                return b"\1" * op.size

            chain = stack.chains.get(name)
            assert await (call() if chain is None else chain(op, call)) == b"\1" * 4096
            assert (op.delay_ns, op.throttle_ns, op.fault, op.dir_order) == (0, 0, "", None)

    trio.run(main)
    assert len(calls) == 4


class _Ctx:
    """A stand-in for pyfuse3.RequestContext (root, umask 0)."""

    uid = gid = pid = 0
    umask = 0


@pytest.mark.parametrize(("layers", "direct_io"), [
    ([], False),
    (DO_NOTHING, False),
    ([*DO_NOTHING, DelayLayer(delay_s=0.001, ops=frozenset({"read"}))], True),
    ([DelayLayer(delay_s=0.001, ops=frozenset({"write"}))], False),
    ([FaultLayer(kind="short_write")], True),
])
def test_the_adapter_opens_files_with_direct_io_only_under_an_acting_read_layer(layers, direct_io: bool) -> None:
    """The FileInfo the kernel gets: FOPEN_DIRECT_IO (``direct_io``) as the stack says, and always for O_DIRECT."""
    backend = MemoryBackend()
    ops = InterposerOperations(backend, Telemetry(), Policy(layers=layers))

    async def main() -> tuple[bool, bool, bool]:
        info, attrs = await ops.create(1, b"f", 0o100644, os.O_RDWR, _Ctx())
        reopened = await ops.open(attrs.st_ino, os.O_RDONLY, _Ctx())
        odirect = await ops.open(attrs.st_ino, os.O_RDONLY | os.O_DIRECT, _Ctx())
        return info.direct_io, reopened.direct_io, odirect.direct_io

    created, reopened, odirect = trio.run(main)
    assert (created, reopened, odirect) == (direct_io, direct_io, True)


def test_expiry_keeps_compiling_out_do_nothing_layers() -> None:
    stack = Stack(Policy(layers=[FaultLayer(probability=0.0), DelayLayer(delay_s=1, expires_at=2000.0)]), 1,
                  applied_at_s=1000.0, now_s=1000.0, rng=random.Random(1))
    assert set(stack.chains) and stack.needs_direct_io("/f")
    later = stack.expire(now_s=2001.0)
    assert later.chains == {} and not later.needs_direct_io("/f") and len(later.layers) == 1


@pytest.mark.parametrize(("layer", "acts_on_flush"), [
    (FaultLayer(errno="EIO", ops=frozenset({"read"})), False),
    (FaultLayer(errno="EIO", ops=frozenset({"flush"}), path_glob="/other/*"), False),
    (FaultLayer(errno="EIO", ops=frozenset({"flush"})), True),
    (DelayLayer(delay_s=0.001), True),  # no ops: every op, flush included
    (FaultLayer(errno="EIO", on="open"), False),  # acts on opens only
    (FaultLayer(errno="EIO", ops=frozenset({"flush"}), probability=0.0), False),  # can never act
])
def test_which_layers_keep_flush_on_close(layer, acts_on_flush: bool) -> None:
    assert Stack(Policy(layers=[layer]), 1).acts_on_flush_at("/f") is acts_on_flush


def test_a_write_behind_delay_keeps_flush_on_close_for_writers_only() -> None:
    # it holds a close only to send the writes it deferred: a read-only descriptor has none
    stack = Stack(Policy(layers=[DelayLayer(delay_s=0.001, ops=frozenset({"write"}), write_behind=True)]), 1)
    assert stack.acts_on_flush_at("/f", writable=True)
    assert not stack.acts_on_flush_at("/f", writable=False)
    also_flush = DelayLayer(delay_s=0.001, ops=frozenset({"write", "flush"}), write_behind=True)
    assert Stack(Policy(layers=[also_flush]), 1).acts_on_flush_at("/f", writable=False)


@pytest.mark.parametrize(("layers", "flushless"), [([], True), ([FaultLayer(errno="EIO", ops=frozenset({"flush"}))], False)])
def test_the_adapter_opens_files_without_flush_unless_a_layer_acts_on_it(layers, flushless: bool) -> None:
    ops = InterposerOperations(MemoryBackend(), Telemetry(), Policy(layers=layers))
    ops.noflush_opens = True  # as _extra_ops sets it when it answers opens

    async def main() -> tuple[bool, bool]:
        info, attrs = await ops.create(1, b"f", 0o100644, os.O_RDWR, _Ctx())
        reopened = await ops.open(attrs.st_ino, os.O_RDONLY, _Ctx())
        return ops.flushless(info.fh), ops.flushless(reopened.fh)

    assert trio.run(main) == (flushless, flushless)


def test_a_flush_layer_arriving_counts_files_opened_without_flush_until_released() -> None:
    backend = MemoryBackend()
    ops = InterposerOperations(backend, Telemetry(), Policy())
    ops.noflush_opens = True

    async def main() -> list[int]:
        info, _ = await ops.create(1, b"held", 0o100644, os.O_RDWR, _Ctx())
        seen = [ops.files_bypassing_layers]
        ops.install(Stack(Policy(layers=[FaultLayer(errno="EIO", ops=frozenset({"flush"}), path_glob="/held")]), 1))
        seen.append(ops.files_bypassing_layers)
        ops.install(Stack(Policy(layers=[FaultLayer(errno="EIO", ops=frozenset({"flush"}), path_glob="/x")]), 2))
        seen.append(ops.files_bypassing_layers)
        ops.install(Stack(Policy(layers=[FaultLayer(errno="EIO", ops=frozenset({"flush"}))]), 3))
        seen.append(ops.files_bypassing_layers)
        await ops.release(info.fh)
        seen.append(ops.files_bypassing_layers)
        return seen

    assert trio.run(main) == [0, 1, 0, 1, 0]
