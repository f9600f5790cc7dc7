"""A warning in the worker's log when delayed ops resume late: the emulation is slower than its policy.

The collector's ``interposer_delay_lateness_seconds`` shows the same thing to whoever
watches Prometheus; this is for the user who runs ``interposer mount`` in a terminal
and would otherwise take the slower latencies for the policy's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Delayed ops per judgement: enough that one descheduled vCPU does not raise a warning.
WINDOW_OPS = 4096
#: A window is late when its delayed ops resumed, on average, more than this share of
#: their delays after them…
LATE_SHARE = 0.1
#: …and more than this, ns (below it, a VM's timer slack and wake-ups, not the worker).
LATE_MIN_NS = 100_000
#: Least time between two warnings, seconds.
WARN_EVERY_S = 60.0


class LatenessWatch:
    """Logs a warning when the delayed ops of a window of :data:`WINDOW_OPS` resume late on average.

    Args:
        monotonic: clock for the warnings' rate limit, seconds (tests pass a fake one).

    Attributes:
        warnings: warnings logged so far.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._ops = 0
        self._delay_ns = 0
        self._late_ns = 0
        self._last_warning_s: float | None = None
        self.warnings = 0

    def observe(self, delay_ns: int, late_ns: int) -> None:
        """Count one delayed op: ``delay_ns`` asked (``Op.delay_ns``), resumed ``late_ns`` after it (``Op.delay_late_ns``)."""
        self._ops += 1
        self._delay_ns += delay_ns
        self._late_ns += late_ns
        if self._ops >= WINDOW_OPS:
            self._judge()

    def _judge(self) -> None:
        mean_late_ns, mean_delay_ns = self._late_ns / self._ops, self._delay_ns / self._ops
        self._ops = self._delay_ns = self._late_ns = 0
        if mean_late_ns <= max(LATE_MIN_NS, LATE_SHARE * mean_delay_ns):
            return
        now_s = self._monotonic()
        if self._last_warning_s is not None and now_s - self._last_warning_s < WARN_EVERY_S:
            return
        self._last_warning_s = now_s
        self.warnings += 1
        log.warning("delays run late: the last %d delayed ops resumed a mean %.0f µs after their %.0f µs "
                    "delays, so the application sees longer latencies than the policy asks (the worker is "
                    "CPU-bound, or the host deschedules its CPU); interposer_delay_lateness_seconds has it "
                    "by op", WINDOW_OPS, mean_late_ns / 1e3, mean_delay_ns / 1e3)
