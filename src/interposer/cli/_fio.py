"""Running fio as the demo's workload and reading its JSON report."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import msgspec


class FioResult(msgspec.Struct, frozen=True):
    """What fio measured for one run (all jobs together).

    Attributes:
        read_bw_bytes_per_s / write_bw_bytes_per_s: bandwidth, bytes per second.
        read_iops / write_iops: I/O operations per second.
        read_lat_mean_s / write_lat_mean_s: mean completion latency, seconds.
        read_lat_p99_s / write_lat_p99_s: 99th percentile completion latency, seconds.
        errors: I/Os that failed (fio ``total_err``, counted thanks to
            ``--continue_on_error=all``).
    """

    read_bw_bytes_per_s: float
    write_bw_bytes_per_s: float
    read_iops: float
    write_iops: float
    read_lat_mean_s: float
    read_lat_p99_s: float
    write_lat_mean_s: float
    write_lat_p99_s: float
    errors: int

    @property
    def bw_bytes_per_s(self) -> float:
        """Read plus write bandwidth, bytes per second."""
        return self.read_bw_bytes_per_s + self.write_bw_bytes_per_s


class FioSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The demo workload: a random read/write mix.

    Attributes:
        directory: where fio puts its files (the interposed mount).
        rwmixread: percentage of reads, 0..100.
        block_size_bytes: I/O size, bytes.
        jobs: concurrent fio jobs (processes), each one I/O at a time (psync).
        file_size_bytes: size of each job's file, bytes.
        direct: open with O_DIRECT, so every I/O reaches the file system (no page cache).
    """

    directory: Path
    rwmixread: int = 70
    block_size_bytes: int = 64 * 1024
    jobs: int = 4
    file_size_bytes: int = 32 * 1024 * 1024
    direct: bool = True

    def argv(self, runtime_s: float | None) -> list[str]:
        """fio command line; ``runtime_s=None`` only lays out the files."""
        fio = shutil.which("fio")
        if fio is None:
            raise FileNotFoundError("fio is not installed: apt-get install fio (make setup does)")
        argv = [
            fio, "--name=interposer-demo", f"--directory={self.directory}", "--ioengine=psync",
            f"--direct={int(self.direct)}", f"--bs={self.block_size_bytes}", "--rw=randrw",
            f"--rwmixread={self.rwmixread}", f"--numjobs={self.jobs}", f"--size={self.file_size_bytes}",
            "--group_reporting", "--continue_on_error=all", "--output-format=json",
        ]
        if runtime_s is None:
            argv.append("--create_only=1")
        else:
            argv += ["--time_based", f"--runtime={runtime_s:g}s"]
        return argv


class FioError(RuntimeError):
    """fio failed to run or produced no report."""


def _percentile(stats: dict, pct: str = "99.000000") -> float:
    return stats.get("percentile", {}).get(pct, 0.0) / 1e9


def parse_report(report: dict) -> FioResult:
    """Turn fio's ``--output-format=json`` report (group_reporting) into a ``FioResult``.

    Raises:
        FioError: the report has no job.
    """
    jobs = report.get("jobs") or []
    if not jobs:
        raise FioError("fio report has no jobs")
    job = jobs[0]
    read, write = job["read"], job["write"]
    return FioResult(
        read_bw_bytes_per_s=float(read["bw_bytes"]), write_bw_bytes_per_s=float(write["bw_bytes"]),
        read_iops=float(read["iops"]), write_iops=float(write["iops"]),
        read_lat_mean_s=read["lat_ns"]["mean"] / 1e9, read_lat_p99_s=_percentile(read["clat_ns"]),
        write_lat_mean_s=write["lat_ns"]["mean"] / 1e9, write_lat_p99_s=_percentile(write["clat_ns"]),
        errors=int(job.get("total_err", 0)),
    )


def run_fio(spec: FioSpec, runtime_s: float | None) -> FioResult | None:
    """Run fio; return its result (None for a layout-only run).

    Raises:
        FioError: fio exited non-zero without a report, or printed no JSON.
    """
    proc = subprocess.run(spec.argv(runtime_s), capture_output=True, text=True, check=False)
    if runtime_s is None:
        if proc.returncode != 0:
            raise FioError(f"fio layout failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return None
    # fio may print warnings before the JSON document.
    start = proc.stdout.find("{")
    if start < 0:
        raise FioError(f"fio printed no report ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return parse_report(json.loads(proc.stdout[start:]))
