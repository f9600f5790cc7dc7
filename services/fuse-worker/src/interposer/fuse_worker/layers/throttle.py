"""Throttle layer: a token bucket on the bytes of reads and writes."""

from __future__ import annotations

from typing import Any

import msgspec
import trio

from interposer.proto import ThrottleLayer

from .._op import BackendCall, Handler, Op
from ._match import compile_glob

#: Default bucket size as seconds of the rate, when the policy gives none.
DEFAULT_BURST_S = 0.05
#: Smallest default bucket, bytes: one maximal FUSE request (1 MiB) fits.
MIN_DEFAULT_BURST_BYTES = 1 << 20


class ThrottleStatistics(msgspec.Struct, frozen=True):
    """Counters of a throttle layer: ops and bytes admitted, total wait, seconds."""

    ops: int
    bytes: int
    wait_s_total: float


class TokenBucket:
    """Token bucket as a virtual schedule (GCRA, ITU-T I.371 "virtual scheduling").

    Each request reserves ``size / rate`` seconds of the schedule at the moment it
    arrives, so waiters are served in arrival order (FIFO) and a request is never
    split. The schedule may run up to ``burst_bytes / rate`` seconds ahead of now
    before requests have to wait.

    Args:
        rate_bytes_per_s: sustained rate, bytes per second.
        burst_bytes: bucket size, bytes.
    """

    def __init__(self, rate_bytes_per_s: float, burst_bytes: float) -> None:
        self.rate_bytes_per_s = rate_bytes_per_s
        self.burst_bytes = burst_bytes
        self._burst_s = burst_bytes / rate_bytes_per_s
        self._tat = float("-inf")  # theoretical arrival time of the next request

    def reserve(self, size_bytes: int, now_s: float) -> float:
        """Reserve ``size_bytes`` at time ``now_s``; return the seconds to wait (≥ 0)."""
        tat = max(self._tat, now_s) + size_bytes / self.rate_bytes_per_s
        self._tat = tat
        return max(0.0, tat - now_s - self._burst_s)


class Throttle:
    """Runtime of a :class:`~interposer.proto.ThrottleLayer`.

    One bucket per layer, shared by every op the layer matches (reads and writes
    together unless the policy names one of them).

    Args:
        spec: the validated layer from the policy.
    """

    def __init__(self, spec: ThrottleLayer) -> None:
        self.spec = spec
        burst = spec.burst_bytes or max(spec.rate_bytes_per_s * DEFAULT_BURST_S, MIN_DEFAULT_BURST_BYTES)
        self.bucket = TokenBucket(spec.rate_bytes_per_s, burst)
        self._match = compile_glob(spec.path_glob)
        self._ops = 0
        self._bytes = 0
        self._wait_s = 0.0

    def bind(self, inner: Handler) -> Handler:
        """Return a handler that applies this layer, then calls ``inner``."""
        bucket, match = self.bucket, self._match

        async def throttle(op: Op, call: BackendCall) -> Any:
            if match is None or match(op.path):
                wait_s = bucket.reserve(op.size, trio.current_time())
                self._ops += 1
                self._bytes += op.size
                if wait_s > 0:
                    self._wait_s += wait_s
                    op.throttle_ns += int(wait_s * 1e9)
                    await trio.sleep(wait_s)
            return await inner(op, call)

        return throttle

    def statistics(self) -> ThrottleStatistics:
        """Snapshot of this layer's counters."""
        return ThrottleStatistics(ops=self._ops, bytes=self._bytes, wait_s_total=self._wait_s)
