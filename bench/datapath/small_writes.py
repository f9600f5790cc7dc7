"""Small writes: 4 KiB ``write(2)`` calls, native vs the worker's path vs kernel passthrough.

Loggers, databases' journals and checkpoint writers issue many small writes.
Through the worker each is at least one FUSE round trip: a WRITE request. Before
a cached or passthrough write the kernel also asks the file system for the
file's ``security.capability`` (a GETXATTR round trip: ``file_remove_privs`` on
the FUSE inode), unless the mount is ``SB_NOSEC``, which it becomes when the
worker asks for ``FUSE_HANDLE_KILLPRIV_V2`` (the default). This measures 4 KiB
writes per second into a new file opened read-write and write-only with
``O_APPEND``, on the backing directory itself (native), through a mount with the
defaults, and with ``--kernel-passthrough``, each also with
``--no-handle-killpriv-v2`` (the GETXATTR before every write); the variants take
turns in each repeat. Prints medians, ratios to native and the worker CPU per
write.

Usage: ``.venv/bin/python bench/datapath/small_writes.py [--quick] [--repeat N]``
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import click

from run import rotated, variant_targets  # bench/datapath/run.py, which puts bench/ on sys.path
from _host import HostMeter, machine  # noqa: E402, I001 - bench/_host.py

#: Bytes per ``write(2)``.
BLOCK = 4096
#: (label, open flags) of the two ways a writer opens its file.
OPENS = (("read-write open", os.O_RDWR), ("write-only, O_APPEND", os.O_WRONLY | os.O_APPEND))


def writes_per_s(directory: Path, flags: int, count: int) -> float:
    """``count`` writes of :data:`BLOCK` bytes into a new file in ``directory`` opened with ``flags``; writes/s."""
    path = directory / "small-writes.out"
    fd = os.open(path, flags | os.O_CREAT | os.O_TRUNC, 0o644)
    block = b"x" * BLOCK
    try:
        start = time.perf_counter()
        for _ in range(count):
            os.write(fd, block)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()
    return count / elapsed


@click.command()
@click.option("--quick", is_flag=True, help="Smoke run: 1,000 writes, one repeat.")
@click.option("--repeat", default=3, show_default=True, help="Runs per cell; the median is reported.")
@click.option("--count", default=20_000, show_default=True, help="Writes per run.")
def main(quick: bool, repeat: int, count: int) -> None:
    """Print 4 KiB write rates: native, the defaults, kernel passthrough, each with and without FUSE_HANDLE_KILLPRIV_V2."""
    count, repeat = (1_000, 1) if quick else (count, repeat)
    host = HostMeter()
    variants = [("native", None, ()), ("defaults", "", ()),
                ("--no-handle-killpriv-v2", "", ("--no-handle-killpriv-v2",)),
                ("kernel passthrough", "", ("--kernel-passthrough",)),
                ("kernel passthrough, --no-handle-killpriv-v2", "", ("--kernel-passthrough", "--no-handle-killpriv-v2"))]
    rates = {(name, label): [] for name, _, _ in variants for label, _ in OPENS}
    cpu_us = {(name, label): [] for name, _, _ in variants for label, _ in OPENS}
    with tempfile.TemporaryDirectory(prefix="interposer-small-writes-") as tmp, \
            variant_targets(Path(tmp), variants) as (directories, mounts):
        for r in range(repeat):
            for name, _, _ in rotated(variants, r):
                mount = mounts.get(name)
                for label, open_flags in OPENS:
                    before = mount.cpu_s() if mount else 0.0
                    rates[name, label].append(writes_per_s(directories[name], open_flags, count))
                    cpu_us[name, label].append((mount.cpu_s() - before) / count * 1e6 if mount else 0.0)
    click.echo(f"machine: {machine()}; {count:,} writes of {BLOCK} bytes per run, median of {repeat}")
    click.echo("| open | variant | writes/s | ratio to native | worker CPU per write (µs) |")
    click.echo("|---|---|---|---|---|")
    for label, _ in OPENS:
        native = statistics.median(rates["native", label])
        for name, _, _ in variants:
            rate = statistics.median(rates[name, label])
            cpu = f"{statistics.median(cpu_us[name, label]):.1f}" if name in mounts else "-"
            click.echo(f"| {label} | {name} | {rate:,.0f} | {rate / native:.2f} | {cpu} |")
    click.echo(host.report())


if __name__ == "__main__":
    main()
