"""The real collector process against a real nats-server, scraped over HTTP."""

from __future__ import annotations

import errno
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from collector_helpers import (
    CollectorProcess,
    Samples,
    batch_message,
    event,
    publish,
    status_message,
    value,
    wait_for,
)

from interposer.cli._procs import free_port, start_nats_server
from interposer.proto import FaultRecord

pytestmark = pytest.mark.nats

StartCollector = Callable[..., CollectorProcess]


def volume_id(name: str) -> str:
    """A volume id no other test (or earlier run on the shared server) uses."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_batches_and_status_become_metrics(nats_url: str, start_collector: StartCollector) -> None:
    collector = start_collector()
    volume = volume_id("vol")
    publish(nats_url, [
        batch_message(volume, [
            event("read", result=4096, duration_ns=3_000_000),
            event("read", result=4096, duration_ns=3_000_000, throttle_ns=1_000_000, sequential=True),
            event("write", result=100, duration_ns=40_000),
            event("copy_file_range", result=1000, duration_ns=50_000),
            event("read", errno=errno.EIO, fault="EIO", delay_ns=2_000_000, duration_ns=2_100_000,
                  delay_late_ns=40_000),
            event("lookup", errno=errno.ENOENT),
        ], seq=1, dropped_total=2),
        batch_message(volume, [event("getattr")], seq=2, dropped_total=3),
        status_message(volume, policy_revision=7, ops_total=7, events_dropped_total=4,
                       sent_at_s=1_700_000_000.5),
    ])

    def everything_arrived() -> Samples | None:
        samples = collector.scrape()
        arrived = (value(samples, "interposer_worker_policy_revision", volume=volume) == 7
                   and value(samples, "interposer_ops_total", volume=volume) == 7)
        return samples if arrived else None

    samples = wait_for(everything_arrived, what="the batches and the heartbeat in /metrics")
    vnp = dict(volume=volume, namespace="default", pod="app-0")
    assert value(samples, "interposer_ops_total", op="read", result="ok", **vnp) == 2
    assert value(samples, "interposer_ops_total", op="read", result="EIO", **vnp) == 1
    assert value(samples, "interposer_ops_total", op="lookup", result="ENOENT", **vnp) == 1
    # A copy served inside the volume read and wrote its bytes there.
    assert value(samples, "interposer_bytes_total", direction="read", **vnp) == 8192 + 1000
    assert value(samples, "interposer_bytes_total", direction="write", **vnp) == 100 + 1000
    assert value(samples, "interposer_op_duration_seconds_bucket", op="read", le="0.0025", **vnp) == 1
    assert value(samples, "interposer_op_duration_seconds_bucket", op="read", le="0.005", **vnp) == 3
    assert value(samples, "interposer_op_duration_seconds_count", op="read", **vnp) == 3
    assert value(samples, "interposer_injected_faults_total", op="read", errno="EIO", **vnp) == 1
    assert value(samples, "interposer_injected_delay_seconds_total", op="read", **vnp) == pytest.approx(0.002)
    assert value(samples, "interposer_throttle_wait_seconds_total", op="read", **vnp) == pytest.approx(0.001)
    assert value(samples, "interposer_delay_lateness_seconds_count", op="read", **vnp) == 1
    assert value(samples, "interposer_delay_lateness_seconds_bucket", op="read", le="2.5e-05", **vnp) == 0
    assert value(samples, "interposer_delay_lateness_seconds_bucket", op="read", le="5e-05", **vnp) == 1
    assert value(samples, "interposer_delay_lateness_seconds_sum", op="read", **vnp) == pytest.approx(4e-05)
    assert value(samples, "interposer_io_size_bytes_bucket", op="read", le="2048.0", **vnp) == 1  # the EIO one
    assert value(samples, "interposer_io_size_bytes_bucket", op="read", le="4096.0", **vnp) == 3
    assert value(samples, "interposer_io_size_bytes_sum", op="write", **vnp) == 100
    assert value(samples, "interposer_sequential_ops_total", op="read", **vnp) == 1
    assert value(samples, "interposer_sequential_ops_total", op="write", **vnp) == 0
    assert value(samples, "interposer_events_dropped_total", **vnp) == 4
    assert value(samples, "interposer_worker_ops_total", **vnp) == 7
    assert value(samples, "interposer_worker_last_heartbeat_timestamp_seconds",
                 volume=volume) == pytest.approx(1_700_000_000.5)
    assert value(samples, "interposer_collector_batches_total") == 2
    assert value(samples, "interposer_collector_events_total") == 7
    assert value(samples, "interposer_collector_decode_errors_total") == 0


def test_garbage_is_counted_and_the_collector_keeps_working(nats_url: str,
                                                            start_collector: StartCollector) -> None:
    collector = start_collector()
    volume = volume_id("garbage")
    good_subject, good_payload = batch_message(volume, [event("read", result=1)])
    other_volume_payload = batch_message("other-volume", [event("read")])[1]
    publish(nats_url, [
        (good_subject, b"\xc1 not msgpack at all"),
        (good_subject, b""),
        (good_subject, b'{"json": "is not msgpack"}'),
        (good_subject, b"\x93\x01\x02\x03"),  # valid msgpack, not an EventBatch
        (f"interposer.status.{volume}", b"\xff\xff"),
        (f"interposer.faults.{volume}", b"\x91\x01"),  # an array, but not of FaultRecord
        (f"interposer.faults.{volume}", msgspec.msgpack.encode([FaultRecord(time_ns=1, op="read", path="/f",
                                                                            kind="errno", volume="other")])),
        (good_subject, other_volume_payload),  # payload's volume does not match the subject
        (good_subject, good_payload),
        (f"interposer.faults.{volume}", msgspec.msgpack.encode([FaultRecord(
            time_ns=1, op="read", path="/f", kind="short_read", volume=volume, worker_id="w-1")])),
    ])
    wait_for(lambda: collector.value("interposer_collector_decode_errors_total") == 8,
             what="8 decode errors")
    wait_for(lambda: collector.value("interposer_ops_total", volume=volume) == 1, what="the good batch")
    wait_for(lambda: collector.value("interposer_fault_records_total", volume=volume, kind="short_read") == 1,
             what="the good fault record")
    assert collector.value("interposer_collector_batches_total") == 1
    # Still alive and still consuming.
    publish(nats_url, [batch_message(volume, [event("write", result=3)], seq=2)])
    wait_for(lambda: collector.value("interposer_bytes_total", volume=volume, direction="write") == 3,
             what="a batch after the garbage")
    assert "dropped malformed message" in collector.child.log_path.read_text()


def test_two_replicas_count_every_batch_exactly_once(nats_url: str, start_collector: StartCollector) -> None:
    replicas = [start_collector(), start_collector()]
    volume = volume_id("shared")
    n_batches, events_per_batch = 200, 10
    publish(nats_url, [
        batch_message(volume, [event("read", result=1)] * events_per_batch, seq=seq)
        for seq in range(1, n_batches + 1)
    ])

    def total(name: str, **labels: str) -> float:
        return sum(replica.value(name, **labels) for replica in replicas)

    wait_for(lambda: total("interposer_collector_batches_total") >= n_batches, what="all batches")
    time.sleep(0.5)  # anything double-delivered would arrive by now
    assert total("interposer_collector_batches_total") == n_batches
    assert total("interposer_ops_total", volume=volume) == n_batches * events_per_batch
    assert total("interposer_bytes_total", volume=volume) == n_batches * events_per_batch
    per_replica = [replica.value("interposer_collector_batches_total") for replica in replicas]
    assert all(count > 0 for count in per_replica), f"the queue group did not share the load: {per_replica}"

    # Heartbeats are not queue-grouped: every replica sees every one.
    publish(nats_url, [status_message(volume, policy_revision=3, ops_total=2000)])
    for replica in replicas:
        wait_for(lambda r=replica: r.value("interposer_worker_policy_revision", volume=volume) == 3,
                 what="the heartbeat on every replica")


def test_sigterm_drains_and_exits_cleanly(start_collector: StartCollector) -> None:
    collector = start_collector()
    proc = collector.child.proc
    assert proc is not None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    log_text = collector.child.log_path.read_text()
    assert "received SIGTERM" in log_text
    assert "drained NATS subscriptions" in log_text


def test_serves_metrics_while_nats_is_unreachable(start_collector: StartCollector) -> None:
    collector = start_collector(nats_url=f"nats://127.0.0.1:{free_port()}", wait_connected=False)
    time.sleep(1.0)  # a few failed connect attempts
    assert collector.value("interposer_collector_nats_connected") == 0
    proc = collector.child.proc
    assert proc is not None
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0
    assert "stopping before NATS was reached" in collector.child.log_path.read_text()


def test_reconnects_after_nats_restarts(start_collector: StartCollector, tmp_path: Path) -> None:
    port = free_port()
    own_nats, url = start_nats_server(tmp_path / "own-nats", port=port)
    try:
        collector = start_collector("--reconnect-time-wait", "0.2", nats_url=url)
        volume = volume_id("restart")
        publish(url, [batch_message(volume, [event("read")], seq=1)])
        wait_for(lambda: collector.value("interposer_ops_total", volume=volume) == 1, what="first batch")

        own_nats.stop()
        wait_for(lambda: collector.value("interposer_collector_nats_connected") == 0, what="the disconnect")
        own_nats, url = start_nats_server(tmp_path / "own-nats", port=port)
        wait_for(lambda: collector.value("interposer_collector_nats_connected") == 1, timeout_s=20.0,
                 what="the reconnect")
        publish(url, [batch_message(volume, [event("read")], seq=2)])
        wait_for(lambda: collector.value("interposer_ops_total", volume=volume) == 2,
                 what="a batch after the reconnect")
    finally:
        own_nats.stop()
