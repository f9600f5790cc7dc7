"""A leaner request loop for pyfuse3: fewer trio scheduling rounds per FUSE request.

pyfuse3's session loop (``_session_loop`` in its ``internal.pxi``) runs several
reader tasks; before each request a task takes a ``trio.Lock`` and then waits
for ``/dev/fuse`` with ``trio.lowlevel.wait_readable``. With trio's own
primitives that is up to three scheduling rounds per request, even when a
request is already waiting: the lock's uncontended acquire still yields
(``cancel_shielded_checkpoint``), a release hands the lock to a parked task
that must be scheduled, and ``wait_readable`` re-arms the fd in epoll
(``EPOLLONESHOT``, one ``epoll_ctl``) and yields. Profiled, that loop costs more
per request than the handlers and the ``pread`` together (issue #3).

pyfuse3 looks its ``trio`` module up at run time (so that ``pyfuse3.asyncio``
can swap it); :func:`install` swaps in :class:`LeanTrio`, which is ``trio``
except for two things pyfuse3's loop uses:

* ``Lock`` → :class:`ReaderLock`: an uncontended acquire does not yield, and a
  release lets the releasing reader take the lock straight back (a woken
  waiter that finds it taken parks again). Only one task ever waits on the fd,
  which is all pyfuse3 needs the lock for.
* ``lowlevel.wait_readable`` → :meth:`LeanLowlevel.wait_readable`: first a
  ``poll(2)`` with timeout 0 on the fd; when a request is already queued the
  reader takes it without yielding. To stay fair to everything else on the
  loop (delayed and throttled requests, the bus thread's calls, timers), at
  most :data:`MAX_REQUESTS_WITHOUT_YIELD` requests in a row are taken that
  way; then the reader yields through trio's real ``wait_readable``.

When nothing is queued, the reader may keep polling for up to ``busy_poll_s``
(50 µs by default, ``--busy-poll-us``) before it yields: at queue depth 1 the
application's next request usually arrives within that time, and on a VM the
alternative — sleeping in ``epoll_wait`` and being woken — costs more than the
poll. Measured on the 2-vCPU benchmark machine (issue #3): QD1 random 4 KiB
reads of cached data 13.7k → 24.9k IOPS at *less* worker CPU per read (57 → 39
µs), create+stat+unlink ~5.6k → ~7.3k ops/s. It never delays other work on the
loop: it does not start while a task is runnable, a callback from another
thread is queued, a blocking call runs in a pool thread (``backends._offload``:
the poll loop would hold the GIL that thread needs to hand its result back; a
precaution, as the one slowdown seen — cold 1 MiB reads at 0.71× in one bench
run — did not reproduce in alternating reruns with or without it), or a trio
deadline or a delay/throttle timer (``layers._timer``) is due within the
window; and it stops as soon as a thread queues a callback. It costs CPU only
right after a request: an idle worker does not poll.

Nothing else changes: requests are still served concurrently (a handler that
blocks frees the lock and another reader takes over), cancellation and unmount
still go through trio (``notify_closing`` wakes the real ``wait_readable``;
pyfuse3 checks its exit flag before every wait).
"""

from __future__ import annotations

import select
import time
import types
from typing import Any

import pyfuse3
import trio

from ._config import DEFAULT_BUSY_POLL_US
from . import _spin
from ._spin import callback_queued, spin_end_ns
from .backends._offload import ThreadHop
from .layers import _timer

#: Requests a reader may take in a row without yielding to trio's scheduler.
#: Each is served in ~30-60 µs here, so other tasks wait at most ~1 ms.
MAX_REQUESTS_WITHOUT_YIELD = 16
#: Polls between two checks for callbacks queued by other threads while busy-polling.
_POLLS_PER_CHECK = 8


class ReaderLock:
    """A lock for pyfuse3's reader tasks that yields only when it must wait.

    Same interface as the part of ``trio.Lock`` pyfuse3 uses (``async with``).
    Not FIFO and not reentrant: any idle reader is as good as another.

    Attributes:
        woken: readers unparked by :meth:`release` that have not run yet (they
            count as runnable tasks for trio, but only come to re-park).
    """

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()
        self.woken = 0

    async def acquire(self) -> None:
        """Take the lock; park until it is free if another reader holds it."""
        while self._held:
            try:
                await self._lot.park()
            finally:
                self.woken = max(0, self.woken - 1)
        self._held = True

    def release(self) -> None:
        """Free the lock and wake one parked reader (which re-parks if it lost the race)."""
        self._held = False
        if self._lot:
            self._lot.unpark(count=1)
            self.woken += 1

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()


class LeanLowlevel(types.SimpleNamespace):
    """``trio.lowlevel`` with a ``wait_readable`` that skips the scheduler when data is queued.

    Args:
        busy_poll_s: how long to keep polling an empty device before yielding,
            seconds (0 = yield at once).
    """

    def __init__(self, busy_poll_s: float = DEFAULT_BUSY_POLL_US * 1e-6) -> None:
        super().__init__()
        self._poller: Any = None
        self._fd = -1
        self._budget = MAX_REQUESTS_WITHOUT_YIELD
        self._busy_poll_ns = round(busy_poll_s * 1e9)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    async def wait_readable(self, fd: int) -> None:
        """Return when ``fd`` is readable: at once if it is and the budget allows, else through trio."""
        if self._budget > 0:
            if fd != self._fd:
                self._poller = select.poll()
                self._poller.register(fd, select.POLLIN)
                self._fd = fd
            if self._poller.poll(0) or (self._busy_poll_ns and self._busy_poll()):
                self._budget -= 1
                _timer.note_loop_busy()
                return
        self._budget = MAX_REQUESTS_WITHOUT_YIELD
        await trio.lowlevel.wait_readable(fd)
        _timer.note_loop_busy()

    def _busy_poll(self) -> bool:
        """Poll the device until a request is queued (True) or the window closes (False).

        The window is ``busy_poll_s``, when and as long as ``_spin`` allows (not
        while other work is ready, cut short by deadlines and timers); it closes
        when another thread queues a callback.
        """
        end_ns = spin_end_ns(self._busy_poll_ns, pool_busy=ThreadHop.in_flight > 0)
        if end_ns is None:
            return False
        poll, polls = self._poller.poll, 0
        while time.monotonic_ns() < end_ns:
            if poll(0):
                return True
            polls += 1
            if polls % _POLLS_PER_CHECK == 0 and callback_queued():
                return False
        return False


class LeanTrio(types.SimpleNamespace):
    """The ``trio`` module as pyfuse3 sees it after :func:`install` (see the module docstring).

    Args:
        busy_poll_s: see :class:`LeanLowlevel`.
    """

    def __init__(self, busy_poll_s: float = DEFAULT_BUSY_POLL_US * 1e-6) -> None:
        super().__init__(lowlevel=LeanLowlevel(busy_poll_s))

    def Lock(self) -> ReaderLock:  # noqa: N802 - stands in for trio.Lock
        """A :class:`ReaderLock` (pyfuse3 makes one for its readers); its woken readers are not work to ``_spin``."""
        lock = ReaderLock()
        _spin.idle_runnable = lambda: lock.woken  # woken only to park again: not work
        return lock

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install(busy_poll_s: float = DEFAULT_BUSY_POLL_US * 1e-6) -> None:
    """Make pyfuse3's session loop use :class:`LeanTrio` (call before ``pyfuse3.main``).

    Args:
        busy_poll_s: how long a reader polls an empty device before yielding, seconds.
    """
    pyfuse3.trio = LeanTrio(busy_poll_s)  # type: ignore[attr-defined]


def uninstall() -> None:
    """Give pyfuse3 back the real ``trio`` module."""
    pyfuse3.trio = trio  # type: ignore[attr-defined]
    _spin.idle_runnable = lambda: 0
