"""Fidelity benchmark: does the application see what the layers emulate?

For each scenario (every profile, single throttle and delay settings, and a stack
of do-nothing layers vs bare passthrough) it mounts a fuse-worker with that
policy, runs fio against the mount at queue depth 1 and 16 (``numjobs`` psync
jobs, so it works buffered and direct alike), with buffered and direct I/O, and
prints target vs achieved bandwidth, IOPS and latency p50/p99 with their ratio.

Usage (as root, from the repo's venv)::

    .venv/bin/python bench/fidelity/fidelity.py            # full run (minutes; quiet machine)
    .venv/bin/python bench/fidelity/fidelity.py --quick    # smoke run (~20 s)

Targets: a throttle's bandwidth/IOPS is its configured rate; a delay's latency
p50 is the distribution's median (the layers add to the backing store's own
latency, which the "bare" scenario shows); where several limits apply the target
is the tightest one (e.g. IOPS at QD1 with a 1 ms delay is at most 1000).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from interposer.proto.profiles import PROFILES

MIB = 1 << 20
#: Default fio run time per measurement, seconds (full mode).
DEFAULT_RUNTIME_S = 20.0
#: fio run time per measurement in --quick mode, seconds.
QUICK_RUNTIME_S = 1.0
#: Size of each fio job's file, bytes (full / quick).
DEFAULT_FILE_BYTES = 256 * MIB
QUICK_FILE_BYTES = 8 * MIB
#: How long to wait for a worker to mount, seconds.
MOUNT_TIMEOUT_S = 15.0


@dataclass
class Target:
    """What a scenario should achieve; None = not a target of this scenario."""

    bw_bytes_per_s: float | None = None
    iops: float | None = None
    lat_p50_s: float | None = None


@dataclass
class Scenario:
    """A policy, the fio workload that probes it, and its targets per queue depth."""

    name: str
    layers: list[dict]
    rw: str = "randread"
    bs: int = 4096
    targets: dict[int, Target] = field(default_factory=dict)  # queue depth → target


def _profile_targets(name: str, bs: int) -> dict[int, Target]:
    """Tightest of the profile's IOPS, bandwidth and latency limits, for read workloads."""
    iops_limit, bw_limit, median_s = math.inf, math.inf, 0.0
    for layer in PROFILES[name].layers:
        kind = type(layer).__name__
        if kind == "ThrottleLayer" and (not layer.ops or "read" in layer.ops):
            iops_limit = min(iops_limit, layer.iops or math.inf)
            bw_limit = min(bw_limit, layer.rate_bytes_per_s or math.inf)
        elif kind == "DelayLayer":
            dist = layer.resolved_distribution
            median_s += {"fixed": lambda d: d.delay_s, "uniform": lambda d: (d.min_s + d.max_s) / 2,
                         "normal": lambda d: d.mean_s, "lognormal": lambda d: d.median_s,
                         "pareto": lambda d: d.scale_s * 2 ** (1 / d.alpha)}[type(dist).__name__.removesuffix("Distribution").lower()](dist)
    out = {}
    for qd in (1, 16):
        iops = min(iops_limit, bw_limit / bs, qd / median_s if median_s else math.inf)
        out[qd] = Target(bw_bytes_per_s=iops * bs, iops=iops, lat_p50_s=median_s or None)
    return out


def scenarios(quick: bool) -> list[Scenario]:
    """The scenarios to run (a small subset in quick mode)."""
    noop = [{"type": "fault", "probability": 0.0}, {"type": "delay", "delay_s": 0.0},
            {"type": "throttle", "rate_bytes_per_s": 1 << 40, "iops": 1 << 30},
            {"type": "metadata", "time_jitter_s": 0}]
    out = [
        Scenario("bare", [], rw="read", bs=128 * 1024),
        Scenario("noop-stack", noop, rw="read", bs=128 * 1024),
        Scenario("throttle-20MiB/s", [{"type": "throttle", "rate_bytes_per_s": 20 * MIB}], rw="read", bs=128 * 1024,
                 targets={qd: Target(bw_bytes_per_s=20 * MIB) for qd in (1, 16)}),
        Scenario("throttle-500iops", [{"type": "throttle", "iops": 500}],
                 targets={qd: Target(iops=500) for qd in (1, 16)}),
        Scenario("delay-fixed-2ms", [{"type": "delay", "delay_s": 0.002, "ops": ["read"]}],
                 targets={1: Target(lat_p50_s=0.002, iops=500), 16: Target(lat_p50_s=0.002, iops=8000)}),
        Scenario("delay-lognormal-1ms", [{"type": "delay", "ops": ["read"],
                                          "distribution": {"type": "lognormal", "median_s": 0.001, "sigma": 0.5}}],
                 targets={qd: Target(lat_p50_s=0.001) for qd in (1, 16)}),
    ]
    out += [Scenario(f"profile-{name}", [{"type": "profile", "name": name}], targets=_profile_targets(name, 4096))
            for name in PROFILES]
    if quick:
        keep = {"bare", "noop-stack", "throttle-20MiB/s", "delay-fixed-2ms", "profile-gp3"}
        out = [s for s in out if s.name in keep]
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

    def __init__(self, work: Path, layers: list[dict]) -> None:
        self.backing, self.mountpoint = work / "backing", work / "mnt"
        self.backing.mkdir(exist_ok=True)
        self.mountpoint.mkdir(exist_ok=True)
        policy = work / "policy.json"
        policy.write_text(json.dumps({"layers": layers}))
        self.argv = [sys.executable, "-m", "interposer.fuse_worker", "--backing-dir", str(self.backing),
                     "--mountpoint", str(self.mountpoint), "--policy-file", str(policy), "--log-level", "WARNING"]

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
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=False, capture_output=True)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_fio(directory: Path, scenario: Scenario, qd: int, direct: bool, runtime_s: float, file_bytes: int) -> dict:
    """Run fio; return ``{bw, iops, p50, p99}`` of reads (bytes/s, ops/s, seconds)."""
    argv = [shutil.which("fio") or "fio", "--name=fidelity", f"--directory={directory}", "--ioengine=psync",
            f"--direct={int(direct)}", f"--bs={scenario.bs}", f"--rw={scenario.rw}", f"--numjobs={qd}",
            f"--size={file_bytes // qd if qd > 1 else file_bytes}", "--group_reporting", "--output-format=json",
            "--time_based", f"--runtime={runtime_s:g}s", "--percentile_list=50:99"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    read = json.loads(proc.stdout[proc.stdout.find("{"):])["jobs"][0]["read"]
    pct = read["clat_ns"].get("percentile", {})
    return {"bw": float(read["bw_bytes"]), "iops": float(read["iops"]),
            "p50": pct.get("50.000000", 0) / 1e9, "p99": pct.get("99.000000", 0) / 1e9}


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "B/s":
        return f"{value / MIB:.1f}MiB/s"
    if unit == "s":
        return f"{value * 1e3:.2f}ms"
    return f"{value:.0f}"


def main() -> None:
    """Run the scenarios and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: few scenarios, QD1 direct, 1 s each")
    parser.add_argument("--runtime-s", type=float, default=None, help="fio run time per measurement, seconds")
    args = parser.parse_args()
    runtime_s = args.runtime_s or (QUICK_RUNTIME_S if args.quick else DEFAULT_RUNTIME_S)
    file_bytes = QUICK_FILE_BYTES if args.quick else DEFAULT_FILE_BYTES
    modes = [(1, True)] if args.quick else [(qd, direct) for qd in (1, 16) for direct in (True, False)]
    header = f"{'scenario':<22} {'qd':>2} {'io':<8} {'metric':<6} {'target':>12} {'achieved':>12} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    bare_bw: dict[tuple[int, bool], float] = {}
    for scenario in scenarios(args.quick):
        with tempfile.TemporaryDirectory(prefix="interposer-fidelity-") as tmp, Mount(Path(tmp), scenario.layers) as m:
            for qd, direct in modes:
                got = run_fio(m.mountpoint, scenario, qd, direct, runtime_s, file_bytes)
                io = "direct" if direct else "buffered"
                target = scenario.targets.get(qd, Target())
                if scenario.name == "bare":
                    bare_bw[(qd, direct)] = got["bw"]
                if scenario.name == "noop-stack":
                    target = Target(bw_bytes_per_s=bare_bw.get((qd, direct)))
                rows = [("bw", target.bw_bytes_per_s, got["bw"], "B/s"), ("iops", target.iops, got["iops"], ""),
                        ("p50", target.lat_p50_s, got["p50"], "s"), ("p99", None, got["p99"], "s")]
                for metric, want, have, unit in rows:
                    ratio = f"{have / want:.2f}" if want else "-"
                    print(f"{scenario.name:<22} {qd:>2} {io:<8} {metric:<6} {_fmt(want, unit):>12} "
                          f"{_fmt(have, unit):>12} {ratio:>6}", flush=True)


if __name__ == "__main__":
    main()
