"""READ replies sent by the worker, so that a delay layer's hold parks no task.

A delay layer holding a request used to sleep in the pyfuse3 reader task that
read it: the task parks in the timer queue, another reader is woken to take the
device over, and when the hold ends the task is scheduled again only to write
the reply. Counted on the 2-vCPU benchmark VM (docs/benchmarks.md, "A held
request's CPU, counted"), that costs ~35 µs of worker CPU per held read over the
same read served at once, and caps one worker at ~12–14k held reads/s: short of
what a log-normal 1 ms floor, ``io2`` or ``efs`` asks for at 16 requests in
flight.

While a delay layer acts on reads, ``_extra_ops`` serves READ in its own slot
(``InterposerOperations.read_replying``, answering through a
:class:`ReadReplier`): the op runs with ``Op.defer_holds``, so the delay
layers only note when the reply is due (``Op.reply_due_ns``) instead of sleeping;
the reader returns to the device at once, and the reply is written by the run's
timer task (``layers._timer.TimerQueue.call_at``) when the hold ends, for every
reply due at that wake-up in one go. What the application sees is the same: the
backend call first, then the hold (a ``floor`` is counted from the request's
start; an ``add`` delay follows the backend call and any hold before it, where a
sleeping ``add`` layer slept before the call — for a read the difference is only
when the data was read). A throttle's wait is left to the reply the same way
(never armed early), and what a layer above a hold does once it ends — a
throttle charging its buckets (``gp3``, ``io2``, ``efs``: throttle above the
latency floor), a delay above that — is noted as a step (``Op.then``) the timer
runs when the hold ends, in layer order, as the sleeping layers would have then.
Telemetry records the op when its reply leaves, with the lateness of that moment
(``Op.delay_late_ns``).

Other ops, reads while no delay layer acts on them, and every op under trio's
``MockClock`` (no timer queue) keep pyfuse3's handler and sleeping holds.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

from ._op import Op
from ._raw_reply import RawReplies
from .layers import _timer

log = logging.getLogger(__name__)

#: What a READ is answered with: the data, or an errno.
Payload = bytes | bytearray | memoryview | int
#: Called once the reply has left: ``sent(sent_ns, late_ns)``, ``time.perf_counter_ns()``
#: when it left and how much later than due, ns.
Sent = Callable[[int, int], None]


class ReadReplier:
    """Sends the replies of READ requests served in the worker's own slot: now, or when their holds end.

    Args:
        replies: the session's raw replies (its request layout already checked).
        reply_err: libfuse's ``fuse_reply_err(req, errno)``.

    Attributes:
        held_total: replies sent from the timer after a hold.
    """

    def __init__(self, replies: RawReplies, reply_err: Callable[[int, int], int]) -> None:
        self._replies = replies
        self._reply_err = reply_err
        self.held_total = 0

    @staticmethod
    def can_hold() -> bool:
        """Whether holds can be left to the reply in this run (not under ``MockClock``: no timer queue)."""
        return _timer.current_queue() is not None

    def send(self, req: int, op: Op, payload: Payload, sent: Sent) -> None:
        """Answer ``req`` with ``payload`` once ``op``'s holds have ended (at once if none); then call ``sent``.

        The holds: ``op.reply_armed_ns``, then each of ``op.after_hold`` in turn
        (a step asking for more time re-arms the timer). Exactly one reply per
        request: ``sent`` runs after it and an exception it raises is logged,
        never answered a second time.
        """
        if op.reply_due_ns and op.reply_armed_ns > time.monotonic_ns():
            self._release_at(op.reply_armed_ns, req, op, payload, sent)
        else:
            self._release(req, op, payload, sent, False)

    def _release_at(self, armed_ns: int, req: int, op: Op, payload: Payload, sent: Sent) -> None:
        queue = _timer.current_queue()
        assert queue is not None  # Op.defer_holds is set only where there is one
        queue.call_at(armed_ns, lambda: self._release(req, op, payload, sent, True))

    def _release(self, req: int, op: Op, payload: Payload, sent: Sent, woken: bool) -> None:
        """Run what waited for the holds to end; reply unless that asks for more time (then come back)."""
        steps = op.after_hold
        while steps:
            try:
                wait_s, lead_s = steps.pop(0)()
            except Exception:  # the request still needs its one reply
                log.exception("a layer failed after a held READ's hold; answered EIO")
                steps.clear()
                wait_s, payload = 0.0, errno.EIO
            if wait_s > 0.0:
                due_ns = time.monotonic_ns() + round(wait_s * 1e9)
                op.reply_due_ns, op.reply_armed_ns = due_ns, due_ns - round(lead_s * 1e9)
                self._release_at(op.reply_armed_ns, req, op, payload, sent)
                return
        if woken:
            # The wake compensation learns the timer's wake-up only: counted after the
            # write too, it doubled the write's cost ("round-trip") and brought the
            # replies of a 0.45 ms floor at QD1 in 5 % early (docs/benchmarks.md).
            _timer.observe_wake(time.monotonic_ns() - op.reply_armed_ns, op.reply_armed_ns)
            self.held_total += 1
        self._write(req, payload)
        left_ns = time.monotonic_ns()  # the lateness users see counts until the reply has left
        _report(sent, time.perf_counter_ns(), max(0, left_ns - op.reply_due_ns) if op.reply_due_ns else 0)

    def _write(self, req: int, payload: Payload) -> None:
        error = abs(self._reply_err(req, payload) if isinstance(payload, int) else self._replies.data(req, payload))
        if error and error not in (errno.ENOENT, errno.ENODEV):  # interrupted, or unmounted meanwhile
            log.error("the kernel refused a READ reply (%s)", errno.errorcode.get(error, error))


def _report(sent: Sent, sent_ns: int, late_ns: int) -> None:
    try:
        sent(sent_ns, late_ns)
    except Exception:
        log.exception("cannot record a READ that was answered")
