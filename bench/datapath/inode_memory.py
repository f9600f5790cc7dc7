"""Worker memory per name the kernel knows: what sizes a worker for a tree of millions of files.

The passthrough worker keeps an inode table entry for every file and directory
the kernel holds (until the kernel sends FORGET): the entry, its key, its name and
the dicts that index it. A training job that walks a dataset of millions of small
files makes the kernel know all of them, so the worker's memory grows with the
dataset, not with the I/O rate, and a worker pod's memory limit (the csi-node's
``--worker-memory-limit``) must hold it.

This lays out ``--names`` empty files in ``--dirs`` directories directly in a
backing directory, mounts a worker with default flags, walks the mount
(``os.listdir`` then ``os.stat`` of each name, as a data loader does) and prints
the worker's RSS against the names walked; the baseline is the RSS of the same
worker right after it mounted. Then the kernel is made to forget
(``drop_caches``, root) and the tree walked again: the second walk's growth says
whether the memory of forgotten entries is reused.

Usage: ``.venv/bin/python bench/datapath/inode_memory.py [--names 200000] [--dirs 20]``
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click

from run import Mount  # bench/datapath/run.py, which puts bench/ on sys.path
from _host import HostMeter, machine  # noqa: E402, I001 - bench/_host.py


def lay_out(backing: Path, names: int, dirs: int) -> list[Path]:
    """Create ``names`` empty files spread over ``dirs`` directories; return the directories."""
    per_dir = -(-names // dirs)
    made = []
    for d in range(dirs):
        directory = backing / f"d{d:04}"
        directory.mkdir()
        for i in range(min(per_dir, names - d * per_dir)):
            (directory / f"f{i:07}").touch()
        made.append(directory)
    return made


def walk(mount: Mount, dirs: list[str], steps: int) -> list[tuple[int, float, float]]:
    """List and stat every name under ``dirs`` of the mount; ``(names, RSS MiB, worst stat s)`` after each step."""
    seen, worst, rows = 0, 0.0, []
    every = max(1, len(dirs) // steps)
    for index, name in enumerate(dirs, 1):
        directory = mount.mountpoint / name
        for entry in os.listdir(directory):
            started = time.monotonic()
            os.stat(directory / entry)
            worst = max(worst, time.monotonic() - started)
            seen += 1
        if index % every == 0 or index == len(dirs):
            rows.append((seen, mount.rss_mb(), worst))
    return rows


@click.command()
@click.option("--names", default=200_000, show_default=True, help="Files laid out and walked.")
@click.option("--dirs", default=20, show_default=True, help="Directories they are spread over.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the backing files go (default: a temporary directory).")
def main(names: int, dirs: int, work_dir: Path | None) -> None:
    """Print the worker's RSS as a walk makes the kernel know more names, and per name."""
    host = HostMeter()
    with tempfile.TemporaryDirectory(prefix="interposer-inode-memory-", dir=work_dir) as tmp:
        work = Path(tmp)
        (work / "backing").mkdir()
        (work / "mnt").mkdir()
        started = time.monotonic()
        made = [d.name for d in lay_out(work / "backing", names, dirs)]
        click.echo(f"machine: {machine()}; {names:,} empty files in {dirs} directories laid out in "
                   f"{time.monotonic() - started:.1f} s")
        mount = Mount(work / "backing", work / "mnt", None, work)
        try:
            baseline = mount.rss_mb()
            click.echo(f"worker RSS after mounting (baseline): {baseline:.1f} MiB")
            click.echo("| walk | names known | worker RSS (MiB) | above baseline (MiB) | bytes per name | "
                       "slowest stat (ms) |")
            click.echo("|---|---|---|---|---|---|")
            for label in ("first", "again, after the kernel forgot"):
                if label != "first":
                    os.sync()
                    Path("/proc/sys/vm/drop_caches").write_text("2\n")  # dentries and inodes: FORGET
                    time.sleep(1.0)
                for seen, rss, worst in walk(mount, made, steps=5):
                    click.echo(f"| {label} | {seen:,} | {rss:.1f} | {rss - baseline:.1f} | "
                               f"{(rss - baseline) * 2**20 / seen:,.0f} | {worst * 1e3:.1f} |")
        finally:
            mount.close()
    click.echo(host.report())


if __name__ == "__main__":
    main()
