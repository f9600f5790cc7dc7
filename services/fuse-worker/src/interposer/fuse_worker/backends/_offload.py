"""Where the passthrough backend's blocking syscalls run: on the event loop or in a thread.

The worker serves every FUSE request on one trio thread. A syscall that blocks
there — a ``pread`` the page cache cannot serve from a slow disk or a network
volume, an ``fsync`` — stalls every other request for as long. A thread hop
frees the loop but costs a few tens of µs of scheduling on this 2-core machine
kind (issue #3: 2-7× a cached ``pread``), so it pays off only for calls that block
longer than that. The hop is :class:`ThreadHop`, a lean pool of threads (half the
CPU of ``trio.to_thread.run_sync`` per call, measured: 55-64 vs 122-130 µs):

* ``fsync``/``fdatasync``/``fsyncdir`` always go to a thread: they wait for the
  device by definition.
* A read of at most :data:`NOWAIT_READ_MAX_BYTES` first tries
  ``preadv2(RWF_NOWAIT)``, which returns only what the page cache holds and never
  waits for I/O; what it cannot serve (a cache miss) is a *slow call*.
* Larger reads, writes and ``flush`` are slow calls as they are.
* After a miss, while the loop has nothing else to do (``_spin``) and misses
  have been completing within the window, the read keeps polling the page cache
  with ``RWF_NOWAIT`` for up to the busy-poll window (``--busy-poll-us``, 50 µs):
  the probe has already submitted the disk read, and on a VM a local disk
  answers within that time more cheaply than a blocking ``pread`` that sleeps
  and is woken. Measured (QD1 random 4 KiB reads of cold data through a mount,
  alternating rounds): 6.1k → 7.6k IOPS (medians of 6; a prototype: 6.8k →
  8.3-8.6k with windows of 50, 100 and 200 µs alike), worker CPU per read about
  the same (120 → 125 µs). A slow store's misses outlast the window, their mean
  rises well above it and the polling stops (:data:`MISS_POLL_MEAN_FACTOR`).

A :class:`CallRouter` decides where the next slow call runs. A hop pays off only
when the call blocks for longer than the hop costs *and* something else waits for
the loop meanwhile; at queue depth 1 nothing does, and the hop only adds its
latency. So, in ``adaptive`` mode (the default):

* on the loop, a call moves the router to a thread when the mean duration of the
  calls (exponentially weighted) is above :data:`OFFLOAD_ABOVE_S` and FUSE
  requests queued up in the kernel while it blocked (``queued()``: the FUSE
  device is readable);
* in a thread, it moves back when the mean falls below half that (hysteresis),
  or when the loop served no other request during :data:`SOLO_CALLS_BEFORE_LOOP`
  offloaded calls in a row (``served()``: the worker's served-ops counter did
  not move).

So a local SSD whose misses take ~20 µs, and a lone reader of a slow volume, keep
the cheap path, while concurrent readers of a network volume are served
concurrently. ``mode="loop"`` and ``mode="thread"`` pin the choice
(``--blocking-io``; for measurements).
"""

from __future__ import annotations

import errno
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from typing import Literal, TypeVar

import outcome
import trio

from .._spin import callback_queued, spin_end_ns

T = TypeVar("T")

#: Mean duration of a slow call above which it moves to a thread, seconds: about
#: four times the CPU a :class:`ThreadHop` call costs on this machine kind (55-64
#: µs). The worker is CPU-bound on 2 cores long before the device is, so a hop pays
#: off only for calls that mostly wait (a network volume, ~1 ms), not for a local
#: disk under load (misses of 100-200 µs at queue depth 16, measured: offloading
#: those lost throughput).
OFFLOAD_ABOVE_S = 250e-6
#: Weight of a new duration sample in the mean: 1/8, the gain of TCP's smoothed
#: round-trip time (RFC 6298, section 2).
DURATION_GAIN = 0.125
#: Most threads a :class:`ThreadHop` starts (calls beyond wait in its queue):
#: trio's own default limit for ``to_thread``.
MAX_HOP_THREADS = 40
#: Offloaded calls in a row during which the loop served nothing else before the
#: router returns to the loop (nothing gained from the hops).
SOLO_CALLS_BEFORE_LOOP = 32
#: Largest read that probes the page cache with ``RWF_NOWAIT`` first, bytes. The
#: probe reads into a zero-filled ``bytearray``; past this size the zero-fill
#: costs more than the probe saves (measured: +0.4 µs at 4 KiB, +67 µs at 1 MiB).
NOWAIT_READ_MAX_BYTES = 64 * 1024

#: Misses are polled for while their mean duration is below this many times the
#: polling window: a local disk's (30-100 µs here) are, a network volume's (~1 ms)
#: are not, so a slow store costs at most one window of polling per read and soon none.
MISS_POLL_MEAN_FACTOR = 4

BlockingIOMode = Literal["adaptive", "loop", "thread"]
#: Errors of ``preadv2(RWF_NOWAIT)`` that mean "would block" or "cannot tell"
#: (a file system or a file mode without NOWAIT support): read the normal way.
_NOWAIT_FALLBACK_ERRNOS = frozenset({errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL})


def _timed(fn: Callable[..., T], *args: object) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


class ThreadHop:
    """Runs blocking functions in a pool of threads on behalf of trio tasks.

    What ``trio.to_thread.run_sync`` does, without what this use does not need
    (capacity limiter, context copy, per-call thread-cache handoff): a task puts
    ``(task, fn, args)`` on a queue and parks; a pool thread runs ``fn`` and hands
    the outcome back with ``run_sync_soon``. Threads start on demand, at most
    :data:`MAX_HOP_THREADS`; they are daemons, idle in ``queue.get``. A waiting
    task cannot be cancelled (neither can ``to_thread`` by default): the call is
    already running.

    Attributes:
        in_flight: calls running or queued in any pool of the process (class-wide):
            the request loop does not busy-poll while a pool thread may need the GIL
            to hand its result back (``_session_loop``).
    """

    in_flight = 0

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = 0
        self._busy = 0

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in a pool thread; returns its result or raises its exception."""
        self._busy += 1
        ThreadHop.in_flight += 1
        if self._busy > self._threads and self._threads < MAX_HOP_THREADS:
            threading.Thread(target=self._serve, name=f"blocking-io-{self._threads}", daemon=True).start()
            self._threads += 1
        self._calls.put((trio.lowlevel.current_trio_token(), trio.lowlevel.current_task(), fn, args))
        try:
            return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        finally:
            self._busy -= 1
            ThreadHop.in_flight -= 1

    def _serve(self) -> None:
        while True:
            token, task, fn, args = self._calls.get()
            result = outcome.capture(fn, *args)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:
                pass  # the trio run that asked is over (the worker is shutting down)


class CallRouter:
    """Runs one kind of slow call on the loop or in a thread (see the module docstring).

    Args:
        mode: ``adaptive``, ``loop`` or ``thread``.
        queued: whether FUSE requests are waiting for the loop (default: always
            assumed, so the mean duration alone decides).
        served: the worker's count of served requests, to see whether the loop
            did other work during an offloaded call (default: not tracked).
        hop: the threads offloaded calls run in (default: a pool of its own).

    Attributes:
        mean_s: exponentially weighted mean duration of the calls, seconds
            (measured where they ran, without the hop).
        offloaded: whether calls currently go to a thread.

    Raises:
        ValueError: unknown ``mode``.
    """

    def __init__(self, mode: BlockingIOMode = "adaptive", queued: Callable[[], bool] | None = None,
                 served: Callable[[], int] | None = None, hop: ThreadHop | None = None) -> None:
        if mode not in ("adaptive", "loop", "thread"):
            raise ValueError(f"blocking I/O mode {mode!r}: expected adaptive, loop or thread")
        self.mode = mode
        self.queued = queued or (lambda: True)
        self.served = served
        self.hop = hop or ThreadHop()
        self.mean_s = 0.0
        self.offloaded = mode == "thread"
        self._solo_calls = 0

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the loop or in a thread; its exceptions propagate unchanged."""
        if not self.offloaded:
            result, took_s = _timed(fn, *args)
            self.observe(took_s, self.queued)  # polled only when the mean is high
            return result
        served_before = self.served() if self.served is not None else 0
        result, took_s = await self.hop.run(_timed, fn, *args)
        # The counter moved while this call ran: the loop served other requests meanwhile
        # (this request is counted only when it completes, after this returns).
        others_served = self.served is None or self.served() > served_before
        self.observe(took_s, others_waited=others_served)
        return result

    def observe(self, took_s: float, others_waited: bool | Callable[[], bool] = True) -> None:
        """Feed one call: its duration, seconds, and whether other requests waited for
        the loop meanwhile (on the loop; a callable is asked only when it matters) or
        were served meanwhile (in a thread)."""
        self.mean_s += DURATION_GAIN * (took_s - self.mean_s)
        if self.mode != "adaptive":
            return
        if not self.offloaded:
            if self.mean_s > OFFLOAD_ABOVE_S and (others_waited() if callable(others_waited) else others_waited):
                self.offloaded, self._solo_calls = True, 0
            return
        self._solo_calls = 0 if others_waited else self._solo_calls + 1
        if self.mean_s < OFFLOAD_ABOVE_S / 2 or self._solo_calls >= SOLO_CALLS_BEFORE_LOOP:
            self.offloaded = False


def read_cached(fd: int, size: int, offset: int) -> bytes | memoryview | None:
    """What the page cache holds of ``size`` bytes at ``offset`` of ``fd``, without waiting.

    Returns:
        the data (possibly shorter than ``size`` at end of file or where the cache
        stops: callers compare the length), or None when nothing could be read
        without I/O or the file system cannot tell (``EAGAIN``, ``EOPNOTSUPP``).

    Raises:
        OSError: any other error of ``preadv2`` (EBADF, EIO…).
    """
    buf = bytearray(size)
    try:
        got = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except OSError as exc:
        if exc.errno in _NOWAIT_FALLBACK_ERRNOS:
            return None
        raise
    return memoryview(buf)[:got] if got < size else buf


class BlockingCalls:
    """The passthrough backend's blocking syscalls, each routed as the module docstring says.

    Args:
        mode: ``adaptive``, ``loop`` or ``thread`` (see :class:`CallRouter`).
    """

    def __init__(self, mode: BlockingIOMode = "adaptive") -> None:
        self.mode = mode
        self.hop = ThreadHop()
        self.reads = CallRouter(mode, hop=self.hop)
        self.writes = CallRouter(mode, hop=self.hop)
        self.flushes = CallRouter(mode, hop=self.hop)
        self._miss_poll_ns = 0

    def watch(self, queued: Callable[[], bool], served: Callable[[], int], miss_poll_s: float = 0.0) -> None:
        """Give the routers the worker's signals (see :class:`CallRouter`): whether FUSE
        requests are queued, and the count of requests served so far; and how long a
        read that missed the page cache may poll it, seconds (0 = not at all)."""
        for router in (self.reads, self.writes, self.flushes):
            router.queued, router.served = queued, served
        self._miss_poll_ns = round(miss_poll_s * 1e9)

    async def pread(self, fd: int, size: int, offset: int) -> bytes | bytearray | memoryview:
        """Read up to ``size`` bytes at ``offset``: from the cache at once, the rest as a slow call.

        Raises:
            OSError: what ``pread`` raises.
        """
        if self.mode != "thread" and size <= NOWAIT_READ_MAX_BYTES:
            cached = read_cached(fd, size, offset)
            if cached is None:
                cached = self._poll_cache(fd, size, offset)
            if cached is not None:
                got = len(cached)
                # All of it, nothing (NOWAIT reads 0 bytes only at end of file), or all
                # there is before end of file: done. Otherwise the cache stopped part-way.
                if got == size or got == 0 or offset + got >= os.fstat(fd).st_size:
                    return cached
                rest = await self.reads.call(os.pread, fd, size - got, offset + got)
                return bytes(cached) + rest
        return await self.reads.call(os.pread, fd, size, offset)

    def _poll_cache(self, fd: int, size: int, offset: int) -> bytes | memoryview | None:
        """After a miss, poll the page cache for the read the probe submitted (module docstring).

        Returns:
            what the cache holds once it holds anything (as :func:`read_cached`;
            the caller reads the rest), or None: no polling allowed (misses slower
            than the window, calls in threads, requests queued, other work on the
            loop) or the window closed first.
        """
        reads = self.reads
        if (not self._miss_poll_ns or reads.offloaded or reads.mean_s * 1e9 > MISS_POLL_MEAN_FACTOR * self._miss_poll_ns
                or reads.queued()):
            return None
        start_ns = time.monotonic_ns()
        end_ns = spin_end_ns(self._miss_poll_ns, pool_busy=ThreadHop.in_flight > 0)
        while end_ns is not None and time.monotonic_ns() < end_ns:
            cached = read_cached(fd, size, offset)
            if cached is not None:
                reads.observe((time.monotonic_ns() - start_ns) * 1e-9, others_waited=False)
                return cached
            if reads.queued() or callback_queued():
                break
        return None

    async def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        """``os.pwrite`` as a slow call (see :class:`CallRouter`)."""
        return await self.writes.call(os.pwrite, fd, data, offset)

    async def flush(self, fd: int) -> None:
        """Close a duplicate of ``fd`` (reports deferred write errors, e.g. a network fs's)."""
        await self.flushes.call(_close_duplicate, fd)

    async def sync(self, fd: int, datasync: bool) -> None:
        """``fdatasync``/``fsync`` in a thread (unless pinned to the loop): it waits for the device."""
        call = os.fdatasync if datasync else os.fsync
        if self.mode == "loop":
            call(fd)
        else:
            await self.hop.run(call, fd)


def _close_duplicate(fd: int) -> None:
    os.close(os.dup(fd))


def fuse_device_fd() -> int | None:
    """This process's open ``/dev/fuse`` descriptor (the session libfuse serves), if any."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue  # closed since listed
    return None


def readable(fd: int) -> Callable[[], bool]:
    """A function telling, without waiting, whether ``fd`` has data (FUSE requests) to read."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return lambda: bool(poller.poll(0))
