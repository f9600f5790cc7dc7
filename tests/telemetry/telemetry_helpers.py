"""Helpers of the telemetry tests: a NATS tap that records what workers publish."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import msgspec
import nats
from interposer.fuse_worker._cgroup import memory_cgroup
from interposer.proto import EventBatch, OpEvent, WorkerStatus, subjects

from interposer.cli._metrics import scrape, total
from interposer.cli._procs import Child

#: How long a tap waits for its subscriptions to be in place, seconds.
TAP_READY_TIMEOUT_S = 10.0
#: How long tests wait for published telemetry to arrive, seconds.
ARRIVAL_TIMEOUT_S = 15.0

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout_s: float = ARRIVAL_TIMEOUT_S, what: str = "condition",
             interval_s: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy and return that.

    Raises:
        AssertionError: still falsy after ``timeout_s`` (the last value is in the message).
    """
    deadline = time.monotonic() + timeout_s
    value = check()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; last value {value!r}")
        time.sleep(interval_s)
        value = check()
    return value


class BusTap:
    """Subscribes (in its own asyncio thread) to a volume's event batches and heartbeats.

    Use as a context manager; ``batches`` and ``statuses`` fill up as messages arrive.

    Args:
        nats_url: the NATS server.
        volume: the volume whose subjects to tap.
    """

    def __init__(self, nats_url: str, volume: str) -> None:
        self.nats_url = nats_url
        self.volume = volume
        self.batches: list[EventBatch] = []
        self.statuses: list[WorkerStatus] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        batch_decoder = msgspec.msgpack.Decoder(EventBatch)
        status_decoder = msgspec.msgpack.Decoder(WorkerStatus)
        try:
            nc = await nats.connect(self.nats_url, name="telemetry-test-tap")
        except BaseException as exc:  # noqa: BLE001 - reported by __enter__
            self._error = exc
            self._ready.set()
            return

        async def on_batch(msg) -> None:  # noqa: ANN001
            self.batches.append(batch_decoder.decode(msg.data))

        async def on_status(msg) -> None:  # noqa: ANN001
            self.statuses.append(status_decoder.decode(msg.data))

        await nc.subscribe(subjects.events(self.volume), cb=on_batch)
        await nc.subscribe(subjects.status(self.volume), cb=on_status)
        await nc.flush()
        self._ready.set()
        await self._stop.wait()
        await nc.drain()

    def __enter__(self) -> BusTap:
        self._thread.start()
        assert self._ready.wait(TAP_READY_TIMEOUT_S), "the NATS tap did not subscribe in time"
        if self._error is not None:
            raise AssertionError(f"the NATS tap could not connect: {self._error}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def events(self) -> list[OpEvent]:
        """Every event received so far, in arrival order."""
        return [event for batch in list(self.batches) for event in batch.events]

    def last_status(self) -> WorkerStatus | None:
        """The newest heartbeat received, None before the first."""
        return self.statuses[-1] if self.statuses else None

    def settled(self) -> WorkerStatus | None:
        """The newest heartbeat if every event it accounts for has arrived, else None.

        A worker publishes its buffered events before each heartbeat, so once a
        heartbeat's ``events_published_total`` equals the events received here, the
        event stream up to that heartbeat is complete.
        """
        status = self.last_status()
        if status is None or status.events_published_total != len(self.events):
            return None
        if status.events_published_total + status.events_dropped_total != status.events_total:
            return None
        return status


class Collector:
    """A running ``python -m interposer.collector`` and its /metrics URL."""

    def __init__(self, child: Child, port: int) -> None:
        self.child = child
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels``."""
        return total(scrape(self.metrics_url), name, labels)


@contextlib.contextmanager
def memory_limited_cgroup(limit_bytes: int) -> Iterator[Path | None]:
    """A new memory cgroup limited to ``limit_bytes``, below this process's own; None where none can be made.

    cgroup v1 (a memory controller mount) allows it as root; cgroup v2 only where this
    process's cgroup already delegates the memory controller to its children (its
    ``cgroup.subtree_control``), since a cgroup holding processes may not enable it.
    Processes left in it at the end are moved back to the parent, then it is removed
    (left behind if that fails: a cgroup v2 parent that delegates refuses processes).
    """
    own = memory_cgroup()
    if own is None:
        yield None
        return
    parent, limit_file = Path(own.hierarchy) / own.path.lstrip("/"), own.limit_file
    cgroup = parent / f"interposer-test-{uuid.uuid4().hex[:8]}"
    try:
        cgroup.mkdir()
        (cgroup / limit_file).write_text(str(limit_bytes))
    except OSError:
        if cgroup.exists():
            cgroup.rmdir()
        yield None
        return
    try:
        yield cgroup
    finally:
        for pid in (cgroup / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (parent / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):  # still busy (a failed test's worker): never mask that failure
            cgroup.rmdir()
