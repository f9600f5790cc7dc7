"""Where the thread hop pays off: the worker's ``--blocking-io`` modes on a fast and a slow backing store.

The passthrough backend runs a read the page cache cannot serve on the event loop
(``loop``), in a thread (``thread``), or on the loop until such reads are measured
slow (``adaptive``, the default; see ``backends/_offload.py``). This runs fio
random 4 KiB reads (``O_DIRECT`` on the mount, so every read reaches the worker)
at QD1 and with 16 jobs through one worker per mode, over two backing stores:

* **local disk**: a directory on this machine's disk, page cache dropped before
  each run (misses cost what the virtio disk costs, tens of µs);
* **slow store**: the mount of another worker whose reads take ``--slow-ms``
  milliseconds (a delay layer, ``mode: floor``): a stand-in for a network volume.
  Its own figures (fio straight on it) are the baseline.

Every mount is up for the whole run and the modes take turns in each repeat.
Prints medians and the ratio to the baseline (the local directory / the slow
store itself), and the worker CPU per read.

Usage: ``.venv/bin/python bench/datapath/blocking_io.py [--quick] [--repeat N] [--slow-ms MS]``
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import click

from run import Mount, drop_caches, fio  # bench/datapath/run.py, which puts bench/ on sys.path
from _host import HostMeter, machine  # noqa: E402, I001 - bench/_host.py

MODES = ("loop", "adaptive", "thread")


def random_reads(directory: Path, size: str, runtime_s: float, jobs: int) -> dict:
    """fio random 4 KiB O_DIRECT reads of one laid-out file by ``jobs`` psync jobs."""
    return fio(directory, ["--rw=randread", "--bs=4k", f"--size={size}", "--ioengine=psync", "--direct=1",
                           "--filename=bench.0.0", f"--numjobs={jobs}", "--time_based",
                           f"--runtime={runtime_s:g}s"])


@click.command()
@click.option("--quick", is_flag=True, help="Smoke run: small file, 1 s runs, one repeat.")
@click.option("--repeat", default=3, show_default=True, help="Runs per cell; the median is reported.")
@click.option("--slow-ms", default=1.0, show_default=True, help="Read latency of the slow store, ms.")
@click.option("--json", "as_json", is_flag=True)
def main(quick: bool, repeat: int, slow_ms: float, as_json: bool) -> None:
    """Print IOPS per --blocking-io mode over a local and a slow backing store."""
    size, runtime_s = ("16M", 1.0) if quick else ("256M", 10.0)
    repeat = 1 if quick else repeat
    slow_policy = json.dumps({"layers": [{"type": "delay", "delay_s": slow_ms / 1000, "ops": ["read"],
                                          "mode": "floor"}]})
    iops: dict[tuple[str, str, int], list[float]] = {}
    cpu_us: dict[tuple[str, str, int], list[float]] = {}
    host = HostMeter()
    with tempfile.TemporaryDirectory(prefix="interposer-blocking-") as tmp:
        work = Path(tmp)
        mounts: list[Mount] = []
        try:
            local = work / "local"
            local.mkdir()
            (work / "slow-backing").mkdir()
            (work / "slow").mkdir()
            slow = Mount(work / "slow-backing", work / "slow", slow_policy, work)
            mounts.append(slow)
            for d in (local, slow.mountpoint):
                fio(d, ["--rw=write", "--bs=1M", f"--size={size}", "--ioengine=psync", "--filename=bench.0.0"])
            stores = {"local disk": (local, None), "slow store": (slow.mountpoint, None)}
            variants: dict[tuple[str, str], tuple[Path, Mount | None]] = {}
            for store, (backing, _) in stores.items():
                variants[(store, "baseline")] = (backing, None)
                for mode in MODES:
                    mnt = work / f"mnt-{store.split()[0]}-{mode}"
                    mnt.mkdir()
                    mount = Mount(backing, mnt, None, work, ("--blocking-io", mode))
                    mounts.append(mount)
                    variants[(store, mode)] = (mnt, mount)
            for jobs in (1, 16):
                for r in range(repeat):
                    keys = list(variants)
                    for store, mode in keys[r % len(keys):] + keys[:r % len(keys)]:
                        directory, mount = variants[(store, mode)]
                        drop_caches()
                        before = mount.cpu_s() if mount else 0.0
                        job = random_reads(directory, size, runtime_s, jobs)
                        reads = max(job["read"]["total_ios"], 1)
                        iops.setdefault((store, mode, jobs), []).append(job["read"]["iops"])
                        cpu_us.setdefault((store, mode, jobs), []).append(
                            ((mount.cpu_s() - before) / reads * 1e6) if mount else 0.0)
                click.echo(f"{jobs} job(s): done", err=True)
        finally:
            for mount in reversed(mounts):
                mount.close()
    med = {k: statistics.median(v) for k, v in iops.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_us.items()}
    if as_json:
        click.echo(json.dumps({"machine": machine(), "steal_share": host.share(), "host_reclaimed_mib": host.reclaimed_mib(), "iops": {" / ".join(map(str, k)): v for k, v in med.items()},
                               "worker_cpu_us_per_read": {" / ".join(map(str, k)): v for k, v in cpu.items()}},
                              indent=2))
        return
    click.echo(f"machine: {machine()}; file {size}, {runtime_s:g} s runs, median of {repeat}; "
               f"slow store: {slow_ms:g} ms reads")
    click.echo("| backing store | jobs | baseline (IOPS) | " + " | ".join(f"--blocking-io {m}" for m in MODES) + " |")
    click.echo("|---|---|---|" + "---|" * len(MODES))
    for store in ("local disk", "slow store"):
        for jobs in (1, 16):
            base = med[(store, "baseline", jobs)]
            cells = [f"{med[(store, m, jobs)]:,.0f} ({med[(store, m, jobs)] / base:.2f}; "
                     f"{cpu[(store, m, jobs)]:.0f} µs CPU)" for m in MODES]
            click.echo(f"| {store} | {jobs} | {base:,.0f} | " + " | ".join(cells) + " |")
    click.echo(host.report())


if __name__ == "__main__":
    main()
