"""``interposer analyze``: access patterns per volume from recorded event batches.

Prometheus metrics carry no path (one series per file would not scale), so what is
per file — hot files and directories, whole-file reads, request sizes, sequential
runs, quiet hours — is computed here, offline, from the batches the collectors
recorded (``interposer.proto.recording``). Pure computation: the only I/O is reading
the recordings.

Input order: each collector replica of the queue group records the batches it
received, so one worker's batches are spread over several files. The files of one
replica are read in name order (= start time) and the replicas' streams are merged
by the completion time of each batch's first event (:func:`read_recordings`), which
restores the order of the batches of one worker closely. Where order still matters
it is taken from the events' own times: the timeline buckets by ``start_ns``, and a
file session is judged by what its reads covered, not by the order they came in.

Memory: per volume, one entry per distinct path (~0.2 KiB with a 35-character path
and its five counters; measured), per directory with metadata ops, per distinct
request size, per worker process, ~0.7 KiB per file session still open (or released
less than :data:`SESSION_GRACE_S` ago in its worker's time: 60,000 of them at 1,000
sessions/s), 8 bytes per finished session, and at most :data:`MAX_FINE_BUCKETS`
timeline buckets; never per event.
"""

from __future__ import annotations

import datetime as dt
import errno as errno_module
import heapq
import itertools
import math
import os
import posixpath
import re
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import msgspec

from interposer.proto import EventBatch
from interposer.proto.recording import RECORDING_NAME_PATTERN, parse_recording_name, read_batches

from ._analyze_objects import ObjectStoreFit, ObjectStoreTally
from ._duration import parse_duration

_NS_PER_S = 1_000_000_000

#: Ops that move file data (their ``size``/``result``/``sequential`` count).
DATA_OPS = frozenset({"read", "write"})
#: Ops whose path is the directory they act on (other ops count for the directory their path is in).
DIRECTORY_OPS = frozenset({"opendir", "readdir", "readdirplus", "releasedir", "fsyncdir"})
#: Op that ends a file session.
RELEASE_OP = "release"
#: Ops besides writes that :class:`ObjectStoreTally` is told of.
OBJECT_STORE_OPS = frozenset({"fsync", RELEASE_OP, "rename", "link"})

#: Top files and directories listed by default.
DEFAULT_TOP = 10
#: Length of the quietest window looked for by default, seconds.
DEFAULT_WINDOW_S = 3600.0
#: The default timeline bucket is the smallest of :data:`TIMELINE_BUCKETS_S` giving at most this many buckets.
DEFAULT_TIMELINE_BUCKETS = 24
#: Most buckets a timeline may have (``--bucket`` too small for the span is refused).
MAX_TIMELINE_BUCKETS = 10_000
#: Bucket lengths the default timeline bucket is chosen from, seconds.
TIMELINE_BUCKETS_S = (1, 2, 10, 20, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 10800, 21600, 43200,
                      86400)
#: Resolutions of the internal per-volume timeline, seconds: each divides the next, and
#: all divide an hour, so hours of the day and coarser buckets are sums of whole ones.
FINE_STEPS_S = (1, 2, 10, 20, 60, 120, 600, 1200, 3600)
#: When a volume's span needs more fine buckets than this, the next step is used:
#: 1 s up to ~5.5 h of span, 10 s up to ~2.3 days, 60 s up to ~2 weeks, ….
MAX_FINE_BUCKETS = 20_000
#: Minimum span that gets ops by hour of the day, seconds.
HOURS_OF_DAY_MIN_SPAN_S = 86400
#: A released file session is finished once its worker's events reach this far past
#: the release (event time, seconds): later events of it, out of order by more than
#: this across the merged recordings, would count as a session of their own.
SESSION_GRACE_S = 60
#: A session whose reads cover more disjoint ranges than this is not tracked further
#: for whole-file reads (random access; it is counted as not whole).
MAX_SESSION_RANGES = 64



class AnalysisError(ValueError):
    """Input ``interposer analyze`` cannot use (the message is one line, for the user)."""


# ---- report -------------------------------------------------------------------------


class SizeBucket(msgspec.Struct, frozen=True):
    """Requests of up to ``le_bytes`` bytes and more than half that (``le_bytes`` 0: empty requests)."""

    le_bytes: int
    count: int


class SizeStats(msgspec.Struct, frozen=True, kw_only=True):
    """Request sizes (``OpEvent.size``, bytes asked for) of successful reads or writes.

    Attributes:
        count: requests.
        median_bytes: nearest-rank median (the smallest size at least half the
            requests do not exceed); None without requests.
        p90_bytes: nearest-rank 90th percentile; None without requests.
        buckets: counts per power-of-two bucket, smallest first, empty buckets left out.
    """

    count: int
    median_bytes: int | None
    p90_bytes: int | None
    buckets: list[SizeBucket]


class SequentialShare(msgspec.Struct, frozen=True, kw_only=True):
    """Share, 0..1, of successful requests with ``OpEvent.sequential`` set (None without requests).

    Attributes:
        by_ops: sequential requests / requests.
        by_bytes: bytes moved by sequential requests / bytes moved.
    """

    by_ops: float | None
    by_bytes: float | None


class Demand(msgspec.Struct, frozen=True, kw_only=True):
    """What the volume asked of its storage, per second: successful reads and writes that
    started in each whole second of the span (idle seconds count as 0).

    Compare with a storage profile's limits (``interposer profiles``: gp3 3,000 IOPS and
    125 MiB/s): a p99 above a limit means the workload would wait for the device in
    more than one second in a hundred. Requests are counted as they reached the
    worker (after the page cache; up to 1 MiB each), where clouds count I/Os of up to
    their own size (EBS SSD: 256 KiB), so a workload of large requests needs more
    device IOPS than ``iops`` says.

    Attributes:
        seconds: whole seconds in the span (the first event's to the last one's).
        iops_p50, iops_p99, iops_max: nearest-rank percentiles and the most of
            requests per second.
        bytes_per_s_p50, bytes_per_s_p99, bytes_per_s_max: the same of bytes moved
            per second (``result``).
    """

    seconds: int
    iops_p50: int
    iops_p99: int
    iops_max: int
    bytes_per_s_p50: int
    bytes_per_s_p99: int
    bytes_per_s_max: int


class FileStats(msgspec.Struct, frozen=True, kw_only=True):
    """One file (path at the time of the op; a renamed file shows under each name).

    Attributes:
        path: path inside the volume.
        read_bytes, write_bytes: bytes moved by its successful reads and writes.
        read_ops, write_ops: its reads and writes (any result).
        ops: every op naming it (metadata ops included).
    """

    path: str
    read_bytes: int
    write_bytes: int
    read_ops: int
    write_ops: int
    ops: int


class DirectoryStats(msgspec.Struct, frozen=True):
    """A directory and the metadata ops on it and on the entries in it."""

    path: str
    metadata_ops: int


class Sessions(msgspec.Struct, frozen=True, kw_only=True):
    """File sessions: what happened between an ``open``/``create`` and its ``release`` (``OpEvent.session``).

    Attributes:
        count: sessions with at least one event in range (also those whose open or
            release is outside it).
        whole_file_reads: sessions that read a non-empty file whole: the bytes their
            successful reads returned cover ``[0, end)`` without a gap, in any order
            (overlaps allowed), and one of them returned fewer bytes than it asked for
            exactly at ``end`` (``offset + result == end`` and ``result < size``: the
            end of the file; an empty read at ``end`` counts). A read served from the
            page cache never reaches the worker, so a session the kernel served is not
            counted.
        median_bytes: nearest-rank median of the bytes each session moved (successful
            reads plus writes); None without sessions.
    """

    count: int
    whole_file_reads: int
    median_bytes: int | None


class TimelineBucket(msgspec.Struct, frozen=True):
    """Ops that started in ``[start, start + bucket)`` and the bytes they moved."""

    start: dt.datetime
    ops: int
    bytes: int


class QuietWindow(msgspec.Struct, frozen=True, kw_only=True):
    """The window of the span with the fewest ops that started in it (ties: the earliest)."""

    start: dt.datetime
    end: dt.datetime
    ops: int
    bytes: int


class Timeline(msgspec.Struct, frozen=True, kw_only=True):
    """Ops over time, in buckets aligned to the Unix epoch (so hour buckets start on the UTC hour).

    Attributes:
        bucket_s: bucket length, seconds (``--bucket``, rounded up to a multiple of
            ``resolution_s``).
        resolution_s: the finest bucket the volume's span allowed (:data:`FINE_STEPS_S`):
            times are exact to it.
        buckets: every bucket from the first event's to the last one's, empty ones included.
        window_s: length of the quietest window looked for, seconds (``--window``,
            rounded up to a multiple of ``resolution_s``).
        quietest_window: the suggested maintenance window, within the span; None when the
            span is shorter than ``window_s``.
        ops_by_hour_utc: 24 counts, ops that started in each hour of the day (UTC),
            when the span covers at least 24 h; else None.
    """

    bucket_s: int
    resolution_s: int
    buckets: list[TimelineBucket]
    window_s: int
    quietest_window: QuietWindow | None
    ops_by_hour_utc: list[int] | None


class VolumeReport(msgspec.Struct, frozen=True, kw_only=True):
    """Access patterns of one volume over the events in range.

    Attributes:
        volume: volume id.
        pods: ``namespace/pod`` of the batches (empty when the workers did not know).
        workers: worker processes (``EventBatch.worker_id``) seen.
        first_event, last_event: start of the earliest and latest op (UTC).
        span_s: seconds between them.
        events: op events.
        ops: events by op name.
        errors: failed ops by errno name (``errno.errorcode``; the number if unknown).
        injected_faults: ops failed on purpose by a fault layer, by errno name.
        delayed_ops: ops a delay layer delayed; ``delay_s`` their injected delay, seconds.
        read_bytes, written_bytes: bytes moved by successful reads and writes
            (``result``; a ``copy_file_range`` inside the volume counts in both, as
            ``interposer_bytes_total`` counts it).
        read_sizes, write_sizes: request sizes.
        sequential_reads, sequential_writes: sequential share (``OpEvent.sequential``:
            the request began where its file's previous one ended, in arrival order,
            or at offset 0: a file read or written from its start).
        metadata_share: share, 0..1, of events that are not reads or writes.
        demand: reads and writes per second, against storage limits.
        top_files_by_bytes, top_files_by_ops: the busiest files (paths never seen as a
            directory).
        top_directories: directories by metadata ops (ops other than read/write on
            the entries in them, plus ``opendir``/``readdir``/… on themselves).
        sessions: file sessions.
        timeline: ops over time and the quietest window.
        batches_missing: batches of the volume's workers absent from the recordings
            (gaps in ``EventBatch.seq``: lost on the bus, not recorded, or deleted by
            retention), between the first and last batch recorded per worker.
        events_dropped: events the workers dropped (``EventBatch.dropped_total``,
            largest per worker, summed) and ``events_sampled_out`` the ops their
            sampling rules kept out: neither is in any number here.
        object_store: what Mountpoint for S3, gcsfuse and blobfuse2 would refuse or
            pay for (:mod:`._analyze_objects`).
    """

    volume: str
    pods: list[str]
    workers: int
    first_event: dt.datetime
    last_event: dt.datetime
    span_s: float
    events: int
    ops: dict[str, int]
    errors: dict[str, int]
    injected_faults: dict[str, int]
    delayed_ops: int
    delay_s: float
    read_bytes: int
    written_bytes: int
    read_sizes: SizeStats
    write_sizes: SizeStats
    sequential_reads: SequentialShare
    sequential_writes: SequentialShare
    metadata_share: float
    demand: Demand
    top_files_by_bytes: list[FileStats]
    top_files_by_ops: list[FileStats]
    top_directories: list[DirectoryStats]
    sessions: Sessions
    timeline: Timeline
    batches_missing: int
    events_dropped: int
    events_sampled_out: int
    object_store: ObjectStoreFit


class AnalysisReport(msgspec.Struct, frozen=True, kw_only=True):
    """``interposer analyze --json``.

    Attributes:
        recordings: recording files read.
        batches: event batches read (every volume).
        since, until: the time range events were taken from (``start_ns`` in
            ``[since, until)``); None = unbounded.
        volumes: one report per volume with events in range, by volume id.
    """

    recordings: int
    batches: int
    since: dt.datetime | None
    until: dt.datetime | None
    volumes: list[VolumeReport]


# ---- input ---------------------------------------------------------------------------


def recording_files(paths: Sequence[Path]) -> list[Path]:
    """The recording files ``paths`` name: files as given, directories' recordings (by name, not recursive).

    Raises:
        AnalysisError: a path does not exist, or no recording was found.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(path / name for name in os.listdir(path) if RECORDING_NAME_PATTERN.fullmatch(name))
        elif path.exists():
            files.append(path)
        else:
            raise AnalysisError(f"{path}: no such file or directory")
    if not files:
        where = ", ".join(str(path) for path in paths)
        raise AnalysisError(f"no recordings (events-*.msgpack) in {where}")
    return files


def _batch_order(batch: EventBatch) -> int:
    """Merge key: completion time of the batch's first event (a worker's batches follow it)."""
    if not batch.events:
        return 0
    first = batch.events[0]
    return first.start_ns + first.duration_ns


def _quietly_vanishing(path: Path) -> Iterator[EventBatch]:
    # A running collector's retention may delete a listed file before it is read.
    try:
        yield from read_batches(path)
    except FileNotFoundError:
        return


def read_recordings(files: Sequence[Path]) -> Iterator[EventBatch]:
    """Every batch of ``files``, each replica's files in name order, the replicas merged by time.

    Files are grouped by the collector instance in their name (a file not named as a
    recording is a group of its own); a group is read in name order, i.e. start time,
    and the groups are merged by :func:`_batch_order`. Streaming: one frame per
    group is in memory.

    Raises:
        RecordingError: a file is not a recording, or has a corrupt frame.
        OSError: a file cannot be read.
    """
    groups: dict[str, list[Path]] = {}
    for path in files:
        parsed = parse_recording_name(path.name)
        key = f"{path.parent}/{parsed[1]}" if parsed else str(path)
        groups.setdefault(key, []).append(path)
    streams = [itertools.chain.from_iterable(_quietly_vanishing(p) for p in sorted(group, key=lambda p: p.name))
               for group in groups.values()]
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=_batch_order)


# ---- time bounds ---------------------------------------------------------------------


class TimeBound(msgspec.Struct, frozen=True):
    """``--since``/``--until``: an absolute time, or a duration before the newest event.

    Attributes:
        at_ns: absolute time, ns since the Unix epoch; None when relative.
        before_newest_ns: how long before the newest event (in range of ``--volume``), ns.
    """

    at_ns: int | None = None
    before_newest_ns: int | None = None

    def resolve(self, newest_ns: int) -> int:
        """The bound in ns since the epoch, given the newest event's start."""
        return self.at_ns if self.at_ns is not None else newest_ns - (self.before_newest_ns or 0)


def parse_time_bound(text: str) -> TimeBound:
    """Parse ``--since``/``--until``: ISO 8601 (naive = UTC) or a duration (``90s``, ``2h``, ``1h30m``, ``7d``).

    Raises:
        AnalysisError: neither.
    """
    value = text.strip()
    try:
        return TimeBound(before_newest_ns=round(parse_duration(value) * _NS_PER_S))
    except ValueError:
        pass  # not a duration: a time, then
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise AnalysisError(f"{text!r} is neither an ISO 8601 time (2026-12-07T15:00:00Z) nor a duration "
                            "before the newest event (90s, 15m, 2h, 1h30m, 7d)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    delta = when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return TimeBound(at_ns=(delta.days * 86400 + delta.seconds) * _NS_PER_S + delta.microseconds * 1000)


def newest_event_ns(batches: Iterable[EventBatch], volumes: frozenset[str] = frozenset()) -> int | None:
    """Start of the newest event of ``volumes`` (all if empty), ns; None when there is none."""
    newest: int | None = None
    for batch in batches:
        if (volumes and batch.volume not in volumes) or not batch.events:
            continue
        latest = max(event.start_ns for event in batch.events)
        if newest is None or latest > newest:
            newest = latest
    return newest


# ---- accumulation --------------------------------------------------------------------


class _Timeline:
    """Ops and bytes per fine bucket (epoch-aligned), coarsened as the span grows."""

    __slots__ = ("step_index", "step_ns", "buckets", "low", "high")

    def __init__(self) -> None:
        self.step_index = 0
        self.step_ns = FINE_STEPS_S[0] * _NS_PER_S
        #: bucket index (start_ns // step_ns) → [ops, bytes].
        self.buckets: dict[int, list[int]] = {}
        self.low = math.inf
        self.high = -math.inf

    def fit(self) -> None:
        """Coarsen until the span fits :data:`MAX_FINE_BUCKETS` (called after each batch)."""
        while self.high - self.low >= MAX_FINE_BUCKETS and self.step_index + 1 < len(FINE_STEPS_S):
            factor = FINE_STEPS_S[self.step_index + 1] // FINE_STEPS_S[self.step_index]
            self.step_index += 1
            self.step_ns = FINE_STEPS_S[self.step_index] * _NS_PER_S
            merged: dict[int, list[int]] = {}
            for index, (ops, moved) in self.buckets.items():
                bucket = merged.get(index // factor)
                if bucket is None:
                    merged[index // factor] = [ops, moved]
                else:
                    bucket[0] += ops
                    bucket[1] += moved
            self.buckets = merged
            self.low = min(merged)
            self.high = max(merged)


class _Sessions:
    """File sessions of one volume: coverage of their reads, bytes, finished at release plus a grace."""

    __slots__ = ("open", "released", "watermark_ns", "count", "whole", "bytes")

    def __init__(self) -> None:
        #: (worker_id, session) → [bytes moved, read ranges (``_add_range``) or None once too
        #: fragmented, ends of file its short reads showed (a set) or None].
        self.open: dict[tuple[str, int], list] = {}
        #: worker_id → (release completion ns, key) in the order seen.
        self.released: dict[str, deque[tuple[int, tuple[str, int]]]] = {}
        #: worker_id → latest completion ns seen of its events.
        self.watermark_ns: dict[str, int] = {}
        self.count = 0
        self.whole = 0
        self.bytes = array("q")

    def finish(self, state: list) -> None:
        self.count += 1
        self.bytes.append(state[0])
        ranges, ends = state[1], state[2]
        if ends and ranges is not None and len(ranges) == 2 and ranges[0] == 0 and ranges[1] in ends:
            self.whole += 1

    def settle(self, worker: str) -> None:
        """Finish the sessions ``worker`` released more than the grace ago (in its events' time)."""
        queue = self.released.get(worker)
        if not queue:
            return
        horizon = self.watermark_ns.get(worker, 0) - SESSION_GRACE_S * _NS_PER_S
        open_sessions = self.open
        while queue and queue[0][0] <= horizon:
            _, key = queue.popleft()
            state = open_sessions.pop(key, None)
            if state is not None:
                self.finish(state)

    def finish_all(self) -> None:
        for state in self.open.values():
            self.finish(state)
        self.open.clear()
        self.released.clear()


def _add_range(state: list, start: int, end: int) -> None:
    """Add the read range ``[start, end)`` to a session's ranges: a flat sorted list ``[s0, e0, s1, e1, …]``
    of disjoint, non-touching ranges (touching ones are merged)."""
    ranges: list[int] | None = state[1]
    if ranges is None or end <= start:
        return
    if not ranges:
        ranges += (start, end)
        return
    if ranges[-2] <= start <= ranges[-1]:  # continues (or overlaps) the last range: a sequential reader
        if end > ranges[-1]:
            ranges[-1] = end
        return
    merged: list[int] = []
    placed = False
    for k in range(0, len(ranges), 2):
        low, high = ranges[k], ranges[k + 1]
        if high < start:
            merged += (low, high)
        elif low > end:
            if not placed:
                merged += (start, end)
                placed = True
            merged += (low, high)
        else:  # overlaps or touches: absorb
            start, end = min(start, low), max(end, high)
    if not placed:
        merged += (start, end)
    state[1] = merged if len(merged) <= 2 * MAX_SESSION_RANGES else None


class _Volume:
    """Running totals of one volume."""

    __slots__ = ("volume", "pods", "workers", "events", "first_ns", "last_ns", "ops", "errors", "faults",
                 "delayed_ops", "delay_ns", "read_bytes", "written_bytes", "read_sizes", "write_sizes",
                 "reads", "seq_reads", "seq_read_bytes", "data_read_bytes", "writes", "seq_writes",
                 "seq_write_bytes", "data_written_bytes", "files", "dirs", "sessions", "timeline", "per_second",
                 "objects")

    def __init__(self, volume: str) -> None:
        self.volume = volume
        self.pods: set[str] = set()
        #: worker_id → [lowest seq, highest seq, batches, dropped_total, sampled_out_total].
        self.workers: dict[str, list[int]] = {}
        self.events = 0
        self.first_ns = math.inf
        self.last_ns = -math.inf
        self.ops: dict[str, int] = {}
        self.errors: dict[int, int] = {}
        self.faults: dict[str, int] = {}
        self.delayed_ops = 0
        self.delay_ns = 0
        self.read_bytes = 0
        self.written_bytes = 0
        self.read_sizes: dict[int, int] = {}
        self.write_sizes: dict[int, int] = {}
        self.reads = self.seq_reads = self.seq_read_bytes = self.data_read_bytes = 0
        self.writes = self.seq_writes = self.seq_write_bytes = self.data_written_bytes = 0
        #: path → [read_bytes, write_bytes, read_ops, write_ops, ops].
        self.files: dict[str, list[int]] = {}
        #: directory → metadata ops.
        self.dirs: dict[str, int] = {}
        self.sessions = _Sessions()
        self.timeline = _Timeline()
        #: whole second since the epoch → [successful reads and writes, bytes they moved]
        #: (an entry per second with I/O: ~0.1 KiB each, 9 MB for a busy day).
        self.per_second: dict[int, list[int]] = {}
        self.objects = ObjectStoreTally()

    def add(self, batch: EventBatch, since_ns: int | None, until_ns: int | None) -> None:
        """Account one batch's events with ``since_ns <= start_ns < until_ns``."""
        worker = batch.worker_id
        if batch.namespace or batch.pod:
            self.pods.add(f"{batch.namespace}/{batch.pod}")
        seen = self.workers.get(worker)
        if seen is None:
            self.workers[worker] = [batch.seq, batch.seq, 1, batch.dropped_total, batch.sampled_out_total]
        else:
            seen[0] = min(seen[0], batch.seq)
            seen[1] = max(seen[1], batch.seq)
            seen[2] += 1
            seen[3] = max(seen[3], batch.dropped_total)
            seen[4] = max(seen[4], batch.sampled_out_total)

        ops, errors, faults, files, dirs = self.ops, self.errors, self.faults, self.files, self.dirs
        read_sizes, write_sizes = self.read_sizes, self.write_sizes
        per_second = self.per_second
        sessions = self.sessions
        open_sessions = sessions.open
        objects = self.objects
        timeline = self.timeline
        buckets = timeline.buckets
        step_ns = timeline.step_ns
        dirname = posixpath.dirname
        low_ns = -math.inf if since_ns is None else since_ns
        high_ns = math.inf if until_ns is None else until_ns
        first_ns, last_ns = self.first_ns, self.last_ns
        bucket_low, bucket_high = timeline.low, timeline.high
        watermark = sessions.watermark_ns.get(worker, 0)
        counted = 0
        for event in batch.events:
            start = event.start_ns
            if not low_ns <= start < high_ns:
                continue
            counted += 1
            end_ns = start + event.duration_ns
            if end_ns > watermark:
                watermark = end_ns
            if start < first_ns:
                first_ns = start
            if start > last_ns:
                last_ns = start
            op = event.op
            ops[op] = ops.get(op, 0) + 1
            err = event.errno
            path = event.path
            moved = 0
            served = False  # a successful read or write: counts in the demand per second
            stats = files.get(path)
            if stats is None:
                stats = files[path] = [0, 0, 0, 0, 0]
            stats[4] += 1
            if err:
                errors[err] = errors.get(err, 0) + 1
            if event.fault:
                faults[event.fault] = faults.get(event.fault, 0) + 1
            if event.delay_ns:
                self.delayed_ops += 1
                self.delay_ns += event.delay_ns
            session = event.session
            if op == "read":
                stats[2] += 1
                if not err:
                    moved = event.result
                    stats[0] += moved
                    self.reads += 1
                    self.data_read_bytes += moved
                    size = event.size
                    read_sizes[size] = read_sizes.get(size, 0) + 1
                    served = True
                    if event.sequential:
                        self.seq_reads += 1
                        self.seq_read_bytes += moved
                    if session:
                        state = open_sessions.get((worker, session))
                        if state is None:
                            state = open_sessions[(worker, session)] = [0, [], None]
                        state[0] += moved
                        offset = event.offset
                        _add_range(state, offset, offset + moved)
                        if moved < size:  # the end of the file, if that is where it began
                            if state[2] is None:
                                state[2] = {offset + moved}
                            else:
                                state[2].add(offset + moved)
                        session = 0  # accounted
                self.read_bytes += moved
            elif op == "write":
                stats[3] += 1
                if not err:
                    moved = event.result
                    stats[1] += moved
                    self.writes += 1
                    self.data_written_bytes += moved
                    size = event.size
                    write_sizes[size] = write_sizes.get(size, 0) + 1
                    served = True
                    if event.sequential:
                        self.seq_writes += 1
                        self.seq_write_bytes += moved
                    objects.write(worker, event)
                self.written_bytes += moved
            else:
                directory = path if op in DIRECTORY_OPS else dirname(path)
                dirs[directory] = dirs.get(directory, 0) + 1
                if op in OBJECT_STORE_OPS:
                    if op == "fsync":
                        objects.fsync(worker, event)
                    elif op == RELEASE_OP:
                        objects.release(worker, event)
                    elif not err:
                        objects.namespace(op, path)
                if op == "copy_file_range" and not err:
                    moved = 2 * event.result  # read and written inside the volume
                    self.read_bytes += event.result
                    self.written_bytes += event.result
            if served:
                second = per_second.get(start // _NS_PER_S)
                if second is None:
                    per_second[start // _NS_PER_S] = [1, moved]
                else:
                    second[0] += 1
                    second[1] += moved
            if session:
                key = (worker, session)
                state = open_sessions.get(key)
                if state is None:
                    state = open_sessions[key] = [0, [], None]
                if op == "write":
                    state[0] += moved
                elif op == RELEASE_OP:
                    sessions.released.setdefault(worker, deque()).append((end_ns, key))
            index = start // step_ns
            bucket = buckets.get(index)
            if bucket is None:
                buckets[index] = [1, moved]
                if index < bucket_low:
                    bucket_low = index
                if index > bucket_high:
                    bucket_high = index
            else:
                bucket[0] += 1
                bucket[1] += moved
        self.events += counted
        self.first_ns, self.last_ns = first_ns, last_ns
        timeline.low, timeline.high = bucket_low, bucket_high
        sessions.watermark_ns[worker] = watermark
        sessions.settle(worker)
        timeline.fit()


# ---- results -------------------------------------------------------------------------


def _nearest_rank(counts: dict[int, int], quantile: float) -> int | None:
    """Nearest-rank quantile of values given as value → count."""
    total = sum(counts.values())
    if not total:
        return None
    rank = max(1, math.ceil(quantile * total))
    running = 0
    for value in sorted(counts):
        running += counts[value]
        if running >= rank:
            return value
    return None  # unreachable


def size_bucket(size_bytes: int) -> int:
    """Upper bound of the power-of-two bucket of a request size: 0, 1, 2, 4, …, 4096, … bytes."""
    return 0 if size_bytes <= 0 else 1 << (size_bytes - 1).bit_length()


def _size_stats(sizes: dict[int, int]) -> SizeStats:
    buckets: dict[int, int] = {}
    for size, count in sizes.items():
        bound = size_bucket(size)
        buckets[bound] = buckets.get(bound, 0) + count
    return SizeStats(count=sum(sizes.values()), median_bytes=_nearest_rank(sizes, 0.5),
                     p90_bytes=_nearest_rank(sizes, 0.9),
                     buckets=[SizeBucket(bound, buckets[bound]) for bound in sorted(buckets)])


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _utc(ns: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ns // _NS_PER_S, dt.UTC) + dt.timedelta(microseconds=(ns % _NS_PER_S) // 1000)


def _top(items: Iterable[FileStats], key: Callable[[FileStats], tuple], top: int) -> list[FileStats]:
    return heapq.nsmallest(top, items, key=key)


def _timeline(timeline: _Timeline, bucket_s: float | None, window_s: float) -> Timeline:
    fine_s = FINE_STEPS_S[timeline.step_index]
    low, high = int(timeline.low), int(timeline.high)
    fine_count = high - low + 1
    if bucket_s is None:
        span_s = fine_count * fine_s
        candidates = [b for b in TIMELINE_BUCKETS_S if b % fine_s == 0]
        chosen = next((b for b in candidates if span_s / b <= DEFAULT_TIMELINE_BUCKETS), candidates[-1])
    else:
        chosen = max(1, math.ceil(bucket_s / fine_s)) * fine_s
    per_bucket = chosen // fine_s
    first_bucket, last_bucket = low // per_bucket, high // per_bucket
    if last_bucket - first_bucket + 1 > MAX_TIMELINE_BUCKETS:
        raise AnalysisError(f"--bucket {bucket_s:g} makes {last_bucket - first_bucket + 1} timeline buckets "
                            f"of this span; at most {MAX_TIMELINE_BUCKETS}: pass a longer one")
    rows: dict[int, list[int]] = {}
    hours = [0] * 24
    for index, (ops, moved) in timeline.buckets.items():
        row = rows.setdefault(index // per_bucket, [0, 0])
        row[0] += ops
        row[1] += moved
        hours[(index * fine_s // 3600) % 24] += ops
    buckets = [TimelineBucket(_utc(b * chosen * _NS_PER_S), *rows.get(b, (0, 0)))
               for b in range(first_bucket, last_bucket + 1)]

    window_fine = max(1, math.ceil(window_s / fine_s))
    quietest: QuietWindow | None = None
    if window_fine <= fine_count:
        get = timeline.buckets.get
        ops_in = [get(i, (0, 0))[0] for i in range(low, high + 1)]
        bytes_in = [get(i, (0, 0))[1] for i in range(low, high + 1)]
        running = sum(ops_in[:window_fine])
        best_ops, best_at = running, 0
        for at in range(1, fine_count - window_fine + 1):
            running += ops_in[at + window_fine - 1] - ops_in[at - 1]
            if running < best_ops:  # strictly fewer: ties keep the earliest
                best_ops, best_at = running, at
        start_ns = (low + best_at) * fine_s * _NS_PER_S
        quietest = QuietWindow(start=_utc(start_ns), end=_utc(start_ns + window_fine * fine_s * _NS_PER_S),
                               ops=best_ops, bytes=sum(bytes_in[best_at:best_at + window_fine]))
    return Timeline(bucket_s=chosen, resolution_s=fine_s, buckets=buckets, window_s=window_fine * fine_s,
                    quietest_window=quietest,
                    ops_by_hour_utc=hours if fine_count * fine_s >= HOURS_OF_DAY_MIN_SPAN_S else None)


def _demand(per_second: dict[int, list[int]], first_ns: float, last_ns: float) -> Demand:
    """Percentiles over every whole second from the first event's to the last one's (idle ones as 0)."""
    seconds = int(last_ns // _NS_PER_S) - int(first_ns // _NS_PER_S) + 1
    idle = seconds - len(per_second)

    def stats(index: int) -> tuple[int, int, int]:
        counts: dict[int, int] = {0: idle} if idle else {}
        for row in per_second.values():
            counts[row[index]] = counts.get(row[index], 0) + 1
        return (_nearest_rank(counts, 0.5) or 0, _nearest_rank(counts, 0.99) or 0, max(counts, default=0))

    iops, rates = stats(0), stats(1)
    return Demand(seconds=seconds, iops_p50=iops[0], iops_p99=iops[1], iops_max=iops[2],
                  bytes_per_s_p50=rates[0], bytes_per_s_p99=rates[1], bytes_per_s_max=rates[2])


def _volume_report(state: _Volume, top: int, bucket_s: float | None, window_s: float) -> VolumeReport:
    sessions = state.sessions
    sessions.finish_all()
    session_bytes = sorted(sessions.bytes)
    directories = state.dirs
    files = [FileStats(path=path, read_bytes=s[0], write_bytes=s[1], read_ops=s[2], write_ops=s[3], ops=s[4])
             for path, s in state.files.items() if path not in directories]
    workers = state.workers.values()
    return VolumeReport(
        volume=state.volume, pods=sorted(state.pods), workers=len(state.workers),
        first_event=_utc(int(state.first_ns)), last_event=_utc(int(state.last_ns)),
        span_s=(state.last_ns - state.first_ns) / _NS_PER_S, events=state.events,
        ops=dict(sorted(state.ops.items(), key=lambda item: (-item[1], item[0]))),
        errors={errno_module.errorcode.get(number, str(number)): count
                for number, count in sorted(state.errors.items(), key=lambda item: (-item[1], item[0]))},
        injected_faults=dict(sorted(state.faults.items(), key=lambda item: (-item[1], item[0]))),
        delayed_ops=state.delayed_ops, delay_s=state.delay_ns / _NS_PER_S,
        read_bytes=state.read_bytes, written_bytes=state.written_bytes,
        read_sizes=_size_stats(state.read_sizes), write_sizes=_size_stats(state.write_sizes),
        sequential_reads=SequentialShare(by_ops=_share(state.seq_reads, state.reads),
                                         by_bytes=_share(state.seq_read_bytes, state.data_read_bytes)),
        sequential_writes=SequentialShare(by_ops=_share(state.seq_writes, state.writes),
                                          by_bytes=_share(state.seq_write_bytes, state.data_written_bytes)),
        metadata_share=(state.events - sum(state.ops.get(op, 0) for op in DATA_OPS)) / state.events,
        demand=_demand(state.per_second, state.first_ns, state.last_ns),
        top_files_by_bytes=_top((f for f in files if f.read_bytes + f.write_bytes),
                                lambda f: (-(f.read_bytes + f.write_bytes), -f.ops, f.path), top),
        top_files_by_ops=_top(files, lambda f: (-f.ops, -(f.read_bytes + f.write_bytes), f.path), top),
        top_directories=[DirectoryStats(path, count) for path, count in
                         heapq.nsmallest(top, directories.items(), key=lambda item: (-item[1], item[0]))],
        sessions=Sessions(count=sessions.count, whole_file_reads=sessions.whole,
                          median_bytes=session_bytes[math.ceil(len(session_bytes) / 2) - 1]
                          if session_bytes else None),
        timeline=_timeline(state.timeline, bucket_s, window_s),
        batches_missing=sum(high - low + 1 - count for low, high, count, _d, _s in workers),
        events_dropped=sum(w[3] for w in workers), events_sampled_out=sum(w[4] for w in workers),
        object_store=state.objects.report(),
    )


def analyze(batches: Iterable[EventBatch], *, volumes: frozenset[str] = frozenset(), since_ns: int | None = None,
            until_ns: int | None = None, top: int = DEFAULT_TOP, bucket_s: float | None = None,
            window_s: float = DEFAULT_WINDOW_S, recordings: int = 0) -> AnalysisReport:
    """Compute the report of ``batches``.

    Args:
        batches: event batches, any volumes, ideally merged by time (:func:`read_recordings`).
        volumes: only these volumes; empty = all.
        since_ns, until_ns: only events with ``since_ns <= start_ns < until_ns`` (ns
            since the epoch); None = unbounded.
        top: how many files and directories to list.
        bucket_s: timeline bucket, seconds; None = chosen from the span (at most
            :data:`DEFAULT_TIMELINE_BUCKETS` buckets).
        window_s: length of the quietest window to find, seconds.
        recordings: number of files the batches came from (reported as is).

    Returns:
        The report; volumes without an event in range are left out.

    Raises:
        AnalysisError: no event in range (of ``volumes``), or ``bucket_s`` makes more
            than :data:`MAX_TIMELINE_BUCKETS` buckets.
    """
    states: dict[str, _Volume] = {}
    seen_volumes: set[str] = set()
    batch_count = 0
    for batch in batches:
        batch_count += 1
        seen_volumes.add(batch.volume)
        if volumes and batch.volume not in volumes:
            continue
        state = states.get(batch.volume)
        if state is None:
            state = states[batch.volume] = _Volume(batch.volume)
        state.add(batch, since_ns, until_ns)
    reports = [_volume_report(state, top, bucket_s, window_s)
               for _volume, state in sorted(states.items()) if state.events]
    if not reports:
        which = f"of volume {', '.join(sorted(volumes))} " if volumes else ""
        when = " in the time range" if since_ns is not None or until_ns is not None else ""
        held = f" (they hold {', '.join(sorted(seen_volumes))})" if volumes and seen_volumes else ""
        raise AnalysisError(f"no events {which}in {batch_count} recorded batches{when}{held}")
    return AnalysisReport(recordings=recordings, batches=batch_count,
                          since=_utc(since_ns) if since_ns is not None else None,
                          until=_utc(until_ns) if until_ns is not None else None, volumes=reports)


def encode_report(report: AnalysisReport) -> bytes:
    """The report as indented JSON (times as RFC 3339 UTC)."""
    return msgspec.json.format(msgspec.json.encode(report), indent=2)
