"""Per-op events into a bounded buffer the bus thread drains; counters for status."""

from __future__ import annotations

import collections
import time

from interposer.proto import OpEvent

from ._op import Op

#: Events held for the bus before new ones are dropped.
DEFAULT_EVENT_BUFFER = 100_000


class Telemetry:
    """Records one ``OpEvent`` per served op without ever waiting.

    The FUSE side (trio thread) appends; the bus side (asyncio thread) pops from the
    left. ``collections.deque`` append/popleft are atomic under the GIL, so no lock
    is taken on the data path. When the buffer is full the event is dropped and
    counted: the data path never waits for the network.

    Args:
        capacity: most events buffered.
    """

    def __init__(self, capacity: int = DEFAULT_EVENT_BUFFER) -> None:
        self.capacity = capacity
        self.buffer: collections.deque[OpEvent] = collections.deque()
        self.ops_total = 0
        self.events_dropped_total = 0
        self.events_published_total = 0

    def record(self, op: Op, errno: int, result_bytes: int, start_ns: int, duration_ns: int) -> None:
        """Count the op and queue its event (or count a drop)."""
        self.ops_total += 1
        if len(self.buffer) >= self.capacity:
            self.events_dropped_total += 1
            return
        self.buffer.append(OpEvent(
            op.name, op.ino, op.path, op.offset, op.size, result_bytes, errno, start_ns, duration_ns,
            op.fault, op.delay_ns, op.throttle_ns, op.pid, op.uid,
        ))

    def take(self, max_events: int) -> list[OpEvent]:
        """Pop up to ``max_events`` events, oldest first."""
        buffer, out = self.buffer, []
        for _ in range(min(max_events, len(buffer))):
            out.append(buffer.popleft())
        return out


def wall_ns() -> int:
    """Wall-clock time, ns since the Unix epoch."""
    return time.time_ns()
