"""Files opened and closed: what one FLUSH request per ``close(2)`` costs, native vs the worker with and without it.

Dataset loaders read many small files (open, read, close), and build tools and
mail or package stores create and delete them. Through FUSE each ``close(2)``
sends a FLUSH request and waits for its reply, unless the open was answered
with FOPEN_NOFLUSH, which the worker does where flushing cannot do anything
(``--skip-needless-flush``, the default; docs/ARCHITECTURE.md, "Closes without
FLUSH"). Two workloads, each timed for a few seconds on the backing directory
itself (native), through a mount with the defaults and through one with
``--always-flush``, taking turns in each repeat (rotated order):

* create+stat+unlink of empty files (``run.py``'s metadata row: 7 FUSE requests
  per round with FLUSH, 6 without);
* open, read 4 KiB, close, over 100 files of 4 KiB whose data the mount's page
  cache holds (OPEN, FLUSH, RELEASE per file; RELEASE is asynchronous).

Prints medians, ratios to native and the worker CPU per op (with busy polling on,
as by default, CPU per op includes the polls between requests).

Usage: ``.venv/bin/python bench/datapath/small_files.py [--quick] [--repeat N] [--seconds S]``
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from run import metadata_ops_per_s, rotated, variant_targets  # bench/datapath/run.py, which puts bench/ on sys.path
from _host import HostMeter, machine  # noqa: E402, I001 - bench/_host.py

#: Files of :data:`FILE_BYTES` each that the open+read+close workload cycles through.
FILES = 100
FILE_BYTES = 4096

_READ_LOOP = (
    "import os, sys, time\n"
    "d, end, n = sys.argv[1], time.monotonic() + float(sys.argv[2]), 0\n"
    "while time.monotonic() < end:\n"
    f"    for i in range({FILES}):\n"
    "        fd = os.open(f'{d}/s{i}', os.O_RDONLY); os.read(fd, 8192); os.close(fd)\n"
    f"    n += {FILES}\n"
    "print(n)\n"
)


def prepare_files(directory: Path) -> Path:
    """Write the small files under ``directory``/small (through the mount, so its page cache holds them)."""
    small = directory / "small"
    small.mkdir(exist_ok=True)
    for i in range(FILES):
        (small / f"s{i}").write_bytes(os.urandom(FILE_BYTES))
    return small


def files_read_per_s(small: Path, seconds: float, cpu_s=lambda: 0.0) -> tuple[float, float]:  # noqa: ANN001
    """open + 4 KiB read + close of the files in ``small`` for ``seconds``; (files per second, ``cpu_s()`` s per file)."""
    before = cpu_s()
    out = subprocess.run([sys.executable, "-c", _READ_LOOP, str(small), str(seconds)],
                         capture_output=True, text=True, check=True)
    files = int(out.stdout)
    return files / seconds, (cpu_s() - before) / max(files, 1)


@click.command()
@click.option("--quick", is_flag=True, help="Smoke run: 1 s per cell, one repeat.")
@click.option("--repeat", default=5, show_default=True, help="Runs per cell; the median is reported.")
@click.option("--seconds", default=4.0, show_default=True, help="Length of each run, seconds.")
def main(quick: bool, repeat: int, seconds: float) -> None:
    """Print create+stat+unlink and open+read+close rates: native, the defaults, --always-flush."""
    seconds, repeat = (1.0, 1) if quick else (seconds, repeat)
    host = HostMeter()
    variants = [("native", None, ()), ("default (no FLUSH where needless)", "", ()),
                ("--always-flush", "", ("--always-flush",))]
    workloads = ("create+stat+unlink (ops/s)", "open+read 4 KiB+close (files/s)")
    rates = {(name, w): [] for name, _, _ in variants for w in workloads}
    cpu_us = {(name, w): [] for name, _, _ in variants for w in workloads}
    with tempfile.TemporaryDirectory(prefix="interposer-small-files-") as tmp, \
            variant_targets(Path(tmp), variants) as (directories, mounts):
        small = {name: prepare_files(directory) for name, directory in directories.items()}
        for r in range(repeat):
            for name, _, _ in rotated(variants, r):
                mount = mounts.get(name)
                cpu = mount.cpu_s if mount else (lambda: 0.0)
                results = (metadata_ops_per_s(directories[name], seconds, cpu),
                           files_read_per_s(small[name], seconds, cpu))
                for workload, (rate, per_op_s) in zip(workloads, results):
                    rates[name, workload].append(rate)
                    cpu_us[name, workload].append(per_op_s * 1e6)
    click.echo(f"machine: {machine()}; {seconds:g} s per run, median of {repeat}")
    click.echo("| workload | variant | rate | ratio to native | ratio to --always-flush | worker CPU per op (µs) |")
    click.echo("|---|---|---|---|---|---|")
    for workload in workloads:
        native = statistics.median(rates["native", workload])
        always = statistics.median(rates["--always-flush", workload])
        for name, _, _ in variants:
            rate = statistics.median(rates[name, workload])
            cpu = f"{statistics.median(cpu_us[name, workload]):.0f}" if name in mounts else "-"
            click.echo(f"| {workload} | {name} | {rate:,.0f} | {rate / native:.3f} | {rate / always:.2f} | {cpu} |")
    click.echo(host.report())


if __name__ == "__main__":
    main()
