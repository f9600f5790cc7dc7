"""End to end: a real mount's I/O, recorded by a real collector, replayed by `interposer replay` into a slower mount.

The second mount (a delay layer on reads: the "slower storage") publishes its own events
to a second recording collector, so the test sees what reached it: the replay must send
it the same read and write requests the first mount served, and its report must show
the reads slowed by the delay and the work taking longer than recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from test_analyze_recorded_mount import (
    BLOCK,
    INTERPOSER,
    _direct_read,
    _direct_write,
    _start_collector,
    wait_until_counted,
)

from interposer.cli._analyze import read_recordings, recording_files
from interposer_testing import MountedVolume

pytestmark = [pytest.mark.nats, pytest.mark.fuse]

#: The slower mount's delay on every read, seconds.
READ_DELAY_S = 0.02


def _record_until_counted(tmp_path: Path, nats_url: str, name: str, volume: str,
                          work: Callable[[], None]) -> Path:
    """Run ``work`` with a recording collector; return the recordings once every op of ``volume`` is in them."""
    record_dir = tmp_path / name
    collector, metrics_url = _start_collector(tmp_path / f"{name}-collector", nats_url, record_dir)
    try:
        work()
        wait_until_counted(metrics_url, volume, time.time())
    finally:
        collector.stop()  # drains, then flushes and closes the recording
    return record_dir


def _requests(record_dir: Path, volume: str) -> Counter:
    """(op, path, offset, size) of every read and write of ``volume`` in the recordings."""
    return Counter((event.op, event.path, event.offset, event.size)
                   for batch in read_recordings(recording_files([record_dir])) if batch.volume == volume
                   for event in batch.events if event.op in {"read", "write"})


def test_a_replay_sends_the_recorded_requests_to_slower_storage_and_reports_the_cost(
        nats_url: str, mount_worker: Callable[..., MountedVolume], tmp_path: Path) -> None:
    (tmp_path / "rec-collector").mkdir()
    (tmp_path / "replayed-collector").mkdir()
    recorded_volume, slow_volume = f"rec-{uuid.uuid4().hex[:8]}", f"slow-{uuid.uuid4().hex[:8]}"

    def application() -> None:
        root = mount_worker(recorded_volume, nats_url=nats_url).mountpoint
        (root / "data").mkdir()
        _direct_write(root / "data" / "big.bin", 8)

        def reader() -> None:  # a second thread, reading while the first writes small files
            assert _direct_read(root / "data" / "big.bin", [5 * BLOCK, 1 * BLOCK, 6 * BLOCK], BLOCK) == [BLOCK] * 3

        thread = threading.Thread(target=reader)
        thread.start()
        for name in ("a", "b"):
            (root / "data" / f"{name}.tmp").write_bytes(b"y" * 1000)
            os.rename(root / "data" / f"{name}.tmp", root / "data" / f"{name}.txt")
        thread.join()

    recorded = _record_until_counted(tmp_path, nats_url, "rec", recorded_volume, application)
    result: dict = {}
    slow: list[MountedVolume] = []

    def replay() -> None:
        slow.append(mount_worker(slow_volume, nats_url=nats_url, policy=json.dumps(
            {"layers": [{"type": "delay", "delay_s": READ_DELAY_S, "ops": ["read"]}]})))
        run = subprocess.run([str(INTERPOSER), "replay", str(recorded), "--volume", recorded_volume, "--target",
                              str(slow[0].mountpoint), "--json"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        result.update(json.loads(run.stdout))

    replayed = _record_until_counted(tmp_path, nats_url, "replayed", slow_volume, replay)

    assert _requests(replayed, slow_volume) == _requests(recorded, recorded_volume), "the same requests, none more"
    rows = {row["op"]: row for row in result["per_op"]}
    assert all(row["errno_differs"] == 0 and row["replayed"] == row["recorded"] for row in rows.values()), rows
    assert rows["read"]["recorded"] == 3 and rows["read"]["recorded_p50_s"] < READ_DELAY_S
    assert rows["read"]["replayed_p50_s"] >= READ_DELAY_S, "the slower storage's reads"
    assert result["replayed_wall_s"] > result["recorded_wall_s"] and result["wall_ratio"] > 1
    assert result["threads"] >= 2 and result["written_bytes"] == 8 * BLOCK + 2 * 1000
    assert sorted(p.name for p in (slow[0].mountpoint / "data").iterdir()) == ["a.txt", "b.txt", "big.bin"]


def test_appends_to_a_log_replayed_onto_gcs_pay_its_whole_download_and_upload(
        nats_url: str, mount_worker: Callable[..., MountedVolume], tmp_path: Path) -> None:
    # A job appends to a log it found. On a disk each append is a small write; through gcsfuse,
    # a log under 2 MiB is downloaded whole at the first write after each open and uploaded whole
    # at the close. The replay must make the log as long as the job found it (the kernel sends
    # O_APPEND writes at the file's end), and the gcs profile must charge both transfers.
    (tmp_path / "rec-collector").mkdir()
    log_bytes, rate = 1 << 20, 8 << 20  # 1 MiB at 8 MiB/s: 0.125 s each way
    backing = tmp_path / "found"
    (backing / "logs").mkdir(parents=True)
    (backing / "logs" / "train.log").write_bytes(b"l" * log_bytes)
    recorded_volume = f"rec-{uuid.uuid4().hex[:8]}"

    def application() -> None:
        root = mount_worker(recorded_volume, nats_url=nats_url, backing=backing).mountpoint
        for epoch in range(3):
            fd = os.open(root / "logs" / "train.log", os.O_WRONLY | os.O_APPEND)
            try:
                assert os.write(fd, f"epoch {epoch}\n".encode()) == 8
            finally:
                os.close(fd)

    recorded = _record_until_counted(tmp_path, nats_url, "rec", recorded_volume, application)
    gcs = mount_worker("gcs", policy=json.dumps({"layers": [
        {"type": "profile", "name": "gcs", "rate_bytes_per_s": rate}]}))
    run = subprocess.run([str(INTERPOSER), "replay", str(recorded), "--volume", recorded_volume, "--target",
                          str(gcs.mountpoint), "--json"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = {row["op"]: row for row in json.loads(run.stdout)["per_op"]}
    transfer_s = log_bytes / rate
    assert rows["write"]["replayed"] == 3 and rows["write"]["errno_differs"] == 0
    assert rows["write"]["recorded_p50_s"] < transfer_s / 10
    assert rows["write"]["replayed_p50_s"] >= transfer_s, "each first write downloads the whole log"
    assert (gcs.backing / "logs" / "train.log").stat().st_size == log_bytes + 3 * 8
