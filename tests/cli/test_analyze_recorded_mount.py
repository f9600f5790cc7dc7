"""End to end: a real mount's I/O, recorded by a real collector, analysed by the `interposer analyze` command.

The application's requests reach the worker as they were made (O_DIRECT), so the test
knows every request: the report must say what the test did, and count the same ops
per op as the collector's /metrics did for the volume.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from interposer.cli._metrics import scrape, total
from interposer.cli._procs import Child
from interposer_testing import MountedVolume, wait_until

pytestmark = [pytest.mark.nats, pytest.mark.fuse]

#: Block of the big file's writes and reads, bytes.
BLOCK = 64 * 1024
#: Blocks written sequentially.
BLOCKS = 16
#: Blocks read back, in this order (some continue the previous read).
READ_BLOCKS = [3, 4, 9, 1, 2, 14, 15, 0]
#: Size of each small file, bytes.
SMALL_BYTES = 1000
#: Bytes appended to an existing small file, and written into another after O_TRUNC.
APPENDED, REWRITTEN = 100, 200
#: The installed console script, run as a user would.
INTERPOSER = Path(sys.executable).parent / "interposer"


def _start_collector(tmp_path: Path, nats_url: str, record_dir: Path) -> tuple[Child, str]:
    port_file = tmp_path / "collector.port"
    child = Child("collector", [sys.executable, "-m", "interposer.collector", "--listen", "127.0.0.1:0",
                                "--port-file", str(port_file), "--nats-url", nats_url,
                                "--record-dir", str(record_dir)], tmp_path / "collector.log").start()
    child.wait_ready(port_file.exists)
    url = f"http://127.0.0.1:{int(port_file.read_text())}/metrics"
    child.wait_ready(lambda: total(scrape(url), "interposer_collector_nats_connected") == 1)
    return child, url


def wait_until_counted(metrics_url: str, volume: str, after_s: float) -> None:
    """Wait until the collector has counted every op the worker served up to ``after_s`` (epoch seconds).

    A heartbeat sent after ``after_s`` says how many ops the worker had served by then;
    once the collector's event counts reach it, every event of those ops is in (and
    recorded). Comparing with an older heartbeat would miss ops served since.
    """

    def counted() -> bool:
        samples = scrape(metrics_url)
        sent_s = total(samples, "interposer_worker_last_heartbeat_timestamp_seconds", {"volume": volume})
        served = total(samples, "interposer_worker_ops_total", {"volume": volume})
        return sent_s > after_s and served > 0 and served == total(samples, "interposer_ops_total",
                                                                   {"volume": volume})

    wait_until(counted, f"the collector to count every op {volume} served", timeout_s=20)


def _direct_write(path: Path, blocks: int) -> None:
    buffer = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
    try:
        for index in range(blocks):
            buffer[:] = bytes([index]) * BLOCK
            assert os.pwritev(fd, [buffer], index * BLOCK) == BLOCK
    finally:
        os.close(fd)


def _direct_read(path: Path, offsets: list[int], size: int) -> list[int]:
    """Read ``size`` bytes at each offset in one open (O_DIRECT); bytes each returned."""
    buffer = mmap.mmap(-1, size)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return [os.preadv(fd, [buffer], offset) for offset in offsets]
    finally:
        os.close(fd)


def test_analyze_reports_what_the_application_did_on_a_recorded_mount(
        nats_url: str, mount_worker: Callable[..., MountedVolume], tmp_path: Path) -> None:
    record_dir = tmp_path / "recordings"
    collector, metrics_url = _start_collector(tmp_path, nats_url, record_dir)
    try:
        volume = f"ana-{uuid.uuid4().hex[:8]}"
        vol = mount_worker(volume, nats_url=nats_url)
        data, small = vol.mountpoint / "data", vol.mountpoint / "small"
        data.mkdir()
        small.mkdir()

        _direct_write(data / "big.bin", BLOCKS)
        got = _direct_read(data / "big.bin", [block * BLOCK for block in READ_BLOCKS], BLOCK)
        assert got == [BLOCK] * len(READ_BLOCKS)
        for name in ("a.txt", "b.txt", "c.txt"):
            fd = os.open(small / name, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
            try:
                assert os.write(fd, b"x" * SMALL_BYTES) == SMALL_BYTES
            finally:
                os.close(fd)
            assert os.stat(small / name).st_size == SMALL_BYTES
        # Read one whole: asked for more than it holds, got it all (a short read at its end).
        assert _direct_read(small / "a.txt", [0], BLOCK) == [SMALL_BYTES]
        # Change two that exist, as object stores would not have it: append to one, empty and rewrite the other.
        fd = os.open(small / "b.txt", os.O_WRONLY | os.O_APPEND)
        try:
            assert os.write(fd, b"+" * APPENDED) == APPENDED
        finally:
            os.close(fd)
        fd = os.open(small / "c.txt", os.O_WRONLY | os.O_TRUNC)
        try:
            assert os.write(fd, b"y" * REWRITTEN) == REWRITTEN
        finally:
            os.close(fd)

        wait_until_counted(metrics_url, volume, time.time())
        samples = scrape(metrics_url)
        metric_ops: dict[str, int] = {}
        for (name, labels), value in samples.items():
            label = dict(labels)
            if name == "interposer_ops_total" and label.get("volume") == volume:
                metric_ops[label["op"]] = metric_ops.get(label["op"], 0) + int(value)
        assert samples[("interposer_collector_record_errors_total", frozenset())] == 0
    finally:
        collector.stop()  # SIGTERM: drains, then flushes and closes the recording
    assert collector.proc is not None and collector.proc.returncode == 0, collector.log_tail()

    result = subprocess.run([str(INTERPOSER), "analyze", "--json", "--volume", volume, str(record_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    [report] = json.loads(result.stdout)["volumes"]

    assert report["ops"] == metric_ops
    big = report["top_files_by_bytes"][0]
    assert (big["path"], big["write_bytes"], big["write_ops"]) == ("/data/big.bin", BLOCKS * BLOCK, BLOCKS)
    assert (big["read_bytes"], big["read_ops"]) == (len(READ_BLOCKS) * BLOCK, len(READ_BLOCKS))
    assert report["written_bytes"] == BLOCKS * BLOCK + 3 * SMALL_BYTES + APPENDED + REWRITTEN
    assert report["read_bytes"] == len(READ_BLOCKS) * BLOCK + SMALL_BYTES
    assert report["sequential_writes"] == {"by_ops": 1.0, "by_bytes": 1.0}

    # The worker's rule, per file in arrival order: a request is sequential when it
    # begins where the file's previous read or write ended, or at offset 0.
    end = BLOCKS * BLOCK  # where the writes left big.bin
    sequential_reads = []
    for block in READ_BLOCKS:
        sequential_reads.append(block * BLOCK in (end, 0))
        end = (block + 1) * BLOCK
    sequential_reads.append(True)  # a.txt read whole, from 0
    read_sizes = [BLOCK] * len(READ_BLOCKS) + [SMALL_BYTES]
    assert report["sequential_reads"]["by_ops"] == pytest.approx(sum(sequential_reads) / len(sequential_reads))
    assert report["sequential_reads"]["by_bytes"] == pytest.approx(
        sum(n for n, s in zip(read_sizes, sequential_reads) if s) / sum(read_sizes))
    assert sum(sequential_reads) == 5  # blocks 4, 2 and 15 continue the previous read; block 0 and a.txt start at 0

    # Sessions: big.bin written, big.bin read at random, three small files written, a.txt read whole,
    # b.txt appended to, c.txt rewritten.
    assert report["sessions"]["count"] == 8
    assert report["sessions"]["whole_file_reads"] == 1
    assert report["read_sizes"]["median_bytes"] == BLOCK
    assert {d["path"] for d in report["top_directories"]} >= {"/", "/small"}
    assert report["batches_missing"] == 0 and report["events_dropped"] == 0

    # What object-store clients would make of it, from the open flags the kernel sent: the files
    # created (O_CREAT on their handles) were written front to back; b.txt was changed in place by
    # appends, c.txt emptied by O_TRUNC and rewritten.
    fit = report["object_store"]
    assert {key: fit[key] for key in ("changed_in_place", "appended", "overwritten", "out_of_order",
                                      "written_after_fsync", "renamed", "linked", "unknown_flags")} == {
        "changed_in_place": 1, "appended": 1, "overwritten": 1, "out_of_order": 0, "written_after_fsync": 0,
        "renamed": 0, "linked": 0, "unknown_flags": 0}
    assert fit["examples"] == {"changed_in_place": ["/small/b.txt"], "appended": ["/small/b.txt"],
                               "overwritten": ["/small/c.txt"]}
