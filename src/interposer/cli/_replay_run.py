"""``interposer replay``, the run: each stream's ops issued as the recording's threads issued them, and timed.

One thread per stream issues its ops in order (:mod:`_replay_plan`, "Streams"); an op
that overlapped the next one in the recording (asynchronous I/O, readahead) is handed
to a shared pool so that they overlap again. Each op is timed around its system call
(``time.perf_counter_ns``), so the replayer's own scheduling is not in its latency.

Data: reads and writes move the recorded sizes at the recorded offsets; writes carry
pseudo-random bytes (a compressing or deduplicating store gains nothing from them).
With ``direct`` (the default) files are opened with ``O_DIRECT`` when every request of
their handle is 4 KiB-aligned, so the target serves exactly the recorded requests: a
recording holds what passed the mount's page cache, and a second page cache in front
of the target would answer some of them again (or read ahead more). A handle with an
unaligned request is replayed buffered, and so is one on a file system that refuses
``O_DIRECT`` (tmpfs before Linux 6.6): the report counts both.
"""

from __future__ import annotations

import errno as errno_module
import heapq
import itertools
import mmap
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import msgspec

from interposer.fuse_worker.backends._libc import fallocate, renameat2
from interposer.proto.events import FATTR_ATIME, FATTR_CTIME, FATTR_GID, FATTR_MODE, FATTR_MTIME, FATTR_SIZE, FATTR_UID

from ._replay_plan import Plan, ReplayOp, Stream, is_device
from ._replay_target import Target

#: Timing modes: ``closed`` keeps each thread's dependencies and think time, ``asap``
#: its dependencies only (every stream starts at once, no think time), ``open`` issues
#: every op at its recorded time whatever the target's speed.
TIMINGS = ("closed", "asap", "open")
#: Alignment of offsets and sizes that direct I/O is used for, bytes (the page size:
#: what every Linux file system accepts for ``O_DIRECT``).
DIRECT_ALIGNMENT = 4096
#: Open flags passed on from the recording; others (``O_CREAT``, ``O_EXCL``, the
#: kernel's own ``O_LARGEFILE``/``FMODE_*`` bits) are set per op or dropped.
PASSED_OPEN_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_DIRECT | os.O_SYNC | os.O_DSYNC
                     | os.O_NOATIME | os.O_NONBLOCK)
#: Most pool threads for overlapping ops.
MAX_POOL_THREADS = 64
#: Name whose attribute a replayed getxattr asks for (the recording has no name: it gets ENODATA like most).
GETXATTR_NAME = "user.interposer-replay"
#: How often ``run``'s progress callback is called, seconds.
PROGRESS_INTERVAL_S = 0.5
_MIB = 1 << 20


class OpOutcome(msgspec.Struct, array_like=True, gc=False):
    """One replayed op.

    Attributes:
        index: ``ReplayOp.index``.
        issued_ns: when it was issued, ns after the replay's start.
        latency_ns: its system call's time, ns.
        errno: 0, or the errno it failed with.
        bytes: bytes read or written.
        late_ns: how much later than due it was issued, ns (the replayer's own lag).
    """

    index: int
    issued_ns: int
    latency_ns: int
    errno: int
    bytes: int
    late_ns: int


class RunResult(msgspec.Struct, kw_only=True):
    """What a run did.

    Attributes:
        outcomes: every replayed op's outcome, by ``index``.
        wall_ns: from the first op issued to the last one finished, ns.
        direct_handles: file handles replayed with ``O_DIRECT``.
        buffered_handles: file handles replayed buffered (an unaligned request, or the target refused ``O_DIRECT``).
        skipped: ops not issued, by reason.
    """

    outcomes: list[OpOutcome]
    wall_ns: int
    direct_handles: int
    buffered_handles: int
    skipped: dict[str, int]


class _Done:
    """A finished op, as a future that needs no waiting."""

    __slots__ = ("end",)

    def __init__(self, end: int) -> None:
        self.end = end

    def result(self) -> int:
        return self.end


class _Handle:
    __slots__ = ("fd", "direct")

    def __init__(self, fd: int, direct: bool) -> None:
        self.fd = fd
        self.direct = direct


def aligned_handles(plan: Plan) -> set[int]:
    """Handles whose reads and writes are all :data:`DIRECT_ALIGNMENT`-aligned in offset and size."""
    aligned: dict[int, bool] = {}
    for stream in plan.streams:
        for op in stream.ops:
            if op.handle and op.op in {"read", "write"}:
                ok = op.offset % DIRECT_ALIGNMENT == 0 and op.size % DIRECT_ALIGNMENT == 0
                aligned[op.handle] = aligned.get(op.handle, True) and ok
    return {handle for handle, ok in aligned.items() if ok}


class Replayer:
    """Replays a :class:`Plan` into a :class:`Target`.

    Args:
        plan: what to replay.
        target: where.
        timing: one of :data:`TIMINGS`.
        direct: use ``O_DIRECT`` for aligned handles (above).
        pattern: at least the largest write's bytes, written by writes.
        think_scale: ``closed`` timing's think time (and each thread's start) times
            this: 0.5 replays the job as if its compute were twice as fast.

    Raises:
        ValueError: an unknown timing, a negative think scale, a pattern too short.
    """

    def __init__(self, plan: Plan, target: Target, *, timing: str = "closed", direct: bool = True,
                 pattern: bytes, think_scale: float = 1.0) -> None:
        if timing not in TIMINGS:
            raise ValueError(f"timing must be one of {', '.join(TIMINGS)}")
        if not think_scale >= 0:
            raise ValueError("think_scale must be ≥ 0")
        self.plan, self.target, self.timing, self.pattern = plan, target, timing, pattern
        self.think_scale = think_scale
        #: Ops finished so far (read by a progress display; a counter's latest value).
        self.done = 0
        self._counter = itertools.count(1)
        self._stop = threading.Event()
        #: Per op (``index``): its recorded end, ns since the epoch; when it finished here, ns after the start (-1: not yet).
        self._recorded_end = [0] * plan.ops
        for stream in plan.streams:
            for op in stream.ops:
                self._recorded_end[op.index] = op.end_ns
        self._finished = [-1] * plan.ops
        self._finishing = threading.Condition()
        self.direct_ok = aligned_handles(plan) if direct else set()
        self.handles: dict[int, _Handle] = {}
        self.failed_handles: set[int] = set()
        self.outcomes: list[OpOutcome | None] = [None] * plan.ops
        self.skipped: dict[str, int] = {}
        self.direct_handles = self.buffered_handles = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._t0 = 0
        largest = max((op.size for stream in plan.streams for op in stream.ops if op.op in {"read", "write"}),
                      default=0)
        if len(pattern) < largest:
            raise ValueError("pattern shorter than the largest write")
        self._largest = max(largest, DIRECT_ALIGNMENT)

    # ---- running -------------------------------------------------------------------------

    def run(self, on_progress: Callable[[int], None] | None = None) -> RunResult:
        """Replay every stream; returns when all ops are done.

        Args:
            on_progress: called with the ops finished so far, twice a second, from another thread.

        Raises:
            KeyboardInterrupt: interrupted; the streams stopped and every file the replay opened is closed.
        """
        threads = [threading.Thread(target=self._run_stream, args=(stream,), daemon=True,
                                    name=f"replay-{stream.thread}") for stream in self.plan.streams]
        overlapping = MAX_POOL_THREADS if self.timing == "open" else self._most_overlapping()
        try:
            with ThreadPoolExecutor(max_workers=min(MAX_POOL_THREADS, max(1, overlapping)),
                                    thread_name_prefix="replay-pool") as pool:
                self._pool = pool
                self._t0 = time.perf_counter_ns()
                for thread in threads:
                    thread.start()
                try:
                    for thread in threads:
                        while thread.is_alive():
                            thread.join(PROGRESS_INTERVAL_S)
                            if on_progress is not None:
                                on_progress(self.done)
                except KeyboardInterrupt:
                    self._stop.set()  # streams end at their next op; ops in flight finish
                    for thread in threads:
                        thread.join()
                    raise
        finally:
            self._close_all()
        outcomes = [outcome for outcome in self.outcomes if outcome is not None]
        end = max((o.issued_ns + o.latency_ns for o in outcomes), default=0)
        start = min((o.issued_ns for o in outcomes), default=0)
        return RunResult(outcomes=outcomes, wall_ns=end - start, direct_handles=self.direct_handles,
                         buffered_handles=self.buffered_handles, skipped=self.skipped)

    def _close_all(self) -> None:
        for handle in list(self.handles.values()):
            os.close(handle.fd)  # handles the recording never released, or an interrupted replay's
        self.handles.clear()

    def _most_overlapping(self) -> int:
        """Pool threads the streams may need at once: the sum of each stream's most ops in flight."""
        total = 0
        for stream in self.plan.streams:
            ends: list[int] = []
            most = 0
            for op in stream.ops:
                while ends and ends[0] <= op.start_ns:
                    heapq.heappop(ends)
                heapq.heappush(ends, op.end_ns)
                most = max(most, len(ends))
            total += most if most > 1 else 0  # a stream without overlaps runs its ops itself
        return total

    def _run_stream(self, stream: Stream) -> None:
        ops, first_ns, timing, scale = stream.ops, self.plan.first_ns, self.timing, self.think_scale
        pending: list[tuple[int, int, Future | _Done]] = []  # (recorded end, index, completion in ns)
        last_end_rec = last_end_rep = None
        all_done = prev_issue = 0
        for position, op in enumerate(ops):
            if self._stop.is_set():
                break
            while timing != "open" and pending and pending[0][0] <= op.start_ns:
                end_rec, _index, done = heapq.heappop(pending)
                end_rep = done.result()
                all_done = max(all_done, end_rep)
                if last_end_rec is None or end_rec >= last_end_rec:
                    last_end_rec, last_end_rep = end_rec, end_rep
            if timing == "open":
                due = op.start_ns - first_ns
            elif timing == "asap":
                due = max(all_done, prev_issue)
            elif last_end_rec is None:
                due = max(round((op.start_ns - first_ns) * scale), prev_issue)
            else:
                due = max(last_end_rep + round((op.start_ns - last_end_rec) * scale), all_done, prev_issue)
            if op.after and timing != "open":
                after = self._wait_for(op.after)
                if after is None:
                    break  # stopped
                for index, finished in zip(op.after, after):
                    gap = 0 if timing == "asap" else round((op.start_ns - self._recorded_end[index]) * scale)
                    due = max(due, finished + gap)
            now = time.perf_counter_ns() - self._t0
            if due > now and self._stop.wait((due - now) / 1e9):
                break
            prev_issue = max(due, 0)
            overlaps_next = position + 1 < len(ops) and ops[position + 1].start_ns < op.end_ns
            if overlaps_next or timing == "open":
                done: Future | _Done = self._pool.submit(self._issue, op, due)
            else:
                done = _Done(self._issue(op, due))
            heapq.heappush(pending, (op.end_ns, op.index, done))
        for _end, _index, done in pending:
            done.result()

    def _wait_for(self, indexes: tuple[int, ...]) -> list[int] | None:
        """Wait until the ops ``indexes`` (of other streams) finished; their finish times, or None when stopped."""
        finished = self._finished
        with self._finishing:
            while any(finished[index] < 0 for index in indexes):
                if self._stop.is_set():
                    return None
                self._finishing.wait(PROGRESS_INTERVAL_S)
        return [finished[index] for index in indexes]

    def _finish(self, op: ReplayOp) -> int:
        """Note ``op`` as finished now (for the ops waiting for it); return the time, ns after the start."""
        now = time.perf_counter_ns() - self._t0
        with self._finishing:
            self._finished[op.index] = now
            self._finishing.notify_all()
        return now

    def _issue(self, op: ReplayOp, due: int) -> int:
        """Run ``op``; record its outcome; return when it finished, ns after the start."""
        issued = time.perf_counter_ns()
        try:
            moved, begin, end = self._call(op)
            err = 0
        except OSError as exc:
            moved, err = 0, exc.errno or errno_module.EIO
            begin = end = None
        except _Skip as skip:
            self._skip(skip.reason)
            return self._finish(op)
        except (ValueError, TypeError) as exc:  # a recorded value no system call takes (a NUL in a name…)
            self._skip(f"{op.op}: {type(exc).__name__}")
            return self._finish(op)
        finished = time.perf_counter_ns()
        self.done = next(self._counter)
        if begin is None:
            begin, end = issued, finished
        self.outcomes[op.index] = OpOutcome(op.index, begin - self._t0, end - begin, err, moved,
                                            max(0, issued - self._t0 - due))
        return self._finish(op)

    def _skip(self, reason: str) -> None:
        with self._lock:
            self.skipped[reason] = self.skipped.get(reason, 0) + 1

    # ---- ops -----------------------------------------------------------------------------

    def _buffer(self, size: int) -> memoryview:
        """A page-aligned buffer of this thread (``O_DIRECT`` needs aligned memory)."""
        buffer = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = mmap.mmap(-1, max(self._largest, DIRECT_ALIGNMENT))
            buffer.write(self.pattern[:len(buffer)])
            self._local.buffer = buffer
        return memoryview(buffer)[:size]

    def _call(self, op: ReplayOp) -> tuple[int, int | None, int | None]:
        """Issue ``op``'s system call(s); returns (bytes moved, start ns, end ns) of the timed call (None = all)."""
        handler = _HANDLERS.get(op.op)
        if handler is None:
            raise _Skip(f"{op.op}: not replayed")
        return handler(self, op)

    def _session(self, op: ReplayOp) -> _Handle:
        handle = self.handles.get(op.handle)
        if handle is None:
            if op.handle in self.failed_handles:
                raise OSError(errno_module.EBADF, "its open failed in the replay")
            # Its open was before the replayed range (or failed): open it now, as it was opened.
            handle = self._open(op, op.flags & ~os.O_TRUNC, create=False)
        return handle

    def _open(self, op: ReplayOp, flags: int, *, create: bool) -> _Handle:
        exclusive = flags & os.O_EXCL
        flags = (flags & PASSED_OPEN_FLAGS) | os.O_NOFOLLOW | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT | exclusive
        direct = bool(flags & os.O_DIRECT) or op.handle in self.direct_ok
        with self.target.parent(op.path) as (dir_fd, name):
            try:
                fd = os.open(name, flags | (os.O_DIRECT if direct else 0), 0o644, dir_fd=dir_fd)
            except OSError as exc:
                if not direct or exc.errno != errno_module.EINVAL or flags & os.O_DIRECT:
                    raise
                direct = False  # a file system without O_DIRECT
                fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
        handle = _Handle(fd, direct)
        with self._lock:
            if op.handle:
                old = self.handles.pop(op.handle, None)
                if old is not None:
                    os.close(old.fd)
                self.handles[op.handle] = handle
            if direct:
                self.direct_handles += 1
            else:
                self.buffered_handles += 1
        return handle

    def _op_open(self, op: ReplayOp) -> tuple[int, int | None, int | None]:
        start = time.perf_counter_ns()
        try:
            self._open(op, op.flags, create=op.op == "create")
        except OSError:
            self.failed_handles.add(op.handle)
            raise
        return 0, start, time.perf_counter_ns()

    def _op_data(self, op: ReplayOp) -> tuple[int, int | None, int | None]:
        """A read or write of the recorded size at the recorded offset, through the op's handle."""
        handle = self._session(op)
        buffer = self._buffer(op.size)
        transfer = os.preadv if op.op == "read" else os.pwritev
        start = time.perf_counter_ns()
        moved = transfer(handle.fd, [buffer], op.offset)
        return moved, start, time.perf_counter_ns()

    def _op_release(self, op: ReplayOp) -> tuple[int, int | None, int | None]:
        with self._lock:
            handle = self.handles.pop(op.handle, None)
        if handle is None:
            raise _Skip("release: its open was not replayed")
        start = time.perf_counter_ns()
        os.close(handle.fd)
        return 0, start, time.perf_counter_ns()

    def _op_fsync(self, op: ReplayOp) -> tuple[int, int | None, int | None]:
        handle = self._session(op)
        start = time.perf_counter_ns()
        os.fsync(handle.fd)
        return 0, start, time.perf_counter_ns()

    def _op_fallocate(self, op: ReplayOp) -> tuple[int, int | None, int | None]:
        handle = self._session(op)
        start = time.perf_counter_ns()
        fallocate(handle.fd, op.flags, op.offset, op.size)
        return 0, start, time.perf_counter_ns()

    def _op_lseek(self, op: ReplayOp) -> tuple[int, int | None, int | None]:
        handle = self._session(op)
        start = time.perf_counter_ns()
        os.lseek(handle.fd, op.offset, op.flags)
        return 0, start, time.perf_counter_ns()

    def _op_path(self, op: ReplayOp) -> tuple[int, int | None, int | None]:
        """Ops on one path, timed whole (the walk to the path included, as the application's own call walks it)."""
        target = self.target
        with target.parent(op.path) as (dir_fd, name):
            call = _PATH_CALLS[op.op]
            call(self, op, dir_fd, name)
        return 0, None, None

    def _op_rename_or_link(self, op: ReplayOp) -> tuple[int, int | None, int | None]:
        with self.target.parent(op.path) as (dir_fd, name), self.target.parent(op.target) as (to_fd, to_name):
            if op.op == "link":
                os.link(to_name, name, src_dir_fd=to_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            elif op.flags:
                renameat2(dir_fd, os.fsencode(name), to_fd, os.fsencode(to_name), op.flags)
            else:
                os.rename(name, to_name, src_dir_fd=dir_fd, dst_dir_fd=to_fd)
        return 0, None, None

    def _setattr(self, op: ReplayOp, dir_fd: int, name: str) -> None:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            mode = os.fstat(fd).st_mode
            # The inode itself, never a symlink's target: used only where fd is no symlink.
            node = f"/proc/self/fd/{fd}"
            if op.flags & FATTR_SIZE and stat.S_ISREG(mode):
                os.truncate(node, op.size)
            if op.flags & FATTR_MODE and not stat.S_ISLNK(mode):
                # The new mode is not recorded: set the one it has, a change the target serves alike.
                os.chmod(node, stat.S_IMODE(mode))
            if op.flags & (FATTR_UID | FATTR_GID):
                os.chown(name, -1, -1, dir_fd=dir_fd, follow_symlinks=False)
            if op.flags & (FATTR_ATIME | FATTR_MTIME | FATTR_CTIME):
                os.utime(name, dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(fd)

    def _listing(self, op: ReplayOp, dir_fd: int, name: str) -> None:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            if op.op == "fsyncdir":
                os.fsync(fd)
            else:
                with os.scandir(fd) as entries:
                    for _entry in entries:
                        pass
        finally:
            os.close(fd)

    def _mknod(self, op: ReplayOp, dir_fd: int, name: str) -> None:
        if is_device(op.flags):
            raise _Skip("mknod: device nodes are not replayed")
        os.mknod(name, op.flags or (stat.S_IFREG | 0o644), dir_fd=dir_fd)

    def _xattr(self, op: ReplayOp, dir_fd: int, name: str) -> None:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise _Skip(f"{op.op}: of a symlink (its path would be followed)")
            node = f"/proc/self/fd/{fd}"
            if op.op == "listxattr":
                os.listxattr(node)
            else:
                os.getxattr(node, GETXATTR_NAME)
        finally:
            os.close(fd)


class _Skip(Exception):
    """An op the replay cannot issue (counted, not timed)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_PathCall = Callable[[Replayer, ReplayOp, int, str], object]
_PATH_CALLS: dict[str, _PathCall] = {
    "lookup": lambda r, op, d, n: os.stat(n, dir_fd=d, follow_symlinks=False),
    "getattr": lambda r, op, d, n: os.stat(n, dir_fd=d, follow_symlinks=False),
    "access": lambda r, op, d, n: os.access(n, os.F_OK, dir_fd=d, follow_symlinks=False) or _raise_enoent(),
    "readlink": lambda r, op, d, n: os.readlink(n, dir_fd=d),
    "mkdir": lambda r, op, d, n: os.mkdir(n, 0o755, dir_fd=d),
    "rmdir": lambda r, op, d, n: os.rmdir(n, dir_fd=d),
    "unlink": lambda r, op, d, n: os.unlink(n, dir_fd=d),
    "symlink": lambda r, op, d, n: os.symlink(op.target, n, dir_fd=d),
    "statfs": lambda r, op, d, n: os.fstatvfs(r.target.root_fd),
    "setattr": Replayer._setattr,
    "readdir": Replayer._listing,
    "readdirplus": Replayer._listing,
    "fsyncdir": Replayer._listing,
    "mknod": Replayer._mknod,
    "getxattr": Replayer._xattr,
    "listxattr": Replayer._xattr,
}


def _raise_enoent() -> None:
    raise FileNotFoundError(errno_module.ENOENT, os.strerror(errno_module.ENOENT))


_Handler = Callable[[Replayer, ReplayOp], tuple[int, int | None, int | None]]
_HANDLERS: dict[str, _Handler] = {
    **{name: Replayer._op_path for name in _PATH_CALLS},
    "open": Replayer._op_open,
    "create": Replayer._op_open,
    "read": Replayer._op_data,
    "write": Replayer._op_data,
    "release": Replayer._op_release,
    "fsync": Replayer._op_fsync,
    "fallocate": Replayer._op_fallocate,
    "lseek": Replayer._op_lseek,
    "rename": Replayer._op_rename_or_link,
    "link": Replayer._op_rename_or_link,
}


def write_pattern(size: int = _MIB) -> bytes:
    """``size`` pseudo-random bytes (fixed seed: replays write the same data)."""
    import random

    return random.Random(0x1D7E5).randbytes(size)
