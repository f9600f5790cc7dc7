"""Worker heartbeats and fault records end to end: a real mount → NATS → a real collector's /metrics.

Quota usage and limits, open files, the worker's resident memory and worker health come from the heartbeat
(``WorkerStatus``); ``interposer_fault_records_total`` from the fault records
(``interposer.faults.<volume>``), which count short reads too.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid
from collections.abc import Callable

import pytest
from telemetry_helpers import Collector, memory_limited_cgroup, wait_for

from interposer.cli._metrics import scrape
from interposer.fuse_worker._cgroup import memory_limit_bytes
from interposer_testing import MountedVolume

pytestmark = [pytest.mark.nats, pytest.mark.fuse]

#: The quota of the test's policy.
QUOTA_BYTES, QUOTA_INODES = 1 << 20, 50
POLICY = {"layers": [
    {"type": "quota", "bytes": QUOTA_BYTES, "inodes": QUOTA_INODES},
    {"type": "fault", "errno": "EIO", "probability": 1.0, "ops": ["read"], "path_glob": "/bad"},
    {"type": "fault", "kind": "short_read", "probability": 1.0, "ops": ["read"], "path_glob": "/short"},
]}
#: Failed reads of /bad the test makes.
BAD_READS = 3


def test_quota_open_files_fault_records_and_worker_up_reach_the_collector(
        nats_url: str, mount_worker: Callable[..., MountedVolume], start_collector: Callable[..., Collector]) -> None:
    collector = start_collector()
    volume = f"wst-{uuid.uuid4().hex[:8]}"
    vol = mount_worker(volume, nats_url=nats_url, policy=json.dumps(POLICY),
                       extra=["--pod-namespace", "team-q", "--pod-name", "app-q", "--pod-uid", "uid-q",
                              "--service-account", "sa-q"])
    labels = {"volume": volume, "namespace": "team-q", "pod": "app-q"}
    (vol.mountpoint / "a").write_bytes(b"a" * 10_000)
    (vol.mountpoint / "bad").write_bytes(b"b" * 100)
    (vol.mountpoint / "short").write_bytes(b"s" * 4096)
    fd = os.open(vol.mountpoint / "bad", os.O_RDONLY)
    for _ in range(BAD_READS):
        with pytest.raises(OSError) as info:
            os.pread(fd, 100, 0)
        assert info.value.errno == errno.EIO
    os.close(fd)
    fd = os.open(vol.mountpoint / "short", os.O_RDONLY)
    assert len(os.pread(fd, 4096, 0)) == 2048, "one short read (ratio 0.5)"
    os.close(fd)
    held = os.open(vol.mountpoint / "a", os.O_RDONLY)  # the one open file
    try:
        expected = {
            "interposer_worker_up": 1, "interposer_open_files": 1, "interposer_volume_info": 1,
            "interposer_quota_used_bytes": 10_000 + 100 + 4096, "interposer_quota_limit_bytes": QUOTA_BYTES,
            "interposer_quota_used_inodes": 3, "interposer_quota_limit_inodes": QUOTA_INODES,
        }
        seen: dict[str, float] = {}

        def arrived() -> bool:
            seen.update({name: collector.total(name, **labels) for name in expected})
            seen["errno"] = collector.total("interposer_fault_records_total", op="read", kind="errno", errno="EIO",
                                            **labels)
            seen["short_read"] = collector.total("interposer_fault_records_total", op="read", kind="short_read",
                                                 **labels)
            return seen == {**expected, "errno": BAD_READS, "short_read": 1}

        wait_for(arrived, what="heartbeat gauges and fault records in the collector", interval_s=0.3)
        # the worker's RSS, to compare with its pod's memory limit: what /proc says of the same process
        rss_kib = next(int(line.split()[1]) for line in open(f"/proc/{vol.proc.pid}/status")
                       if line.startswith("VmRSS:"))
        reported = collector.total("interposer_worker_resident_memory_bytes", **labels)
        assert 0.8 * rss_kib * 1024 <= reported <= 1.25 * rss_kib * 1024
        assert collector.total("interposer_injected_faults_total", op="read", errno="EIO", **labels) == BAD_READS
        # podInfoOnMount's uid and ServiceAccount, for joins on the volume
        assert collector.total("interposer_volume_info", pod_uid="uid-q", service_account="sa-q", **labels) == 1
    finally:
        os.close(held)
    wait_for(lambda: collector.total("interposer_open_files", **labels) == 0, what="the file to be released")
    vol.unmount()

    def gone() -> bool:  # an unmount is not an outage: no worker_up series, not 0
        return not {"interposer_worker_up", "interposer_quota_used_bytes", "interposer_volume_info"} & collector_names(
            collector, volume)

    wait_for(gone, what="the unmounted worker's series to go", interval_s=0.3)


def test_a_killed_worker_is_reported_down(
        nats_url: str, mount_worker: Callable[..., MountedVolume], start_collector: Callable[..., Collector]) -> None:
    """A worker that dies leaves the pod a dead mount (ENOTCONN): ``interposer_worker_up`` 0, what alerts fire on."""
    collector = start_collector()
    volume = f"wst-{uuid.uuid4().hex[:8]}"
    vol = mount_worker(volume, nats_url=nats_url, extra=["--pod-namespace", "team-q", "--pod-name", "app-k"])
    labels = {"volume": volume, "namespace": "team-q", "pod": "app-k"}
    wait_for(lambda: collector.total("interposer_worker_up", **labels) == 1, what="the worker up", interval_s=0.3)
    vol.proc.kill()
    vol.proc.wait()
    subprocess.run(["fusermount3", "-uz", str(vol.mountpoint)], check=False, capture_output=True)

    def down() -> bool:
        return ("interposer_worker_up" in collector_names(collector, volume)
                and collector.total("interposer_worker_up", **labels) == 0)

    wait_for(down, what="the killed worker to be reported down (3 missed heartbeats)", interval_s=0.3)


def test_the_worker_reports_the_memory_limit_of_its_cgroup(
        nats_url: str, mount_worker: Callable[..., MountedVolume], start_collector: Callable[..., Collector]) -> None:
    """What the worker's RSS is compared with (alert InterposerWorkerMemoryNearLimit): its pod's limit."""
    collector = start_collector()
    volume = f"wst-{uuid.uuid4().hex[:8]}"
    labels = {"volume": volume, "namespace": "team-q", "pod": "app-m"}
    with memory_limited_cgroup(768 << 20) as cgroup:
        vol = mount_worker(volume, nats_url=nats_url, extra=["--pod-namespace", "team-q", "--pod-name", "app-m"])
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(vol.proc.pid))  # as the kubelet puts a pod's container
            expected = 768 << 20
        else:  # no memory cgroup to create here (cgroup v2 without delegation): the one it runs in
            expected = memory_limit_bytes(f"/proc/{vol.proc.pid}/cgroup")
        wait_for(lambda: collector.total("interposer_worker_resident_memory_bytes", **labels) > 0,
                 what="the worker's heartbeat", interval_s=0.3)

        def reported() -> float | None:
            return next((value for (name, labels_), value in scrape(collector.metrics_url).items()
                         if name == "interposer_worker_memory_limit_bytes" and ("volume", volume) in labels_), None)

        wait_for(lambda: reported() == expected, what=f"memory limit {expected} reported", interval_s=0.3)
        vol.unmount()


def test_an_unmounted_volume_leaves_the_collectors_metrics_after_the_retention(
        nats_url: str, mount_worker: Callable[..., MountedVolume], start_collector: Callable[..., Collector]) -> None:
    """Every volume ever mounted staying on /metrics would grow it without bound on a busy cluster."""
    collector = start_collector("--forget-stopped-after", "3")
    volume = f"wst-{uuid.uuid4().hex[:8]}"
    vol = mount_worker(volume, nats_url=nats_url, extra=["--pod-namespace", "team-q", "--pod-name", "app-f"])
    (vol.mountpoint / "f").write_bytes(b"f" * 4096)
    wait_for(lambda: collector.total("interposer_bytes_total", volume=volume, direction="write") == 4096,
             what="the write in the collector", interval_s=0.3)
    vol.unmount()
    wait_for(lambda: not collector_names(collector, volume), what="the unmounted volume's series to go",
             interval_s=0.3)


def collector_names(collector: Collector, volume: str) -> set[str]:
    """Names of the samples the collector exports for ``volume``."""
    return {name for name, labels in scrape(collector.metrics_url) if ("volume", volume) in labels}


def test_a_spent_credit_bucket_shows_in_the_burst_balance_gauge(
        nats_url: str, mount_worker: Callable[..., MountedVolume], start_collector: Callable[..., Collector]) -> None:
    # As CloudWatch's BurstBalance: a bucket of 100 read credits earned at 1 per second;
    # 50 direct reads spend half of it, and the gauge shows it within a few heartbeats.
    collector = start_collector()
    volume = f"wsb-{uuid.uuid4().hex[:8]}"
    policy = {"layers": [{"type": "throttle", "iops": 1, "burst_ops": 100, "ops": ["read"]}]}
    vol = mount_worker(volume, nats_url=nats_url, policy=json.dumps(policy))
    (vol.backing / "data").write_bytes(os.urandom(64 * 4096))
    wait_for(lambda: collector.total("interposer_burst_balance_ratio", volume=volume) == 1.0,
             what="a full bucket in the gauge", interval_s=0.3)
    fd = os.open(vol.mountpoint / "data", os.O_RDONLY | os.O_DIRECT)
    try:
        for i in range(50):
            os.pread(fd, 4096, i * 4096)
    finally:
        os.close(fd)
    wait_for(lambda: 0.45 <= collector.total("interposer_burst_balance_ratio", volume=volume) <= 0.7,
             what="half the bucket spent in the gauge", interval_s=0.3)
