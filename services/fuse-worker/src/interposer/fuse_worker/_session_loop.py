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

Nothing else changes: requests are still served concurrently (a handler that
blocks frees the lock and another reader takes over), cancellation and unmount
still go through trio (``notify_closing`` wakes the real ``wait_readable``;
pyfuse3 checks its exit flag before every wait).
"""

from __future__ import annotations

import select
import types
from typing import Any

import pyfuse3
import trio

#: Requests a reader may take in a row without yielding to trio's scheduler.
#: Each is served in ~30-60 µs here, so other tasks wait at most ~1 ms.
MAX_REQUESTS_WITHOUT_YIELD = 16


class ReaderLock:
    """A lock for pyfuse3's reader tasks that yields only when it must wait.

    Same interface as the part of ``trio.Lock`` pyfuse3 uses (``async with``).
    Not FIFO and not reentrant: any idle reader is as good as another.
    """

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self) -> None:
        """Take the lock; park until it is free if another reader holds it."""
        while self._held:
            await self._lot.park()
        self._held = True

    def release(self) -> None:
        """Free the lock and wake one parked reader (which re-parks if it lost the race)."""
        self._held = False
        if self._lot:
            self._lot.unpark(count=1)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()


class LeanLowlevel(types.SimpleNamespace):
    """``trio.lowlevel`` with a ``wait_readable`` that skips the scheduler when data is queued."""

    def __init__(self) -> None:
        super().__init__()
        self._poller: Any = None
        self._fd = -1
        self._budget = MAX_REQUESTS_WITHOUT_YIELD

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    async def wait_readable(self, fd: int) -> None:
        """Return when ``fd`` is readable: at once if it is and the budget allows, else through trio."""
        if self._budget > 0:
            if fd != self._fd:
                self._poller = select.poll()
                self._poller.register(fd, select.POLLIN)
                self._fd = fd
            if self._poller.poll(0):
                self._budget -= 1
                return
        self._budget = MAX_REQUESTS_WITHOUT_YIELD
        await trio.lowlevel.wait_readable(fd)


class LeanTrio(types.SimpleNamespace):
    """The ``trio`` module as pyfuse3 sees it after :func:`install` (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(Lock=ReaderLock, lowlevel=LeanLowlevel())

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install() -> None:
    """Make pyfuse3's session loop use :class:`LeanTrio` (call before ``pyfuse3.main``)."""
    pyfuse3.trio = LeanTrio()  # type: ignore[attr-defined]


def uninstall() -> None:
    """Give pyfuse3 back the real ``trio`` module."""
    pyfuse3.trio = trio  # type: ignore[attr-defined]
