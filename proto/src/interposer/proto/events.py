"""Telemetry messages a fuse-worker publishes: op events and status heartbeats.

Wire format is msgpack (``msgspec.msgpack``). These messages must evolve without
breaking older consumers, so unknown fields are ignored and new fields are only
ever appended with defaults (msgspec schema-evolution rules).
"""

from __future__ import annotations

import msgspec


#: ``OpEvent.flags`` of a ``setattr``: the attributes it changed, as FUSE_SETATTR's
#: ``valid`` bits (<linux/fuse.h>, ``FATTR_*``).
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_CTIME = 1 << 10


class OpEvent(msgspec.Struct, array_like=True, gc=False):
    """One FUSE request as the worker served it.

    ``array_like`` keeps each event a compact msgpack array; fields may only be
    appended (with defaults), never reordered.

    Attributes:
        op: FUSE op name (``lookup``, ``getattr``, ``read``, ``write``, …).
        ino: FUSE inode number the op addressed (the parent for entry ops).
        path: path of that inode inside the volume at the time of the op,
            ``/``-separated, starting with ``/``; for entry ops the entry's path.
        offset: byte offset (read/write), else 0.
        size: bytes requested (read/write; the new size for a truncating setattr), else 0.
        result: bytes done, i.e. transferred by a successful read/write (may be less
            than ``size``: a short read at end of file, or a short I/O a layer made),
            else 0.
        errno: 0 on success, else the errno number returned to the kernel.
        start_ns: wall-clock start, ns since the Unix epoch.
        duration_ns: time spent serving the op, ns (includes injected delay).
        fault: errno name injected by a fault layer (``"EIO"``), ``""`` if none.
        delay_ns: delay injected by delay layers, ns.
        throttle_ns: time spent waiting for throttle tokens, ns.
        pid: caller process id (0 where FUSE does not say, e.g. release).
        uid: caller user id.
        session: file session id: set by ``open``/``create`` and carried by every op on
            the file handle it returned (read, write, flush, fsync, release), so a
            consumer can group what happened to one opened file (open → release).
            Unique per worker process (a counter, never reused even when the kernel
            reuses the fh number); 0 for ops outside a file session.
        delay_late_ns: how much later than its delay layers asked the worker
            resumed the op after their holds, ns (0 when on time, or not delayed):
            the worker's scheduling lag (a saturated event loop, a descheduled
            vCPU), which the application sees on top of ``delay_ns``.
        sequential: for ``read`` and ``write``: True if the request began where the
            previous read or write of the same file (inode) ended, in the order the
            requests reached the worker, or at offset 0 (a file read or written from
            its start, as a loader reading whole files does in every epoch); False
            for random access and for other ops.
            This is the access pattern the backing store sees, after the page cache
            (readahead makes a sequential reader's requests 1 MiB long; a buffered
            random reader's may still be sequential runs).
        flags: the request's flags: for ``open`` and ``create``, and for ``read``,
            ``write``, ``flush`` and ``fsync`` of a file handle, the flags the file
            was opened with (``O_ACCMODE`` bits, ``O_TRUNC``, ``O_APPEND``,
            ``O_DIRECT``…, Linux values); ``rename``: ``RENAME_*``; ``mknod``: the
            mode (file type and permission bits); ``fallocate``: ``FALLOC_FL_*``;
            ``copy_file_range``: its flags; ``lseek``: whence; ``setattr``: which
            attributes it changed (``FATTR_*`` bits below); else 0.
        target: the op's second path: ``rename``: the destination's path;
            ``link``: the path of the file linked to (``path`` is the new name);
            ``symlink``: the link's contents, as given; ``copy_file_range``: the
            source file's path (``path`` is the destination's); else ``""``.
            With ``path``, ``flags`` and the sizes, this is what a replay of the
            ops needs (``interposer replay``).
    """

    op: str
    ino: int
    path: str
    offset: int
    size: int
    result: int
    errno: int
    start_ns: int
    duration_ns: int
    fault: str = ""
    delay_ns: int = 0
    throttle_ns: int = 0
    pid: int = 0
    uid: int = 0
    session: int = 0
    delay_late_ns: int = 0
    sequential: bool = False
    flags: int = 0
    target: str = ""


class EventBatch(msgspec.Struct):
    """A batch of op events of one volume, published on ``interposer.events.<volume>``.

    Attributes:
        volume: volume id.
        worker_id: unique id of the worker process (changes when it restarts).
        seq: batch sequence number of this worker, starting at 1.
        events: the ops, in completion order.
        dropped_total: events this worker dropped so far because its buffer was full.
        namespace: Kubernetes namespace of the pod using the volume, ``""`` if unknown.
        pod: name of that pod, ``""`` if unknown.
        sampled_out_total: ops this worker served but, by its event sampling rules,
            did not turn into events, so far (counted in ``WorkerStatus.ops_total``).
        pod_uid: uid of the pod using the volume (``k8s.pod.uid``), ``""`` if unknown.
    """

    volume: str
    worker_id: str
    seq: int
    events: list[OpEvent]
    dropped_total: int = 0
    namespace: str = ""
    pod: str = ""
    sampled_out_total: int = 0
    pod_uid: str = ""


class WorkerStatus(msgspec.Struct):
    """Heartbeat of a worker, published on ``interposer.status.<volume>``.

    Attributes:
        volume: volume id.
        worker_id: unique id of the worker process.
        policy_revision: KV revision of the policy in force; 0 = initial/local policy.
        ops_total: FUSE ops served since start.
        events_total: op events produced (queued or dropped) since start.
        events_dropped_total: events dropped because the buffer was full.
        events_published_total: events handed to NATS.
        started_at_s: worker start, seconds since the Unix epoch.
        sent_at_s: time of this heartbeat, seconds since the Unix epoch.
        namespace: pod namespace, ``""`` if unknown.
        pod: pod name, ``""`` if unknown.
        faults_total: fault records produced since start.
        faults_dropped_total: fault records dropped because the buffer was full.
        status_interval_s: how often this worker sends a heartbeat, seconds (a
            consumer calls the worker down after a few intervals without one).
        open_files: open file handles (file sessions between ``open``/``create`` and
            ``release``) now.
        quota_bytes_used: bytes (apparent sizes of regular files) the quota layer
            counts in use; ``None`` when no quota layer is in force (not tracked).
        quota_bytes_limit: the byte limit of the quota in force; ``None`` = none.
        quota_inodes_used: files, directories and links the quota layer counts in
            use; ``None`` when no quota layer is in force.
        quota_inodes_limit: the inode limit of the quota in force; ``None`` = none.
        pod_uid: uid of the pod using the volume, ``""`` if unknown.
        service_account: that pod's ServiceAccount name, ``""`` if unknown.
        labels: the labels of the pod using the volume (``{}`` = unknown), which
            selector policies with ``labels`` match.
        node: the node the worker runs on (the csi-node's node id), ``""`` if
            unknown (selectors match it).
        kernel_passthrough_files: open file handles the kernel serves by
            passthrough now (``--kernel-passthrough``): their reads and writes reach
            no layer and make no op events.
        files_bypassing_layers: open files the policy in force would act on but
            cannot reach until they are reopened (they were opened before it
            arrived, and the kernel takes neither back): passthrough handles whose
            reads or writes it acts on, and handles opened without FLUSH
            (FOPEN_NOFLUSH) whose ``flush`` it acts on.
        burst_balance: how full, 0..1, the emptiest burst bucket sized by the
            policy is (a throttle layer's ``burst_bytes``/``burst_ops``, e.g. the
            credit buckets of the ``gp2`` and ``st1`` profiles), as CloudWatch's
            ``BurstBalance`` but a ratio; ``None`` when no layer in force has one.
        resident_memory_bytes: the worker process's resident memory (RSS), bytes,
            when the heartbeat was made (``/proc/self/statm``); ``None`` where
            unknown. A passthrough worker's grows ~260 B per file or directory
            the kernel knows: what its pod's memory limit must hold.
        internal_errors_total: requests the worker answered EIO because of an error
            in its own code (a bug), not the backing store's, since start.
        memory_limit_bytes: the memory limit of the worker's cgroup (its pod's
            limit), bytes, the tightest on its path to the root: past it the kernel
            OOM-kills the worker; ``None`` when there is none or it is unknown.
        stopped: True only in the last heartbeat of a worker that ends on request
            (SIGTERM/SIGINT, or its mount unmounted): consumers stop expecting
            heartbeats from it and do not call it down. A worker that crashes, is
            killed or fails to mount sends none, so its silence reads as down.
    """

    volume: str
    worker_id: str
    policy_revision: int
    ops_total: int
    events_total: int
    events_dropped_total: int
    events_published_total: int
    started_at_s: float
    sent_at_s: float
    namespace: str = ""
    pod: str = ""
    faults_total: int = 0
    faults_dropped_total: int = 0
    status_interval_s: float = 1.0
    open_files: int = 0
    quota_bytes_used: int | None = None
    quota_bytes_limit: int | None = None
    quota_inodes_used: int | None = None
    quota_inodes_limit: int | None = None
    pod_uid: str = ""
    service_account: str = ""
    labels: dict[str, str] = {}
    node: str = ""
    kernel_passthrough_files: int = 0
    files_bypassing_layers: int = 0
    burst_balance: float | None = None
    resident_memory_bytes: int | None = None
    internal_errors_total: int = 0
    stopped: bool = False
    memory_limit_bytes: int | None = None


class FaultRecord(msgspec.Struct, kw_only=True):
    """One fault a worker injected, published on ``interposer.faults.<volume>``.

    Each message is a msgpack array of records. Compare them with what the
    application logged: every errno, short read/write and corruption the layers
    injected gets one record; when the worker's fault buffer is full new records
    are dropped and counted (``WorkerStatus.faults_dropped_total``).

    Attributes:
        time_ns: wall-clock start of the faulted op, ns since the Unix epoch.
        op: FUSE op name.
        path: path inside the volume.
        kind: ``errno``, ``short_read``, ``short_write`` or ``corrupt``.
        errno: errno name for ``kind == "errno"``, else ``""``.
        pid: caller process id (0 where FUSE does not say, e.g. read/write).
        uid: caller user id.
        volume: volume id.
        layer: index of the injecting layer in the policy's ``layers``.
        offset: byte offset of the op (read/write), else 0.
        size: bytes requested, else 0.
        result: bytes transferred after a short read/write, else 0.
        policy_revision: revision of the policy in force.
        worker_id: the worker process that injected it (``EventBatch.worker_id``).
        session: file session id of the op (``OpEvent.session``), 0 outside one.
            With ``volume``, ``worker_id``, ``op`` and ``time_ns`` it names the op's
            event, so a consumer can link the record to the op's span.
        duration_ns: time spent serving the faulted op, ns (``OpEvent.duration_ns``).
        namespace: pod namespace (``EventBatch.namespace``), ``""`` if unknown.
        pod: pod name, ``""`` if unknown.
    """

    time_ns: int
    op: str
    path: str
    kind: str
    errno: str = ""
    pid: int = 0
    uid: int = 0
    volume: str = ""
    layer: int = 0
    offset: int = 0
    size: int = 0
    result: int = 0
    policy_revision: int = 0
    worker_id: str = ""
    session: int = 0
    duration_ns: int = 0
    namespace: str = ""
    pod: str = ""
