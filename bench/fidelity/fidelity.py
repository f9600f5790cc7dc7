"""Fidelity benchmark: does the application see what the layers emulate?

For each scenario (every profile, single throttle settings, fixed and log-normal
delays in both delay modes, and a stack of do-nothing layers vs bare passthrough)
it mounts a fuse-worker with that policy over one shared backing directory, runs
fio against the mount at queue depth 1 and 16 (``numjobs`` psync jobs, so it
works buffered and direct alike; with ``--aio``, one libaio job of that
``iodepth``, direct only), with buffered and direct I/O, and prints
target vs achieved bandwidth, IOPS and latency p50/p99 with their ratio.

Usage (as root, from the repo's venv)::

    .venv/bin/python bench/fidelity/fidelity.py            # every scenario, ~10 min (quiet machine)
    .venv/bin/python bench/fidelity/fidelity.py --quick    # every scenario, 1 s each (~1 min, smoke)
    .venv/bin/python bench/fidelity/fidelity.py --noop     # do-nothing stack vs bare only, alternated
    .venv/bin/python bench/fidelity/fidelity.py --only 'delay-*' --only profile-gp3
    .venv/bin/python bench/fidelity/fidelity.py --aio --mode qd16-direct   # asynchronous queue depth

The fio files are laid out in the backing directory once, *before* any worker
mounts it, so no policy (a 40 MiB/s throttle, a 40 ms delay per op) slows the
layout down; every scenario then reads the same files through its own mount.

Targets: a throttle's bandwidth/IOPS is its configured rate; a delay's latency
p50/p99 are the quantiles of its distribution (``layers.quantile``). In ``floor``
mode that is the target itself. In ``add`` mode the layer promises the draw *on
top of* what the request costs anyway, so the target adds the request's own
service time: the p50 and mean of 4 KiB random reads through a mount with no
layers (QD1 direct, measured first in the same run, printed as "service time");
p99 adds the service p50 to the delay's p99.
Where several limits apply the target is the tightest one: IOPS at most
``qd / (mean latency + think time)`` (the response time law; the think time, what
each job spends between its ops, is taken from the run: :func:`with_think_time`)
and at most the throttle's; when a
throttle binds, the *mean* latency's target is ``qd / IOPS`` (Little's law gives the
mean, not a quantile: buffered sequential readers, most of whose reads the page
cache answers, had p50s 0.87–0.91 of it) and there is no p50 or p99 target.
A throttle's rate over a run of T seconds is its rate plus what its bucket holds
at the start, over T (the ``st1`` credit bucket, 1 TiB, never empties in a run);
requests are charged in the throttle's units (``max_io_bytes``, whole ones with
``charge_units``; sequential ones of 32 KiB or more merge). In sequential
scenarios (``rw=read``) a delay with ``skip_sequential`` is left out (``"buffered"``:
in the buffered modes only): only the
first read of each file, and each wrap-around to its start, pays it.

Each ratio comes with the range an exact emulation would show 95 % of the time
from the number of ops measured (column "exact 95%", :func:`sampling_range`): a
random delay's p99 from a few hundred draws is itself random (``s3``'s 20 ms
log-normal read 441 times, 10 s at QD1: anywhere in 0.88–1.44 of its target). The
run ends with a count of the cells within ±10 % of their targets, those outside,
and those outside by no more than sampling gives (a run too short to tell).

Metadata scenarios (profiles that delay metadata ops, e.g. ``efs``) time a
``stat`` of each of many files the kernel has not looked up (one LOOKUP each; in
``qd`` processes, since fio's ``filestat`` engine stats every file during its
setup, so that its run finds them in the kernel's cache), an ``open(O_RDONLY)`` of
each of many such files (a LOOKUP and an OPEN through FUSE; one OPEN from an NFSv4
client, RFC 8881 section 18.16; the close is not timed), an ``open`` and a 64 KiB
``read`` of each (``read-file``: a training loader's small-file sample, 4 KiB files,
so one READ; its target is the sum of an independent ``open`` and ``read`` delay),
and run fio's
``filecreate`` engine (an ``open(O_CREAT)`` of each of many new files, in ``qd``
jobs), each file once, at QD1 and QD16 (direct modes only: no data moves). Their
targets are the quantiles of the delay acting on ``lookup``, ``open`` and
``create``: what the emulated file system publishes for one such request.

Client-side caching of a network file system (``efs``): ``profile-efs-seq`` reads
each file in order as ``bare`` does; its target is the lesser of the profile's
bandwidth and what ``bare`` moved in the same mode (readahead streams the data, so
only this machine limits it). ``profile-efs-fsync`` writes 4 KiB at random with an
``fsync`` after every 16 writes, over the worker's memory backend (this VM's disk
takes 1.8–5 ms per fsync at 16 jobs itself, a floor under the emulated one): buffered,
the fsync's latency (rows ``sync50``/``sync99``) is the write latency's quantiles
and the writes have no target; direct (``O_DIRECT``, sent at once), each write is.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import json
import math
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interposer.fuse_worker.layers import Throttle, quantile
from interposer.fuse_worker.layers.throttle import MIN_MERGED_IO_BYTES
from interposer.proto import DelayLayer, ProfileLayer, ThrottleLayer, decode_policy
from interposer.proto.profiles import PROFILES, expand_profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _host import HostMeter, machine  # noqa: E402 - bench/_host.py
from _mounts import unmount  # noqa: E402 - bench/_mounts.py
from fuse_trace import FuseRequestTrace, available  # noqa: E402 - bench/fidelity/fuse_trace.py

MIB = 1 << 20
#: fio run time per measurement, seconds (full mode): 13 scenarios x 4 modes x 10 s ~ 9 min of fio.
DEFAULT_RUNTIME_S = 10.0
#: fio run time of each mode's untimed warm-up read before "bare", seconds.
WARM_UP_S = 3.0
#: fio run time per measurement in --quick mode, seconds.
QUICK_RUNTIME_S = 1.0
#: Bytes of the fio files per queue depth (one file at QD1, qd files of size/qd above), full / quick.
DEFAULT_FILE_BYTES = 256 * MIB
QUICK_FILE_BYTES = 32 * MIB  # 2 MiB per job at QD16: room for the 1 MiB sequential reads
#: How long to wait for a worker to mount, seconds.
MOUNT_TIMEOUT_S = 15.0
#: Queue depths and I/O modes measured (full mode); --quick and --noop use fewer.
FULL_MODES = [(qd, direct) for qd in (1, 16) for direct in (True, False)]
QUICK_MODES = [(1, True), (16, False)]
#: Quantile levels printed for latency.
P50, P90, P99 = 0.5, 0.9, 0.99
#: Bins of the numeric mean of a delay distribution (mean = integral of its quantile function).
MEAN_BINS = 2000
#: Standard normal quantile of the two-sided 95 % sampling range printed beside each ratio.
Z_95 = 1.959964
#: Files per job (fio job or stat process) of the metadata scenarios by queue depth, full /
#: quick: each is visited once, so no lookup is answered from the kernel's entry cache.
#: fio's own setup through a mount that delays metadata grows faster than the file count
#: (4,000 files: 87 s of setup for a 4.5 s run), and creates in one directory are
#: serialised by its lock (below), so the counts stay small.
META_FILES_PER_JOB = {"stat": {1: 2000, 16: 500}, "open": {1: 2000, 16: 500}, "read-file": {1: 2000, 16: 500},
                      "create": {1: 500, 16: 50}, "rename": {1: 400, 16: 25}}
QUICK_META_FILES_PER_JOB = {"stat": {1: 200, 16: 25}, "open": {1: 200, 16: 25}, "read-file": {1: 200, 16: 25},
                            "create": {1: 100, 16: 10}, "rename": {1: 100, 16: 8}}
#: fio engine of each metadata workload (None: timed here), and the ops whose delays add up to its target.
META_WORKLOADS = {"stat": (None, ("lookup",)), "open": (None, ("open",)), "read-file": (None, ("open", "read")),
                  "create": ("filecreate", ("create",)), "rename": (None, ("rename",))}
#: Metadata workloads over files laid out before the mount (the others make their own).
LAID_OUT_META = ("stat", "open", "read-file", "rename")
#: Metadata workloads whose calls one directory serialises: the kernel holds the parent's lock for each.
ONE_AT_A_TIME_META = (("create",), ("rename",))
#: Equally likely values per delay when the target is a sum of independent delays (their pairwise sums
#: make the sum's distribution: 400 x 400 values).
SUM_BINS = 400
#: Values a partial sum of draws keeps before the next delay is added (its 1/4000 quantiles).
SUM_KEPT = 4000


@dataclass
class Target:
    """What a scenario should achieve at one queue depth; None = not a target of this scenario."""

    bw_bytes_per_s: float | None = None
    iops: float | None = None
    lat_p50_s: float | None = None
    lat_p99_s: float | None = None
    #: mean latency, where only Little's law gives one (a throttle or a queue sets the rate)
    lat_mean_s: float | None = None
    #: latency of the fsyncs of a workload that syncs every few writes (``Scenario.fsync_every``)
    sync_p50_s: float | None = None
    sync_p99_s: float | None = None
    #: the target latency's quantile function (level in (0, 1) → seconds) when a delay, not a
    #: throttle, sets it: what :func:`sampling_range` needs; of the fsyncs when ``sync_*`` are set
    latency_quantile: Callable[[float], float] | None = field(default=None, repr=False, compare=False)


@dataclass
class ServiceTime:
    """What a 4 KiB random read costs through a mount with no layers (QD1 direct), seconds."""

    p50_s: float
    mean_s: float


@dataclass
class Scenario:
    """A policy and the fio workload that probes it."""

    name: str
    layers: list[dict]
    rw: str = "randread"
    bs: int = 4096
    targets: dict[int, Target] = field(default_factory=dict)  # queue depth → fixed target; empty = computed
    #: a fresh worker for each mode: a drained credit bucket would refill while idle between modes
    remount: bool = False
    #: a metadata workload (a key of META_WORKLOADS) instead of reads
    meta: str | None = None
    #: writes (``rw`` a write pattern) with an fsync after every this many of them; 0 = no fsync
    fsync_every: int = 0
    #: the emulated rate is beyond what this machine moves through a mount: the target is the
    #: bare mount's bandwidth in the same mode (the same workload as scenario "bare")
    machine_bound: bool = False
    #: more options of this scenario's worker
    worker_args: tuple[str, ...] = ()
    #: with ``rw="randrw"``: the percentage of ops that are reads (fio ``rwmixread``); the
    #: targets and figures are of reads and writes together (fio ``unified_rw_reporting=mixed``)
    read_percent: int = 100

    def target(self, qd: int, runtime_s: float, service: ServiceTime | None = None, direct: bool = False) -> Target:
        """What this scenario should achieve at queue depth ``qd`` in a run of ``runtime_s`` seconds."""
        if self.targets:
            return self.targets.get(qd, Target())
        if self.meta:
            return meta_target(self.layers, META_WORKLOADS[self.meta][1], qd)
        if self.fsync_every:
            return write_target(self.layers, qd, direct)
        return targets_of(self.layers, self.bs, qd, service, runtime_s=runtime_s, sequential=self.rw == "read",
                          direct=direct, read_share=self.read_percent / 100)


def _acting_on(layers: list[dict], *ops: str) -> list:
    """The validated layers of a policy, profiles expanded, keeping those that act on any of ``ops``."""
    return [part for layer in decode_policy(json.dumps({"layers": layers})).layers
            for part in (expand_profile(layer) if isinstance(layer, ProfileLayer) else [layer])
            if not part.ops or part.ops & set(ops)]


def _read_layers(layers: list[dict]) -> list:
    """The validated layers of a policy, profiles expanded, keeping those that act on reads."""
    return _acting_on(layers, "read")


def _quantile_s(layer: DelayLayer, q: float) -> float:
    """The ``q``-quantile of the delay a layer draws, seconds (its cap and probability count)."""
    return quantile(layer.resolved_distribution, q, max_s=layer.max_s, probability=layer.probability)


def _quantile_fn(layer: DelayLayer) -> Callable[[float], float]:
    """The quantile function of the delay ``layer`` draws (level in (0, 1) → seconds)."""
    return lambda q: _quantile_s(layer, q)


def _binned(latency_quantile: Callable[[float], float]) -> list[float]:
    """A distribution as :data:`MEAN_BINS` equally likely values (its quantile function at the bins' middles)."""
    return [latency_quantile((i + 0.5) / MEAN_BINS) for i in range(MEAN_BINS)]


def _mean_s(layer: DelayLayer) -> float:
    """Mean delay a layer draws, seconds: the integral of its quantile function (caps and probability count)."""
    return statistics.fmean(_binned(_quantile_fn(layer)))


def sampling_range(latency_quantile: Callable[[float], float], metric: str, n: int) -> tuple[float, float] | None:
    """Where the ratio achieved / target of ``metric`` falls 95 % of the time for an exact emulation, from ``n`` ops.

    A latency quantile measured over ``n`` independent draws is itself random: the
    sample ``q``-quantile is below the true ``p``-quantile exactly when enough of the
    ``n`` draws are, a binomial count, so it lies between the true quantiles at the
    ends of the 95 % score interval of a proportion ``q`` seen in ``n`` trials
    (Wilson, "Probable inference, the law of succession, and statistical inference",
    JASA 22, 1927; the plain normal interval ``q ± 1.96 sqrt(q (1 - q) / n)`` covered
    only 91-93 % for a p99 of 441-1,000 ops, tests/bench). The rate of a delay-bound
    workload is ``qd / mean latency``, and the mean of ``n`` draws varies by
    ``1.96 sd / sqrt(n)`` (central limit theorem), sd from the same quantile
    function. So a 20 ms log-normal (σ 0.5) delay read 441 times — 10 s at queue
    depth 1 — gives a p99 anywhere in 0.88–1.44 of its target
    and a p50 in 0.94–1.06: a deviation inside that range says the run was too short
    to tell, not that the emulation is off.

    Args:
        latency_quantile: the target latency's quantile function (``Target.latency_quantile``).
        metric: ``p50``/``p90``/``p99``/``sync50``/``sync99`` (those quantiles) or ``iops``.
        n: ops measured.

    Returns:
        (low, high) ratios, or None when ``n`` is 0 or the metric has no range (bandwidth).
    """
    if n <= 0:
        return None
    if metric == "iops":
        draws = _binned(latency_quantile)
        mean = statistics.fmean(draws)
        if mean <= 0:
            return None
        spread = Z_95 * statistics.pstdev(draws) / math.sqrt(n) / mean
        # IOPS = qd / mean latency: a mean latency (1 ± spread) × the target's gives IOPS / (1 ± spread)
        return 1 / (1 + spread), (1 / (1 - spread) if spread < 1 else math.inf)
    level = {"p50": P50, "p90": P90, "p99": P99, "sync50": P50, "sync99": P99}.get(metric)
    if level is None:
        return None
    target = latency_quantile(level)
    if target <= 0:
        return None
    shrink = 1 + Z_95 ** 2 / n
    centre = (level + Z_95 ** 2 / (2 * n)) / shrink
    half_width = Z_95 / shrink * math.sqrt(level * (1 - level) / n + Z_95 ** 2 / (4 * n * n))
    return latency_quantile(centre - half_width) / target, latency_quantile(centre + half_width) / target


def has_added_delay(layers: list[dict]) -> bool:
    """True if a delay layer acting on reads is in ``add`` mode (its target includes the service time)."""
    return any(isinstance(layer, DelayLayer) and layer.mode == "add" for layer in _read_layers(layers))


def _shares(layer: Any, read_share: float) -> tuple[float, float]:
    """The shares of a mixed workload's ops that are reads and writes ``layer`` acts on (``read_share``: reads)."""
    ops = layer.ops or {"read", "write"}
    return (read_share if "read" in ops else 0.0), ((1 - read_share) if "write" in ops else 0.0)


def targets_of(layers: list[dict], bs: int, qd: int, service: ServiceTime | None = None, *,
               runtime_s: float = DEFAULT_RUNTIME_S, sequential: bool = False, direct: bool = False,
               read_share: float = 1.0) -> Target:
    """Targets of a workload of ``bs``-byte requests at queue depth ``qd`` under ``layers``.

    Reads only by default; ``read_share`` < 1 mixes in writes at random (fio
    ``randrw``, ``rwmixread``), and the targets are of all ops together.
    Bandwidth and IOPS: the tightest of the throttles (bytes/s, ops/s counted in
    ``max_io_bytes`` units where a throttle gives them, a read's charge scaled by
    ``read_charge``/``read_iops_charge``, averaged over the mix) and of
    ``qd / mean delay`` (Little's law; the mean is the integral of the quantile
    function, so caps and probabilities count). Latency: the delay's p50/p99
    (summed over delay layers: exact for one, an upper bound for more; none when a
    delay holds only part of a mix), or the mean latency ``qd / IOPS`` when a
    throttle is what limits the rate. With an ``add``-mode
    delay and ``service`` given, the service time is added once: its p50 to the
    p50 and p99, its mean to the mean. ``runtime_s``: the run, over which a
    bucket's contents add to its rate. ``sequential``: each job reads its file in order
    (``direct``: with ``O_DIRECT``, which a ``"buffered"`` ``skip_sequential`` holds).
    """
    iops_limit = math.inf  # requests per second
    p50 = p99 = mean = base = 0.0
    if service is not None and has_added_delay(layers):
        p50, p99, mean = service.p50_s, service.p50_s, service.mean_s
        base = service.p50_s
    delays: list[DelayLayer] = []
    whole = True  # every delay holds every op of the mix: its quantiles are the workload's
    for layer in _acting_on(layers, "read", *(("write",) if read_share < 1 else ())):
        reads, writes = _shares(layer, read_share)
        if isinstance(layer, ThrottleLayer):
            buckets = Throttle(layer)  # the worker's own bucket sizes
            units = 1.0  # units each request counts
            if layer.max_io_bytes:
                unit = layer.max_io_bytes
                merged = sequential and MIN_MERGED_IO_BYTES <= bs < unit
                units = bs / unit if merged else math.ceil(bs / unit)
            if buckets.ops_bucket is not None:
                ops_per_s = layer.iops + buckets.ops_bucket.burst_bytes * layer.burst_balance / runtime_s
                iops_limit = min(iops_limit, ops_per_s / (units * (reads * layer.read_iops_charge + writes)))
            if buckets.bucket is not None:
                bytes_per_s = layer.rate_bytes_per_s + buckets.bucket.burst_bytes * layer.burst_balance / runtime_s
                charged = units * layer.max_io_bytes if layer.charge_units else bs
                iops_limit = min(iops_limit, bytes_per_s / (charged * (reads * layer.read_charge + writes)))
        elif isinstance(layer, DelayLayer):
            if sequential and (layer.skip_sequential is True or (layer.skip_sequential == "buffered" and not direct)):
                continue
            whole = whole and math.isclose(reads + writes, 1.0)
            p50 += _quantile_s(layer, P50)
            p99 += _quantile_s(layer, P99)
            mean += _mean_s(layer) * (reads + writes)
            delays.append(layer)
    throttled = iops_limit
    delayed = qd / mean if mean else math.inf
    iops = min(throttled, delayed)
    if math.isinf(iops):
        return Target()
    if throttled < delayed or not whole:  # Little's law gives the mean; no quantile is known
        return Target(bw_bytes_per_s=iops * bs, iops=iops, lat_mean_s=qd / iops)
    return Target(bw_bytes_per_s=iops * bs, iops=iops, lat_p50_s=p50, lat_p99_s=p99,
                  latency_quantile=lambda q: base + sum(_quantile_s(layer, q) for layer in delays))


def meta_target(layers: list[dict], ops: tuple[str, ...], qd: int) -> Target:
    """Targets of ``qd`` jobs each doing one call after another in one directory, a call being one request
    of each of ``ops`` to the emulated file system: the delays acting on them, added up.

    Latency p50/p99 are the quantiles of that delay layer's distribution (of the sum
    of independent draws of each op's, :func:`sum_quantile_fn`; an op held by ``add``
    delays before its floor waits for each of them too: ``gcs``'s rename, a copy and a
    delete); the rate is ``qd / mean`` (Little's law). Creates and renames are the
    exception: the kernel holds the parent directory's lock for each
    (``open_last_lookups`` in fs/namei.c takes it exclusively for O_CREAT,
    ``lock_rename`` for a rename), on an NFS client as here, so one directory takes one
    at a time: ``1 / mean``, and at ``qd`` > 1 the p50 is the queue, ``qd / rate``, a
    mean (Little's law), with no p50 or p99 target. An op without a delay: no target.
    """
    delays = []
    for op in ops:
        acting = [layer for layer in _acting_on(layers, op) if isinstance(layer, DelayLayer)]
        if not acting:
            return Target()
        floors = [layer for layer in acting if layer.mode == "floor"]
        delays += [layer for layer in acting if layer.mode == "add"] + floors[:1]
    mean = sum(_mean_s(layer) for layer in delays)
    if ops in ONE_AT_A_TIME_META and qd > 1:
        return Target(iops=1 / mean, lat_mean_s=qd * mean)
    draws = _quantile_fn(delays[0]) if len(delays) == 1 else sum_quantile_fn(delays)
    return Target(iops=qd / mean, lat_p50_s=draws(P50), lat_p99_s=draws(P99), latency_quantile=draws)


def sum_quantile_fn(delays: list[DelayLayer]) -> Callable[[float], float]:
    """The quantile function of the sum of one independent draw of each delay (level in (0, 1) → seconds):
    each as :data:`SUM_BINS` equally likely values, every combination summed and sorted; the sum so far is
    thinned to :data:`SUM_KEPT` equally likely values before each further delay is added (else the
    combinations of four delays would be 400⁴)."""
    sums = [0.0]
    for layer in delays:
        if len(sums) > SUM_KEPT:
            sums.sort()
            step = len(sums) / SUM_KEPT
            sums = [sums[int((i + 0.5) * step)] for i in range(SUM_KEPT)]
        values = [_quantile_s(layer, (i + 0.5) / SUM_BINS) for i in range(SUM_BINS)]
        sums = [s + v for s in sums for v in values]
    sums.sort()
    return lambda q: sums[min(int(q * len(sums)), len(sums) - 1)]


def write_target(layers: list[dict], qd: int, direct: bool) -> Target:
    """Targets of ``qd`` jobs writing, each syncing every few writes, under the delay acting on ``write``.

    A ``write_behind`` delay (``efs``: an NFS client's page cache; ``s3``: Mountpoint's
    background upload) holds the fsync, once for the writes before it: the fsync
    latency's p50/p99 are the delay's, and the writes get no target (each costs the
    mount's own round trip). Direct writes under a ``"buffered"`` one (``O_DIRECT``:
    sent at once on NFS) and any other delay hold every write: p50/p99 are the
    delay's, the rate ``qd / mean`` (Little's law). No delay on writes: no target.
    """
    for layer in _acting_on(layers, "write"):
        if isinstance(layer, DelayLayer):
            draws = _quantile_fn(layer)
            p50, p99 = draws(P50), draws(P99)
            if layer.write_behind is True or (layer.write_behind and not direct):
                return Target(sync_p50_s=p50, sync_p99_s=p99, latency_quantile=draws)
            return Target(iops=qd / _mean_s(layer), lat_p50_s=p50, lat_p99_s=p99, latency_quantile=draws)
    return Target()


NOOP_LAYERS = [
    {"type": "fault", "probability": 0.0},
    {"type": "delay", "delay_s": 0.0},
    {"type": "throttle", "rate_bytes_per_s": 1 << 40, "iops": 1 << 30},
    {"type": "metadata", "time_jitter_s": 0},
]


def scenarios() -> list[Scenario]:
    """Every scenario, in the order they run ("bare" first: "noop-stack" is compared with it)."""
    delays = {"fixed-2ms": {"delay_s": 0.002},
              "lognormal-1ms": {"distribution": {"type": "lognormal", "median_s": 0.001, "sigma": 0.5}}}
    out = [
        Scenario("bare", [], rw="read", bs=128 * 1024, targets={1: Target(), 16: Target()}),
        Scenario("noop-stack", NOOP_LAYERS, rw="read", bs=128 * 1024, targets={1: Target(), 16: Target()}),
        Scenario("throttle-20MiB/s", [{"type": "throttle", "rate_bytes_per_s": 20 * MIB}], rw="read",
                 bs=128 * 1024),
        Scenario("throttle-500iops", [{"type": "throttle", "iops": 500}]),
        # 1 MiB reads counted as four 256 KiB I/Os, as EBS SSD volumes count them: 25 reads/s
        Scenario("throttle-100iops-256KiB-units", [{"type": "throttle", "iops": 100, "max_io_bytes": 256 * 1024}],
                 rw="read", bs=1024 * 1024),
    ]
    out += [Scenario(f"delay-{name}-{mode}", [{"type": "delay", "ops": ["read"], "mode": mode, **spec}])
            for name, spec in delays.items() for mode in ("add", "floor")]
    out += [Scenario(f"profile-{name}", [{"type": "profile", "name": name}]) for name in PROFILES]
    out += [Scenario("profile-gp3-6000iops", [{"type": "profile", "name": "gp3", "iops": 6000}])]
    # gp2 whose 5.4 million I/O credits were spent: its 300 IOPS baseline
    out += [Scenario("profile-gp2-drained", [{"type": "profile", "name": "gp2", "burst_balance": 0}], remount=True)]
    # pd-standard's reads and writes share one budget: half of each is 1,024 IOPS, not 768 reads + 768 writes
    out += [Scenario("profile-pd-standard-mixed", [{"type": "profile", "name": "pd-standard"}], rw="randrw",
                     read_percent=50)]
    # Azure Premium SSD P10 whose burst credits were spent: its provisioned 500 IOPS
    out += [Scenario("profile-premium-ssd-drained", [{"type": "profile", "name": "premium-ssd", "burst_balance": 0}],
                     remount=True)]
    # disks stream what they read in order: no positioning delay, the transfer rate (st1: burst while credits last)
    out += [Scenario(f"profile-{name}-seq", [{"type": "profile", "name": name}], rw="read", bs=MIB)
            for name in ("hdd-7200", "st1")]
    out += [Scenario("profile-st1-drained-seq", [{"type": "profile", "name": "st1", "burst_balance": 0}],
                     rw="read", bs=MIB, remount=True)]
    # a network file system pays its latency on metadata too: a stat of an unseen name, a create
    out += [Scenario(f"profile-efs-{meta}", [{"type": "profile", "name": "efs"}], meta=meta) for meta in META_WORKLOADS]
    # Filestore Basic HDD: 5 ms on data, but a lookup is answered from the server's memory (1 ms)
    out += [Scenario("profile-filestore-basic-hdd-stat", [{"type": "profile", "name": "filestore-basic-hdd"}],
                     meta="stat")]
    # Cloud Storage FUSE: each unseen name is one stat-object request (its cache only helps a repeat)
    out += [Scenario("profile-gcs-stat", [{"type": "profile", "name": "gcs"}], meta="stat")]
    # ... and renaming a file is two: a copy, then the source's deletion (a bucket without hierarchical namespace)
    out += [Scenario("profile-gcs-rename", [{"type": "profile", "name": "gcs"}], meta="rename")]
    # blobfuse2: a copy, then the source's deletion (its caller checks the source in the attribute cache)
    out += [Scenario("profile-azure-blob-rename", [{"type": "profile", "name": "azure-blob"}], meta="rename")]
    # an NFS client's readahead streams a sequential reader (only its first read waits); its page
    # cache takes writes and the fsync after them pays the write latency once
    out += [Scenario("profile-efs-seq", [{"type": "profile", "name": "efs"}], rw="read", bs=128 * 1024,
                     machine_bound=True),
            # over the memory backend: this VM's disk takes 1.8 ms (p50) to 5 ms (p99) per fsync at 16 jobs
            # itself, a floor under EFS's (fio creates its files through the mount first, untimed)
            Scenario("profile-efs-fsync", [{"type": "profile", "name": "efs"}], rw="randwrite", fsync_every=16,
                     worker_args=("--backend", "memory")),
            # Mountpoint for S3 prefetches for any sequential reader, direct or not; fsync waits for the upload
            Scenario("profile-s3-seq", [{"type": "profile", "name": "s3"}], rw="read", bs=128 * 1024,
                     machine_bound=True),
            Scenario("profile-s3-fsync", [{"type": "profile", "name": "s3"}], rw="randwrite", fsync_every=16,
                     worker_args=("--backend", "memory")),
            # EFS Bursting, 100 GiB stored, credits spent: its 50 KiB/s-per-GiB baseline, reads metered at a third
            Scenario("profile-efs-drained-seq", [{"type": "profile", "name": "efs", "size_gib": 100,
                                                 "burst_balance": 0}], rw="read", bs=MIB, remount=True)]
    return out


def _is_fuse_mount(path: Path) -> bool:
    target = str(path.resolve())
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == target and fields[fields.index("-") + 1].startswith("fuse"):
            return True
    return False


class Mount:
    """A fuse-worker serving ``backing`` at ``mountpoint`` with a policy, as a context manager."""

    def __init__(self, backing: Path, mountpoint: Path, layers: list[dict], worker_flags: tuple[str, ...] = ()) -> None:
        self.mountpoint = mountpoint
        mountpoint.mkdir(exist_ok=True)
        policy = mountpoint.parent / "policy.json"
        policy.write_text(json.dumps({"layers": layers}))
        self.argv = [sys.executable, "-m", "interposer.fuse_worker", "--backing-dir", str(backing),
                     "--mountpoint", str(mountpoint), "--policy-file", str(policy), "--log-level", "WARNING", *worker_flags]

    def __enter__(self) -> Mount:
        self.proc = subprocess.Popen(self.argv)
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not _is_fuse_mount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"worker did not mount: {self.argv}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        unmount(self.proc, self.mountpoint)


def _fio_argv(directory: Path, qd: int, file_bytes: int, aio: bool = False) -> list[str]:
    """fio options naming and sizing the files of queue depth ``qd`` (the same for layout and runs).

    ``qd`` psync jobs, each on a file of its own; with ``aio``, one libaio job of
    ``iodepth`` ``qd`` on one file (asynchronous requests: FUSE's ``max_background``
    limits how many are in flight).
    """
    fio = shutil.which("fio") or "fio"
    if aio:
        return [fio, "--name=fidelity-aio", f"--directory={directory}", "--numjobs=1", f"--size={file_bytes}",
                "--ioengine=libaio", f"--iodepth={qd}"]
    return [fio, f"--name=fidelity-qd{qd}", f"--directory={directory}", f"--numjobs={qd}",
            f"--size={file_bytes // qd}", "--ioengine=psync"]


def _run_fio(argv: list[str], what: str = "fio") -> str:
    """Run fio with ``argv``; its standard output.

    Raises:
        RuntimeError: fio failed (the message names ``what``, the command and fio's stderr).
    """
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr}")
    return proc.stdout


def _fio_result(stdout: str, side: str) -> dict:
    """``{bw, iops, mean, p50, p99, n}`` of one side (``read``/``write``/``mixed``) of fio's JSON report (bytes/s, ops/s, s,
    ops measured), and ``sync50``/``sync99`` (s) and ``sync_n`` when the jobs synced (``--fsync``)."""
    job = json.loads(stdout[stdout.find("{"):])["jobs"][0]
    got, pct = job[side], job[side]["clat_ns"].get("percentile", {})
    result = {"bw": float(got["bw_bytes"]), "iops": float(got["iops"]), "mean": got["clat_ns"]["mean"] / 1e9,
              "p50": pct.get("50.000000", 0) / 1e9, "p99": pct.get("99.000000", 0) / 1e9,
              "n": int(got.get("total_ios", 0))}
    if job.get("sync", {}).get("total_ios"):
        sync_pct = job["sync"]["lat_ns"].get("percentile", {})
        result.update(sync50=sync_pct.get("50.000000", 0) / 1e9, sync99=sync_pct.get("99.000000", 0) / 1e9,
                      sync_n=int(job["sync"]["total_ios"]))
    return result


def _quantiles_s(values: list[float], *levels: float) -> list[float]:
    """The ``levels`` (whole percents) of ``values``, inclusive method."""
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return [cuts[round(q * 100) - 1] for q in levels]


def lay_out(backing: Path, qds: set[int], file_bytes: int, aio: bool = False) -> None:
    """Create the fio files of every queue depth directly in ``backing``, before any mount."""
    for qd in sorted(qds):
        _run_fio([*_fio_argv(backing, qd, file_bytes, aio), "--rw=write", "--bs=128k", "--create_only=1"],
                 "fio layout")


def _meta_files(scenario: Scenario, qd: int) -> str:
    """The name fio gives a metadata scenario's files at ``qd`` (``<name>.<job>.<file>``): per workload, and per
    scenario for renames, which use their files up."""
    return f"meta-{scenario.name if scenario.meta == 'rename' else scenario.meta}-qd{qd}"


def _fio_meta_argv(directory: Path, scenario: Scenario, qd: int, files_per_job: int) -> list[str]:
    """fio options of a metadata scenario at queue depth ``qd``: ``qd`` jobs of ``files_per_job`` 4 KiB files."""
    fio = shutil.which("fio") or "fio"
    return [fio, f"--name={_meta_files(scenario, qd)}", f"--directory={directory}", f"--numjobs={qd}",
            f"--nrfiles={files_per_job}", "--filesize=4k", "--bs=4k", "--openfiles=1", "--fallocate=none"]


def lay_out_meta(backing: Path, chosen: list[Scenario], qds: set[int],
                 files_per_job: dict[str, dict[int, int]]) -> None:
    """Create the files the ``stat`` and ``open`` scenarios look up, directly in ``backing``, before any mount."""
    for scenario in chosen:
        if scenario.meta not in LAID_OUT_META:
            continue
        for qd in sorted(qds):
            # written, not create_only (that leaves them empty, and fio lays them out again through the mount)
            _run_fio([*_fio_meta_argv(backing, scenario, qd, files_per_job[scenario.meta][qd]), "--rw=write"],
                     "fio layout")


#: The start line of one ``_time_stats`` run's processes (inherited at fork: see ``_time_stats``).
_stat_start: Any = None


def _wait_at_start(barrier: Any) -> None:
    global _stat_start
    _stat_start = barrier


def _stat_files(mountpoint: Path, meta: str, files: str, job: int, files_per_job: int) -> tuple[float, float, list[float]]:
    """``stat`` (``meta`` "open": open read-only; "read-file": open and read; "rename": rename to a new name)
    job ``job``'s files (fio's layout names) once each; (start, end, latencies), seconds (monotonic). A file's
    close is not timed; a rename's two names are looked up before the start, untimed (the kernel's LOOKUPs
    under the rename are then answered by a client's lookup cache, where the emulation has one)."""
    took = []
    paths = [mountpoint / f"{files}.{job}.{number}" for number in range(files_per_job)]
    if meta == "rename":
        for path in paths:
            os.stat(path)
            assert not os.path.lexists(f"{path}.renamed")
    _stat_start.wait()  # all jobs start together, as fio's do: forks spawned one by one would not
    started = time.monotonic()
    for path in paths:
        before = time.monotonic()
        if meta == "rename":
            os.rename(path, f"{path}.renamed")
            took.append(time.monotonic() - before)
        elif meta in ("open", "read-file"):
            fd = os.open(path, os.O_RDONLY)
            if meta == "read-file":
                os.read(fd, 65536)
            took.append(time.monotonic() - before)
            os.close(fd)
        else:
            os.stat(path)
            took.append(time.monotonic() - before)
    return started, time.monotonic(), took


def _time_stats(mountpoint: Path, scenario: Scenario, qd: int, files_per_job: int) -> dict:
    """``stat`` each file laid out for ``scenario`` at ``qd`` once, in ``qd`` processes; ``{iops, mean, p50, p99, n}``.

    Processes, not threads: 16 Python threads wait for the GIL after each ``stat``
    (up to its 5 ms switch interval), which would be measured as latency. They
    start together from a barrier (handed down at fork, not pickled), so the time
    the pool takes to fork them is not counted as the run's.
    """
    jobs = [(mountpoint, scenario.meta, _meta_files(scenario, qd), job, files_per_job) for job in range(qd)]
    context = multiprocessing.get_context("fork")
    with context.Pool(qd, initializer=_wait_at_start, initargs=(context.Barrier(qd),)) as pool:
        results = pool.starmap(_stat_files, jobs, chunksize=1)
    latencies = sorted(t for _, _, took in results for t in took)
    elapsed = max(end for _, end, _ in results) - min(start for start, _, _ in results)
    p50, p99 = _quantiles_s(latencies, P50, P99)
    return {"bw": 0.0, "iops": len(latencies) / elapsed, "mean": statistics.fmean(latencies), "p50": p50, "p99": p99,
            "n": len(latencies)}


def run_fio_meta(mountpoint: Path, scenario: Scenario, qd: int, files_per_job: int) -> dict:
    """Run a metadata scenario once over its files; return ``{iops, mean, p50, p99}`` (ops/s, then seconds).

    ``stat``, ``open``: the files laid out before the mount, each looked up (and opened) once (timed here).
    ``create``: fio in a fresh directory (made through the mount) where every file is new.
    """
    engine = META_WORKLOADS[scenario.meta][0]
    if engine is None:
        return _time_stats(mountpoint, scenario, qd, files_per_job)
    directory = mountpoint / f"create-qd{qd}"
    directory.mkdir()
    stdout = _run_fio([*_fio_meta_argv(directory, scenario, qd, files_per_job), f"--ioengine={engine}", "--rw=write",
                       "--group_reporting", "--output-format=json", f"--percentile_list={P50 * 100:g}:{P99 * 100:g}"])
    return {**_fio_result(stdout, "write"), "bw": 0.0}


def run_fio(directory: Path, scenario: Scenario, qd: int, direct: bool, runtime_s: float, file_bytes: int,
            aio: bool = False) -> dict:
    """Run fio; return ``{bw, iops, mean, p50, p99}`` of its reads or writes (bytes/s, ops/s, then seconds),
    and with ``fsync_every`` the fsync latency ``sync50``/``sync99`` (seconds)."""
    argv = [*_fio_argv(directory, qd, file_bytes, aio), f"--direct={int(direct)}", f"--bs={scenario.bs}",
            f"--rw={scenario.rw}", "--group_reporting", "--output-format=json", "--time_based",
            f"--runtime={runtime_s:g}s", f"--percentile_list={P50 * 100:g}:{P99 * 100:g}"]
    if scenario.fsync_every:
        argv.append(f"--fsync={scenario.fsync_every}")
    if scenario.rw == "randrw":
        argv += [f"--rwmixread={scenario.read_percent}", "--unified_rw_reporting=mixed"]
        return _fio_result(_run_fio(argv), "mixed")
    return _fio_result(_run_fio(argv), "write" if "write" in scenario.rw else "read")


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "B/s":
        return f"{value / MIB:.1f}MiB/s"
    if unit == "s":
        return f"{value * 1e3:.2f}ms"
    return f"{value:.0f}"


HEADER = (f"{'scenario':<27} {'qd':>2} {'io':<8} {'metric':<6} {'target':>12} {'achieved':>12} {'ratio':>6} "
          f"{'exact 95%':>11}")
#: Printed at the top of the table: what the last column means.
RANGE_NOTE = ("# exact 95%: where the ratio of an exact emulation falls 95 % of the time from this many ops "
              "(sampling alone; '-': no random target)")
#: A ratio further than this from 1 is a miss (issue #4's first goal) unless its sampling range covers it.
TOLERANCE = 0.10


@dataclass
class Tally:
    """Cells with a target seen so far, and those off it by more than :data:`TOLERANCE`, for the closing summary."""

    cells: int = 0
    misses: list[str] = field(default_factory=list)
    too_few_ops: list[str] = field(default_factory=list)

    def add(self, row: str, ratio: float | None, spread: tuple[float, float] | None) -> None:
        """Count one printed row with its ``ratio`` (None: no target) and sampling range."""
        if ratio is None:
            return
        self.cells += 1
        if abs(ratio - 1) <= TOLERANCE:
            return
        if spread is not None and spread[0] <= ratio <= spread[1]:
            self.too_few_ops.append(row)
        else:
            self.misses.append(row)

    def report(self) -> str:
        """One summary line, then the rows outside the tolerance."""
        lines = [f"# {self.cells} cells with a target: {self.cells - len(self.misses) - len(self.too_few_ops)} "
                 f"within ±{TOLERANCE:.0%}, {len(self.misses)} outside, {len(self.too_few_ops)} outside but "
                 "within what sampling alone gives (too few ops to tell)"]
        lines += [f"#   outside: {row}" for row in self.misses]
        lines += [f"#   too few ops: {row}" for row in self.too_few_ops]
        return "\n".join(lines)


def _row(name: str, qd: int, direct: bool | None, metric: str, want: float | None, have: float, unit: str,
         spread: tuple[float, float] | None = None, tally: Tally | None = None) -> str:
    ratio = have / want if want else None
    io = "-" if direct is None else "direct" if direct else "buffered"
    shown = "-" if spread is None or ratio is None else f"{spread[0]:.2f}-{spread[1]:.2f}" if spread[1] < 100 else f">={spread[0]:.2f}"
    row = (f"{name:<27} {qd:>2} {io:<8} {metric:<6} {_fmt(want, unit):>12} {_fmt(have, unit):>12} "
           f"{'-' if ratio is None else f'{ratio:.2f}':>6} {shown:>11}")
    if tally is not None:
        tally.add(row, ratio, spread)
    return row


def with_think_time(target: Target, qd: int, got: dict) -> Target:
    """``target`` with a delay-bound rate lowered by the time each job spends between its ops.

    ``qd`` jobs each issue one op after the other, so by the response time law
    (``N = X (R + Z)``: Denning & Buzen, "The Operational Analysis of Queueing
    Network Models", ACM Computing Surveys 10(3), 1978) a job's cycle is the op's
    latency ``R`` plus its think time ``Z`` between ops, which the run gives:
    ``Z = qd / X - R`` from the achieved rate ``X`` and mean latency ``R``. The
    application spends ``Z`` with any storage (fio's own work, ~µs; a Python
    ``stat`` loop's, tens of µs: 3-5 % of a 1 ms target), so the rate a storage
    with the target latency gives it is ``qd / (mean target + Z)``. Only where a
    delay sets the rate (``Target.latency_quantile``); a throttle's rate is its own.
    """
    if target.iops is None or target.latency_quantile is None or not got.get("iops"):
        return target
    think_s = max(0.0, qd / got["iops"] - got["mean"])
    iops = qd / (qd / target.iops + think_s)
    scale = iops / target.iops
    bw = None if target.bw_bytes_per_s is None else target.bw_bytes_per_s * scale
    return dataclasses.replace(target, iops=iops, bw_bytes_per_s=bw)


def _mean_row(target: Target, got: dict) -> list[tuple[str, float | None, float, str]]:
    """The ``mean`` latency row, for targets that have one (:attr:`Target.lat_mean_s`)."""
    return [("mean", target.lat_mean_s, got["mean"], "s")] if target.lat_mean_s is not None else []


def _spread(target: Target, metric: str, got: dict) -> tuple[float, float] | None:
    """The sampling range of ``metric``'s ratio for ``got`` (:func:`sampling_range`); None without a random target."""
    if target.latency_quantile is None or metric not in ("bw", "iops", "p50", "p99", "sync50", "sync99"):
        return None
    if metric.startswith("sync") != (target.sync_p50_s is not None):
        return None  # the quantile function is of the other op's latency
    if metric in ("bw", "iops"):
        if target.iops is None:
            return None
        metric = "iops"  # bandwidth = IOPS x request size: the same range
    return sampling_range(target.latency_quantile, metric, got.get("sync_n" if metric.startswith("sync") else "n", 0))


def measure_service_time(work: Path, runtime_s: float, file_bytes: int, worker_flags: tuple[str, ...],
                         aio: bool = False) -> ServiceTime:
    """4 KiB random reads through a mount with no layers, QD1 direct: the service time ``add`` targets build on."""
    probe = Scenario("service-time", [], targets={1: Target()})
    with Mount(work / "backing", work / "mnt", [], worker_flags) as mount:
        got = run_fio(mount.mountpoint, probe, 1, True, runtime_s, file_bytes, aio)
    return ServiceTime(p50_s=got["p50"], mean_s=got["mean"])


def run_table(chosen: list[Scenario], modes: list[tuple[int, bool]], work: Path, runtime_s: float,
              file_bytes: int, worker_flags: tuple[str, ...] = (), fuse_trace: bool = False,
              aio: bool = False, meta_files: dict[str, dict[int, int]] | None = None) -> None:
    """Measure every scenario in every mode and print one row per metric.

    With ``fuse_trace``, also the read latency p50/p99 the kernel saw at the FUSE
    device (rows ``fuse50``/``fuse99``, :mod:`fuse_trace`): what the worker's
    side adds, without the application's own wake-up and scheduling.
    """
    service = None
    if any(has_added_delay(s.layers) for s in chosen):
        service = measure_service_time(work, runtime_s, file_bytes, worker_flags, aio)
        print(f"# service time (4 KiB random reads, no layers, QD1 direct): p50 {service.p50_s * 1e3:.3f} ms, "
              f"mean {service.mean_s * 1e3:.3f} ms; added to the targets of add-mode delays", flush=True)
    if any(s.name == "bare" for s in chosen):
        warm_up(work, modes, runtime_s, file_bytes, worker_flags, aio)
    print(RANGE_NOTE)
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    bare_bw: dict[tuple[int, bool], float] = {}
    tally = Tally()
    for scenario in chosen:
        if scenario.meta:
            _run_meta(scenario, sorted({qd for qd, _ in modes}), work, worker_flags,
                      (meta_files or META_FILES_PER_JOB)[scenario.meta], tally)
            continue
        for group in ([[mode] for mode in modes] if scenario.remount else [modes]):
            _run_modes(scenario, group, work, runtime_s, file_bytes, worker_flags, fuse_trace, aio, service, bare_bw,
                       tally)
    print(tally.report(), flush=True)


def warm_up(work: Path, modes: list[tuple[int, bool]], runtime_s: float, file_bytes: int,
            worker_flags: tuple[str, ...], aio: bool) -> None:
    """Read the files through a mount without layers once in every mode, untimed, before "bare".

    "bare" is the baseline of ``noop-stack`` and of the machine-bound targets, and
    it runs first: measured cold, right after the layout, its QD1 reads ran at
    276 MiB/s where the do-nothing stack read 1,412 MiB/s minutes later (the first
    use of memory the host took back, free page reporting, costs a fault each).
    """
    probe = Scenario("warm-up", [], rw="read", bs=128 * 1024, targets={1: Target(), 16: Target()})
    with Mount(work / "backing", work / "mnt", [], worker_flags) as mount:
        for qd, direct in modes:
            run_fio(mount.mountpoint, probe, qd, direct, min(runtime_s, WARM_UP_S), file_bytes, aio)
    print(f"# warm-up: the files read through a mount without layers, {min(runtime_s, WARM_UP_S):g} s per mode, "
          "untimed", flush=True)


def _run_meta(scenario: Scenario, qds: list[int], work: Path, worker_flags: tuple[str, ...],
              files_per_job: dict[int, int], tally: Tally) -> None:
    """Measure a metadata scenario at each queue depth on one mount and print its rows (I/O mode "-")."""
    with Mount(work / "backing", work / "mnt", scenario.layers, worker_flags) as mount:
        for qd in qds:
            got = run_fio_meta(mount.mountpoint, scenario, qd, files_per_job[qd])
            target = with_think_time(scenario.target(qd, 0.0), qd, got)
            for metric, want, have, unit in (("iops", target.iops, got["iops"], ""), *_mean_row(target, got),
                                             ("p50", target.lat_p50_s, got["p50"], "s"),
                                             ("p99", target.lat_p99_s, got["p99"], "s")):
                print(_row(scenario.name, qd, None, metric, want, have, unit, _spread(target, metric, got), tally),
                      flush=True)
    for created in (work / "backing").glob("create-qd*"):
        shutil.rmtree(created)


def _run_modes(scenario: Scenario, modes: list[tuple[int, bool]], work: Path, runtime_s: float, file_bytes: int,
               worker_flags: tuple[str, ...], fuse_trace: bool, aio: bool, service: ServiceTime | None,
               bare_bw: dict[tuple[int, bool], float], tally: Tally) -> None:
    """Measure ``scenario`` in ``modes`` on one mount (one worker) and print its rows."""
    with Mount(work / "backing", work / "mnt", scenario.layers, (*worker_flags, *scenario.worker_args)) as mount:
        for qd, direct in modes:
            trace = FuseRequestTrace(mount.mountpoint) if fuse_trace else None
            with trace or contextlib.nullcontext():
                got = run_fio(mount.mountpoint, scenario, qd, direct, runtime_s, file_bytes, aio)
            target = with_think_time(
                scenario.target(qd, runtime_s, service if has_added_delay(scenario.layers) else None, direct), qd, got)
            if scenario.name == "bare":
                bare_bw[(qd, direct)] = got["bw"]
            elif scenario.name == "noop-stack":
                target = Target(bw_bytes_per_s=bare_bw.get((qd, direct)))
            elif scenario.machine_bound:
                machine_bw = bare_bw.get((qd, direct), math.inf)
                if machine_bw < (target.bw_bytes_per_s or math.inf):
                    target = Target(bw_bytes_per_s=machine_bw)  # what this machine moves, not the limit
            rows = [("bw", target.bw_bytes_per_s, got["bw"], "B/s"), ("iops", target.iops, got["iops"], ""),
                    *_mean_row(target, got), ("p50", target.lat_p50_s, got["p50"], "s"),
                    ("p99", target.lat_p99_s, got["p99"], "s")]
            if "sync50" in got:
                rows += [("sync50", target.sync_p50_s, got["sync50"], "s"),
                         ("sync99", target.sync_p99_s, got["sync99"], "s")]
            for metric, want, have, unit in rows:
                print(_row(scenario.name, qd, direct, metric, want, have, unit, _spread(target, metric, got), tally),
                      flush=True)
            if trace is not None and len(latencies := trace.latencies()) > 1:  # the same quantiles, at the device
                p50, p99 = _quantiles_s(latencies, P50, P99)
                for metric, want, have in (("fuse50", target.lat_p50_s, p50), ("fuse99", target.lat_p99_s, p99)):
                    print(_row(scenario.name, qd, direct, metric, want, have, "s"), flush=True)


def run_noop(modes: list[tuple[int, bool]], work: Path, runtime_s: float, file_bytes: int, repeat: int) -> None:
    """Do-nothing stack vs bare passthrough, alternated ``repeat`` times per mode; median ratio per mode.

    Issue #4's goal: the do-nothing stack keeps at least 0.90 of bare bandwidth.
    """
    by_name = {s.name: s for s in scenarios()}
    bare, noop = by_name["bare"], by_name["noop-stack"]
    print(f"{'qd':>2} {'io':<8} {'round':>5} {'bare':>12} {'noop-stack':>12} {'ratio':>6}")
    for qd, direct in modes:
        ratios = []
        for round_ in range(repeat):
            bw = {}
            for scenario in (bare, noop) if round_ % 2 == 0 else (noop, bare):
                with Mount(work / "backing", work / "mnt", scenario.layers) as mount:
                    bw[scenario.name] = run_fio(mount.mountpoint, scenario, qd, direct, runtime_s, file_bytes)["bw"]
            ratios.append(bw["noop-stack"] / bw["bare"])
            print(f"{qd:>2} {'direct' if direct else 'buffered':<8} {round_ + 1:>5} {_fmt(bw['bare'], 'B/s'):>12} "
                  f"{_fmt(bw['noop-stack'], 'B/s'):>12} {ratios[-1]:>6.2f}", flush=True)
        verdict = "meets" if statistics.median(ratios) >= 0.90 else "misses"
        print(f"{qd:>2} {'direct' if direct else 'buffered':<8} median ratio {statistics.median(ratios):.3f} "
              f"({verdict} the >= 0.90 goal)", flush=True)


def main() -> None:
    """Lay out the files, then run the chosen scenarios and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke mode: every scenario, QD1 direct and QD16 buffered, {QUICK_RUNTIME_S:g} s each")
    parser.add_argument("--noop", action="store_true",
                        help="only the do-nothing stack vs bare, alternated --repeat times per mode")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each mode with --noop (default 3)")
    parser.add_argument("--only", action="append", default=[], metavar="GLOB",
                        help="run only scenarios whose name matches GLOB (repeatable; 'bare' is added for "
                             "'noop-stack' and 'profile-efs-seq')")
    parser.add_argument("--runtime-s", type=float, default=None, help="fio run time per measurement, seconds")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the backing files and the mount go (default: a fresh temporary directory)")
    parser.add_argument("--wake-compensation", choices=["off", "worker", "round-trip"], default=None,
                        help="the workers' --wake-compensation (default: the worker's default)")
    parser.add_argument("--mode", action="append", default=[], choices=["qd1-direct", "qd1-buffered",
                        "qd16-direct", "qd16-buffered"], help="run only these queue depth / cache modes (repeatable)")
    parser.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                        help="pass ARG to every worker, e.g. --worker-arg=--max-background=0 (repeatable)")
    parser.add_argument("--aio", action="store_true",
                        help="queue depth as one libaio job's iodepth instead of psync jobs (direct modes only)")
    parser.add_argument("--list", action="store_true", help="print the scenarios with their targets and exit")
    parser.add_argument("--fuse-trace", action="store_true",
                        help="also print read latency p50/p99 at the FUSE device (kernel tracepoints via perf; root)")
    args = parser.parse_args()
    if args.fuse_trace and (reason := available()) is not None:
        parser.error(f"--fuse-trace: {reason}")
    runtime_s = args.runtime_s or (QUICK_RUNTIME_S if args.quick else DEFAULT_RUNTIME_S)
    file_bytes = QUICK_FILE_BYTES if args.quick else DEFAULT_FILE_BYTES
    modes = QUICK_MODES if args.quick else FULL_MODES
    if args.mode:
        modes = [(qd, direct) for qd, direct in FULL_MODES
                 if f"qd{qd}-{'direct' if direct else 'buffered'}" in args.mode]
    if args.aio:
        if args.noop:
            parser.error("--aio: not with --noop")
        if any(not direct for _, direct in modes):
            parser.error("--aio: libaio is asynchronous only for direct I/O; choose direct --mode(s)")
    worker_flags = (*(("--wake-compensation", args.wake_compensation) if args.wake_compensation else ()),
                    *args.worker_arg)
    chosen = scenarios()
    if args.only:
        wanted = {s.name for s in chosen if any(fnmatch.fnmatchcase(s.name, g) for g in args.only)}
        if any(s.name in wanted and (s.name == "noop-stack" or s.machine_bound) for s in chosen):
            wanted.add("bare")  # their targets are what the bare mount moved
        chosen = [s for s in chosen if s.name in wanted]
        if not chosen:
            parser.error(f"no scenario matches {args.only}; --list shows them")
    if args.list:
        for s in chosen:
            print(s.name, json.dumps(s.layers), {qd: s.target(qd, runtime_s) for qd in (1, 16)})
        return
    with tempfile.TemporaryDirectory(prefix="interposer-fidelity-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        (work / "backing").mkdir()
        started = time.monotonic()
        host = HostMeter()
        print(f"# machine: {machine()}", flush=True)
        adds = not args.noop and any(has_added_delay(s.layers) for s in chosen)
        lay_out(work / "backing", {qd for qd, _ in modes} | ({1} if adds else set()), file_bytes, args.aio)
        meta_files = QUICK_META_FILES_PER_JOB if args.quick else META_FILES_PER_JOB
        lay_out_meta(work / "backing", chosen, {qd for qd, _ in modes}, meta_files)
        print(f"# fio files laid out in {time.monotonic() - started:.1f} s (before any policy); "
              f"fio {runtime_s:g} s per measurement", flush=True)
        if args.noop:
            run_noop(modes, work, runtime_s, file_bytes, args.repeat)
        else:
            run_table(chosen, modes, work, runtime_s, file_bytes, worker_flags, args.fuse_trace, args.aio,
                      meta_files)
        print(f"# total {time.monotonic() - started:.0f} s; {host.report()}", flush=True)


if __name__ == "__main__":
    main()
