"""``interposer replay``, the plan: a recording's ops of one volume as per-thread streams, and the tree they start from.

A recording holds what reached the worker, after the mount's page cache: the requests
a storage system must serve. Replaying them against another directory — a mount with
a cloud-disk profile, a real cloud disk — shows how long the same work would take
there. Pure computation: the only I/O is reading the recordings.

**Streams.** FUSE gives each request the caller's thread id (``OpEvent.pid``). Ops of
one file handle (``session``) belong to the thread that opened it, since the kernel
sends reads, writes and releases without a caller; directory listings to the thread
of the ``opendir`` before them. A replay keeps each stream's order and replays its
ops with the dependencies they had: an op waits for every op of its stream that had
finished before it began in the recording, plus the same gap after the latest of them
(its think time), and ops that overlapped (asynchronous I/O, readahead) overlap again.
Between threads, files carry the order: an op also waits for the op of another thread
that had finished last on each path it names (and, for ops that change names, on its
directory) before it began — the resource-oriented ordering of ROOT (Weiss et al.,
"ROOT: Replaying Multithreaded Traces with Resource-Oriented Ordering", SOSP 2013),
with threads and paths as the resources (:func:`_order_across_threads`). A thread's
first op otherwise starts at its recorded offset from the recording's start.

**Start state.** Whether a path existed when the recording began is read from the first
op that names it: a create, mkdir, mknod or symlink (or a lookup that found nothing)
says it did not; anything else that succeeded says it did. A file must hold at least
the bytes its reads got before anything wrote or truncated it (``offset + result``).

Memory: one :class:`ReplayOp` per replayed event, each distinct path once: ~0.5 KiB per
event at the peak (1M events: 0.53 GB, planned in ~13 s; docs/benchmarks.md, "Replay").
"""

from __future__ import annotations

import errno as errno_module
import heapq
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator

import msgspec

from interposer.proto import EventBatch
from interposer.proto.events import FATTR_SIZE

#: Ops replayed by a system call of their own.
REPLAYED_OPS = frozenset({
    "lookup", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link",
    "open", "create", "read", "write", "release", "fsync", "fallocate", "lseek", "readdir", "readdirplus",
    "fsyncdir", "statfs", "access", "getxattr", "listxattr",
})
#: Ops that happen as part of another replayed call, so have none of their own.
FOLDED_OPS = {
    "flush": "sent by the close that replays release",
    "opendir": "the listing replayed at its first readdir opens the directory",
    "releasedir": "the listing replayed at its first readdir closes the directory",
}
#: Why the other ops are not replayed.
NOT_REPLAYED = {
    "forget": "kernel-internal (the kernel dropping an inode from its cache)",
    "batch_forget": "kernel-internal (the kernel dropping inodes from its cache)",
    "setxattr": "the event carries neither the attribute's name nor its value",
    "removexattr": "the event does not carry the attribute's name",
    "copy_file_range": "the event does not carry the source offset",
    "ioctl": "the event does not carry the request",
    "bmap": "not issued by applications",
    "poll": "not issued by applications",
}
#: Ops whose success means the path did not exist before them.
CREATING_OPS = frozenset({"create", "mknod", "mkdir", "symlink"})
#: Ops that show their path is a directory.
DIRECTORY_OPS = frozenset({"opendir", "readdir", "readdirplus", "releasedir", "fsyncdir", "rmdir", "mkdir"})
#: Ops after which reads no longer tell how long the file was at the start.
RESHAPING_OPS = frozenset({"write", "fallocate", "create", "unlink", "rename"})
#: Ops that belong to a file handle (their thread is the opener's).
SESSION_OPS = frozenset({"read", "write", "flush", "release", "fsync", "fallocate", "lseek"})
#: Ops that belong to the thread of the opendir before them (FUSE sends them without a caller).
DIRECTORY_HANDLE_OPS = frozenset({"readdir", "readdirplus", "releasedir", "fsyncdir"})
#: ``RENAME_EXCHANGE`` (<linux/fs.h>): both names exist before and after.
RENAME_EXCHANGE = 1 << 1


class ReplayError(ValueError):
    """The recordings cannot be replayed as asked (no such volume, no ops, a path that escapes)."""


class ReplayOp(msgspec.Struct, gc=False):
    """One recorded op to replay.

    Attributes:
        index: position in the replay (recorded start order), from 0.
        op: FUSE op name.
        path: path inside the volume, ``/``-separated, starting with ``/``, no ``.``/``..``.
        target: ``OpEvent.target`` (a path for rename and link, contents for symlink).
        offset: bytes (read, write, fallocate, lseek; a readdir's position).
        size: bytes asked (read, write, fallocate), the new size of a truncating setattr.
        result: bytes the recording's read or write moved.
        errno: the recording's errno (0 = success).
        flags: ``OpEvent.flags`` (open flags, ``RENAME_*``, mknod's mode, ``FATTR_*``).
        handle: the file handle the op uses (a number per worker and session), 0 if none.
        start_ns: recorded start, ns since the epoch.
        end_ns: recorded end (start + the worker's service time), ns since the epoch.
        thread: the caller's thread (``OpEvent.pid``; 0 = not given), then the stream's.
        directory: the inode the op addressed in its worker (which listing a readdir continues).
        after: ops of other threads this one waits for (``index`` es): on each path it
            names (and on its directory, for ops that change names), the op that had
            finished last before this one began (:func:`_order_across_threads`).
    """

    index: int
    op: str
    path: str
    target: str
    offset: int
    size: int
    result: int
    errno: int
    flags: int
    handle: int
    start_ns: int
    end_ns: int
    thread: int
    directory: int
    after: tuple[int, ...] = ()


class Stream(msgspec.Struct):
    """The ops of one application thread, in recorded start order.

    Attributes:
        thread: the caller's thread id (``OpEvent.pid``); 0 for ops no thread could be found for.
        ops: its ops.
    """

    thread: int
    ops: list[ReplayOp]


class StartState(msgspec.Struct, kw_only=True):
    """The tree the recording began with, as far as its ops show it.

    Attributes:
        directories: paths that existed as directories.
        files: paths that existed as regular files → the least size they had (what reads got, and where
            the first append to them began), bytes.
        symlinks: paths that existed as symbolic links (their contents are not recorded).
        absent: paths that did not exist (the recording creates them, or looked for them in vain).
    """

    directories: set[str]
    files: dict[str, int]
    symlinks: set[str]
    absent: set[str]


class Plan(msgspec.Struct, kw_only=True):
    """What to replay.

    Attributes:
        volume: the volume the recording is of.
        streams: per-thread streams, by thread id.
        start: the tree the recording began with.
        first_ns: the earliest replayed op's recorded start, ns since the epoch.
        last_end_ns: the latest recorded end of a replayed op, ns.
        recorded_ops: ops in the recording's range, by op name.
        not_replayed: ops left out, by op name → (count, why).
        unknown_paths: ops left out because the worker did not know their inode's path,
            or a rename, link or symlink has no target (recorded before ``OpEvent.target``).
        events_missing: events the workers dropped or sampled out (the recording is incomplete).
    """

    volume: str
    streams: list[Stream]
    start: StartState
    first_ns: int
    last_end_ns: int
    recorded_ops: dict[str, int]
    not_replayed: dict[str, tuple[int, str]]
    unknown_paths: int
    events_missing: int

    @property
    def ops(self) -> int:
        """Ops to replay."""
        return sum(len(stream.ops) for stream in self.streams)


def check_path(path: str) -> str:
    """Return ``path`` if it is a normalised volume path: ``/``, or ``/a/b`` without empty, ``.`` or ``..`` parts.

    Raises:
        ReplayError: anything else (a path that could leave the replay's target).
    """
    if path == "/":
        return path
    parts = path.split("/")
    if parts[0] != "" or any(part in {"", ".", ".."} for part in parts[1:]) or "\0" in path:
        raise ReplayError(f"recorded path {path!r} is not a path inside a volume")
    return path


def parent_paths(path: str) -> Iterable[str]:
    """``/a/b/c`` → ``/a``, ``/a/b`` (the directories on the way, not the root)."""
    parts = path.split("/")[1:-1]
    for depth in range(1, len(parts) + 1):
        yield "/" + "/".join(parts[:depth])


def volumes_in(batches: Iterable[EventBatch]) -> dict[str, int]:
    """Events per volume in ``batches``."""
    counts: dict[str, int] = {}
    for batch in batches:
        counts[batch.volume] = counts.get(batch.volume, 0) + len(batch.events)
    return counts


class _StartTracker:
    """Reads the start state off the ops in start order."""

    def __init__(self) -> None:
        self.seen: dict[str, bool] = {}  # path → existed at the start
        self.directories: set[str] = set()
        self.symlinks: set[str] = set()
        self.sizes: dict[str, int] = {}
        self.reshaped: set[str] = set()
        self.written: set[str] = set()

    def first(self, path: str, existed: bool) -> None:
        if path not in self.seen:
            self.seen[path] = existed

    def add(self, op: ReplayOp) -> None:
        name, path, ok = op.op, op.path, op.errno == 0
        if name in CREATING_OPS:
            self.first(path, not ok and op.errno == errno_module.EEXIST)
        elif name == "lookup":
            self.first(path, ok)
        elif name == "link":
            self.first(op.target, True)
            self.first(path, not ok and op.errno == errno_module.EEXIST)
        elif name == "rename":
            self.first(path, ok or op.errno != errno_module.ENOENT)
            self.first(op.target, bool(op.flags & RENAME_EXCHANGE))
            self.reshaped.add(op.target)
        else:
            self.first(path, ok or op.errno != errno_module.ENOENT)
        if name in DIRECTORY_OPS:
            self.directories.add(path)
        elif name == "readlink" and ok:
            self.symlinks.add(path)
        if name == "read" and ok and path not in self.reshaped:
            self.sizes[path] = max(self.sizes.get(path, 0), op.offset + op.result)
        elif name == "write" and path not in self.written:
            self.written.add(path)
            if op.flags & os.O_APPEND and path not in self.reshaped:
                # the kernel sends an append at the file's end: what the file held before the recording wrote
                self.sizes[path] = max(self.sizes.get(path, 0), op.offset)
        if name in RESHAPING_OPS or (name == "setattr" and op.flags & FATTR_SIZE) or (
                name == "open" and op.flags & os.O_TRUNC):
            self.reshaped.add(path)

    def state(self) -> StartState:
        existing = {path for path, existed in self.seen.items() if existed and path != "/"}
        absent = {path for path, existed in self.seen.items() if not existed}
        # A directory on the way to any path existed, unless the recording made it.
        parents = {parent for path in self.seen for parent in parent_paths(path)} - absent
        directories = (self.directories & existing) | parents
        symlinks = (self.symlinks & existing) - directories
        files = {path: self.sizes.get(path, 0) for path in existing - directories - symlinks}
        return StartState(directories=directories, files=files, symlinks=symlinks, absent=absent)


def plan_replay(batches: Iterable[EventBatch], *, volume: str | None = None, since_ns: int | None = None,
                until_ns: int | None = None) -> Plan:
    """Build the replay of one volume's recorded ops.

    Args:
        batches: recorded event batches (``_analyze.read_recordings``), any order.
        volume: the volume to replay; None = the only one the recordings hold.
        since_ns: only ops that started at or after this time, ns since the epoch.
        until_ns: only ops that started before this time, ns since the epoch.

    Raises:
        ReplayError: no volume given while the recordings hold several, no such volume,
            nothing to replay, or a recorded path that is not a path inside a volume.
    """
    ops: list[ReplayOp] = []
    volumes: dict[str, int] = {}
    missing_by_worker: dict[str, int] = {}
    handles: dict[tuple[str, int], int] = {}  # (worker, session) → handle number
    workers: dict[str, int] = {}
    interned: dict[str, str] = {}  # one str per distinct path: recordings repeat paths
    recorded: dict[str, int] = {}
    for batch in batches:
        volumes[batch.volume] = volumes.get(batch.volume, 0) + len(batch.events)
        if volume is not None and batch.volume != volume:
            continue
        missing_by_worker[batch.worker_id] = max(missing_by_worker.get(batch.worker_id, 0),
                                                 batch.dropped_total + batch.sampled_out_total)
        worker = workers.setdefault(batch.worker_id, len(workers))
        for event in batch.events:
            if (since_ns is not None and event.start_ns < since_ns) or (
                    until_ns is not None and event.start_ns >= until_ns):
                continue
            handle = handles.setdefault((batch.worker_id, event.session), len(handles) + 1) if event.session else 0
            path = interned.setdefault(event.path, event.path)
            ops.append(ReplayOp(0, event.op, path, event.target, event.offset, event.size, event.result,
                                event.errno, event.flags, handle, event.start_ns,
                                event.start_ns + event.duration_ns, event.pid, event.ino << 16 | worker))
    if volume is None:
        if len(volumes) > 1:
            listing = ", ".join(f"{name} ({count:,} events)" for name, count in sorted(volumes.items()))
            raise ReplayError(f"the recordings hold several volumes: {listing}; name one with --volume")
        volume = next(iter(volumes), None)
    if volume is None or volume not in volumes:
        known = ", ".join(sorted(volumes)) or "none"
        raise ReplayError(f"no events of volume {volume!r} in the recordings (volumes: {known})")
    ops.sort(key=lambda op: op.start_ns)  # stable: a batch's order breaks ties

    not_replayed: dict[str, tuple[int, str]] = {}
    unknown_paths = 0
    opener: dict[int, int] = {}  # handle → thread that opened it
    lister: dict[int, int] = {}  # directory inode (in its worker) → thread of its last opendir
    streams: dict[int, list[ReplayOp]] = {}
    tracker = _StartTracker()
    checked: set[str] = set()

    def leave_out(name: str, why: str) -> None:
        count, _why = not_replayed.get(name, (0, why))
        not_replayed[name] = (count + 1, why)

    for op in ops:
        name = op.op
        recorded[name] = recorded.get(name, 0) + 1
        if name not in REPLAYED_OPS:
            leave_out(name, FOLDED_OPS.get(name) or NOT_REPLAYED.get(name, "not replayed"))
            if name == "opendir" and op.thread:
                lister[op.directory] = op.thread
            continue
        if op.path == "?" or (name in {"rename", "link"} and op.target in {"", "?"}) or (
                name == "symlink" and not op.target):  # unknown, or recorded before events had targets
            unknown_paths += 1
            continue
        if op.path not in checked:  # each distinct path once
            checked.add(check_path(op.path))
        if name in {"rename", "link"}:
            check_path(op.target)
        if name in {"open", "create"} and op.handle:
            opener[op.handle] = op.thread
        elif name in SESSION_OPS and op.handle:
            op.thread = opener.get(op.handle, op.thread)
        elif name in DIRECTORY_HANDLE_OPS:
            op.thread = lister.get(op.directory, op.thread)
        if name in {"readdir", "readdirplus"} and op.offset != 0:
            leave_out(name + " (continued)", "part of the listing replayed at its first readdir")
            continue
        tracker.add(op)
        streams.setdefault(op.thread, []).append(op)
    del ops
    ordered = sorted((op for stream in streams.values() for op in stream), key=lambda op: op.start_ns)
    if not ordered:
        raise ReplayError(f"nothing to replay of volume {volume!r}"
                          + (" in that time range" if since_ns is not None or until_ns is not None else ""))
    for index, op in enumerate(ordered):
        op.index = index
    _order_across_threads(ordered)
    return Plan(volume=volume, streams=[Stream(thread, ops) for thread, ops in sorted(streams.items())],
                start=tracker.state(), first_ns=ordered[0].start_ns,
                last_end_ns=max(op.end_ns for op in ordered), recorded_ops=recorded, not_replayed=not_replayed,
                unknown_paths=unknown_paths, events_missing=sum(missing_by_worker.values()))


#: Ops that change the names in their path's directory: they are ordered after what last
#: happened to the directory itself (a mkdir of it in another thread, say).
NAMESPACE_OPS = frozenset({"create", "mknod", "mkdir", "symlink", "link", "rename", "unlink", "rmdir"})  # ⊇ rename, link


def _resources(op: ReplayOp) -> Iterator[str]:
    """The paths whose order across threads ``op`` must keep: its path, its second path, its directory."""
    yield op.path
    if op.op in {"rename", "link"}:
        yield op.target
    if op.op in NAMESPACE_OPS:
        yield posixpath.dirname(op.path)
        if op.op == "rename":
            yield posixpath.dirname(op.target)


def _order_across_threads(ordered: list[ReplayOp]) -> None:
    """Set each op's ``after``: per path, the op of another thread that had finished last before it began.

    Threads record no dependencies between them, but files do: a thread that opens a
    file another thread created must not run before the create. So, as ROOT orders
    replayed ops by the resources they share (Weiss et al., SOSP 2013, "resource-
    oriented ordering"), an op waits for the latest op on each of its paths
    (:func:`_resources`) that had ended before it started in the recording. Ops that
    overlapped on a path stay unordered, as they were.

    Args:
        ordered: every replayed op, in recorded start order, ``index`` set.
    """
    running: dict[str, list[tuple[int, int]]] = {}  # path → heap of (end, index) not yet passed
    latest: dict[str, tuple[int, int]] = {}  # path → (end, index) of the latest op ended before now
    for op in ordered:
        after: list[int] = []
        # Most ops (reads, writes, stats) name one path: no generator for them.
        for path in _resources(op) if op.op in NAMESPACE_OPS else (op.path,):
            heap = running.get(path)
            while heap and heap[0][0] <= op.start_ns:
                ended = heapq.heappop(heap)
                if path not in latest or ended[0] >= latest[path][0]:
                    latest[path] = ended
            done = latest.get(path)
            if done is not None and ordered[done[1]].thread != op.thread and done[1] not in after:
                after.append(done[1])
            heapq.heappush(running.setdefault(path, []), (op.end_ns, op.index))
        if after:
            op.after = tuple(after)


def is_device(mode: int) -> bool:
    """Whether mknod mode ``mode`` makes a device node (not replayed: the target's pods could not open it)."""
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
