"""Per-op events into a bounded buffer the bus thread drains; counters for status."""

from __future__ import annotations

import collections
import time

from interposer.proto import FaultRecord, OpEvent

from ._op import Op

#: Events held for the bus before new ones are dropped.
DEFAULT_EVENT_BUFFER = 100_000
#: Fault records held for the bus before new ones are dropped.
DEFAULT_FAULT_BUFFER = 100_000


class Telemetry:
    """Records one ``OpEvent`` per served op without ever waiting.

    The FUSE side (trio thread) appends; the bus side (asyncio thread) pops from the
    left. ``collections.deque`` append/popleft are atomic under the GIL, so no lock
    is taken on the data path. When the buffer is full the event is dropped and
    counted: the data path never waits for the network.

    Injected faults (``Op.injected``) also become ``FaultRecord`` s in a second
    bounded deque, ``faults``, drained the same way.

    Args:
        capacity: most events buffered.
        volume: volume id written into fault records.
        fault_capacity: most fault records buffered.
    """

    def __init__(self, capacity: int = DEFAULT_EVENT_BUFFER, volume: str = "",
                 fault_capacity: int = DEFAULT_FAULT_BUFFER) -> None:
        self.capacity = capacity
        self.volume = volume
        self.fault_capacity = fault_capacity
        self.buffer: collections.deque[OpEvent] = collections.deque()
        self.faults: collections.deque[FaultRecord] = collections.deque()
        self.faults_total = 0
        self.faults_dropped_total = 0
        self.faults_published_total = 0
        self.ops_total = 0
        self.events_dropped_total = 0
        self.events_published_total = 0

    def record(self, op: Op, errno: int, result_bytes: int, start_ns: int, duration_ns: int,
               revision: int = 0) -> None:
        """Count the op and queue its event and fault records (or count drops)."""
        self.ops_total += 1
        if op.injected:
            self._record_faults(op, start_ns, revision)
        if len(self.buffer) >= self.capacity:
            self.events_dropped_total += 1
            return
        self.buffer.append(OpEvent(
            op.name, op.ino, op.path, op.offset, op.size, result_bytes, errno, start_ns, duration_ns,
            op.fault, op.delay_ns, op.throttle_ns, op.pid, op.uid,
        ))

    def _record_faults(self, op: Op, start_ns: int, revision: int) -> None:
        for injection in op.injected or ():
            self.faults_total += 1
            if len(self.faults) >= self.fault_capacity:
                self.faults_dropped_total += 1
                continue
            self.faults.append(FaultRecord(
                time_ns=start_ns, op=op.name, path=op.path, kind=injection.kind, errno=injection.errno_name,
                pid=op.pid, uid=op.uid, volume=self.volume, layer=injection.layer, offset=op.offset,
                size=op.size, result=injection.result, policy_revision=revision,
            ))

    def take_faults(self, max_records: int) -> list[FaultRecord]:
        """Pop up to ``max_records`` fault records, oldest first."""
        faults, out = self.faults, []
        for _ in range(min(max_records, len(faults))):
            out.append(faults.popleft())
        return out

    def take(self, max_events: int) -> list[OpEvent]:
        """Pop up to ``max_events`` events, oldest first."""
        buffer, out = self.buffer, []
        for _ in range(min(max_events, len(buffer))):
            out.append(buffer.popleft())
        return out


def wall_ns() -> int:
    """Wall-clock time, ns since the Unix epoch."""
    return time.time_ns()
