"""A warning logged at most once per interval, saying how many like it were suppressed."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """Logs a warning at most once per interval and says how many were suppressed.

    Args:
        logger: where the warnings go.
        interval_s: shortest gap between two lines, seconds (monotonic clock).
    """

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._next_s = 0.0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        """Log ``msg % args`` as a warning unless one was logged less than the interval ago."""
        now_s = time.monotonic()
        if now_s < self._next_s:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, self._suppressed)
        self._suppressed = 0
        self._next_s = now_s + self._interval_s
        self._logger.warning(msg, *args)
