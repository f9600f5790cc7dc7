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


async def sleep(seconds: float) -> None:
    """Sleep ``seconds`` with sub-millisecond precision (a checkpoint when ``seconds <= 0``).

    Under trio's ``MockClock`` (tests in virtual time) this is ``trio.sleep``, so
    the virtual clock still governs. Otherwise the task waits for a timerfd; it is
    cancellable like ``trio.sleep``, and the descriptor is closed either way.

    Args:
        seconds: how long, seconds (any float; at most the 60 s a layer may ask for
            is expected).

    Raises:
        OSError: no timerfd could be made (EMFILE).
    """
    if seconds <= 0.0:
        await trio.lowlevel.checkpoint()
        return
    if isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
        await trio.sleep(seconds)
        return
    fd = _armed_timerfd(seconds)
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
