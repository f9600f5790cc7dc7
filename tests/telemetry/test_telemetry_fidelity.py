"""Fidelity: after fio on a real mount, the collectors' totals equal the worker's and fio's.

The worker counts every op it serves (``WorkerStatus.ops_total``, exported as
``interposer_worker_ops_total``); the collector counts the events it received
(``interposer_ops_total``). With no event dropped and no sampling they must be equal,
exactly — also when two collector replicas share the event stream in their queue
group: each batch goes to one of them, so their ``interposer_ops_total`` sum to the
worker's count, while both see every heartbeat (``max``, not ``sum``, of the worker's). Bytes: fio opens with O_DIRECT, so every byte fio reads or writes is one FUSE
read/write byte — the collector's ``interposer_bytes_total`` must match fio's
``io_bytes`` within 1 % (it is exact here; metadata ops move no bytes, and fio's file
creation is an ftruncate, a ``setattr``, not a write: ``--fallocate=truncate``; with
fio's default, ``posix_fallocate`` is not supported by the FUSE mount and fio lays the
file out with writes of its own, which it does not count in ``io_bytes``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Callable

import pytest
from telemetry_helpers import Collector, wait_for

from interposer_testing import MountedVolume

pytestmark = [pytest.mark.nats, pytest.mark.fuse]

#: Size of fio's file, bytes (small: this is about counting, not speed).
FIO_SIZE_BYTES = 8 * 1024 * 1024
#: fio block size, bytes.
FIO_BLOCK_BYTES = 16 * 1024
#: Allowed relative gap between fio's and the collector's byte totals.
BYTES_TOLERANCE = 0.01


def _fio(directory: str) -> dict[str, int]:
    """Sequential write of one file, then random reads of it (O_DIRECT); bytes by direction."""
    fio = shutil.which("fio")
    assert fio, "fio is missing: apt-get install fio (make setup does)"
    common = [f"--directory={directory}", "--filename=fidelity.bin", "--ioengine=psync", "--direct=1",
              f"--bs={FIO_BLOCK_BYTES}", f"--size={FIO_SIZE_BYTES}", "--fallocate=truncate",
              "--output-format=json"]
    argv = [fio, *common, "--name=write", "--rw=write", "--name=read", "--stonewall", "--rw=randread"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {direction: sum(job[direction]["io_bytes"] for job in report["jobs"]) for direction in ("read", "write")}


def test_two_collectors_totals_sum_to_the_workers_and_fios(
        nats_url: str, mount_worker: Callable[..., MountedVolume], start_collector: Callable[..., Collector]) -> None:
    replicas = [start_collector(), start_collector()]

    def summed(name: str, **labels: str) -> float:
        return sum(replica.total(name, **labels) for replica in replicas)

    def worker_reported(name: str, **labels: str) -> float:
        return max(replica.total(name, **labels) for replica in replicas)

    volume = f"fid-{uuid.uuid4().hex[:8]}"
    vol = mount_worker(volume, nats_url=nats_url)
    fio_bytes = _fio(str(vol.mountpoint))
    assert fio_bytes == {"read": FIO_SIZE_BYTES, "write": FIO_SIZE_BYTES}

    seen: list[tuple[float, float]] = []

    def settled() -> bool:
        # Heartbeats come every second; settled = the worker's count stopped moving and
        # the collector has counted every event of it.
        worker_ops = worker_reported("interposer_worker_ops_total", volume=volume)
        event_ops = summed("interposer_ops_total", volume=volume)
        seen.append((worker_ops, event_ops))
        return len(seen) >= 3 and worker_ops > 0 and worker_ops == event_ops and seen[-3][0] == worker_ops

    wait_for(settled, what="the collectors to count every op the worker served", interval_s=0.5)
    assert [replica.total("interposer_worker_ops_total", volume=volume) for replica in replicas] == [seen[-1][0]] * 2
    assert summed("interposer_collector_batches_total") >= 2
    assert worker_reported("interposer_events_dropped_total", volume=volume) == 0
    assert worker_reported("interposer_events_sampled_out_total", volume=volume) == 0
    reads = summed("interposer_ops_total", volume=volume, op="read", result="ok")
    writes = summed("interposer_ops_total", volume=volume, op="write", result="ok")
    assert (reads, writes) == (FIO_SIZE_BYTES // FIO_BLOCK_BYTES,) * 2
    for direction, expected in fio_bytes.items():
        counted = summed("interposer_bytes_total", volume=volume, direction=direction)
        assert abs(counted - expected) <= BYTES_TOLERANCE * expected, (direction, counted, expected)
        assert counted == expected, "O_DIRECT: every fio byte is one FUSE byte"


def test_injected_faults_equal_the_errors_fio_saw(
        nats_url: str, mount_worker: Callable[..., MountedVolume], start_collector: Callable[..., Collector]) -> None:
    collector = start_collector()
    volume = f"fidf-{uuid.uuid4().hex[:8]}"
    policy = {"layers": [{"type": "fault", "errno": "EIO", "probability": 0.1, "ops": ["read"]}]}
    vol = mount_worker(volume, nats_url=nats_url, policy=json.dumps(policy))
    (vol.mountpoint / "fidelity.bin").write_bytes(b"\0" * FIO_SIZE_BYTES)
    fio = shutil.which("fio")
    assert fio, "fio is missing: apt-get install fio (make setup does)"
    proc = subprocess.run(
        [fio, f"--directory={vol.mountpoint}", "--filename=fidelity.bin", "--ioengine=psync", "--direct=1",
         f"--bs={FIO_BLOCK_BYTES}", f"--size={FIO_SIZE_BYTES}", "--name=read", "--rw=randread",
         "--continue_on_error=all", "--output-format=json"],
        capture_output=True, text=True, check=False, timeout=120)
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    fio_errors = sum(job["total_err"] for job in report["jobs"])
    assert fio_errors > 0, "10 % of 512 reads failed on purpose"

    def counted() -> float | None:
        faults = collector.total("interposer_injected_faults_total", volume=volume, op="read", errno="EIO")
        return faults if faults == fio_errors else None

    wait_for(counted, what=f"{fio_errors} injected faults in the collector", interval_s=0.5)
    assert collector.total("interposer_ops_total", volume=volume, op="read", result="EIO") == fio_errors
