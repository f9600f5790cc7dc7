"""Precise sleeps for the delay and throttle layers.

``trio.sleep`` waits in ``epoll_wait``, whose timeout is whole milliseconds, and
CPython rounds the timeout up (``select.epoll.poll`` converts seconds with
``_PyTime_ROUND_CEILING``): a 0.3 ms sleep takes ≥ 1 ms and a 1.1 ms sleep ≥ 2 ms.
Measured on the 2-core dev machine (p50 of 200 sleeps): ``trio.sleep`` 0.3 ms →
1.15 ms, 1.1 ms → 2.21 ms, 1.5 ms → 2.22 ms; a timerfd 0.3 ms → 0.38 ms, 1.1 ms →
1.21 ms, 1.5 ms → 1.61 ms. A delay layer emulating a 1 ms device would be off by
up to a whole millisecond, so the layers sleep on a ``timerfd`` (nanosecond
resolution, plus the kernel's timer slack of 50 µs for ordinary threads,
``prctl(2)`` PR_SET_TIMERSLACK) that trio waits on like any file descriptor: the
sleeping op still holds only its own task. All sleeps of a run share one timerfd,
armed for the earliest deadline (:class:`TimerQueue`): a timerfd per sleep cost
~48 µs of CPU per sleep with 16 sleepers, the shared one ~18 µs.

A timerfd still wakes the worker late: on a VM an idle vCPU is descheduled by
the host, and waking it costs ~0.1-0.2 ms (measured here: 2 ms sleeps wake
76-162 µs late, p50). :class:`WakeCompensation` keeps a running estimate of that
lateness and arms a delay's timer early by it, so the delay is what the policy
says on average, wake-up included: in ``floor`` mode the sleep ends at a latency
target (the mode below decides whether the application's wake-up counts), in
``add`` mode it is time added to the op, which pays the application's wake-up
without the delay too, so only the worker's own is compensated. Throttle waits
are never shortened (a rate limit must not be exceeded).
The application's thread pays the same kind of wake-up when the reply arrives
after a long idle period, and its request may have queued for the worker, which
the worker cannot see; the ``round-trip`` mode adds an estimate of that wait
(:class:`WakeCompensation`). The worker chooses the mode
(``--wake-compensation``); it never shortens a sleep by more than
:data:`MAX_COMPENSATION_S`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import heapq
import itertools
import logging
import os
import time
from collections.abc import Callable

import trio
import trio.testing

log = logging.getLogger(__name__)

#: ``timerfd_create`` flags: TFD_NONBLOCK and TFD_CLOEXEC have the values of
#: O_NONBLOCK and O_CLOEXEC (timerfd_create(2)).
_TFD_FLAGS = os.O_NONBLOCK | os.O_CLOEXEC
_NS_PER_S = 1_000_000_000
#: Weight of a new lateness sample in the running estimate: 1/8, the gain of TCP's
#: smoothed round-trip time (RFC 6298, section 2).
LATENESS_GAIN = 0.125
#: The application's share of a ``round-trip`` lead is the worker's lateness, but at most this many
#: times the wake-up of an idle thread: the application's wait (its request queued for the
#: worker, its thread woken by the reply) grows with load like the worker's lateness, measured
#: up to ~85 µs (``efs`` stats at 16 processes, idle wake-up ~63 µs), but not to the 300-440 µs
#: a worker saturated by 59k writes/s resumed its fsyncs late (idle wake-up 57-79 µs), where a
#: full share sent those fsyncs' replies ~0.23 ms early (docs/benchmarks.md).
APPLICATION_WAKE_CAP = 2.0
#: Most a sleep is shortened by, seconds: a lateness sample above this (a stall
#: of the whole VM, a GC pause) says nothing about ordinary wake-ups.
MAX_COMPENSATION_S = 0.001


class WakeCompensation:
    """How early to arm a timer so that the sleep, and the reply after it, end on time.

    Two running estimates: how late the worker resumes after a timer, from every
    sleep (its own lateness, compensated in full), and how late it resumes when
    its event loop was idle at the deadline (the cost of waking an idle thread
    and vCPU). The ``round-trip`` mode adds the application's wait, which the
    worker cannot see, as its own lateness again but at most
    :data:`APPLICATION_WAKE_CAP` idle wake-ups: under load the worker's lateness
    grows with the work its loop is busy with when a timer is due, and one
    saturated by 59k buffered writes/s resumed its delayed fsyncs a mean 300-440
    µs late; counted twice, that sent the fsyncs' replies ~0.23 ms early (p50 2.47
    ms against ``efs``'s 2.7 ms, docs/benchmarks.md), while below saturation (16
    processes' lookups, 85 µs) the application's wait grew as much as the
    worker's.

    Attributes:
        mode: ``off`` (arm for the full sleep), ``worker`` (early by the estimated
            lateness of the worker's own wake-up) or ``round-trip`` (early by that
            and by the application's estimated wait for the reply, above).
        lateness_s: running estimate of how late the worker resumes after a timer,
            seconds (an exponentially weighted mean, gain :data:`LATENESS_GAIN`).
        idle_wake_s: the same, from the sleeps whose deadline found the event loop
            idle (:func:`note_loop_busy` not called since), seconds.
    """

    FACTORS = {"off": 0.0, "worker": 1.0, "round-trip": 2.0}

    def __init__(self, mode: str = "off") -> None:
        if mode not in self.FACTORS:
            raise ValueError(f"wake compensation {mode!r}: expected one of {', '.join(self.FACTORS)}")
        self.mode = mode
        self._factor = self.FACTORS[mode]
        self.lateness_s = 0.0
        self.idle_wake_s = 0.0

    def lead_s(self, seconds: float, own_wake_only: bool = False) -> float:
        """How much earlier than ``seconds`` from now to arm the timer, seconds (< ``seconds``).

        ``own_wake_only``: the worker's own wake-up at most, never the application's
        (``round-trip`` counts like ``worker``).
        """
        own = min(self._factor, 1.0) * self.lateness_s
        application = 0.0 if own_wake_only else max(self._factor - 1.0, 0.0) * min(
            self.lateness_s, APPLICATION_WAKE_CAP * self.idle_wake_s)
        return min(own + application, MAX_COMPENSATION_S, seconds * 0.5)

    def observe(self, late_s: float, idle: bool = True) -> None:
        """Feed how late the worker resumed after one armed timer, seconds (negative = early).

        ``idle``: the event loop had nothing else to do at the timer's deadline, so
        the lateness is that of waking an idle thread.
        """
        if self._factor:
            sample = min(max(late_s, 0.0), MAX_COMPENSATION_S)
            self.lateness_s += LATENESS_GAIN * (sample - self.lateness_s)
            if idle:
                self.idle_wake_s += LATENESS_GAIN * (sample - self.idle_wake_s)


#: The worker's compensation (set once at start by ``configure``).
_compensation = WakeCompensation()


def configure(mode: str) -> WakeCompensation:
    """Choose the wake compensation of every later sleep (see :class:`WakeCompensation`).

    Raises:
        ValueError: unknown ``mode``.
    """
    global _compensation
    _compensation = WakeCompensation(mode)
    return _compensation


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_create.restype = ctypes.c_int
_libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
_libc.timerfd_settime.restype = ctypes.c_int


#: ``timerfd_settime`` flag: ``it_value`` is an absolute time on the timer's clock (timerfd_create(2)).
_TFD_TIMER_ABSTIME = 1


def _timerfd() -> int:
    """A new non-blocking, disarmed timerfd on CLOCK_MONOTONIC (the clock of ``time.monotonic_ns``).

    Raises:
        OSError: timerfd_create failed (EMFILE: out of descriptors).
    """
    fd = _libc.timerfd_create(time.CLOCK_MONOTONIC, _TFD_FLAGS)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"timerfd_create: {os.strerror(err)}")
    return fd


class _Sleeper:
    """One pending sleep: the task to wake, or None once its sleep was cancelled. Calling it wakes the task."""

    __slots__ = ("task",)

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task: trio.lowlevel.Task | None = task

    def __call__(self) -> None:
        if self.task is not None:
            trio.lowlevel.reschedule(self.task)


class _Call:
    """A function to call at a deadline (:meth:`TimerQueue.call_at`), marked by its type apart from sleeps."""

    __slots__ = ("function",)

    def __init__(self, function: Callable[[], object]) -> None:
        self.function = function

    def __call__(self) -> None:
        try:
            self.function()
        except Exception:  # the timer task must outlive a failed call: other sleeps depend on it
            log.exception("a timed call failed")


class TimerQueue:
    """Every precise sleep of one ``trio.run``, on one timerfd armed for the earliest deadline.

    A timerfd per sleep costs five syscalls and an epoll registration each
    (create, settime, epoll_ctl, read, close): measured here, ~48 µs of CPU per
    1 ms sleep with 16 concurrent sleepers against ~18 µs with this queue; with
    16 delayed FUSE reads in flight the worker's CPU per read went from ~103 to
    ~81 µs. One queue costs a heap push and, only when the new
    deadline is the earliest, one ``timerfd_settime``; one wake-up serves every
    deadline that has passed. A system task (:meth:`run`) waits on the fd.
    Cancelled sleeps stay in the heap, marked, until their deadline pops.
    Besides sleeps, the queue runs plain functions at deadlines (:meth:`call_at`),
    on the timer task itself: held READ replies (``_held_reads``), which so
    need no task of their own.
    """

    def __init__(self) -> None:
        self._fd = _timerfd()
        self._heap: list[tuple[int, int, _Sleeper | _Call]] = []
        self._seq = itertools.count()
        self._armed_ns: int | None = None
        self._spec = _Itimerspec()

    @property
    def armed_ns(self) -> int | None:
        """When the timer fires next, ``time.monotonic_ns()`` ns; None = no sleep pending."""
        return self._armed_ns

    def _arm(self, deadline_ns: int) -> None:
        deadline_ns = max(1, deadline_ns)  # an all-zero it_value would disarm the timer
        self._spec.it_value.tv_sec, self._spec.it_value.tv_nsec = divmod(deadline_ns, _NS_PER_S)
        if _libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
        self._armed_ns = deadline_ns

    def _push(self, deadline_ns: int, entry: _Sleeper | _Call) -> None:
        heapq.heappush(self._heap, (deadline_ns, next(self._seq), entry))
        if self._armed_ns is None or deadline_ns < self._armed_ns:
            self._arm(deadline_ns)

    def call_at(self, deadline_ns: int, function: Callable[[], object]) -> None:
        """Call ``function()`` on the timer task once ``time.monotonic_ns() >= deadline_ns``.

        It must not block or await (it runs between two wake-ups of the timer);
        an exception it raises is logged. Pending calls run early, at once, when
        :meth:`call_pending_now` is called or the run ends.
        """
        self._push(deadline_ns, _Call(function))

    def call_pending_now(self) -> int:
        """Run every pending :meth:`call_at` function now, whatever its deadline; returns how many ran.

        For the end of a FUSE session: a held reply must leave before the session
        it belongs to is destroyed.
        """
        ran = 0
        while calls := [entry for _, _, entry in self._heap if isinstance(entry, _Call)]:
            # Until none is left: a call may queue another (a held reply's next step).
            self._heap[:] = [item for item in self._heap if not isinstance(item[2], _Call)]
            heapq.heapify(self._heap)
            for call in calls:
                call()
            ran += len(calls)
        return ran

    async def sleep_until(self, deadline_ns: int) -> None:
        """Park the calling task until ``time.monotonic_ns() >= deadline_ns`` (cancellable)."""
        sleeper = _Sleeper(trio.lowlevel.current_task())
        self._push(deadline_ns, sleeper)

        def abort(_: object) -> trio.lowlevel.Abort:
            sleeper.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def run(self) -> None:
        """Wake sleepers as their deadlines pass, until the run ends (then close the fd)."""
        heap = self._heap
        try:
            while True:
                await trio.lowlevel.wait_readable(self._fd)
                try:
                    os.read(self._fd, 8)  # the expiry count; only clears readability
                except BlockingIOError:  # re-armed for a later deadline after it fired
                    continue
                self._armed_ns = None
                now_ns = time.monotonic_ns()
                while heap and heap[0][0] <= now_ns:
                    heapq.heappop(heap)[2]()
                if heap:
                    self._arm(heap[0][0])
        finally:
            self.call_pending_now()
            os.close(self._fd)


_QUEUE: trio.lowlevel.RunVar[TimerQueue | None] = trio.lowlevel.RunVar("interposer_timer_queue")


def current_queue() -> TimerQueue | None:
    """This run's :class:`TimerQueue`, made (and its system task started) on first use; None under MockClock."""
    try:
        return _QUEUE.get()
    except LookupError:
        if isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
            _QUEUE.set(None)
            return None
        queue = TimerQueue()
        trio.lowlevel.spawn_system_task(queue.run, name="interposer timer queue")
        _QUEUE.set(queue)
        return queue


def call_pending_now() -> int:
    """Run every pending timed call of this run's queue now (:meth:`TimerQueue.call_pending_now`); returns how many."""
    try:
        queue = _QUEUE.get()
    except LookupError:
        return 0
    return 0 if queue is None else queue.call_pending_now()


def next_deadline_ns() -> int | None:
    """When this run's timer fires next (``time.monotonic_ns()`` ns), or None if no sleep is pending."""
    try:
        queue = _QUEUE.get()
    except LookupError:
        return None
    return None if queue is None else queue.armed_ns


async def sleep(seconds: float, *, compensate: bool = False, own_wake_only: bool = False) -> int:
    """Sleep ``seconds`` with sub-millisecond precision (a checkpoint when ``seconds <= 0``).

    Under trio's ``MockClock`` (tests in virtual time) this is ``trio.sleep``, so
    the virtual clock still governs. Otherwise the task parks in this run's
    :class:`TimerQueue` (one timerfd trio waits on); it is cancellable like
    ``trio.sleep``. How late the task woke updates the estimate of
    :class:`WakeCompensation`.

    Args:
        seconds: how long, seconds (any float; at most the 60 s a layer may ask for
            is expected).
        compensate: arm the timer early by the configured compensation (at most
            half the sleep), for a delay, whose time should include the wake-up
            that follows it; a throttle wait is a minimum and is never shortened.
        own_wake_only: compensate only the worker's own wake-up, not the
            application's after the reply (an ``add`` delay: the op pays that one
            without the delay too).

    Returns:
        How much later than ``seconds`` after the call the task ran again, ns
        (0 if on time or early): the worker's scheduling lag beyond what the
        compensation covers (a busy event loop, a descheduled vCPU), which the
        application sees on top of the latency asked for.

    Raises:
        OSError: the run's timerfd could not be made (EMFILE) or armed.
    """
    if seconds <= 0.0:
        await trio.lowlevel.checkpoint()
        return 0
    queue = current_queue()
    if queue is None:
        intended_end_s = trio.current_time() + seconds
        await trio.sleep(seconds)
        return max(0, round((trio.current_time() - intended_end_s) * _NS_PER_S))
    start_ns = time.monotonic_ns()
    deadline_ns = start_ns + max(1, round(seconds * _NS_PER_S) - (lead_ns(seconds, own_wake_only) if compensate else 0))
    await queue.sleep_until(deadline_ns)
    woke_ns = time.monotonic_ns()
    observe_wake(woke_ns - deadline_ns, deadline_ns)
    return max(0, woke_ns - start_ns - round(seconds * _NS_PER_S))


def lead_ns(seconds: float, own_wake_only: bool = False) -> int:
    """How much earlier than its end a delay of ``seconds`` should be armed, ns (:meth:`WakeCompensation.lead_s`)."""
    return round(_compensation.lead_s(seconds, own_wake_only) * _NS_PER_S)


#: When the event loop last took up work other than timers (a FUSE request), ``time.monotonic_ns()``.
_loop_busy_ns = 0


def note_loop_busy() -> None:
    """Note that the event loop takes up a piece of work now (``_session_loop``: each FUSE request it reads).

    A timer whose deadline passes after this and before it is served waited behind
    that work: its lateness is the worker's own, not an idle wake-up's
    (:class:`WakeCompensation`).
    """
    global _loop_busy_ns
    _loop_busy_ns = time.monotonic_ns()


def observe_wake(late_ns: int, deadline_ns: int | None = None) -> None:
    """Feed how late after its armed deadline (``deadline_ns``, monotonic) the worker resumed, ns, to the wake compensation.

    Without ``deadline_ns`` the sample counts as an idle wake-up.
    """
    idle = deadline_ns is None or _loop_busy_ns <= deadline_ns
    _compensation.observe(late_ns / _NS_PER_S, idle)
