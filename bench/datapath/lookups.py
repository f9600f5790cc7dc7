"""Lookups of names that do not exist: the kernel's negative entries vs a round trip each.

Programs probe many names that are not there: a shell or ``execvp`` walking
``$PATH``, the dynamic loader walking library paths, a compiler its include
paths, a job polling for a marker file. Each probe is a FUSE LOOKUP unless the
worker answers with a cacheable negative entry (``--negative-timeout``, default
1 s). This runs ``stat`` of 50 missing names in a loop (one process) on the
backing directory itself (native), through a mount with the default, and
through one with ``--negative-timeout 0``; the variants take turns in each
repeat. Prints medians, ratios to native and the worker CPU per ``stat``.

Usage: ``.venv/bin/python bench/datapath/lookups.py [--quick] [--repeat N]``
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from run import Mount  # bench/datapath/run.py, which puts bench/ on sys.path
from _host import HostMeter, machine  # noqa: E402, I001 - bench/_host.py

#: Distinct missing names probed in turn.
NAMES = 50

_PROBE = (
    "import os, sys, time\n"
    "d, end, n = sys.argv[1], time.monotonic() + float(sys.argv[2]), 0\n"
    f"names = [os.path.join(d, f'missing-{{i}}') for i in range({NAMES})]\n"
    "while time.monotonic() < end:\n"
    "    for p in names:\n"
    "        try:\n"
    "            os.stat(p)\n"
    "        except FileNotFoundError:\n"
    "            pass\n"
    f"    n += {NAMES}\n"
    "print(n)\n"
)


def missing_stats_per_s(directory: Path, seconds: float) -> float:
    """``stat`` calls per second on missing names in ``directory``, from a fresh process."""
    out = subprocess.run([sys.executable, "-c", _PROBE, str(directory), str(seconds)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout) / seconds


@click.command()
@click.option("--quick", is_flag=True, help="Smoke run: 0.5 s runs, one repeat.")
@click.option("--repeat", default=3, show_default=True, help="Runs per cell; the median is reported.")
def main(quick: bool, repeat: int) -> None:
    """Print missing-name stat rates: native, negative entries cached (default), not cached."""
    seconds, repeat = (0.5, 1) if quick else (3.0, repeat)
    host = HostMeter()
    variants = {"native": None, "mount, --negative-timeout 1 (default)": (),
                "mount, --negative-timeout 0": ("--negative-timeout", "0")}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    cpu_us: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="interposer-lookups-") as tmp:
        work = Path(tmp)
        backing = work / "backing"
        backing.mkdir()
        mounts: dict[str, Mount] = {}
        try:
            for i, (name, flags) in enumerate(variants.items()):
                if flags is not None:
                    (work / f"mnt-{i}").mkdir()
                    mounts[name] = Mount(backing, work / f"mnt-{i}", None, work, flags)
            names = list(variants)
            for r in range(repeat):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    mount = mounts.get(name)
                    before = mount.cpu_s() if mount else 0.0
                    rate = missing_stats_per_s(mount.mountpoint if mount else backing, seconds)
                    rates[name].append(rate)
                    cpu_us[name].append((mount.cpu_s() - before) / (rate * seconds) * 1e6 if mount else 0.0)
        finally:
            for mount in mounts.values():
                mount.close()
    native = statistics.median(rates["native"])
    click.echo(f"machine: {machine()}; {NAMES} missing names, {seconds:g} s runs, median of {repeat}")
    click.echo("| variant | stat of a missing name (/s) | ratio to native | worker CPU per stat (µs) |")
    click.echo("|---|---|---|---|")
    for name in variants:
        rate = statistics.median(rates[name])
        cpu = f"{statistics.median(cpu_us[name]):.1f}" if name in mounts else "-"
        click.echo(f"| {name} | {rate:,.0f} | {rate / native:.2f} | {cpu} |")
    click.echo(host.report())


if __name__ == "__main__":
    main()
