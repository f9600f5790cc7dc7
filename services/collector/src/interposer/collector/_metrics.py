"""Prometheus exposition of the aggregates: a custom collector read at scrape time.

Nothing is registered in prometheus_client's global default registry: callers get a
fresh :class:`~prometheus_client.CollectorRegistry` from :func:`make_registry`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ._aggregate import DURATION_BUCKETS_S, SIZE_BUCKETS_BYTES, Aggregator, Snapshot

_VNP = ["volume", "namespace", "pod"]

# The exported families: name (without the ``_total`` a counter gets), type, labels, help.
# Kept in one table so describe(), the README and the tests agree.
METRICS: tuple[tuple[str, str, list[str], str], ...] = (
    ("interposer_ops", "counter", [*_VNP, "op", "result"],
     "FUSE ops served, by result: ok or the errno name returned (EIO, ENOENT, ...)."),
    ("interposer_op_duration_seconds", "histogram", [*_VNP, "op"],
     "Time the worker spent serving an op, seconds (includes injected delay and throttle wait)."),
    ("interposer_bytes", "counter", [*_VNP, "direction"],
     "Bytes moved by successful reads (direction=read) and writes (direction=write); "
     "a copy_file_range served in the volume counts in both."),
    ("interposer_injected_faults", "counter", [*_VNP, "op", "errno"],
     "Ops failed on purpose by a fault layer, by injected errno name."),
    ("interposer_injected_delay_seconds", "counter", [*_VNP, "op"],
     "Delay injected by delay layers, seconds."),
    ("interposer_delay_lateness_seconds", "histogram", [*_VNP, "op"],
     "How much later than its delay layers asked the worker resumed a delayed op, seconds (0 = on time): "
     "its scheduling lag (a CPU-bound worker, a descheduled vCPU), which the application sees on top of "
     "the delay. Delayed ops only."),
    ("interposer_throttle_wait_seconds", "counter", [*_VNP, "op"],
     "Time ops waited for throttle tokens, seconds."),
    ("interposer_io_size_bytes", "histogram", [*_VNP, "op"],
     "Size of read and write requests as they reached the worker (bytes asked; after the page cache: "
     "readahead and write-back merge a buffered application's I/O), bytes."),
    ("interposer_sequential_ops", "counter", [*_VNP, "op"],
     "Read and write requests that began where the previous one of the same file ended (or at offset 0: "
     "a file read or written from its start): divide by interposer_ops_total for the sequential share."),
    ("interposer_events_dropped", "counter", list(_VNP),
     "Op events the workers dropped because their buffer was full (summed over worker processes)."),
    ("interposer_events_sampled_out", "counter", list(_VNP),
     "Ops the workers served but, by their event sampling rules, did not turn into events."),
    ("interposer_worker_ops", "counter", list(_VNP),
     "FUSE ops the workers report serving, from their heartbeats (summed over worker processes)."),
    ("interposer_worker_internal_errors", "counter", list(_VNP),
     "Requests the workers answered EIO because of an error in their own code (a bug, logged with its "
     "traceback), not the backing store's: alert on any increase (summed over worker processes)."),
    ("interposer_worker_policy_revision", "gauge", ["volume"],
     "Policy revision in force in the volume's worker (newest heartbeat); 0 = initial policy."),
    ("interposer_worker_last_heartbeat_timestamp_seconds", "gauge", ["volume"],
     "Send time of the volume's newest worker heartbeat, seconds since the Unix epoch."),
    ("interposer_fault_records", "counter", [*_VNP, "op", "kind", "errno"],
     "Faults the workers recorded injecting (errno, short_read, short_write, corrupt), from their fault records."),
    ("interposer_worker_up", "gauge", list(_VNP),
     "1 while the volume's worker sent a heartbeat within the last 3 of its heartbeat intervals, else 0 "
     "(crashed, killed or cut off); absent once it stopped on request (unmounted)."),
    ("interposer_open_files", "gauge", list(_VNP),
     "Open file handles of the volume (file sessions between open/create and release)."),
    ("interposer_kernel_passthrough_open_files", "gauge", list(_VNP),
     "Open file handles the kernel serves by passthrough (worker --kernel-passthrough): their reads "
     "and writes reach no layer and are in no other metric."),
    ("interposer_open_files_bypassing_layers", "gauge", list(_VNP),
     "Open files the policy in force would act on but cannot reach until they are reopened: kernel "
     "passthrough handles whose reads or writes its layers act on, and handles opened without FLUSH "
     "whose flush they act on (both opened before the policy)."),
    ("interposer_worker_resident_memory_bytes", "gauge", list(_VNP),
     "Resident memory (RSS) of the volume's worker process, bytes (newest heartbeat): compare with "
     "interposer_worker_memory_limit_bytes; a passthrough worker's grows ~260 B per file or directory the "
     "kernel knows."),
    ("interposer_worker_memory_limit_bytes", "gauge", list(_VNP),
     "Memory limit of the worker's cgroup (its pod's limit), bytes: past it the kernel OOM-kills the worker "
     "and the volume's mount answers ENOTCONN; absent when unlimited or unknown."),
    ("interposer_quota_used_bytes", "gauge", list(_VNP),
     "Bytes (apparent file sizes) the volume's quota counts in use; absent without a quota."),
    ("interposer_quota_limit_bytes", "gauge", list(_VNP),
     "Byte limit of the volume's quota; absent without a byte limit."),
    ("interposer_quota_used_inodes", "gauge", list(_VNP),
     "Files, directories and links the volume's quota counts in use; absent without a quota."),
    ("interposer_quota_limit_inodes", "gauge", list(_VNP),
     "Inode limit of the volume's quota; absent without an inode limit."),
    ("interposer_burst_balance_ratio", "gauge", list(_VNP),
     "How full, 0..1, the emptiest burst bucket the volume's policy sized is (a throttle's burst_bytes or "
     "burst_ops: the credit buckets of the gp2 and st1 profiles), as CloudWatch's BurstBalance; absent "
     "without one."),
    ("interposer_volume_info", "gauge", [*_VNP, "pod_uid", "service_account"],
     "1 per volume with an up worker: the pod using it (uid, ServiceAccount; podInfoOnMount). Join on volume."),
    ("interposer_collector_batches", "counter", [], "Event batches this collector aggregated."),
    ("interposer_collector_events", "counter", [], "Op events this collector aggregated."),
    ("interposer_collector_status_messages", "counter", [], "Worker heartbeats this collector aggregated."),
    ("interposer_collector_decode_errors", "counter", [], "Malformed messages this collector dropped."),
    ("interposer_collector_slow_consumer_drops", "counter", [],
     "Messages NATS dropped because this collector fell behind (subscription buffer full)."),
    ("interposer_collector_nats_disconnects", "counter", [],
     ("Times this collector lost its NATS connection; what the server held for it then is lost "
      "(a server cuts off a collector that falls too far behind as a slow consumer).")),
    ("interposer_collector_nats_connected", "gauge", [],
     "1 while this collector is connected to NATS with its subscriptions in place, else 0."),
)

_HELP = {name: text for name, _type, _labels, text in METRICS}
_LABELS = {name: labels for name, _type, labels, _text in METRICS}
_DURATION_BOUNDS = [floatToGoString(bound) for bound in DURATION_BUCKETS_S]
_SIZE_BOUNDS = [floatToGoString(bound) for bound in SIZE_BUCKETS_BYTES]


def _counter(name: str, samples: Iterable[tuple[tuple[str, ...], float]]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, _HELP[name], labels=_LABELS[name])
    for labels, value in samples:
        family.add_metric(labels, value)
    return family


def _gauge(name: str, samples: Iterable[tuple[tuple[str, ...], float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, _HELP[name], labels=_LABELS[name])
    for labels, value in samples:
        family.add_metric(labels, value)
    return family


def _histogram(name: str, series: dict[tuple[str, ...], tuple[list[int], float]],
               bounds: list[str] = _DURATION_BOUNDS) -> HistogramMetricFamily:
    """A histogram family from ``labels → (non-cumulative counts per bound then +Inf, sum)``.

    ``bounds``: the ``le`` labels, :data:`DURATION_BUCKETS_S` (seconds) by default.
    """
    family = HistogramMetricFamily(name, _HELP[name], labels=_LABELS[name])
    for labels, (counts, total) in series.items():
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip(bounds, counts[:-1], strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        buckets.append(("+Inf", cumulative + counts[-1]))
        family.add_metric(list(labels), buckets, total)
    return family


def families(snapshot: Snapshot) -> Iterator[Metric]:
    """Yield every metric family of a snapshot, in the order of :data:`METRICS`.

    Args:
        snapshot: the aggregates to expose.

    Yields:
        prometheus_client metric families, ready for exposition.
    """
    yield _counter("interposer_ops", snapshot.ops.items())
    yield _histogram("interposer_op_duration_seconds", snapshot.durations)
    yield _counter("interposer_bytes", snapshot.bytes.items())
    yield _counter("interposer_injected_faults", snapshot.faults.items())
    yield _counter("interposer_injected_delay_seconds", snapshot.delay_s.items())
    yield _histogram("interposer_delay_lateness_seconds", snapshot.delay_lateness)
    yield _counter("interposer_throttle_wait_seconds", snapshot.throttle_wait_s.items())
    yield _histogram("interposer_io_size_bytes", snapshot.io_sizes, _SIZE_BOUNDS)
    yield _counter("interposer_sequential_ops", snapshot.sequential_ops.items())
    yield _counter("interposer_events_dropped", snapshot.events_dropped.items())
    yield _counter("interposer_events_sampled_out", snapshot.events_sampled_out.items())
    yield _counter("interposer_worker_ops", snapshot.worker_ops.items())
    yield _counter("interposer_worker_internal_errors", snapshot.worker_internal_errors.items())
    yield _gauge("interposer_worker_policy_revision",
                 (((volume,), revision) for volume, revision in snapshot.policy_revision.items()))
    yield _gauge("interposer_worker_last_heartbeat_timestamp_seconds",
                 (((volume,), sent_at_s) for volume, sent_at_s in snapshot.last_heartbeat_s.items()))
    yield _counter("interposer_fault_records", snapshot.fault_records.items())
    yield _gauge("interposer_worker_up", snapshot.worker_up.items())
    yield _gauge("interposer_open_files", snapshot.open_files.items())
    yield _gauge("interposer_kernel_passthrough_open_files", snapshot.kernel_passthrough_files.items())
    yield _gauge("interposer_open_files_bypassing_layers", snapshot.files_bypassing_layers.items())
    yield _gauge("interposer_quota_used_bytes", snapshot.quota_used_bytes.items())
    yield _gauge("interposer_quota_limit_bytes", snapshot.quota_limit_bytes.items())
    yield _gauge("interposer_quota_used_inodes", snapshot.quota_used_inodes.items())
    yield _gauge("interposer_quota_limit_inodes", snapshot.quota_limit_inodes.items())
    yield _gauge("interposer_burst_balance_ratio", snapshot.burst_balance.items())
    yield _gauge("interposer_worker_resident_memory_bytes", snapshot.resident_memory_bytes.items())
    yield _gauge("interposer_worker_memory_limit_bytes", snapshot.memory_limit_bytes.items())
    yield _gauge("interposer_volume_info", snapshot.volume_info.items())
    yield _counter("interposer_collector_batches", [((), snapshot.batches_total)])
    yield _counter("interposer_collector_events", [((), snapshot.events_total)])
    yield _counter("interposer_collector_status_messages", [((), snapshot.status_total)])
    yield _counter("interposer_collector_decode_errors", [((), snapshot.decode_errors_total)])
    yield _counter("interposer_collector_slow_consumer_drops", [((), snapshot.slow_consumer_drops_total)])
    yield _counter("interposer_collector_nats_disconnects", [((), snapshot.nats_disconnects_total)])
    yield _gauge("interposer_collector_nats_connected", [((), 1.0 if snapshot.nats_connected else 0.0)])


class MetricsCollector(Collector):
    """prometheus_client collector that renders an :class:`Aggregator` at scrape time.

    Args:
        aggregator: the running totals to expose.
    """

    def __init__(self, aggregator: Aggregator) -> None:
        self._aggregator = aggregator

    def describe(self) -> Iterator[Metric]:
        """Yield the (empty) families this collector exports, for registration checks."""
        for name, kind, labels, text in METRICS:
            if kind == "counter":
                yield CounterMetricFamily(name, text, labels=labels)
            elif kind == "gauge":
                yield GaugeMetricFamily(name, text, labels=labels)
            else:
                yield HistogramMetricFamily(name, text, labels=labels)

    def collect(self) -> Iterator[Metric]:
        """Yield every family, computed from one consistent snapshot of the aggregates."""
        yield from families(self._aggregator.snapshot())


def make_registry(aggregator: Aggregator) -> CollectorRegistry:
    """Return a fresh registry exposing ``aggregator`` (never the global default one).

    Args:
        aggregator: the running totals to expose.

    Returns:
        A ``CollectorRegistry`` holding one :class:`MetricsCollector`.
    """
    registry = CollectorRegistry(auto_describe=True)
    registry.register(MetricsCollector(aggregator))
    return registry
