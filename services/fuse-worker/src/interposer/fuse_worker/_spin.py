"""Whether the worker's one loop thread may spin — poll without yielding — and until when.

Two waits are cheaper as a short poll than as a sleep on a VM, where a thread that
sleeps and is woken pays the scheduler, the idle vCPU and the wake-up: the next
FUSE request at queue depth 1 (``_session_loop``'s busy poll) and a disk read the
page cache is waiting for (``backends._offload``). Spinning holds the loop thread,
so it is allowed only while nothing else needs it; both polls ask here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from .layers import _timer

#: How many runnable tasks are not work: the lean loop's readers woken only to park
#: again (``_session_loop`` points this at its reader lock's count).
idle_runnable: Callable[[], int] = lambda: 0


def spin_end_ns(window_ns: int, *, pool_busy: bool) -> int | None:
    """When a spin opened now must end, ``time.monotonic_ns()`` ns; None = do not spin.

    Args:
        window_ns: the longest spin wanted, ns.
        pool_busy: a blocking call runs in a pool thread (``ThreadHop.in_flight``):
            the spinning loop would hold the GIL that thread needs to hand its result back.

    Returns:
        None while another task is ready to run (beyond :data:`idle_runnable`),
        another thread has queued a callback, or ``pool_busy``; otherwise
        ``now + window_ns``, cut short by the next trio deadline and the next
        delay/throttle timer (``layers._timer``).
    """
    stats = trio.lowlevel.current_statistics()
    if stats.tasks_runnable > idle_runnable() or stats.run_sync_soon_queue_size or pool_busy:
        return None
    now_ns = time.monotonic_ns()
    end_ns = now_ns + window_ns
    if stats.seconds_to_next_deadline < window_ns * 1e-9:  # inf when no deadline
        end_ns = now_ns + int(stats.seconds_to_next_deadline * 1e9)
    timer_ns = _timer.next_deadline_ns()
    return end_ns if timer_ns is None else min(end_ns, timer_ns)


def callback_queued() -> bool:
    """Whether another thread has queued work for the loop (the spin should stop)."""
    return trio.lowlevel.current_statistics().run_sync_soon_queue_size > 0
