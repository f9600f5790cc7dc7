"""Per-op events into a bounded buffer the bus thread drains; counters for status."""

from __future__ import annotations

import collections
import random
import time
import typing
import uuid
from collections.abc import Callable, Iterable

import msgspec

from interposer.proto import FaultRecord, OpEvent
from interposer.proto.policy import OpName

from ._config import DEFAULT_EVENT_BUFFER as DEFAULT_EVENT_BUFFER, EventSampleRule
from ._lateness import LatenessWatch
from ._op import Op
from .layers._match import compile_glob
from .layers._streams import FileStreams
from .layers.quota import Quota
from .layers.throttle import Throttle
#: Fault records held for the bus before new ones are dropped.
DEFAULT_FAULT_BUFFER = 100_000

#: Every FUSE op name an event can carry (the policy's op names).
_OP_NAMES: tuple[str, ...] = typing.get_args(OpName)

#: One compiled rule: (path predicate, None = every path; ratio 0..1).
_CompiledRule = tuple[Callable[[str], object] | None, float]


def compile_sampling(rules: Iterable[EventSampleRule]) -> dict[str, tuple[_CompiledRule, ...]]:
    """Compile sampling rules into ``op name → rules that can apply to it``, in order.

    Ops no rule names are left out, so the data path of an unsampled op costs one
    dict miss.

    Args:
        rules: the configured rules, first match wins.

    Returns:
        ``dict[str, tuple[(predicate | None, ratio), ...]]``.
    """
    compiled = [(rule.ops, compile_glob(rule.path_glob), rule.ratio) for rule in rules]
    by_op: dict[str, tuple[_CompiledRule, ...]] = {}
    for name in _OP_NAMES:
        applicable = tuple((match, ratio) for ops, match, ratio in compiled if not ops or name in ops)
        if applicable:
            by_op[name] = applicable
    return by_op


class Telemetry:
    """Records one ``OpEvent`` per served op without ever waiting.

    The FUSE side (trio thread) appends; the bus side (asyncio thread) pops from the
    left. ``collections.deque`` append/popleft are atomic under the GIL, so no lock
    is taken on the data path. When the buffer is full the event is dropped and
    counted: the data path never waits for the network.

    Every op is counted in ``ops_total``; only the ops the sampling rules keep (all,
    by default) become events, the others are counted in ``sampled_out_total``.
    Every delayed op (``Op.delay_ns`` > 0) is counted in ``delayed_ops_total``, and
    how late it resumed (``Op.delay_late_ns``) summed in ``delay_late_ns_total`` and
    watched by ``lateness`` (a :class:`~._lateness.LatenessWatch`: a log warning
    when delays run late).

    Injected faults (``Op.injected``) also become ``FaultRecord`` s in a second
    bounded deque, ``faults``, drained the same way; they are never sampled and are
    recorded even with events off.

    Args:
        capacity: most events buffered.
        sampling: event sampling rules (first match wins; unmatched ops are kept).
        enabled: False records no events at all (counters and fault records only).
        rng: ``() -> float`` in [0, 1) used for sampling decisions (tests pass a
            deterministic one).
        volume: volume id written into fault records.
        fault_capacity: most fault records buffered.
        worker_id: id of this worker process (``EventBatch.worker_id``, written into
            fault records); default a new random one.
        namespace: pod namespace written into fault records.
        pod: pod name written into fault records.

    Attributes:
        worker_id: id of this worker process; unique per process start.
        internal_errors_total: requests answered EIO because of an error in the
            worker's own code (a bug, not the backing store's errno), counted by
            the handlers that caught it.
        sessions: ``dict[int, int]``: open file handle → its file session id.
    """

    def __init__(self, capacity: int = DEFAULT_EVENT_BUFFER, sampling: Iterable[EventSampleRule] = (),
                 enabled: bool = True, rng: Callable[[], float] = random.random, *, volume: str = "",
                 fault_capacity: int = DEFAULT_FAULT_BUFFER, worker_id: str = "", namespace: str = "",
                 pod: str = "") -> None:
        self.capacity = capacity
        self.enabled = enabled
        self.volume = volume
        self.worker_id = worker_id or uuid.uuid4().hex[:12]
        self.namespace = namespace
        self.pod = pod
        self.fault_capacity = fault_capacity
        self.buffer: collections.deque[OpEvent] = collections.deque()
        self.faults: collections.deque[FaultRecord] = collections.deque()
        self.faults_total = 0
        self.faults_dropped_total = 0
        self.faults_published_total = 0
        self.ops_total = 0
        self.internal_errors_total = 0
        self.delayed_ops_total = 0
        self.delay_late_ns_total = 0
        self.lateness = LatenessWatch()
        self.events_total = 0
        self.events_dropped_total = 0
        self.events_published_total = 0
        self.sampled_out_total = 0
        self._sampling = compile_sampling(sampling)
        self._rng = rng
        self.sessions: dict[int, int] = {}
        self._last_session = 0
        self._stream_ends: FileStreams[int] = FileStreams()

    def continues(self, ino: int, offset: int, size: int) -> bool:
        """Say whether a read or write arriving now continues its file's access stream (``OpEvent.sequential``).

        True when it begins where the previous read or write of inode ``ino`` ended
        (in arrival order, across handles: what the backing store sees), or at
        offset 0 (a file read or written from its start: whole-file readers stay
        sequential when they read the file again); the file's stream then ends at
        ``offset + size``. The delay layer's ``skip_sequential`` keeps the same
        per-inode state but does not count a start at 0 (a client's readahead does
        not hide a file's first fetch); at most ``_streams.MAX_TRACKED_STREAMS`` files are
        remembered (a forgotten one's next request away from 0 counts as random).
        Always False with events off (nothing would carry it).

        Args:
            ino: FUSE inode of the file.
            offset: first byte of the request.
            size: bytes requested.
        """
        if not self.enabled:
            return False
        streams = self._stream_ends
        expected = streams.take(ino)
        streams.put(ino, offset + size)
        return offset == 0 or offset == expected

    def new_session(self) -> int:
        """Return a new file session id (1, 2, …; never reused in this process)."""
        self._last_session += 1
        return self._last_session

    def bind_session(self, fh: int, session: int) -> None:
        """Attach ``session`` to file handle ``fh`` until :meth:`end_session`."""
        self.sessions[fh] = session

    def session_of(self, fh: int) -> int:
        """Return the file session id of ``fh``, 0 if it has none."""
        return self.sessions.get(fh, 0)

    def end_session(self, fh: int) -> int:
        """Detach and return the file session id of ``fh`` (on release), 0 if none."""
        return self.sessions.pop(fh, 0)

    @property
    def open_files(self) -> int:
        """Open file handles now: file sessions opened and not yet released."""
        return len(self.sessions)

    def _keep(self, rules: tuple[_CompiledRule, ...], path: str) -> bool:
        for match, ratio in rules:
            if match is None or match(path):
                return ratio >= 1.0 or (ratio > 0.0 and self._rng() < ratio)
        return True

    def record(self, op: Op, errno: int, result_bytes: int, start_ns: int, duration_ns: int,
               revision: int = 0) -> None:
        """Count the op and queue its event and fault records (or count them as sampled out or dropped).

        Args:
            op: the finished op (request and outcome fields).
            errno: 0 on success, else the errno number returned to the kernel.
            result_bytes: bytes done (read/write), else 0.
            start_ns: wall-clock start, ns since the Unix epoch.
            duration_ns: time spent serving the op, ns.
            revision: policy revision the op was served under (for fault records).
        """
        self.ops_total += 1
        if op.delay_ns:
            self.delayed_ops_total += 1
            self.delay_late_ns_total += op.delay_late_ns
            self.lateness.observe(op.delay_ns, op.delay_late_ns)
        if op.injected:
            self._record_faults(op, start_ns, duration_ns, revision)
        if not self.enabled:
            return
        rules = self._sampling.get(op.name)
        if rules is not None and not self._keep(rules, op.path):
            self.sampled_out_total += 1
            return
        self.events_total += 1
        if len(self.buffer) >= self.capacity:
            self.events_dropped_total += 1
            return
        self.buffer.append(OpEvent(
            op.name, op.ino, op.path, op.offset, op.size, result_bytes, errno, start_ns, duration_ns,
            op.fault, op.delay_ns, op.throttle_ns, op.pid, op.uid, op.session, op.delay_late_ns,
            op.sequential, op.open_flags or op.mode, op.target,
        ))

    def _record_faults(self, op: Op, start_ns: int, duration_ns: int, revision: int) -> None:
        for injection in op.injected or ():
            self.faults_total += 1
            if len(self.faults) >= self.fault_capacity:
                self.faults_dropped_total += 1
                continue
            self.faults.append(FaultRecord(
                time_ns=start_ns, op=op.name, path=op.path, kind=injection.kind, errno=injection.errno_name,
                pid=op.pid, uid=op.uid, volume=self.volume, layer=injection.layer, offset=op.offset,
                size=op.size, result=injection.result, policy_revision=revision, worker_id=self.worker_id,
                session=op.session, duration_ns=duration_ns, namespace=self.namespace, pod=self.pod,
            ))

    def take_faults(self, max_records: int) -> list[FaultRecord]:
        """Pop up to ``max_records`` fault records, oldest first."""
        faults, out = self.faults, []
        for _ in range(min(max_records, len(faults))):
            out.append(faults.popleft())
        return out

    def take(self, max_events: int) -> list[OpEvent]:
        """Pop up to ``max_events`` events, oldest first."""
        buffer, out = self.buffer, []
        for _ in range(min(max_events, len(buffer))):
            out.append(buffer.popleft())
        return out


class QuotaUsage(msgspec.Struct, frozen=True, kw_only=True):
    """Usage and limits of the quota in force (``WorkerStatus.quota_*``).

    Attributes:
        bytes_used: bytes (apparent sizes of regular files) in use.
        bytes_limit: most bytes; None = no byte limit.
        inodes_used: files, directories and links in use.
        inodes_limit: most inodes; None = no inode limit.
    """

    bytes_used: int
    inodes_used: int
    bytes_limit: int | None = None
    inodes_limit: int | None = None


def _tightest(limits: Iterable[int | None]) -> int | None:
    given = [limit for limit in limits if limit is not None]
    return min(given) if given else None


def quota_usage(layers: Iterable[object]) -> QuotaUsage | None:
    """Usage and limits of the quota layers among ``layers`` (a ``Stack.layers``).

    Quota layers of one stack share the worker's tracked usage; with several, the
    tightest limit of each kind applies (each layer refuses on its own), so that is
    the one reported. Safe to call from the bus thread: it only reads ints.

    Args:
        layers: the runtimes of the layers in force.

    Returns:
        None when no quota layer is in force (usage is not tracked then).
    """
    quotas = [layer for layer in layers if isinstance(layer, Quota)]
    if not quotas:
        return None
    stats = quotas[0].statistics()
    return QuotaUsage(bytes_used=stats.bytes_used, inodes_used=stats.inodes_used,
                      bytes_limit=_tightest(q.spec.bytes for q in quotas),
                      inodes_limit=_tightest(q.spec.inodes for q in quotas))


def burst_balance(layers: Iterable[object], now_s: float) -> float | None:
    """How full, 0..1, the emptiest policy-sized burst bucket among ``layers`` is (``WorkerStatus.burst_balance``).

    Args:
        layers: the runtimes of the layers in force (a ``Stack.layers``).
        now_s: the time on the clock the throttles run on (trio's), seconds.

    Returns:
        None when no throttle layer in force has a bucket sized by the policy.
    """
    balances = [b for layer in layers if isinstance(layer, Throttle)
                if (b := layer.burst_balance(now_s)) is not None]
    return min(balances, default=None)


def wall_ns() -> int:
    """Wall-clock time, ns since the Unix epoch."""
    return time.time_ns()
