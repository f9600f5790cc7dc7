"""Worker-wide pauses on a fresh mount: the first lookups of many names, 16 callers at once.

Every caller of a mount stalls together when the worker's one event-loop thread
blocks: growing its fd table past a power of two (one ``O_PATH`` fd per name the
kernel knows; ``synchronize_rcu()`` in the kernel while the table is shared by
threads) and full garbage collections of its startup objects did, 10–20 ms each
(``_pauses``). This runs 16 processes that each ``stat`` 2,000 names the kernel
has never seen (one LOOKUP each: 32,000 new inodes, past 16,384 fds) on the
backing directory itself (native), through a worker as it starts by default, and
through one started with both measures undone (``grow_fd_table`` and
``freeze_long_lived_objects`` replaced by no-ops: the baseline, same code
otherwise); fresh worker and fresh names for every run, the variants taking
turns. Prints stat rates, p50/p99/max latency, how many stats took over 5 ms,
and ratios.

Usage: ``.venv/bin/python bench/datapath/pauses.py [--quick] [--repeat N] [--names N]``
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from run import Mount  # bench/datapath/run.py, which puts bench/ on sys.path
from _host import HostMeter, machine  # noqa: E402, I001 - bench/_host.py

JOBS = 16
#: A stat slower than this counts as stalled, seconds (a bare LOOKUP takes ~0.3 ms at 16 callers here).
STALL_S = 0.005
#: The worker as it started before ``_pauses``: the same entry point with both measures made no-ops.
UNDONE = ("-c", "import interposer.fuse_worker._worker as w\n"
                "w.grow_fd_table = lambda fd_limit: 0\n"
                "w.freeze_long_lived_objects = lambda: 0\n"
                "from interposer.fuse_worker.__main__ import main\n"
                "main()")
VARIANTS = ("native", "default", "both undone")

_start: Any = None


def _init(barrier: Any) -> None:
    global _start
    _start = barrier


def _stat_all(directory: str, names: int) -> list[float]:
    """``stat`` ``names`` files of ``directory`` once each, after all jobs are ready; each one's seconds."""
    _start.wait()
    took = []
    for index in range(names):
        before = time.perf_counter()
        os.stat(f"{directory}/{index}")
        took.append(time.perf_counter() - before)
    return took


def _lay_out(backing: Path, turn: int, names: int) -> list[Path]:
    directories = []
    for job in range(JOBS):
        directory = backing / f"t{turn}" / f"j{job}"
        directory.mkdir(parents=True)
        for index in range(names):
            (directory / str(index)).touch()
        directories.append(directory)
    return directories


def _run(root: Path, directories: list[Path], backing: Path, names: int) -> tuple[float, list[float]]:
    """Stats per second and every stat's seconds, 16 processes at once, under ``root``."""
    paths = [str(root / d.relative_to(backing)) for d in directories]
    context = multiprocessing.get_context("fork")
    with context.Pool(JOBS, initializer=_init, initargs=(context.Barrier(JOBS),)) as pool:
        started = time.perf_counter()
        results = pool.starmap(_stat_all, [(path, names) for path in paths], chunksize=1)
        elapsed = time.perf_counter() - started
    latencies = [t for took in results for t in took]
    return len(latencies) / elapsed, latencies


@click.command()
@click.option("--quick", is_flag=True, help="Smoke run: 300 names per process, one repeat.")
@click.option("--repeat", default=3, show_default=True, help="Runs per variant; medians reported.")
@click.option("--names", default=2000, show_default=True,
              help="Fresh names each process looks up (10,000: a tree the inode table grows large with).")
def main(quick: bool, repeat: int, names: int) -> None:
    """Print stat rates and stalls of 16 callers looking up fresh names: native, default worker, measures undone."""
    names, repeat = (300, 1) if quick else (names, repeat)
    host = HostMeter()
    cells: dict[str, list[tuple[float, float, float, float, int]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="interposer-pauses-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        backing = work / "backing"
        backing.mkdir()
        turn = 0
        for r in range(repeat):
            for variant in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
                turn += 1
                directories = _lay_out(backing, turn, names)
                os.sync()
                mount = None
                if variant != "native":
                    mountpoint = work / f"mnt-{turn}"
                    mountpoint.mkdir()
                    mount = Mount(backing, mountpoint, None, work,
                                  launcher=UNDONE if variant == "both undone" else ("-m", "interposer.fuse_worker"))
                try:
                    rate, latencies = _run(mount.mountpoint if mount else backing, directories, backing, names)
                finally:
                    if mount is not None:
                        mount.close()
                cuts = statistics.quantiles(latencies, n=100, method="inclusive")
                cells[variant].append((rate, cuts[49], cuts[98], max(latencies),
                                       sum(t > STALL_S for t in latencies)))
    click.echo(f"machine: {machine()}; {JOBS} processes x {names:,} fresh names, median of {repeat}")
    click.echo("| variant | stats/s | ratio to native | p50 (ms) | p99 (ms) | max (ms) | stats > 5 ms |")
    click.echo("|---|---|---|---|---|---|---|")
    native_rate = statistics.median(c[0] for c in cells["native"])
    for variant in VARIANTS:
        rate, p50, p99, worst, stalls = (statistics.median(c[i] for c in cells[variant]) for i in range(5))
        click.echo(f"| {variant} | {rate:,.0f} | {rate / native_rate:.2f} | {p50 * 1e3:.2f} | {p99 * 1e3:.2f} | "
                   f"{worst * 1e3:.1f} | {stalls:.0f} |")
    default = [statistics.median(c[i] for c in cells["default"]) for i in (0, 2)]
    undone = [statistics.median(c[i] for c in cells["both undone"]) for i in (0, 2)]
    click.echo(f"default / undone: stats/s {default[0] / undone[0]:.2f}, p99 {default[1] / undone[1]:.2f}")
    click.echo(host.report())


if __name__ == "__main__":
    main()
