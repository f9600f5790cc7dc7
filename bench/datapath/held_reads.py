"""Held reads: replies sent by the timer (``--held-reads``, default) vs a parked reader per hold (``--sleeping-holds``).

16 fio psync jobs of 4 KiB random ``O_DIRECT`` reads (16 files of 16 MiB, page
cache warm) through a mount whose policy holds every read to a log-normal
latency floor, for two floors: median 1 ms (asks ~14k reads/s, what the
``io2``/``efs``/log-normal fidelity cells ask) and median 0.25 ms (asks ~56k,
more than one worker holds: it shows each path's ceiling). The two worker modes
take turns in each repeat, each with a fresh worker. Prints the medians, the ratio
held / sleeping, and the worker CPU per read (user + system, ``/proc``).

Usage: ``.venv/bin/python bench/datapath/held_reads.py [--quick] [--repeat N] [--runtime-s S]``
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import click

from run import Mount, fio  # bench/datapath/run.py, which puts bench/ on sys.path
from _host import HostMeter, machine  # noqa: E402, I001 - bench/_host.py

JOBS = 16
FILE_MIB = 16
#: Floors: (name, median seconds). σ 0.5 as the fidelity bench's log-normal scenarios.
FLOORS = (("log-normal 1 ms", 0.001), ("log-normal 0.25 ms", 0.00025))
MODES = (("sleeping", "--sleeping-holds"), ("held", "--held-reads"))


def _policy(median_s: float) -> str:
    return json.dumps({"layers": [{"type": "delay", "ops": ["read"], "mode": "floor",
                                   "distribution": {"type": "lognormal", "median_s": median_s, "sigma": 0.5}}]})


def _run(backing: Path, work: Path, policy: str, flag: str, runtime_s: float, turn: int) -> tuple[float, float, float]:
    """IOPS, p50 latency (s) and worker CPU per read (µs) of one fio run through a fresh worker."""
    mountpoint = work / f"mnt-{turn}"
    mountpoint.mkdir()
    mount = Mount(backing, mountpoint, policy, work, (flag,))
    try:
        before = mount.cpu_s()
        job = fio(mountpoint, ["--rw=randread", "--bs=4k", f"--size={FILE_MIB}m", f"--numjobs={JOBS}",
                               "--filename_format=f$jobnum", "--ioengine=psync", "--direct=1", "--time_based",
                               f"--runtime={runtime_s:g}", "--invalidate=0"])
        cpu_s = mount.cpu_s() - before
    finally:
        mount.close()
    read = job["read"]
    return read["iops"], read["clat_ns"]["percentile"]["50.000000"] / 1e9, cpu_s / read["total_ios"] * 1e6


@click.command()
@click.option("--quick", is_flag=True, help="Smoke run: 1 s runs, one repeat.")
@click.option("--repeat", default=3, show_default=True, help="Runs per cell, modes alternating; medians reported.")
@click.option("--runtime-s", default=6.0, show_default=True, help="fio run time per cell, seconds.")
def main(quick: bool, repeat: int, runtime_s: float) -> None:
    """Print held vs sleeping read holds: IOPS, p50 and worker CPU per read, with the ratio."""
    if quick:
        repeat, runtime_s = 1, 1.0
    host = HostMeter()
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="interposer-held-reads-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        backing = work / "backing"
        backing.mkdir()
        for index in range(JOBS):
            with open(backing / f"f{index}", "wb") as out:
                out.write(bytes(range(256)) * (FILE_MIB << 12))
        turn = 0
        for floor_name, median_s in FLOORS:
            for round_ in range(repeat):
                modes = MODES if round_ % 2 == 0 else MODES[::-1]
                for mode, flag in modes:
                    turn += 1
                    results.setdefault((floor_name, mode), []).append(
                        _run(backing, work, _policy(median_s), flag, runtime_s, turn))
    click.echo(f"machine: {machine()}; {JOBS} psync jobs, 4 KiB random O_DIRECT reads, {runtime_s:g} s runs, "
               f"median of {repeat}")
    click.echo("| floor | mode | IOPS | p50 (ms) | worker CPU per read (µs) | IOPS held / sleeping |")
    click.echo("|---|---|---|---|---|---|")
    for floor_name, _ in FLOORS:
        medians = {mode: [statistics.median(values) for values in zip(*results[(floor_name, mode)])]
                   for mode, _ in MODES}
        for mode, _ in MODES:
            iops, p50_s, cpu_us = medians[mode]
            ratio = f"{iops / medians['sleeping'][0]:.2f}" if mode == "held" else ""
            click.echo(f"| {floor_name} | {mode} | {iops:,.0f} | {p50_s * 1e3:.3f} | {cpu_us:.1f} | {ratio} |")
    click.echo(host.report())


if __name__ == "__main__":
    main()
