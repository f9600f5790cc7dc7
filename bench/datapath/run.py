"""Data-path benchmark: fio through an interposed mount vs the backing directory itself.

For each test, runs fio on the native backing directory, on passthrough mounts with
no layers (pyfuse3's own request loop and the worker's lean one), and on a
passthrough mount whose policy holds one of each layer set to do nothing (fault
probability 0, delay 0 s, throttle at 1 TiB/s) — the cost of the layer machinery —
and on one with kernel passthrough (``--kernel-passthrough``: the kernel serves reads
and writes from the backing files). Every variant is mounted for the whole run and the variants take turns within each
repeat, in a rotated order, so that drift of the VM (measured: ±30 % over ten
minutes) hits them alike. Prints medians of ``--repeat`` runs and the ratio to
native, the worker CPU time per application I/O (user + system, from
``/proc/<pid>/stat``: less noisy than throughput on a shared machine), the worker's
RSS and how long the mount took to answer. Page caches are dropped before each run
(``/proc/sys/vm/drop_caches``, needs root). ``--pause-page-reporting`` measures as on
a host that does not take back freed guest memory (``bench/_host.py``): on a VM
that does, a write through the mount pays the host's first-touch cost for two page
caches where a native write pays it for one.

Usage: ``.venv/bin/python bench/datapath/run.py [--quick] [--repeat N] [--json] [--variant NAME ...]
[--test NAME ...] [--pause-page-reporting]``
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TypeVar

import click

from interposer.cli._procs import cpu_seconds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _host import HostMeter, machine, page_reporting_paused  # noqa: E402 - bench/_host.py

NOOP_LAYERS = json.dumps({"description": "every layer, doing nothing", "layers": [
    {"type": "fault", "errno": "EIO", "probability": 0.0},
    {"type": "delay", "delay_s": 0.0},
    {"type": "throttle", "rate_bytes_per_s": 1 << 40},
]})


def drop_caches() -> None:
    """Write back and drop the page cache, dentries and inodes (root only; ignored otherwise)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def fio(directory: Path, args: list[str]) -> dict:
    """Run fio with ``args`` in ``directory``; return its JSON job (group_reporting)."""
    cmd = ["fio", "--name=bench", f"--directory={directory}", "--group_reporting", "--output-format=json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]


class Test:
    """One fio workload and how to read its figure of merit."""

    def __init__(self, name: str, unit: str, prepare: list[str] | None, args: list[str],
                 value: Callable[[dict], float], cold: bool = True) -> None:
        self.name, self.unit, self.prepare, self.args, self.value, self.cold = name, unit, prepare, args, value, cold

    def run(self, directory: Path, cpu_s: Callable[[], float] = lambda: 0.0) -> tuple[float, float]:
        """Run the workload in ``directory``; return (figure of merit, ``cpu_s()`` seconds per I/O)."""
        if self.prepare:
            fio(directory, self.prepare)
        if self.cold:
            drop_caches()
        before = cpu_s()
        job = fio(directory, self.args)
        ios = job["read"]["total_ios"] + job["write"]["total_ios"]
        return self.value(job), (cpu_s() - before) / max(ios, 1)


def metadata_ops_per_s(directory: Path, seconds: float,
                       cpu_s: Callable[[], float] = lambda: 0.0) -> tuple[float, float]:
    """create + stat + unlink of empty files for ``seconds``; each call counts as one op.

    Returns:
        (ops per second, ``cpu_s()`` seconds per op).
    """
    code = (
        "import os, sys, time\n"
        "d, end, n = sys.argv[1], time.monotonic() + float(sys.argv[2]), 0\n"
        "while time.monotonic() < end:\n"
        "    for i in range(100):\n"
        "        p = os.path.join(d, f'f{i}')\n"
        "        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)); os.stat(p); os.unlink(p)\n"
        "    n += 300\n"
        "print(n)\n"
    )
    before = cpu_s()
    out = subprocess.run([sys.executable, "-c", code, str(directory), str(seconds)],
                         capture_output=True, text=True, check=True)
    ops = int(out.stdout)
    return ops / seconds, (cpu_s() - before) / max(ops, 1)


class WriteOnlySeqWrite:
    """``dd bs=1M conv=fsync`` into a new file: the write-only open of cp, dd and checkpoint writers.

    fio opens its files read-write, so its write tests never show how a mount treats a
    write-only open (the worker bypasses the page cache for them: docs/ARCHITECTURE.md).
    The figure of merit is MB/s (10^6 bytes) from the wall time of the whole ``dd``,
    the final ``fsync`` included; per-I/O CPU is per 1 MiB block.
    """

    name, unit = "seq write 1 MiB, write-only open (dd, incl. fsync)", "MB/s"

    def __init__(self, size_bytes: int) -> None:
        self.blocks = size_bytes >> 20

    def run(self, directory: Path, cpu_s: Callable[[], float] = lambda: 0.0) -> tuple[float, float]:
        """Write ``blocks`` MiB to ``directory/dd.out``; return (MB/s, ``cpu_s()`` seconds per MiB)."""
        drop_caches()
        before_cpu, start = cpu_s(), time.monotonic()
        subprocess.run(["dd", "if=/dev/zero", f"of={directory / 'dd.out'}", "bs=1M", f"count={self.blocks}",
                        "conv=fsync"], capture_output=True, check=True)
        elapsed = time.monotonic() - start
        return (self.blocks << 20) / elapsed / 1e6, (cpu_s() - before_cpu) / self.blocks


class CopyFile:
    """``cp`` of a file inside the volume, cold, then ``fsync`` of the copy.

    GNU cp (≥ 9) copies with ``copy_file_range(2)``; through the mount the worker
    serves that inside the backing fs when no layer acts on reads or writes
    (docs/ARCHITECTURE.md, "Ops pyfuse3 does not dispatch"), else the kernel copies
    through FUSE read and write requests. MB/s (10^6 bytes) from the wall time of
    ``cp`` and the ``fsync``; per-I/O CPU is per MiB copied.
    """

    name, unit = "cp (copy_file_range), cold, incl. fsync", "MB/s"

    def __init__(self, size_bytes: int) -> None:
        self.blocks = size_bytes >> 20

    def run(self, directory: Path, cpu_s: Callable[[], float] = lambda: 0.0) -> tuple[float, float]:
        """Write a ``blocks`` MiB source, drop caches, time ``cp`` + fsync; return (MB/s, seconds per MiB)."""
        source, copy = directory / "cp.src", directory / "cp.dst"
        subprocess.run(["dd", "if=/dev/urandom", f"of={source}", "bs=1M", f"count={self.blocks}", "conv=fsync"],
                       capture_output=True, check=True)
        drop_caches()
        before_cpu, start = cpu_s(), time.monotonic()
        subprocess.run(["cp", str(source), str(copy)], check=True)
        fd = os.open(copy, os.O_WRONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        elapsed = time.monotonic() - start
        return (self.blocks << 20) / elapsed / 1e6, (cpu_s() - before_cpu) / self.blocks


def tests(size: str, runtime_s: float) -> list[Test | WriteOnlySeqWrite | CopyFile]:
    bw = lambda job: (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / 1e6  # noqa: E731
    iops = lambda job: job["read"]["iops"] + job["write"]["iops"]  # noqa: E731
    layout = ["--rw=write", "--bs=1M", f"--size={size}", "--ioengine=psync"]
    timed = ["--time_based", f"--runtime={runtime_s:g}s"]
    rand = ["--rw=randread", "--bs=4k", f"--size={size}", "--ioengine=psync", "--fadvise_hint=0", *timed]
    size_bytes = int(size[:-1]) << {"M": 20, "G": 30}[size[-1]]
    return [
        Test("seq write 1 MiB (incl. fsync)", "MB/s", None,
             ["--rw=write", "--bs=1M", f"--size={size}", "--ioengine=psync", "--end_fsync=1"], bw),
        WriteOnlySeqWrite(size_bytes),
        Test("seq read 1 MiB, cold", "MB/s", layout, ["--rw=read", "--bs=1M", f"--size={size}", "--ioengine=psync"], bw),
        Test("rand read 4 KiB QD1", "IOPS", layout, rand, iops),
        Test("rand read 4 KiB 16 jobs", "IOPS", layout, [*rand, "--numjobs=16", "--filename=bench.0.0"], iops),
        CopyFile(size_bytes),
    ]


class Mount:
    """A worker process serving ``backing`` at ``mountpoint``."""

    def __init__(self, backing: Path, mountpoint: Path, policy: str | None, work: Path,
                 extra: tuple[str, ...] = (), launcher: tuple[str, ...] = ("-m", "interposer.fuse_worker")) -> None:
        """Start the worker (``python`` + ``launcher`` + its flags) and wait for the mount."""
        argv = [sys.executable, *launcher, "--backing-dir", str(backing),
                "--mountpoint", str(mountpoint), "--volume-id", "bench", "--log-level", "WARNING", *extra]
        if policy:
            policy_file = work / f"{mountpoint.name}.policy.json"
            policy_file.write_text(policy)
            argv += ["--policy-file", str(policy_file)]
        start = time.monotonic()
        self.proc = subprocess.Popen(argv)
        while not os.path.ismount(mountpoint):
            if self.proc.poll() is not None or time.monotonic() - start > 30:
                raise RuntimeError("worker did not mount")
            time.sleep(0.005)
        self.ready_s = time.monotonic() - start
        self.mountpoint = mountpoint

    def cpu_s(self) -> float:
        """CPU time the worker used so far (user + system), seconds."""
        return cpu_seconds(self.proc.pid)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=False)
        self.proc.wait(30)


#: A variant of a benchmark: (name, policy JSON — "" for none, None for the backing
#: directory itself, without a mount —, extra worker flags).
Variant = tuple[str, str | None, tuple[str, ...]]
T = TypeVar("T")


@contextmanager
def variant_targets(work: Path, variants: Sequence[Variant]) -> Iterator[tuple[dict[str, Path], dict[str, Mount]]]:
    """A fresh backing directory under ``work`` per variant, mounted as the variant says.

    Yields:
        (name → directory to run the workload in: the mount, or the backing
        directory itself for a ``None`` policy; name → its :class:`Mount`). The
        mounts are unmounted on exit.
    """
    targets: dict[str, Path] = {}
    mounts: dict[str, Mount] = {}
    try:
        for i, (name, policy, extra) in enumerate(variants):
            backing = work / f"backing-{i}"
            backing.mkdir()
            targets[name] = backing
            if policy is not None:
                mnt = work / f"mnt-{i}"
                mnt.mkdir()
                mounts[name] = Mount(backing, mnt, policy or None, work, extra)
                targets[name] = mnt
        yield targets, mounts
    finally:
        for mount in mounts.values():
            mount.close()


def rotated(items: Sequence[T], turn: int) -> list[T]:
    """``items`` starting at position ``turn`` (mod length): each repeat starts with another variant, so drift hits all alike."""
    start = turn % len(items)
    return [*items[start:], *items[:start]]


@click.command()
@click.option("--quick", is_flag=True, help="Smoke run: small files, 1 s runs, one repeat.")
@click.option("--repeat", default=3, show_default=True, help="Runs per cell; the median is reported.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--variant", "only", multiple=True, metavar="NAME",
              help="Run only this variant (repeatable; native always runs): one of the table's column names.")
@click.option("--test", "only_tests", multiple=True, metavar="NAME",
              help="Run only this test (repeatable): one of the table's row names, without the unit.")
@click.option("--dir", "base", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to put backing dirs (default: system temp; should be on the disk under test).")
@click.option("--pause-page-reporting", is_flag=True,
              help="Measure as on a host that does not take back freed guest memory: stop the guest's free "
                   "page reporting for the run (root; restored after). See bench/_host.py.")
def main(quick: bool, repeat: int, as_json: bool, only: tuple[str, ...], only_tests: tuple[str, ...],
         base: Path | None, pause_page_reporting: bool) -> None:
    """Print fio results native vs interposed, as ratios measured in the same run."""
    if shutil.which("fio") is None:
        raise click.ClickException("fio is not installed (make setup)")
    size, runtime_s, meta_s = ("64M", 1.0, 1.0) if quick else ("1G", 10.0, 10.0)
    repeat = 1 if quick else repeat
    # (name, policy or None for the bare directory, extra worker flags)
    variants: list[Variant] = [("native", None, ()), ("passthrough, pyfuse3 loop", "", ("--session-loop", "pyfuse3")),
                ("lean loop, no busy poll", "", ("--session-loop", "lean", "--busy-poll-us", "0")),
                ("passthrough, lean loop", "", ("--session-loop", "lean")), ("+ no-op layers", NOOP_LAYERS, ()),
                ("kernel passthrough", "", ("--kernel-passthrough",))]
    unknown = set(only) - {v for v, _, _ in variants}
    if unknown:
        raise click.BadParameter(f"no variant {', '.join(sorted(unknown))}", param_hint="--variant")
    if only:
        variants = [v for v in variants if v[0] == "native" or v[0] in only]
    metadata_test = "create+stat+unlink"
    chosen: list[Test | None] = [*tests(size, runtime_s), None]
    known_tests = [t.name if t else metadata_test for t in chosen]
    if set(only_tests) - set(known_tests):
        raise click.BadParameter(f"no test {', '.join(sorted(set(only_tests) - set(known_tests)))}; "
                                 f"one of: {'; '.join(known_tests)}", param_hint="--test")
    if only_tests:
        chosen = [t for t, name in zip(chosen, known_tests) if name in only_tests]
    results: dict[str, dict[str, list[float]]] = {v: {} for v, _, _ in variants}
    cpu_us: dict[str, dict[str, list[float]]] = {v: {} for v, _, _ in variants}
    extras: dict[str, dict[str, float]] = {}
    host = HostMeter()
    # Enough for both page caches of a test file (the mount's and the backing one's) and more.
    warm_mib = 4 * int(size[:-1]) * (1024 if size.endswith("G") else 1)
    with page_reporting_paused(warm_mib) if pause_page_reporting else nullcontext(False) as paused, \
            tempfile.TemporaryDirectory(prefix="interposer-bench-", dir=base) as tmp, \
            variant_targets(Path(tmp), variants) as (targets, mounts):
        if pause_page_reporting and not paused:
            raise click.ClickException("cannot pause free page reporting: no page_reporting_order here, or not root")
        for test in chosen:
            name = test.name if test else metadata_test
            for r in range(repeat):
                for variant, _, _ in rotated(variants, r):
                    mount = mounts.get(variant)
                    cpu = mount.cpu_s if mount else (lambda: 0.0)
                    if test is None:
                        value, per_op = metadata_ops_per_s(targets[variant], meta_s, cpu)
                    else:
                        value, per_op = test.run(targets[variant], cpu)
                        for f in targets[variant].iterdir():
                            f.unlink()
                    results[variant].setdefault(name, []).append(value)
                    cpu_us[variant].setdefault(name, []).append(per_op * 1e6)
            click.echo(f"{name}: done", err=True)
        for variant, mount in mounts.items():
            extras[variant] = {"worker RSS MB": mount.rss_mb(), "mount ready s": mount.ready_s}
    medians = {v: {n: statistics.median(xs) for n, xs in row.items()} for v, row in results.items()}
    cpu_medians = {v: {n: statistics.median(xs) for n, xs in row.items()} for v, row in cpu_us.items()}
    units = {t.name if t else metadata_test: t.unit if t else "ops/s" for t in chosen}
    if as_json:
        click.echo(json.dumps({"machine": machine(), "steal_share": host.share(), "host_reclaimed_mib": host.reclaimed_mib(),
                               "page_reporting_paused": pause_page_reporting, "results": medians, "worker_cpu_us_per_io": cpu_medians,
                               "runs": results, "worker": extras}, indent=2))
        return
    click.echo(f"machine: {machine()}; size {size}, runtime {runtime_s:g} s, median of {repeat}"
               + (f"; free page reporting paused, {warm_mib:,} MiB warmed" if pause_page_reporting else ""))
    header = "| test | native | " + " | ".join(v for v, _, _ in variants[1:]) + " |"
    click.echo(header)
    click.echo("|---" * (len(variants) + 1) + "|")
    for name, unit in units.items():
        native = medians["native"][name]
        cells = [f"{medians[v][name]:,.0f} ({medians[v][name] / native:.2f})" for v, _, _ in variants[1:]]
        click.echo(f"| {name} ({unit}) | {native:,.0f} | " + " | ".join(cells) + " |")
    click.echo("\nworker CPU per application I/O, µs (median):")
    click.echo("| test | " + " | ".join(v for v, _, _ in variants[1:]) + " |")
    click.echo("|---" * len(variants) + "|")
    for name in units:
        click.echo(f"| {name} | " + " | ".join(f"{cpu_medians[v][name]:.1f}" for v, _, _ in variants[1:]) + " |")
    for variant, values in extras.items():
        click.echo(f"{variant}: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
    click.echo(host.report())


if __name__ == "__main__":
    main()
