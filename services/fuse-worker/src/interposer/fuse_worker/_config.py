"""Worker configuration: one frozen Struct, filled from flags (``__main__``) or by callers."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from interposer.proto.policy import MAX_GLOB_LENGTH, MAX_SELECTOR_LABELS, LabelKey, LabelValue, OpName, check_glob
from interposer.proto.subjects import VOLUME_ID_PATTERN
from interposer.proto.worker_tuning import MAX_BACKGROUND_REQUESTS, MAX_BUSY_POLL_US, MAX_CACHE_TIMEOUT_S

from ._readahead import DEFAULT_READ_AHEAD_KIB
from .backends import BACKEND_KINDS, DEFAULT_MEMORY_SIZE_BYTES


#: How long a worker with a bus waits for its stored policy before mounting, seconds.
DEFAULT_POLICY_WAIT_S = 5.0

#: How long a worker with ``fuse_fd_socket`` waits to receive its FUSE fd, seconds.
DEFAULT_FUSE_FD_WAIT_S = 30.0
#: Wake compensation of delay and throttle timers (see ``layers._timer``).
DEFAULT_WAKE_COMPENSATION = "round-trip"
#: How long the lean request loop polls an empty FUSE device before it sleeps, µs
#: (``_session_loop``: on a VM, cheaper than being woken; chosen by measurement).
DEFAULT_BUSY_POLL_US = 50
#: Most asynchronous ("background") FUSE requests the kernel keeps in flight: async
#: direct I/O (libaio, io_uring) and readahead. The kernel's default, 12, caps an
#: application's queue depth at 12 whatever it asks for: an emulated 20 ms disk read
#: at fio iodepth 32 gave 567 IOPS at p50 62 ms instead of ~1,600 at 20 ms (64:
#: 1,494 IOPS, p50 21 ms; docs/benchmarks.md). 64 covers the queue depths cloud
#: disks are benchmarked at; the worker serves up to ``max_tasks`` at once anyway.
DEFAULT_MAX_BACKGROUND = 64
#: How long the kernel may cache a name it looked up, and a file's attributes, seconds
#: (docs/posix.md: changes made directly in the backing dir show within this time).
DEFAULT_ENTRY_TIMEOUT_S = 1.0
DEFAULT_ATTR_TIMEOUT_S = 1.0

#: Most event sampling rules one worker takes.
MAX_EVENT_SAMPLE_RULES = 64

# Event batching, sized for issue #6's goal of no drops at 50,000 ops/s:
#: How often buffered events are published, seconds: events reach the collector
#: within ~0.1 s, and at 50,000 ops/s one flush carries 5,000 events.
DEFAULT_FLUSH_INTERVAL_S = 0.1
#: Longest wait between flushes while nothing is buffered, seconds: an idle worker's
#: flush timer backs off (doubling) from ``flush_interval_s`` to this, and returns to
#: ``flush_interval_s`` after a flush that found events. Measured: the 10 Hz timer was
#: ~3.5 of an idle worker's 5 ms of CPU per second; with the backoff an idle worker
#: takes 2-2.5 ms/s (50 idle workers on a node: 12-15 % of a core saved, issue #5).
#: The first events after idle wait at most this long, and at
#: 50,000 ops/s that is 20,000 events: a fifth of ``DEFAULT_EVENT_BUFFER``.
IDLE_FLUSH_INTERVAL_MAX_S = 0.4
#: Most events in one published batch: one flush interval at 50,000 ops/s, so the
#: steady state is one message per flush. With typical paths (< 100 bytes) that is
#: well under NATS's default ``max_payload`` of 1 MiB; a batch encoding larger than
#: the server's ``max_payload`` (long paths) is split in halves until each part fits,
#: never dropped (``Bus``).
DEFAULT_BATCH_MAX_EVENTS = 5_000
#: Most op events buffered before new ones are dropped: 2 s of events at 50,000
#: ops/s, i.e. 20 flush intervals the bus thread may fall behind (GIL contention with
#: the FUSE thread, a NATS stall) before anything is lost; about 25 MB at ~250 bytes
#: per buffered ``OpEvent``.
DEFAULT_EVENT_BUFFER = 100_000


class EventSampleRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which share of the matching ops become op events.

    The first rule whose ``ops`` and ``path_glob`` match an op decides; an op no
    rule matches always becomes an event. Every op is counted in ``ops_total``
    whether or not it is sampled.

    Attributes:
        ops: FUSE op names the rule applies to; empty = every op.
        path_glob: ``fnmatch`` glob on the op's path inside the volume (``*`` and
            ``?`` also match ``/``); ``*`` = every path.
        ratio: share of the matching ops recorded, 0..1 (0 = none, 1 = all); each
            op is kept independently with this probability.
    """

    ops: frozenset[OpName] = frozenset()
    path_glob: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_GLOB_LENGTH)] = "*"
    ratio: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 1.0

    def __post_init__(self) -> None:
        check_glob(self.path_glob)  # a rule that can never match would sample nothing, silently


def parse_sample_rule(text: str) -> EventSampleRule:
    """Parse a ``--event-sample`` value ``OPS:GLOB:RATIO`` into a rule.

    ``OPS`` is a comma-separated list of FUSE op names (empty = all), ``GLOB`` a path
    glob (may itself contain ``:``), ``RATIO`` a number in 0..1. Examples:
    ``getattr,lookup:*:0.01``, ``read,write:/scratch/*:0``, ``:*.log:0.1``.

    Args:
        text: the flag value.

    Returns:
        The validated rule.

    Raises:
        ValueError: not ``OPS:GLOB:RATIO``, an unknown op name, or a ratio outside
            0..1 (the message names the part).
    """
    ops_text, sep1, rest = text.partition(":")
    glob, sep2, ratio_text = rest.rpartition(":")
    if not (sep1 and sep2):
        raise ValueError(f"event sample rule {text!r}: expected OPS:GLOB:RATIO, e.g. getattr,lookup:*:0.01")
    try:
        ratio = float(ratio_text)
    except ValueError:
        raise ValueError(f"event sample rule {text!r}: ratio {ratio_text!r} is not a number") from None
    ops = [op.strip() for op in ops_text.split(",") if op.strip()]
    try:
        return msgspec.convert({"ops": ops, "path_glob": glob or "*", "ratio": ratio}, EventSampleRule)
    except msgspec.ValidationError as exc:
        raise ValueError(f"event sample rule {text!r}: {exc}") from None


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a fuse-worker needs to serve one volume.

    Attributes:
        volume_id: the volume's id (CSI volume_id); names its subjects and KV key.
        backing_dir: directory served by the passthrough backend (required for it;
            unused by ``memory`` and ``null``).
        mountpoint: where the FUSE file system is mounted (by the worker itself);
            informative only with ``fuse_fd_socket``.
        fuse_fd_socket: unix socket of the csi-node to receive an already mounted
            ``/dev/fuse`` fd from (``SCM_RIGHTS``) instead of mounting: the worker
            then needs no ``CAP_SYS_ADMIN`` and no ``/dev/fuse``; ``""`` = mount
            ``mountpoint`` itself.
        fuse_fd_wait_s: with ``fuse_fd_socket``: how long to wait for the fd, seconds.
        backend: backend kind: ``passthrough`` (a backing directory), ``memory`` (a
            file system in the worker's memory) or ``null`` (contents discarded).
        memory_size_bytes: most bytes of file contents the ``memory`` backend holds
            (ENOSPC beyond); the size ``statfs`` reports for ``memory`` and ``null``.
        nats_url: NATS server; ``""`` runs without a bus (initial policy only, no events).
        nats_creds: ``--nats-creds`` file of the ``worker`` role
            (``interposer.proto.connection``: user, password, TLS files); ``""`` = anonymous.
        policy_file: JSON policy applied before the first request; ``""`` = none.
        pod_namespace: namespace of the pod using the volume (labels telemetry).
        pod_name: name of that pod.
        pod_uid: uid of that pod (worker heartbeats and event batches carry it).
        service_account: that pod's ServiceAccount name (heartbeats carry it).
        node_name: the node this worker runs on (the csi-node's node id); matched
            by selector policies with a ``node`` (``""`` = unknown, never matches).
        pod_labels: the labels of the pod using the volume (label key → value, as
            the csi-node read them from the API); matched by selector policies with
            ``labels`` and sent in the heartbeat (empty = unknown, never matches).
        read_only: mount read-only (writes fail with EROFS in the kernel).
        allow_other: let users other than the mounting one use the mount (pods run
            as arbitrary uids); needs root or ``user_allow_other`` in /etc/fuse.conf.
        entry_timeout_s: kernel cache time of name lookups, seconds.
        attr_timeout_s: kernel cache time of attributes, seconds.
        negative_timeout_s: kernel cache time of a lookup that found no such name,
            seconds (FUSE's negative entry: inode 0 with an entry timeout); 0 = every
            lookup of a missing name reaches the worker; None = ``entry_timeout_s``
            (a name is cached as long whether found or not, so a file created directly
            in the backing dir shows within the time a deleted one already took; read
            it as :attr:`negative_entry_timeout_s`). Not used while a layer acts on
            lookups, nor for an injected ENOENT (``InterposerOperations.lookup``).
        max_tasks: most FUSE requests served concurrently (pyfuse3 worker tasks).
        session_loop: ``lean`` (default) runs pyfuse3's request loop on the leaner
            primitives of ``_session_loop`` (fewer scheduling rounds per request,
            ~40 % less worker CPU per request); ``pyfuse3`` runs it as it is.
        max_background: most asynchronous FUSE requests (async direct I/O,
            readahead) the kernel keeps in flight, set in the FUSE_INIT reply
            (``_extra_ops``); 0 = the kernel's default (12). The congestion
            threshold is 3/4 of it, libfuse's rule.
        kernel_passthrough: let the kernel serve the reads and writes of files no
            layer needs to see straight from the backing files (Linux ≥ 6.9, CAP_SYS_ADMIN,
            passthrough backend; ``_kernel_passthrough``). Off by default: those
            reads and writes then make no op events, metrics or traces either.
        skip_needless_flush: answer opens with FOPEN_NOFLUSH (Linux ≥ 5.16: no
            FLUSH request on ``close(2)``) where flushing does nothing: no layer in
            force acts on ``flush`` at the file's path, and the backend's flush has
            no effect there (``Backend.flush_needed``: memory and null, or a backing
            fs without a flush method, e.g. ext4, xfs, btrfs, tmpfs). One request
            fewer per file opened; such closes then show as ``release`` only.
        handle_killpriv_v2: ask the kernel for ``FUSE_HANDLE_KILLPRIV_V2``
            (Linux ≥ 5.11): the worker clears set-ID bits on writes, truncations
            and ``O_TRUNC`` opens by non-root callers itself (``_setid``), and the
            kernel no longer sends a GETXATTR of ``security.capability`` before
            every cached or kernel-passthrough ``write(2)``: a round trip fewer
            per write.
        held_reads: while a delay layer acts on reads, serve READ in the worker's
            own slot and send a held read's reply from the timer task when its
            hold ends, instead of parking a reader task through it
            (``_held_reads``); False: every hold sleeps in its request's task.
        busy_poll_us: with the lean loop, how long a reader keeps polling an empty
            FUSE device before it yields, µs (``_session_loop``; 0 = never).
        blocking_io: where the passthrough backend's reads, writes, flushes and
            syncs run: ``adaptive`` (on the event loop while they are measured to
            be fast, in a thread once they block for long, e.g. a network volume),
            ``loop`` or ``thread`` (``backends._offload``).
        wake_compensation: how early the timers of delays (both modes; not
            throttle waits) are armed to make up for late wake-ups (``layers._timer.WakeCompensation``): ``off``,
            ``worker`` (the worker's own measured lateness) or ``round-trip``
            (also the application's wait for the reply, estimated from it;
            ``add`` delays take the worker's own part only).
        max_file_fds: most non-directory files the passthrough backend keeps an
            ``O_PATH`` fd of while the kernel knows them; past it the longest held
            are closed and reopened by name when used (``_inodes.InodeTable``), so
            a walk over more files than the open-file limit allows does not fail
            with EMFILE. 0: half of the worker's open-file limit.
        max_dir_fds: the same for directories. 0: a quarter of the open-file limit.
        read_ahead_kib: kernel readahead of the mount, KiB (``_readahead``); 0 =
            the kernel's default (128 KiB). Not applied with ``fuse_fd_socket``
            (the csi-node made the mount).
        event_buffer: most op events buffered before new ones are dropped.
        batch_max_events: most events in one published batch.
        flush_interval_s: how often buffered events are published, seconds.
        status_interval_s: how often a ``WorkerStatus`` heartbeat is published, seconds.
        policy_wait_s: with ``nats_url``: how long the worker waits, before it
            mounts, for the volume's stored policy, seconds; a worker that
            (re)starts while the bus is reachable never serves a stale policy.
        on_bus_unreachable: what to do when that wait times out: ``passthrough``
            mounts with the local policy (``policy_file`` or none, revision 0) and
            applies the stored one when the bus comes back; ``refuse`` exits
            without mounting.
        events: turn served ops into op events; False keeps only the counters of the
            heartbeat (to measure what telemetry costs the data path).
        event_sampling: rules choosing which share of ops become events (first match
            wins; unmatched ops are all recorded); see :class:`EventSampleRule`.
    """

    volume_id: str = msgspec.field(default="default")
    backing_dir: str = ""
    mountpoint: str = ""
    fuse_fd_socket: str = ""
    fuse_fd_wait_s: float = DEFAULT_FUSE_FD_WAIT_S
    backend: str = "passthrough"
    memory_size_bytes: int = DEFAULT_MEMORY_SIZE_BYTES
    nats_url: str = ""
    nats_creds: str = ""
    policy_file: str = ""
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    service_account: str = ""
    node_name: str = ""
    pod_labels: Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=MAX_SELECTOR_LABELS)] = {}
    read_only: bool = False
    allow_other: bool = True
    entry_timeout_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_CACHE_TIMEOUT_S)] = DEFAULT_ENTRY_TIMEOUT_S
    attr_timeout_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_CACHE_TIMEOUT_S)] = DEFAULT_ATTR_TIMEOUT_S
    negative_timeout_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_CACHE_TIMEOUT_S)] | None = None
    max_tasks: int = 128
    session_loop: Literal["lean", "pyfuse3"] = "lean"
    busy_poll_us: Annotated[int, msgspec.Meta(ge=0, le=MAX_BUSY_POLL_US)] = DEFAULT_BUSY_POLL_US
    max_background: Annotated[int, msgspec.Meta(ge=0, le=MAX_BACKGROUND_REQUESTS)] = DEFAULT_MAX_BACKGROUND
    kernel_passthrough: bool = False
    skip_needless_flush: bool = True
    handle_killpriv_v2: bool = True
    held_reads: bool = True
    blocking_io: Literal["adaptive", "loop", "thread"] = "adaptive"
    wake_compensation: Literal["off", "worker", "round-trip"] = DEFAULT_WAKE_COMPENSATION
    read_ahead_kib: Annotated[int, msgspec.Meta(ge=0, le=65536)] = DEFAULT_READ_AHEAD_KIB
    max_file_fds: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_dir_fds: Annotated[int, msgspec.Meta(ge=0)] = 0
    event_buffer: int = DEFAULT_EVENT_BUFFER
    batch_max_events: int = DEFAULT_BATCH_MAX_EVENTS
    flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S
    status_interval_s: float = 1.0
    policy_wait_s: float = DEFAULT_POLICY_WAIT_S
    on_bus_unreachable: Literal["passthrough", "refuse"] = "passthrough"
    events: bool = True
    event_sampling: Annotated[
        tuple[EventSampleRule, ...], msgspec.Meta(max_length=MAX_EVENT_SAMPLE_RULES)
    ] = ()

    @property
    def negative_entry_timeout_s(self) -> float:
        """Kernel cache time of a lookup that found no such name, seconds (resolved ``negative_timeout_s``)."""
        return self.entry_timeout_s if self.negative_timeout_s is None else self.negative_timeout_s

    def __post_init__(self) -> None:
        if not VOLUME_ID_PATTERN.fullmatch(self.volume_id):
            raise ValueError(f"volume_id {self.volume_id!r} must match {VOLUME_ID_PATTERN.pattern}")
        if not self.mountpoint and not self.fuse_fd_socket:
            raise ValueError("a mountpoint (--mountpoint) or an fd-handoff socket (--fuse-fd-socket) is required")
        if self.backend not in BACKEND_KINDS:
            raise ValueError(f"backend {self.backend!r} is not supported (supported: {', '.join(BACKEND_KINDS)})")
        if self.backend == "passthrough" and not self.backing_dir:
            raise ValueError("backing_dir is required for the passthrough backend")
        if self.kernel_passthrough and self.backend != "passthrough":
            raise ValueError(f"kernel_passthrough needs the passthrough backend, not {self.backend!r} "
                             "(there is no backing file to pass through to)")
        if self.memory_size_bytes < 4096:
            raise ValueError(f"memory_size_bytes = {self.memory_size_bytes} must be >= 4096")
        if self.max_tasks < 1 or self.event_buffer < 1 or self.batch_max_events < 1:
            raise ValueError("max_tasks, event_buffer and batch_max_events must be >= 1")
        if self.flush_interval_s <= 0 or self.status_interval_s <= 0:
            raise ValueError("flush_interval_s and status_interval_s must be > 0")
        if self.policy_wait_s < 0:
            raise ValueError("policy_wait_s must be >= 0")
