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
sleeping op still holds only its own task.

A timerfd still wakes the worker late: on a VM an idle vCPU is descheduled by
the host, and waking it costs ~0.1-0.2 ms (measured here: 2 ms sleeps wake
76-162 µs late, p50). :class:`WakeCompensation` keeps a running estimate of that
lateness and arms a timer early by it where the sleep ends at a latency target
(a delay in ``floor`` mode), so that target is met on average.
The application's thread pays the same kind of wake-up when the reply arrives
after a long idle period, which the worker cannot see; the ``round-trip`` mode
assumes it equals the worker's own (same machine, same idle states) and arms
the timer early by twice the estimate. The worker chooses the mode
(``--wake-compensation``); it never shortens a sleep by more than
:data:`MAX_COMPENSATION_S`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

import trio
import trio.testing

#: ``timerfd_create`` flags: TFD_NONBLOCK and TFD_CLOEXEC have the values of
#: O_NONBLOCK and O_CLOEXEC (timerfd_create(2)).
_TFD_FLAGS = os.O_NONBLOCK | os.O_CLOEXEC
_NS_PER_S = 1_000_000_000
#: Weight of a new lateness sample in the running estimate: 1/8, the gain of TCP's
#: smoothed round-trip time (RFC 6298, section 2).
LATENESS_GAIN = 0.125
#: Most a sleep is shortened by, seconds: a lateness sample above this (a stall
#: of the whole VM, a GC pause) says nothing about ordinary wake-ups.
MAX_COMPENSATION_S = 0.001


class WakeCompensation:
    """How early to arm a timer so that the sleep, and the reply after it, end on time.

    Attributes:
        mode: ``off`` (arm for the full sleep), ``worker`` (early by the estimated
            lateness of the worker's own wake-up) or ``round-trip`` (early by twice
            that: the worker's wake-up and, assumed equal, the application's when
            the reply reaches it).
        lateness_s: running estimate of how late a timerfd wakes the worker,
            seconds (an exponentially weighted mean, gain :data:`LATENESS_GAIN`).
    """

    FACTORS = {"off": 0.0, "worker": 1.0, "round-trip": 2.0}

    def __init__(self, mode: str = "off") -> None:
        if mode not in self.FACTORS:
            raise ValueError(f"wake compensation {mode!r}: expected one of {', '.join(self.FACTORS)}")
        self.mode = mode
        self._factor = self.FACTORS[mode]
        self.lateness_s = 0.0

    def lead_s(self, seconds: float) -> float:
        """How much earlier than ``seconds`` from now to arm the timer, seconds (< ``seconds``)."""
        return min(self._factor * self.lateness_s, MAX_COMPENSATION_S, seconds * 0.5)

    def observe(self, late_s: float) -> None:
        """Feed how late one armed timer woke the worker, seconds (negative = early)."""
        if self._factor:
            sample = min(max(late_s, 0.0), MAX_COMPENSATION_S)
            self.lateness_s += LATENESS_GAIN * (sample - self.lateness_s)


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


def _armed_timerfd(seconds: float) -> int:
    """A non-blocking timerfd on CLOCK_MONOTONIC that becomes readable ``seconds`` from now.

    Raises:
        OSError: timerfd_create or timerfd_settime failed (EMFILE: out of descriptors).
    """
    fd = _libc.timerfd_create(time.CLOCK_MONOTONIC, _TFD_FLAGS)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"timerfd_create: {os.strerror(err)}")
    ns = max(1, round(seconds * _NS_PER_S))  # an all-zero it_value would disarm the timer
    spec = _Itimerspec(_Timespec(0, 0), _Timespec(ns // _NS_PER_S, ns % _NS_PER_S))
    if _libc.timerfd_settime(fd, 0, ctypes.byref(spec), None) < 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
    return fd


async def sleep(seconds: float, *, compensate: bool = False) -> None:
    """Sleep ``seconds`` with sub-millisecond precision (a checkpoint when ``seconds <= 0``).

    Under trio's ``MockClock`` (tests in virtual time) this is ``trio.sleep``, so
    the virtual clock still governs. Otherwise the task waits for a timerfd; it is
    cancellable like ``trio.sleep``, and the descriptor is closed either way. How
    late the timer woke the worker updates the estimate of :class:`WakeCompensation`.

    Args:
        seconds: how long, seconds (any float; at most the 60 s a layer may ask for
            is expected).
        compensate: arm the timer early by the configured compensation (at most
            half the sleep), for a sleep that ends at a latency *target* (a delay
            in ``floor`` mode); other sleeps (``add`` delays, throttle waits) are
            minimums and are never shortened.

    Raises:
        OSError: no timerfd could be made (EMFILE).
    """
    if seconds <= 0.0:
        await trio.lowlevel.checkpoint()
        return
    if isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
        await trio.sleep(seconds)
        return
    compensation = _compensation
    armed_s = seconds - compensation.lead_s(seconds) if compensate else seconds
    fd = _armed_timerfd(armed_s)
    start = time.perf_counter()
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
    compensation.observe(time.perf_counter() - start - armed_s)
