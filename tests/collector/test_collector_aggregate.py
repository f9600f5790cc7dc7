"""Unit tests of the aggregation and its Prometheus rendering (no NATS, no HTTP)."""

from __future__ import annotations

import errno
import threading

import pytest
from collector_helpers import event, parse_metrics, value
from interposer.collector import DURATION_BUCKETS_S, SIZE_BUCKETS_BYTES, Aggregator, errno_name, make_registry
from interposer.proto import EventBatch, FaultRecord, OpEvent, WorkerStatus
from prometheus_client import generate_latest

LABELS = ("vol-a", "team-x", "trainer-0")


def batch(events: list[OpEvent], *, volume: str = "vol-a", worker_id: str = "w-1", dropped_total: int = 0,
          namespace: str = "team-x", pod: str = "trainer-0") -> EventBatch:
    return EventBatch(volume=volume, worker_id=worker_id, seq=1, events=events, dropped_total=dropped_total,
                      namespace=namespace, pod=pod)


def status(*, volume: str = "vol-a", worker_id: str = "w-1", revision: int = 0, ops_total: int = 0,
           dropped: int = 0, sent_at_s: float = 1000.0, namespace: str = "team-x",
           pod: str = "trainer-0", **extra: object) -> WorkerStatus:
    return WorkerStatus(volume=volume, worker_id=worker_id, policy_revision=revision, ops_total=ops_total,
                        events_total=ops_total, events_dropped_total=dropped, events_published_total=0,
                        started_at_s=900.0, sent_at_s=sent_at_s, namespace=namespace, pod=pod,
                        **extra)  # type: ignore[arg-type]


class FakeClock:
    """A monotonic clock the test moves by hand, seconds."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_ops_counted_by_op_and_result_name() -> None:
    agg = Aggregator()
    agg.add_batch(batch([
        event("read", result=10), event("read", result=10), event("read", errno=errno.EIO),
        event("lookup", errno=errno.ENOENT), event("getattr"),
    ]))
    ops = agg.snapshot().ops
    assert ops == {
        (*LABELS, "read", "ok"): 2,
        (*LABELS, "read", "EIO"): 1,
        (*LABELS, "lookup", "ENOENT"): 1,
        (*LABELS, "getattr", "ok"): 1,
    }


def test_errno_name() -> None:
    assert errno_name(0) == "ok"
    assert errno_name(errno.ENOSPC) == "ENOSPC"
    assert errno_name(99999) == "99999"


def test_bytes_only_from_successful_reads_and_writes() -> None:
    agg = Aggregator()
    agg.add_batch(batch([
        event("read", result=4096), event("read", result=100),
        event("write", result=512),
        event("read", result=777, errno=errno.EIO),  # failed: not counted even if result is set
        event("write", result=999, errno=errno.ENOSPC),
        event("getxattr", result=55),  # not a data op
    ]))
    moved = agg.snapshot().bytes
    assert moved == {(*LABELS, "read"): 4196, (*LABELS, "write"): 512}


@pytest.mark.parametrize(("duration_ns", "upper_bound_s"), [
    (0, 1e-05),
    (10_000, 1e-05),          # exactly on a bound: le is "less or equal"
    (10_001, 2.5e-05),
    (3_000_000, 0.005),
    (1_000_000_000, 1.0),
    (10_000_000_000, 10.0),
    (10_000_000_001, float("inf")),
])
def test_histogram_bucket_placement(duration_ns: int, upper_bound_s: float) -> None:
    agg = Aggregator()
    agg.add_batch(batch([event("read", duration_ns=duration_ns)]))
    counts, sum_s = agg.snapshot().durations[(*LABELS, "read")]
    assert len(counts) == len(DURATION_BUCKETS_S) + 1
    assert sum(counts) == 1
    index = counts.index(1)
    bounds = [*DURATION_BUCKETS_S, float("inf")]
    assert bounds[index] == upper_bound_s
    assert sum_s == pytest.approx(duration_ns / 1e9)


def test_histogram_buckets_cover_10us_to_10s_in_1_2_5_steps() -> None:
    assert DURATION_BUCKETS_S[0] == pytest.approx(10e-6)
    assert DURATION_BUCKETS_S[-1] == pytest.approx(10.0)
    assert list(DURATION_BUCKETS_S) == sorted(DURATION_BUCKETS_S)
    assert len(DURATION_BUCKETS_S) == 19


def test_histogram_exposition_is_cumulative() -> None:
    agg = Aggregator()
    agg.add_batch(batch([event("write", duration_ns=d) for d in (5_000, 30_000, 30_000, 2_000_000_000)]))
    samples = parse_metrics(generate_latest(make_registry(agg)).decode())
    labels = dict(volume="vol-a", op="write")
    assert value(samples, "interposer_op_duration_seconds_bucket", le="1e-05", **labels) == 1
    assert value(samples, "interposer_op_duration_seconds_bucket", le="5e-05", **labels) == 3
    assert value(samples, "interposer_op_duration_seconds_bucket", le="1.0", **labels) == 3
    assert value(samples, "interposer_op_duration_seconds_bucket", le="2.5", **labels) == 4
    assert value(samples, "interposer_op_duration_seconds_bucket", le="+Inf", **labels) == 4
    assert value(samples, "interposer_op_duration_seconds_count", **labels) == 4
    assert value(samples, "interposer_op_duration_seconds_sum", **labels) == pytest.approx(2.000065)


def test_faults_delay_and_throttle() -> None:
    agg = Aggregator()
    agg.add_batch(batch([
        event("read", errno=errno.EIO, fault="EIO"),
        event("read", errno=errno.EIO, fault="EIO"),
        event("write", errno=errno.ENOSPC, fault="ENOSPC", delay_ns=2_000_000),
        event("read", result=10, delay_ns=1_000_000, throttle_ns=500_000_000),
        event("read", errno=errno.EIO),  # a real error, not injected
    ]))
    snap = agg.snapshot()
    assert snap.faults == {(*LABELS, "read", "EIO"): 2, (*LABELS, "write", "ENOSPC"): 1}
    assert snap.delay_s == {(*LABELS, "write"): pytest.approx(0.002), (*LABELS, "read"): pytest.approx(0.001)}
    assert snap.throttle_wait_s == {(*LABELS, "read"): pytest.approx(0.5)}
    assert snap.ops[(*LABELS, "read", "EIO")] == 3


def test_delay_lateness_is_a_histogram_of_the_delayed_ops_only() -> None:
    agg = Aggregator()
    agg.add_batch(batch([
        event("read", result=10, delay_ns=1_000_000),  # on time
        event("read", result=10, delay_ns=1_000_000, delay_late_ns=30_000),
        event("read", result=10, delay_ns=1_000_000, delay_late_ns=3_000_000),
        event("read", result=10, delay_late_ns=7),  # no delay asked: not a delayed op
        event("getattr"),
    ]))
    counts, sum_s = agg.snapshot().delay_lateness[(*LABELS, "read")]
    assert sum(counts) == 3 and sum_s == pytest.approx(0.00303)
    bounds = list(DURATION_BUCKETS_S)
    assert counts[0] == 1  # 0 ns: the first bucket (≤ 10 µs)
    assert counts[bounds.index(50e-6)] == 1 and counts[bounds.index(5e-3)] == 1
    assert set(agg.snapshot().delay_lateness) == {(*LABELS, "read")}


def test_request_sizes_and_sequential_requests_of_reads_and_writes() -> None:
    agg = Aggregator()
    agg.add_batch(batch([
        event("read", result=4096, sequential=True),
        event("read", size=4096, errno=errno.EIO),  # a failed request still had its size and place
        event("read", result=100, size=1 << 20, sequential=True),  # short at end of file: size asked counts
        event("write", result=600),
        event("write", result=(1 << 20) + 1),  # past the largest bound
        event("getattr"),
    ]))
    snap = agg.snapshot()
    bounds = list(SIZE_BUCKETS_BYTES)
    read_counts, read_sum = snap.io_sizes[(*LABELS, "read")]
    assert read_counts[bounds.index(4096)] == 2 and read_counts[bounds.index(1 << 20)] == 1
    assert sum(read_counts) == 3 and read_sum == 4096 + 4096 + (1 << 20)
    write_counts, write_sum = snap.io_sizes[(*LABELS, "write")]
    assert write_counts[bounds.index(1024)] == 1 and write_counts[-1] == 1 and write_sum == 600 + (1 << 20) + 1
    assert snap.sequential_ops == {(*LABELS, "read"): 2, (*LABELS, "write"): 0}
    assert set(snap.io_sizes) == {(*LABELS, "read"), (*LABELS, "write")}


def test_dropped_is_max_per_worker_summed_over_workers() -> None:
    agg = Aggregator()
    agg.add_batch(batch([event("read")], worker_id="w-1", dropped_total=5))
    agg.add_batch(batch([event("read")], worker_id="w-1", dropped_total=3))  # out of order: max stays 5
    agg.add_status(status(worker_id="w-1", dropped=4))
    agg.add_status(status(worker_id="w-2", dropped=7))  # restarted worker, new id
    agg.add_batch(batch([], worker_id="w-2", dropped_total=9))
    agg.add_batch(batch([], volume="vol-b", worker_id="w-9", dropped_total=1))
    snap = agg.snapshot()
    assert snap.events_dropped == {LABELS: 5 + 9, ("vol-b", "team-x", "trainer-0"): 1}


def test_worker_status_counters_and_gauges() -> None:
    agg = Aggregator()
    agg.add_status(status(worker_id="w-1", ops_total=100, revision=3, sent_at_s=1000.0))
    agg.add_status(status(worker_id="w-1", ops_total=150, revision=4, sent_at_s=1002.0))
    agg.add_status(status(worker_id="w-1", ops_total=120, revision=3, sent_at_s=1001.0))  # late arrival
    agg.add_status(status(worker_id="w-2", ops_total=10, revision=4, sent_at_s=1003.0))
    snap = agg.snapshot()
    assert snap.worker_ops == {LABELS: 160}
    assert snap.worker_internal_errors == {LABELS: 0}
    assert snap.policy_revision == {"vol-a": 4}
    assert snap.last_heartbeat_s == {"vol-a": 1003.0}
    assert snap.status_total == 4


def test_worker_up_while_heartbeats_are_younger_than_three_intervals() -> None:
    clock = FakeClock()
    agg = Aggregator(clock=clock)
    agg.add_status(status(worker_id="w-1", status_interval_s=2.0))
    assert agg.snapshot().worker_up == {LABELS: 1}
    clock.now_s += 5.9  # < 3 × 2 s
    assert agg.snapshot().worker_up == {LABELS: 1}
    clock.now_s += 0.2
    assert agg.snapshot().worker_up == {LABELS: 0}
    agg.add_status(status(worker_id="w-2", status_interval_s=1.0))  # the restarted worker
    assert agg.snapshot().worker_up == {LABELS: 1}
    clock.now_s += 3.0
    assert agg.snapshot().worker_up == {LABELS: 0}


def test_a_worker_that_stopped_on_request_is_neither_up_nor_down() -> None:
    """An unmount is not an outage: ``worker_up`` == 0 (what an alert fires on) is kept
    for workers that went silent without saying they stopped."""
    clock = FakeClock()
    agg = Aggregator(clock=clock)
    agg.add_status(status(worker_id="w-1", sent_at_s=1000.0, open_files=2))
    clock.now_s += 10  # w-1 went silent: crashed or killed
    assert agg.snapshot().worker_up == {LABELS: 0}
    agg.add_status(status(worker_id="w-2", sent_at_s=1010.0, open_files=1))  # its replacement
    assert agg.snapshot().worker_up == {LABELS: 1}
    agg.add_status(status(worker_id="w-2", sent_at_s=1011.0, open_files=0, stopped=True))  # then unmounted
    snap = agg.snapshot()
    assert snap.worker_up == {} and snap.open_files == {} and snap.volume_info == {}
    samples = parse_metrics(generate_latest(make_registry(agg)).decode())
    assert not any(name == "interposer_worker_up" for name, _ in samples)
    clock.now_s += 100
    assert agg.snapshot().worker_up == {}  # and stays so
    agg.add_status(status(worker_id="w-3", sent_at_s=1200.0))  # mounted again
    assert agg.snapshot().worker_up == {LABELS: 1}


def test_a_late_heartbeat_of_a_stopped_worker_does_not_revive_it() -> None:
    agg = Aggregator(clock=FakeClock())
    agg.add_status(status(sent_at_s=1001.0, stopped=True))
    agg.add_status(status(sent_at_s=1000.0))  # sent before, arrived after
    assert agg.snapshot().worker_up == {}


def test_an_unmounted_volume_leaves_the_metrics_after_the_retention_and_a_silent_one_stays() -> None:
    """A cluster that runs a short job per new volume must not grow /metrics forever."""
    clock = FakeClock()
    agg = Aggregator(clock=clock, forget_stopped_after_s=300.0)
    vol_b, vol_c = ("vol-b", "team-x", "trainer-0"), ("vol-c", "team-x", "trainer-0")
    for volume in ("vol-a", "vol-b", "vol-c"):
        agg.add_batch(batch([event("read", result=4096)], volume=volume))
        agg.add_status(status(volume=volume, ops_total=1))
    agg.add_status(status(sent_at_s=1001.0, ops_total=1, stopped=True))  # vol-a unmounted
    agg.add_status(status(volume="vol-c", sent_at_s=1001.0, ops_total=1, stopped=True))
    clock.now_s += 200
    agg.add_faults([fault(volume="vol-c")])  # late news of vol-c: its retention starts again
    clock.now_s += 99.9
    assert {key[0] for key in agg.snapshot().ops} == {"vol-a", "vol-b", "vol-c"}  # final counts still scraped
    clock.now_s += 0.2
    snap = agg.snapshot()
    assert {key[0] for key in snap.ops} == {"vol-b", "vol-c"}
    assert LABELS not in snap.worker_ops and LABELS not in snap.events_dropped
    assert "vol-a" not in snap.policy_revision and "vol-a" not in snap.last_heartbeat_s
    assert snap.worker_up == {vol_b: 0}  # vol-b went silent without a goodbye: kept, reported down
    clock.now_s += 200
    snap = agg.snapshot()
    assert {key[0] for key in snap.ops} == {"vol-b"} and snap.worker_up == {vol_b: 0}
    samples = parse_metrics(generate_latest(make_registry(agg)).decode())
    assert {dict(labels).get("volume") for _, labels in samples} - {None} == {"vol-b"}
    assert not any(key[0] == "vol-c" for key in snap.fault_records)


def test_a_silent_volume_reads_down_for_an_hour_then_leaves() -> None:
    """A worker that died on a node that then unpublished its volume must not read "down" forever."""
    clock = FakeClock()
    agg = Aggregator(clock=clock, forget_stopped_after_s=300.0, forget_silent_after_s=3600.0)
    agg.add_batch(batch([event("read")]))
    agg.add_status(status(ops_total=1))
    clock.now_s += 3599.9
    snap = agg.snapshot()
    assert snap.worker_up == {LABELS: 0} and LABELS in snap.worker_ops and snap.ops
    clock.now_s += 0.2
    snap = agg.snapshot()
    assert (snap.worker_up, snap.worker_ops, snap.ops, snap.policy_revision) == ({}, {}, {}, {})


def test_a_volume_is_kept_while_one_of_its_workers_runs() -> None:
    clock = FakeClock()
    agg = Aggregator(clock=clock, forget_stopped_after_s=10.0)
    agg.add_status(status(worker_id="w-1", sent_at_s=1000.0, ops_total=5, stopped=True))
    agg.add_status(status(worker_id="w-2", sent_at_s=1000.0, ops_total=7))
    clock.now_s += 11
    agg.add_status(status(worker_id="w-2", sent_at_s=1011.0, ops_total=8))
    assert agg.snapshot().worker_ops == {LABELS: 5 + 8}  # the stopped worker's count stays in the sum


def test_quota_and_open_files_come_from_the_newest_heartbeat_of_an_up_worker() -> None:
    clock = FakeClock()
    agg = Aggregator(clock=clock)
    agg.add_status(status(sent_at_s=1000.0, open_files=3, quota_bytes_used=10, quota_bytes_limit=100,
                          quota_inodes_used=2))
    agg.add_status(status(sent_at_s=1001.0, open_files=1, quota_bytes_used=40, quota_bytes_limit=100,
                          quota_inodes_used=5, kernel_passthrough_files=1, files_bypassing_layers=1,
                          burst_balance=0.25, resident_memory_bytes=441 << 20))
    agg.add_status(status(sent_at_s=999.0, open_files=9, quota_bytes_used=1))  # late arrival: ignored
    agg.add_status(status(volume="vol-b", sent_at_s=1001.0))  # no quota in force
    snap = agg.snapshot()
    vol_b = ("vol-b", "team-x", "trainer-0")
    assert snap.open_files == {LABELS: 1, vol_b: 0}
    assert (snap.quota_used_bytes, snap.quota_limit_bytes) == ({LABELS: 40}, {LABELS: 100})
    assert (snap.quota_used_inodes, snap.quota_limit_inodes) == ({LABELS: 5}, {})
    samples = parse_metrics(generate_latest(make_registry(agg)).decode())
    assert value(samples, "interposer_quota_used_bytes", volume="vol-a") == 40
    assert value(samples, "interposer_quota_limit_bytes", volume="vol-a") == 100
    assert value(samples, "interposer_quota_used_inodes", volume="vol-a") == 5
    assert value(samples, "interposer_open_files", volume="vol-a", namespace="team-x", pod="trainer-0") == 1
    assert value(samples, "interposer_kernel_passthrough_open_files", volume="vol-a") == 1
    assert value(samples, "interposer_open_files_bypassing_layers", volume="vol-a") == 1
    assert value(samples, "interposer_burst_balance_ratio", volume="vol-a") == 0.25
    assert value(samples, "interposer_worker_resident_memory_bytes", volume="vol-a") == 441 << 20
    assert not any(name == "interposer_worker_resident_memory_bytes" and ("volume", "vol-b") in labels
                   for name, labels in samples)  # not reported: absent, not 0
    assert not any(name == "interposer_burst_balance_ratio" and ("volume", "vol-b") in labels
                   for name, labels in samples)  # no sized bucket: absent, not 1
    assert value(samples, "interposer_kernel_passthrough_open_files", volume="vol-b") == 0
    assert value(samples, "interposer_worker_up", volume="vol-b") == 1
    assert not any(name == "interposer_quota_limit_inodes" for name, _ in samples)
    clock.now_s += 10  # the worker stopped: its gauges go, worker_up says why
    snap = agg.snapshot()
    assert snap.open_files == {} and snap.quota_used_bytes == {} and snap.worker_up == {LABELS: 0, vol_b: 0}


def fault(op: str = "read", kind: str = "errno", err: str = "EIO", **extra: object) -> FaultRecord:
    fields: dict = {"volume": "vol-a", "worker_id": "w-1", "namespace": "team-x", "pod": "trainer-0", **extra}
    return FaultRecord(time_ns=1, op=op, path="/f", kind=kind, errno=err, **fields)


def test_fault_records_by_op_kind_and_errno() -> None:
    agg = Aggregator()
    agg.add_faults([fault(), fault(), fault("write", "errno", "ENOSPC"), fault(kind="short_read", err="")])
    agg.add_batch(batch([], worker_id="w-old"))
    agg.add_faults([fault(worker_id="w-old", namespace="", pod="")])  # an older worker: labels of its batches
    assert agg.snapshot().fault_records == {
        (*LABELS, "read", "errno", "EIO"): 3, (*LABELS, "write", "errno", "ENOSPC"): 1,
        (*LABELS, "read", "short_read", ""): 1,
    }
    samples = parse_metrics(generate_latest(make_registry(agg)).decode())
    assert value(samples, "interposer_fault_records_total", op="read", kind="short_read") == 1
    assert value(samples, "interposer_fault_records_total", kind="errno", errno="EIO") == 3


def test_unknown_pod_gives_empty_labels() -> None:
    agg = Aggregator()
    agg.add_batch(batch([event("read")], namespace="", pod=""))
    assert ("vol-a", "", "", "read", "ok") in agg.snapshot().ops


def test_collector_self_counters() -> None:
    agg = Aggregator()
    agg.add_batch(batch([event("read")] * 3))
    agg.add_batch(batch([event("write")] * 2))
    agg.add_decode_error()
    agg.add_slow_consumer_drop()
    agg.set_nats_connected(True)
    snap = agg.snapshot()
    assert (snap.batches_total, snap.events_total, snap.decode_errors_total) == (2, 5, 1)
    assert snap.slow_consumer_drops_total == 1
    assert snap.nats_disconnects_total == 0
    assert snap.nats_connected


def test_a_lost_nats_connection_is_counted_and_marks_the_collector_disconnected() -> None:
    agg = Aggregator()
    agg.set_nats_connected(True)
    agg.add_nats_disconnect()
    snap = agg.snapshot()
    assert (snap.nats_disconnects_total, snap.nats_connected) == (1, False)
    agg.set_nats_connected(True)  # reconnected: the count stays
    agg.add_nats_disconnect()
    assert agg.snapshot().nats_disconnects_total == 2


def test_internal_errors_are_the_largest_count_per_worker_summed_over_workers() -> None:
    """A worker bug answered EIO is told apart from the backing store's EIO: its own counter."""
    agg = Aggregator()
    agg.add_status(status(worker_id="w-1", internal_errors_total=2, sent_at_s=1000.0))
    agg.add_status(status(worker_id="w-1", internal_errors_total=1, sent_at_s=999.0))  # late arrival
    agg.add_status(status(worker_id="w-2", internal_errors_total=3, sent_at_s=1001.0))  # the restarted worker
    samples = parse_metrics(generate_latest(make_registry(agg)).decode())
    assert value(samples, "interposer_worker_internal_errors_total", volume="vol-a", namespace="team-x",
                 pod="trainer-0") == 5


def test_exposition_has_every_metric_and_no_path_label() -> None:
    agg = Aggregator()
    agg.add_batch(batch([event("read", result=1, fault="EIO", errno=errno.EIO, delay_ns=1, throttle_ns=1),
                         event("read", result=1)]))
    agg.add_status(status(ops_total=2, revision=1))
    text = generate_latest(make_registry(agg)).decode()
    samples = parse_metrics(text)
    names = {name for name, _ in samples}
    for name in [
        "interposer_ops_total", "interposer_op_duration_seconds_bucket", "interposer_bytes_total",
        "interposer_injected_faults_total", "interposer_injected_delay_seconds_total",
        "interposer_throttle_wait_seconds_total", "interposer_events_dropped_total",
        "interposer_worker_ops_total", "interposer_worker_policy_revision",
        "interposer_worker_last_heartbeat_timestamp_seconds", "interposer_collector_batches_total",
        "interposer_collector_events_total", "interposer_collector_decode_errors_total",
        "interposer_collector_slow_consumer_drops_total", "interposer_collector_nats_disconnects_total",
    ]:
        assert name in names, name
    assert "/data/file.bin" not in text
    assert all("path" not in dict(labels) for _, labels in samples)
    assert value(samples, "interposer_ops_total", volume="vol-a", namespace="team-x", pod="trainer-0",
                 op="read", result="EIO") == 1
    assert value(samples, "interposer_injected_faults_total", errno="EIO", op="read") == 1


def test_registry_is_not_the_global_default() -> None:
    from prometheus_client import REGISTRY

    agg = Aggregator()
    registry = make_registry(agg)
    assert registry is not REGISTRY
    assert REGISTRY.get_sample_value("interposer_collector_batches_total") is None
    assert registry.get_sample_value("interposer_collector_batches_total") == 0


def test_snapshot_while_adding_from_another_thread() -> None:
    agg = Aggregator()
    registry = make_registry(agg)
    events = [event("read", result=1)] * 100
    done = threading.Event()

    def feed() -> None:
        for _ in range(300):
            agg.add_batch(batch(events))
        done.set()

    thread = threading.Thread(target=feed)
    thread.start()
    while not done.is_set():
        generate_latest(registry)  # must never see a dict change size mid-iteration
    thread.join()
    assert registry.get_sample_value("interposer_ops_total", {
        "volume": "vol-a", "namespace": "team-x", "pod": "trainer-0", "op": "read", "result": "ok"}) == 30_000
