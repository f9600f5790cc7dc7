"""Aggregation of event batches and worker heartbeats into counters and histograms.

No I/O here: :class:`Aggregator` is fed decoded :class:`~interposer.proto.EventBatch`
and :class:`~interposer.proto.WorkerStatus` messages (from the NATS thread) and hands
out consistent :class:`Snapshot` copies (to the HTTP scrape thread). One lock guards
the state; it is held for one batch or one snapshot copy at a time.

The per-event loop is the collector's hot path: it touches only dicts keyed by
small tuples and a preallocated bucket list per op, and leaves every label
formatting (errno names, seconds) to snapshot time.
"""

from __future__ import annotations

import errno as _errno
import threading
import time
import typing
from bisect import bisect_left
from collections.abc import Callable, Iterable

import msgspec
from interposer.proto import EventBatch, FaultRecord, WorkerStatus

#: Upper bounds of the op-duration histogram buckets, ns: 10 µs … 10 s in 1-2.5-5 steps
#: (a ``+Inf`` bucket follows). Integers, so bucket placement needs no float conversion.
DURATION_BUCKETS_NS: tuple[int, ...] = (
    10_000, 25_000, 50_000,
    100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000,
    10_000_000, 25_000_000, 50_000_000,
    100_000_000, 250_000_000, 500_000_000,
    1_000_000_000, 2_500_000_000, 5_000_000_000,
    10_000_000_000,
)
#: The same bounds in seconds, as exported in the ``le`` label.
DURATION_BUCKETS_S: tuple[float, ...] = tuple(bound / 1e9 for bound in DURATION_BUCKETS_NS)
#: Upper bounds of the request-size histogram buckets, bytes: 512 B … 1 MiB in powers of
#: two (a ``+Inf`` bucket follows). 1 MiB is the largest READ/WRITE the worker asks the
#: kernel for (FUSE ``max_pages`` 256); 4 KiB is a page, the unit of buffered I/O.
SIZE_BUCKETS_BYTES: tuple[int, ...] = tuple(512 << shift for shift in range(12))
#: Ops whose request sizes and access pattern (``OpEvent.sequential``) are aggregated.
DATA_OPS = frozenset({"read", "write"})

#: ``result`` label of a successful op.
RESULT_OK = "ok"
#: ``direction`` label values of ``interposer_bytes_total``.
DIRECTION_READ = "read"
DIRECTION_WRITE = "write"

#: A worker is up while its newest heartbeat is younger than this many of its
#: heartbeat intervals (``WorkerStatus.status_interval_s``): one late or lost
#: heartbeat is not an outage, three in a row are.
WORKER_UP_HEARTBEATS = 3
#: How long the series of a volume whose workers all stopped on request
#: (``WorkerStatus.stopped``) stay on /metrics after the last news of it, seconds:
#: enough scrapes at common intervals (15–60 s) to record the final counts. Without
#: it every volume ever mounted stays forever, and a cluster running short jobs,
#: each on a new volume, grows the exposition without bound.
DEFAULT_FORGET_STOPPED_AFTER_S = 300.0
#: How long the series of a volume whose workers went silent without stopping stay,
#: seconds: ``interposer_worker_up`` 0 (alert ``InterposerWorkerDown``) for an hour,
#: then gone, so a worker that died on a node that then unpublished its volume does
#: not stay "down" on /metrics forever.
DEFAULT_FORGET_SILENT_AFTER_S = 3600.0

_NS_PER_S = 1_000_000_000
# Index of the running duration sum in an op's bucket list (after the +Inf bucket).
_SUM_INDEX = len(DURATION_BUCKETS_NS) + 1
# The same for the request-size bucket lists.
_SIZE_SUM_INDEX = len(SIZE_BUCKETS_BYTES) + 1

Labels3 = tuple[str, str, str]
"""``(volume, namespace, pod)``."""


def _histogram(buckets: list[int]) -> tuple[list[int], float]:
    """``(bucket_counts, sum_s)`` of a running bucket list (counts..., +Inf count, sum in ns), copied."""
    return buckets[:_SUM_INDEX], buckets[_SUM_INDEX] / _NS_PER_S


def _size_histogram(buckets: list[int]) -> tuple[list[int], float]:
    """``(bucket_counts, sum_bytes)`` of a running request-size bucket list, copied."""
    return buckets[:_SIZE_SUM_INDEX], float(buckets[_SIZE_SUM_INDEX])


def errno_name(number: int) -> str:
    """Return the ``result`` label of an errno number.

    Args:
        number: 0 for success, else a positive errno number.

    Returns:
        ``"ok"`` for 0, the platform's name (``"EIO"``) for a known errno, else the
        number as decimal text.
    """
    if number == 0:
        return RESULT_OK
    return _errno.errorcode.get(number, str(number))


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """A consistent copy of every aggregate, keyed by full label tuples.

    Counters are totals since the collector started. Every dict is a fresh copy the
    caller may keep.

    Attributes:
        ops: ``(volume, namespace, pod, op, result)`` → ops; ``result`` is ``"ok"`` or
            an errno name.
        durations: ``(volume, namespace, pod, op)`` → ``(bucket_counts, sum_s)``:
            non-cumulative counts per bucket of :data:`DURATION_BUCKETS_S` followed by
            the ``+Inf`` bucket, and the sum of durations in seconds.
        bytes: ``(volume, namespace, pod, direction)`` → bytes moved by successful
            reads (``"read"``) and writes (``"write"``).
        faults: ``(volume, namespace, pod, op, errno_name)`` → injected faults.
        delay_s: ``(volume, namespace, pod, op)`` → injected delay, seconds.
        delay_lateness: ``(volume, namespace, pod, op)`` → ``(bucket_counts, sum_s)``
            as ``durations``, of how late the worker resumed delayed ops after
            their delays (``OpEvent.delay_late_ns``; ops with ``delay_ns`` only).
        throttle_wait_s: ``(volume, namespace, pod, op)`` → throttle wait, seconds.
        io_sizes: ``(volume, namespace, pod, op)`` → ``(bucket_counts, sum_bytes)`` of
            the sizes of ``read`` and ``write`` requests (bytes asked), per bucket of
            :data:`SIZE_BUCKETS_BYTES` then ``+Inf``, non-cumulative.
        sequential_ops: ``(volume, namespace, pod, op)`` → ``read``/``write`` requests
            that continued their file's previous one (``OpEvent.sequential``).
        events_dropped: ``(volume, namespace, pod)`` → events the workers dropped.
        events_sampled_out: ``(volume, namespace, pod)`` → ops the workers' sampling
            rules kept out of the event stream.
        worker_ops: ``(volume, namespace, pod)`` → ops the workers report serving.
        worker_internal_errors: the same key → requests the workers answered EIO for
            an error in their own code (``WorkerStatus.internal_errors_total``).
        policy_revision: volume → policy revision in the newest heartbeat.
        last_heartbeat_s: volume → send time of the newest heartbeat, seconds since the
            Unix epoch.
        fault_records: ``(volume, namespace, pod, op, kind, errno_name)`` → fault
            records received (``errno_name`` is ``""`` unless ``kind == "errno"``).
        worker_up: ``(volume, namespace, pod)`` → of the worker heard from last, 1
            while its newest heartbeat is younger than :data:`WORKER_UP_HEARTBEATS`
            of its intervals (collector clock, from when the heartbeat arrived), else
            0 (it crashed, was killed, failed, or lost NATS); no entry when that
            heartbeat said it stopped on request (``WorkerStatus.stopped``: an
            unmount, not an outage). A worker replaced by a newer one no longer counts.
        open_files: ``(volume, namespace, pod)`` → open file handles (newest
            heartbeat of an up worker).
        kernel_passthrough_files: the same key → of those, the handles the kernel
            serves by passthrough (their reads and writes make no events).
        files_bypassing_layers: the same key → open files the policy in force would
            act on but cannot reach until reopened (``WorkerStatus.files_bypassing_layers``).
        quota_used_bytes: ``(volume, namespace, pod)`` → bytes in use, for up workers
            with a quota in force.
        quota_limit_bytes: the same key → byte limit, for quotas that have one.
        quota_used_inodes: the same key → inodes in use (quota in force).
        quota_limit_inodes: the same key → inode limit, for quotas that have one.
        burst_balance: the same key → how full, 0..1, the emptiest policy-sized
            throttle bucket is (``WorkerStatus.burst_balance``), for workers with one.
        resident_memory_bytes: the same key → the worker process's RSS, bytes, for
            workers that report it.
        memory_limit_bytes: the same key → the memory limit of the worker's cgroup,
            bytes, for workers that have one (``WorkerStatus.memory_limit_bytes``).
        volume_info: ``(volume, namespace, pod, pod_uid, service_account)`` → 1 for
            each up worker (newest heartbeat): who uses the volume, for joins in PromQL.
        batches_total: event batches aggregated.
        events_total: op events aggregated.
        status_total: worker heartbeats aggregated.
        decode_errors_total: malformed messages dropped.
        slow_consumer_drops_total: messages the collector's NATS client dropped because
            a subscription buffer was full (the collector fell behind).
        nats_disconnects_total: times the collector lost its NATS connection (what the
            server was still holding for it then is lost; see :meth:`Aggregator.add_nats_disconnect`).
        nats_connected: True while connected to NATS with subscriptions in place.
    """

    ops: dict[tuple[str, str, str, str, str], int]
    durations: dict[tuple[str, str, str, str], tuple[list[int], float]]
    bytes: dict[tuple[str, str, str, str], int]
    faults: dict[tuple[str, str, str, str, str], int]
    delay_s: dict[tuple[str, str, str, str], float]
    delay_lateness: dict[tuple[str, str, str, str], tuple[list[int], float]]
    throttle_wait_s: dict[tuple[str, str, str, str], float]
    io_sizes: dict[tuple[str, str, str, str], tuple[list[int], float]]
    sequential_ops: dict[tuple[str, str, str, str], int]
    events_dropped: dict[Labels3, int]
    events_sampled_out: dict[Labels3, int]
    worker_ops: dict[Labels3, int]
    worker_internal_errors: dict[Labels3, int]
    policy_revision: dict[str, int]
    last_heartbeat_s: dict[str, float]
    fault_records: dict[tuple[str, str, str, str, str, str], int]
    worker_up: dict[Labels3, int]
    open_files: dict[Labels3, int]
    kernel_passthrough_files: dict[Labels3, int]
    files_bypassing_layers: dict[Labels3, int]
    quota_used_bytes: dict[Labels3, int]
    quota_limit_bytes: dict[Labels3, int]
    quota_used_inodes: dict[Labels3, int]
    quota_limit_inodes: dict[Labels3, int]
    burst_balance: dict[Labels3, float]
    resident_memory_bytes: dict[Labels3, int]
    memory_limit_bytes: dict[Labels3, int]
    volume_info: dict[tuple[str, str, str, str, str], int]
    batches_total: int
    events_total: int
    status_total: int
    decode_errors_total: int
    slow_consumer_drops_total: int
    nats_disconnects_total: int
    nats_connected: bool


class _Group:
    """Aggregates of one ``(volume, namespace, pod)``; mutated under the aggregator lock."""

    __slots__ = ("ops", "durations", "bytes_read", "bytes_written", "faults", "delay_ns", "delay_lateness",
                 "throttle_ns", "io_sizes", "sequential", "fault_records", "updated_s")

    def __init__(self) -> None:
        self.ops: dict[tuple[str, int], int] = {}  # (op, errno number) → ops
        # op → [count per bucket ..., +Inf count, sum of durations in ns]
        self.durations: dict[str, list[int]] = {}
        self.bytes_read = 0
        self.bytes_written = 0
        self.faults: dict[tuple[str, str], int] = {}  # (op, errno name) → faults
        self.delay_ns: dict[str, int] = {}  # op → injected delay, ns
        # op → buckets of the delayed ops' lateness (``OpEvent.delay_late_ns``), as ``durations``
        self.delay_lateness: dict[str, list[int]] = {}
        self.throttle_ns: dict[str, int] = {}  # op → throttle wait, ns
        # read/write → [count per size bucket ..., +Inf count, sum of sizes in bytes]
        self.io_sizes: dict[str, list[int]] = {}
        self.sequential: dict[str, int] = {}  # read/write → requests continuing their file's previous one
        self.fault_records: dict[tuple[str, str, str], int] = {}  # (op, kind, errno name) → records
        self.updated_s = 0.0  # collector clock when a batch or fault record last arrived


class _Worker:
    """What the collector knows of one worker process (one ``(volume, worker_id)``)."""

    __slots__ = ("namespace", "pod", "dropped_total", "ops_total", "sampled_out_total", "internal_errors_total",
                 "status", "received_s", "updated_s")

    def __init__(self) -> None:
        self.namespace = ""
        self.pod = ""
        self.dropped_total = 0
        self.ops_total = 0
        self.sampled_out_total = 0
        self.internal_errors_total = 0
        self.status: WorkerStatus | None = None  # newest heartbeat (by send time)
        self.received_s = 0.0  # collector clock when the newest heartbeat arrived
        self.updated_s = 0.0  # collector clock when any message of this worker last arrived


class Aggregator:
    """Thread-safe running totals of everything the workers report.

    Feed it with :meth:`add_batch` and :meth:`add_status` (any thread), read it with
    :meth:`snapshot` (any thread).

    Worker-reported totals (``dropped_total``, ``ops_total``) are absolute counts of a
    worker process, so they are kept per ``(volume, worker_id)`` as the largest value
    seen (messages may arrive out of order, and each collector replica sees only some
    batches) and summed over the worker ids of a volume at snapshot time; a restarted
    worker has a new id, so the sum never goes down.

    The series of a ``(volume, namespace, pod)`` leave once each of its workers is
    finished: ``forget_stopped_after_s`` after the last message of a worker that
    stopped on request, ``forget_silent_after_s`` after that of one that went silent
    without stopping (``worker_up`` 0 is the news until then).

    Args:
        clock: monotonic clock of the collector, seconds (tests pass a fake one);
            heartbeat ages for ``worker_up`` are measured on it.
        forget_stopped_after_s: see :data:`DEFAULT_FORGET_STOPPED_AFTER_S`, seconds.
        forget_silent_after_s: see :data:`DEFAULT_FORGET_SILENT_AFTER_S`, seconds.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 forget_stopped_after_s: float = DEFAULT_FORGET_STOPPED_AFTER_S,
                 forget_silent_after_s: float = DEFAULT_FORGET_SILENT_AFTER_S) -> None:
        self._clock = clock
        self._forget_stopped_after_s = forget_stopped_after_s
        self._forget_silent_after_s = forget_silent_after_s
        self._lock = threading.Lock()
        self._groups: dict[Labels3, _Group] = {}
        self._workers: dict[tuple[str, str], _Worker] = {}  # (volume, worker_id) → worker
        self._heartbeats: dict[str, tuple[float, int]] = {}  # volume → (sent_at_s, revision)
        self._batches_total = 0
        self._events_total = 0
        self._status_total = 0
        self._decode_errors_total = 0
        self._slow_consumer_drops_total = 0
        self._nats_disconnects_total = 0
        self._nats_connected = False

    def _worker(self, volume: str, worker_id: str, namespace: str, pod: str) -> _Worker:
        # Caller holds the lock.
        worker = self._workers.get((volume, worker_id))
        if worker is None:
            worker = self._workers[(volume, worker_id)] = _Worker()
        worker.updated_s = self._clock()
        if namespace:
            worker.namespace = namespace
        if pod:
            worker.pod = pod
        return worker

    def add_batch(self, batch: EventBatch) -> None:
        """Add the events of one batch and the worker's dropped-event count.

        Args:
            batch: a decoded ``EventBatch``.
        """
        events = batch.events
        bounds = DURATION_BUCKETS_NS
        sum_index = _SUM_INDEX
        size_bounds = SIZE_BUCKETS_BYTES
        size_sum_index = _SIZE_SUM_INDEX
        data_ops = DATA_OPS
        with self._lock:
            key = (batch.volume, batch.namespace, batch.pod)
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group()
            group.updated_s = self._clock()
            ops = group.ops
            durations = group.durations
            io_sizes = group.io_sizes
            sequential = group.sequential
            bytes_read = 0
            bytes_written = 0
            for event in events:
                op = event.op
                err = event.errno
                op_key = (op, err)
                ops[op_key] = ops.get(op_key, 0) + 1
                buckets = durations.get(op)
                if buckets is None:
                    buckets = durations[op] = [0] * (sum_index + 1)
                duration_ns = event.duration_ns
                buckets[bisect_left(bounds, duration_ns)] += 1
                buckets[sum_index] += duration_ns
                if op in data_ops:
                    sizes = io_sizes.get(op)
                    if sizes is None:
                        sizes = io_sizes[op] = [0] * (size_sum_index + 1)
                    size = event.size
                    sizes[bisect_left(size_bounds, size)] += 1
                    sizes[size_sum_index] += size
                    if event.sequential:
                        sequential[op] = sequential.get(op, 0) + 1
                if err == 0:
                    if op == "read":
                        bytes_read += event.result
                    elif op == "write":
                        bytes_written += event.result
                    elif op == "copy_file_range":  # read and written inside the volume
                        bytes_read += event.result
                        bytes_written += event.result
                if event.fault:
                    fault_key = (op, event.fault)
                    group.faults[fault_key] = group.faults.get(fault_key, 0) + 1
                if event.delay_ns:
                    group.delay_ns[op] = group.delay_ns.get(op, 0) + event.delay_ns
                    late = group.delay_lateness.get(op)
                    if late is None:
                        late = group.delay_lateness[op] = [0] * (sum_index + 1)
                    late_ns = event.delay_late_ns
                    late[bisect_left(bounds, late_ns)] += 1
                    late[sum_index] += late_ns
                if event.throttle_ns:
                    group.throttle_ns[op] = group.throttle_ns.get(op, 0) + event.throttle_ns
            group.bytes_read += bytes_read
            group.bytes_written += bytes_written
            worker = self._worker(batch.volume, batch.worker_id, batch.namespace, batch.pod)
            if batch.dropped_total > worker.dropped_total:
                worker.dropped_total = batch.dropped_total
            if batch.sampled_out_total > worker.sampled_out_total:
                worker.sampled_out_total = batch.sampled_out_total
            self._batches_total += 1
            self._events_total += len(events)

    def add_status(self, status: WorkerStatus) -> None:
        """Add one worker heartbeat.

        Args:
            status: a decoded ``WorkerStatus``.
        """
        with self._lock:
            worker = self._worker(status.volume, status.worker_id, status.namespace, status.pod)
            if status.events_dropped_total > worker.dropped_total:
                worker.dropped_total = status.events_dropped_total
            if status.ops_total > worker.ops_total:
                worker.ops_total = status.ops_total
            if status.internal_errors_total > worker.internal_errors_total:
                worker.internal_errors_total = status.internal_errors_total
            if worker.status is None or status.sent_at_s >= worker.status.sent_at_s:
                worker.status = status
                worker.received_s = self._clock()
            newest = self._heartbeats.get(status.volume)
            if newest is None or status.sent_at_s >= newest[0]:
                self._heartbeats[status.volume] = (status.sent_at_s, status.policy_revision)
            self._status_total += 1

    def add_faults(self, records: Iterable[FaultRecord]) -> None:
        """Count fault records (one message of ``interposer.faults.<volume>``).

        Records from workers that do not send ``namespace``/``pod`` in them get the
        labels their worker's batches and heartbeats carried.

        Args:
            records: decoded ``FaultRecord`` s.
        """
        with self._lock:
            for record in records:
                namespace, pod = record.namespace, record.pod
                if not (namespace or pod):
                    worker = self._workers.get((record.volume, record.worker_id))
                    if worker is not None:
                        namespace, pod = worker.namespace, worker.pod
                key = (record.volume, namespace, pod)
                group = self._groups.get(key)
                if group is None:
                    group = self._groups[key] = _Group()
                group.updated_s = self._clock()
                record_key = (record.op, record.kind, record.errno)
                group.fault_records[record_key] = group.fault_records.get(record_key, 0) + 1

    def add_decode_error(self) -> None:
        """Count one malformed message."""
        with self._lock:
            self._decode_errors_total += 1

    def add_slow_consumer_drop(self) -> None:
        """Count one message NATS dropped because a subscription buffer was full."""
        with self._lock:
            self._slow_consumer_drops_total += 1

    def add_nats_disconnect(self) -> None:
        """Count one lost NATS connection (not a shutdown) and mark the collector disconnected.

        Core NATS delivers at most once: messages the server had buffered for this
        collector, and those published while it reconnects (unless another replica of the
        queue group takes them), are gone. A server also cuts off a client whose backlog
        exceeds its ``max_pending`` (slow consumer), so a disconnect is how falling far
        behind shows, and it must be counted, never only logged.
        """
        with self._lock:
            self._nats_disconnects_total += 1
            self._nats_connected = False

    def _forget_finished(self, now_s: float) -> None:
        """Drop the state of each ``(volume, namespace, pod)`` whose workers are all finished
        (see the class; caller holds the lock)."""
        workers_of: dict[Labels3, list[tuple[str, str]]] = {}
        expires_s: dict[Labels3, float] = {}
        for worker_key, worker in self._workers.items():
            key3 = (worker_key[0], worker.namespace, worker.pod)
            stopped = worker.status is not None and worker.status.stopped
            kept_s = self._forget_stopped_after_s if stopped else self._forget_silent_after_s
            expires_s[key3] = max(expires_s.get(key3, 0.0), worker.updated_s + kept_s)
            workers_of.setdefault(key3, []).append(worker_key)
        for key3, worker_keys in workers_of.items():
            group = self._groups.get(key3)
            if group is not None:  # a late batch or fault record restarts the wait
                expires_s[key3] = max(expires_s[key3], group.updated_s + self._forget_stopped_after_s)
            if now_s < expires_s[key3]:
                continue
            for worker_key in worker_keys:
                del self._workers[worker_key]
            self._groups.pop(key3, None)
        volumes = {volume for volume, _worker_id in self._workers}
        for volume in [v for v in self._heartbeats if v not in volumes]:
            del self._heartbeats[volume]

    def set_nats_connected(self, connected: bool) -> None:
        """Record whether the collector is connected to NATS and subscribed."""
        with self._lock:
            self._nats_connected = connected

    def snapshot(self) -> Snapshot:
        """Return a consistent copy of every aggregate (see :class:`Snapshot`).

        Takes time proportional to the number of series, not of events.
        """
        ops: dict[tuple[str, str, str, str, str], int] = {}
        durations: dict[tuple[str, str, str, str], tuple[list[int], float]] = {}
        moved: dict[tuple[str, str, str, str], int] = {}
        faults: dict[tuple[str, str, str, str, str], int] = {}
        delay_s: dict[tuple[str, str, str, str], float] = {}
        delay_lateness: dict[tuple[str, str, str, str], tuple[list[int], float]] = {}
        throttle_wait_s: dict[tuple[str, str, str, str], float] = {}
        io_sizes: dict[tuple[str, str, str, str], tuple[list[int], float]] = {}
        sequential_ops: dict[tuple[str, str, str, str], int] = {}
        events_dropped: dict[Labels3, int] = {}
        events_sampled_out: dict[Labels3, int] = {}
        worker_ops: dict[Labels3, int] = {}
        worker_internal_errors: dict[Labels3, int] = {}
        fault_records: dict[tuple[str, str, str, str, str, str], int] = {}
        worker_up: dict[Labels3, int] = {}
        latest: dict[Labels3, _Worker] = {}  # the worker heard from last
        newest: dict[Labels3, WorkerStatus] = {}  # newest heartbeat of an up worker
        with self._lock:
            now_s = self._clock()
            self._forget_finished(now_s)
            for (volume, namespace, pod), group in self._groups.items():
                for (op, err), count in group.ops.items():
                    key5 = (volume, namespace, pod, op, errno_name(err))
                    # Two numbers can share a name (never on Linux); add, never overwrite.
                    ops[key5] = ops.get(key5, 0) + count
                for op, buckets in group.durations.items():
                    durations[(volume, namespace, pod, op)] = _histogram(buckets)
                for op, buckets in group.delay_lateness.items():
                    delay_lateness[(volume, namespace, pod, op)] = _histogram(buckets)
                if group.bytes_read or "read" in group.durations:
                    moved[(volume, namespace, pod, DIRECTION_READ)] = group.bytes_read
                if group.bytes_written or "write" in group.durations:
                    moved[(volume, namespace, pod, DIRECTION_WRITE)] = group.bytes_written
                for (op, fault), count in group.faults.items():
                    faults[(volume, namespace, pod, op, fault)] = count
                for op, total_ns in group.delay_ns.items():
                    delay_s[(volume, namespace, pod, op)] = total_ns / _NS_PER_S
                for op, total_ns in group.throttle_ns.items():
                    throttle_wait_s[(volume, namespace, pod, op)] = total_ns / _NS_PER_S
                for op, buckets in group.io_sizes.items():
                    io_sizes[(volume, namespace, pod, op)] = _size_histogram(buckets)
                    # 0 rather than absent: a share of sequential requests needs both series
                    sequential_ops[(volume, namespace, pod, op)] = group.sequential.get(op, 0)
                for (op, kind, err), count in group.fault_records.items():
                    fault_records[(volume, namespace, pod, op, kind, err)] = count
            for (volume, _worker_id), worker in self._workers.items():
                key3 = (volume, worker.namespace, worker.pod)
                events_dropped[key3] = events_dropped.get(key3, 0) + worker.dropped_total
                events_sampled_out[key3] = events_sampled_out.get(key3, 0) + worker.sampled_out_total
                worker_ops[key3] = worker_ops.get(key3, 0) + worker.ops_total
                worker_internal_errors[key3] = worker_internal_errors.get(key3, 0) + worker.internal_errors_total
                status = worker.status
                if status is None:
                    continue
                if key3 not in latest or worker.received_s >= latest[key3].received_s:
                    latest[key3] = worker
                up = not status.stopped and _heard_lately(worker, status, now_s)
                if up and (key3 not in newest or status.sent_at_s >= newest[key3].sent_at_s):
                    newest[key3] = status
            for key3, worker in latest.items():
                status = worker.status
                assert status is not None
                if status.stopped:
                    continue  # unmounted on purpose: neither up nor down, so no series
                worker_up[key3] = int(_heard_lately(worker, status, now_s))
            heartbeats = dict(self._heartbeats)
            return Snapshot(
                ops=ops,
                durations=durations,
                bytes=moved,
                faults=faults,
                delay_s=delay_s,
                delay_lateness=delay_lateness,
                throttle_wait_s=throttle_wait_s,
                io_sizes=io_sizes,
                sequential_ops=sequential_ops,
                events_dropped=events_dropped,
                events_sampled_out=events_sampled_out,
                worker_ops=worker_ops,
                worker_internal_errors=worker_internal_errors,
                policy_revision={volume: revision for volume, (_, revision) in heartbeats.items()},
                last_heartbeat_s={volume: sent_at_s for volume, (sent_at_s, _) in heartbeats.items()},
                fault_records=fault_records,
                worker_up=worker_up,
                open_files={key3: status.open_files for key3, status in newest.items()},
                kernel_passthrough_files={key3: status.kernel_passthrough_files for key3, status in newest.items()},
                files_bypassing_layers={key3: status.files_bypassing_layers for key3, status in newest.items()},
                quota_used_bytes=_present(newest, "quota_bytes_used"),
                quota_limit_bytes=_present(newest, "quota_bytes_limit"),
                quota_used_inodes=_present(newest, "quota_inodes_used"),
                quota_limit_inodes=_present(newest, "quota_inodes_limit"),
                burst_balance=_present(newest, "burst_balance"),
                resident_memory_bytes=_present(newest, "resident_memory_bytes"),
                memory_limit_bytes=_present(newest, "memory_limit_bytes"),
                volume_info={(*key3, status.pod_uid, status.service_account): 1 for key3, status in newest.items()},
                batches_total=self._batches_total,
                events_total=self._events_total,
                status_total=self._status_total,
                decode_errors_total=self._decode_errors_total,
                slow_consumer_drops_total=self._slow_consumer_drops_total,
                nats_disconnects_total=self._nats_disconnects_total,
                nats_connected=self._nats_connected,
            )


def _heard_lately(worker: _Worker, status: WorkerStatus, now_s: float) -> bool:
    """Whether ``worker``'s newest heartbeat (``status``) arrived within :data:`WORKER_UP_HEARTBEATS`
    of its intervals before ``now_s`` (collector clock, seconds)."""
    return now_s - worker.received_s < WORKER_UP_HEARTBEATS * status.status_interval_s


def _present(statuses: dict[Labels3, WorkerStatus], field: str) -> dict[Labels3, typing.Any]:
    """``key → statuses[key].<field>`` for the heartbeats where that field is not None."""
    out: dict[Labels3, typing.Any] = {}
    for key3, status in statuses.items():
        value = getattr(status, field)
        if value is not None:
            out[key3] = value
    return out
