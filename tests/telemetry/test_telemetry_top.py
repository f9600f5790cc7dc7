"""``interposer top``: rates from two scrapes, and one frame against a real collector and mount."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable

import pytest
from telemetry_helpers import Collector

from rich.console import Console

from interposer.cli._top import bucket_quantile, compute_rows, top_table
from interposer_testing import MountedVolume


def _s(name: str, value: float, **labels: str) -> tuple[tuple[str, frozenset[tuple[str, str]]], float]:
    return (name, frozenset(labels.items())), value


def test_bucket_quantile_interpolates_like_histogram_quantile() -> None:
    buckets = [(0.001, 0.0), (0.002, 50.0), (0.004, 100.0), (math.inf, 100.0)]
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.002)
    assert bucket_quantile(0.99, buckets) == pytest.approx(0.002 + 0.002 * 49 / 50)
    assert bucket_quantile(0.25, buckets) == pytest.approx(0.0015)
    assert bucket_quantile(0.99, [(0.001, 1.0), (math.inf, 100.0)]) == 0.001  # in +Inf: highest finite bound
    assert math.isnan(bucket_quantile(0.99, [(0.001, 0.0), (math.inf, 0.0)]))


def test_compute_rows_differences_two_scrapes() -> None:
    vnp = {"volume": "v", "namespace": "ns", "pod": "p"}
    before = dict([
        _s("interposer_ops_total", 100, op="read", result="ok", **vnp),
        _s("interposer_bytes_total", 1_000_000, direction="read", **vnp),
        _s("interposer_op_duration_seconds_bucket", 100, op="read", le="0.001", **vnp),
        _s("interposer_op_duration_seconds_bucket", 100, op="read", le="+Inf", **vnp),
        _s("interposer_io_size_bytes_count", 100, op="read", **vnp),
        _s("interposer_io_size_bytes_sum", 100 * 4096, op="read", **vnp),
        _s("interposer_sequential_ops_total", 100, op="read", **vnp),
    ])
    after = dict([
        _s("interposer_ops_total", 300, op="read", result="ok", **vnp),
        _s("interposer_ops_total", 20, op="read", result="EIO", **vnp),  # new series: counts from 0
        _s("interposer_bytes_total", 5_000_000, direction="read", **vnp),
        _s("interposer_injected_faults_total", 20, op="read", errno="EIO", **vnp),
        _s("interposer_op_duration_seconds_bucket", 300, op="read", le="0.001", **vnp),
        _s("interposer_op_duration_seconds_bucket", 320, op="read", le="+Inf", **vnp),
        _s("interposer_delay_lateness_seconds_bucket", 90, op="read", le="1e-05", **vnp),
        _s("interposer_delay_lateness_seconds_bucket", 100, op="read", le="0.001", **vnp),
        _s("interposer_delay_lateness_seconds_bucket", 100, op="read", le="+Inf", **vnp),
        # 200 reads of 64 KiB, 40 of them sequential; 20 writes of 4 KiB, all sequential
        _s("interposer_io_size_bytes_count", 300, op="read", **vnp),
        _s("interposer_io_size_bytes_sum", 100 * 4096 + 200 * 65536, op="read", **vnp),
        _s("interposer_sequential_ops_total", 140, op="read", **vnp),
        _s("interposer_io_size_bytes_count", 20, op="write", **vnp),
        _s("interposer_io_size_bytes_sum", 20 * 4096, op="write", **vnp),
        _s("interposer_sequential_ops_total", 20, op="write", **vnp),
        _s("interposer_ops_total", 5, op="getattr", result="ok", volume="idle", namespace="", pod=""),
        _s("interposer_worker_up", 1, **vnp),
        _s("interposer_worker_resident_memory_bytes", 300 << 20, **vnp),
        _s("interposer_worker_memory_limit_bytes", 1 << 30, **vnp),
        _s("interposer_worker_up", 0, volume="idle", namespace="", pod=""),
    ])
    busy, idle = compute_rows(before, after, 2.0)
    assert (busy.volume, busy.namespace, busy.pod) == ("v", "ns", "p")
    assert busy.iops == 110 and busy.read_mb_per_s == 2.0 and busy.write_mb_per_s == 0
    assert busy.errors_per_s == 10 and busy.faults_per_s == 10
    assert busy.p99_latency_s == 0.001  # 99 % of 220 new ops is past 200: in +Inf → highest finite bound
    # 100 delayed reads, 10 of them resumed 10 µs..1 ms late: p99 interpolated in that bucket
    assert busy.p99_delay_lateness_s == pytest.approx(1e-05 + (0.001 - 1e-05) * 9 / 10)
    assert idle.volume == "idle" and idle.iops == 2.5 and math.isnan(idle.p99_latency_s) and math.isnan(idle.p99_delay_lateness_s)
    assert (busy.worker_up, busy.resident_memory_bytes, busy.memory_limit_bytes) == (1, 300 << 20, 1 << 30)
    assert (idle.worker_up, idle.resident_memory_bytes, idle.memory_limit_bytes) == (0, None, None)
    assert busy.sequential_share == pytest.approx(60 / 220)
    assert busy.mean_request_bytes == pytest.approx((200 * 65536 + 20 * 4096) / 220)
    assert math.isnan(idle.sequential_share) and math.isnan(idle.mean_request_bytes)
    cells = _rendered_cells(top_table([busy, idle], "test", 2.0))
    assert cells["v"][-4:] == ["27%", "59", "up", "300 (29%)"] and cells["idle"][-4:] == ["-", "-", "DOWN", "-"]
    with pytest.raises(ValueError, match="interval_s"):
        compute_rows(before, after, 0)


@pytest.mark.nats
@pytest.mark.fuse
def test_top_once_shows_a_live_volume(nats_url: str, mount_worker: Callable[..., MountedVolume],
                                      start_collector: Callable[..., Collector]) -> None:
    collector = start_collector()
    volume = f"top-{uuid.uuid4().hex[:8]}"
    policy = {"layers": [{"type": "fault", "errno": "EIO", "probability": 1.0, "ops": ["read"],
                          "path_glob": "/faulty"},
                         {"type": "delay", "delay_s": 0.001, "ops": ["write"], "path_glob": "/data"}]}
    vol = mount_worker(volume, nats_url=nats_url, policy=json.dumps(policy),
                       extra=["--pod-namespace", "ns1", "--pod-name", "pod1"])
    (vol.mountpoint / "faulty").write_bytes(b"x" * 4096)
    stop = threading.Event()

    def workload() -> None:
        while not stop.is_set():
            (vol.mountpoint / "data").write_bytes(b"d" * 65536)
            fd = os.open(vol.mountpoint / "faulty", os.O_RDONLY | os.O_DIRECT)
            try:
                os.read(fd, 4096)
            except OSError:
                pass
            finally:
                os.close(fd)

    thread = threading.Thread(target=workload, daemon=True)
    thread.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "interposer.cli", "top", "--url", collector.metrics_url, "--once",
             "--interval", "2"],
            capture_output=True, text=True, timeout=60,
            env={k: v for k, v in os.environ.items() if k != "COLUMNS"})  # piped, as in a CI log: no cells cut
    finally:
        stop.set()
        thread.join(10)
    assert proc.returncode == 0, proc.stderr
    [row] = [line for line in proc.stdout.splitlines() if volume in line]
    cells = [cell.strip() for cell in row.strip("│┃| ").split("│")]
    assert cells[:3] == [volume, "ns1", "pod1"], cells
    iops, _read_mb, write_mb, p99_ms, errors, faults, late_p99_ms = (float(c) for c in cells[3:10])
    assert iops > 0 and write_mb > 0 and p99_ms >= 1.0, "writes of /data are delayed 1 ms"
    assert errors > 0 and faults > 0, "every read of /faulty fails on purpose"
    # The delayed writes' lateness: a number, not "-". Not compared with the p99 of all ops: that
    # may fall inside the writes' spread, below the tail of their lateness on a busy host.
    assert late_p99_ms >= 0
    # Each round writes /data whole (one 64 KiB request at 0) and reads /faulty's first 4 KiB (refused, but
    # asked): every request starts a file, and they average 34 KiB.
    assert cells[10:12] == ["100%", "34"], cells
    assert cells[12] == "up" and int(cells[13].split()[0]) > 10, cells  # the worker's RSS, MiB


def _rendered_cells(table) -> dict[str, list[str]]:  # noqa: ANN001 - a rich Table
    """The table as a plain-text terminal shows it: first cell → the row's cells."""
    console = Console(width=250, record=True, color_system=None)
    console.print(table)
    rows = [line for line in console.export_text().splitlines() if line.startswith("│")]
    cells = [[cell.strip() for cell in line.strip("│").split("│")] for line in rows]
    return {row[0]: row for row in cells}
