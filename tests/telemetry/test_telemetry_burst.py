"""No event is dropped by the worker's default buffering at issue #6's rate of 50,000 ops/s.

With the defaults (``WorkerConfig``: 100,000-event buffer, 5,000-event batches every
0.1 s) one second of ops at 50,000 ops/s — ten flush intervals' worth, as if the bus
thread had stalled for a second — fits in the buffer, and is then published in full
over a real NATS, in messages that each fit the server's ``max_payload`` even with
long paths (a batch over it would be refused by NATS and lost as a whole).
"""

from __future__ import annotations

import asyncio
import errno
import uuid

import msgspec
import nats
import pytest

from interposer.fuse_worker._bus import Bus, fitting, next_flush_wait
from interposer.fuse_worker._config import (
    DEFAULT_EVENT_BUFFER,
    DEFAULT_FLUSH_INTERVAL_S,
    IDLE_FLUSH_INTERVAL_MAX_S,
    WorkerConfig,
)
from interposer.fuse_worker._op import Op
from interposer.fuse_worker._telemetry import Telemetry
from interposer.proto import EventBatch, FaultRecord, subjects

#: Ops per second the worker must sustain without dropping events (issue #6).
TARGET_OPS_PER_S = 50_000
#: The burst: one second of ops at that rate, recorded with nothing drained.
BURST_EVENTS = TARGET_OPS_PER_S
#: Fault records in the burst: every op of a 100 %-EIO policy for a tenth of a second.
BURST_FAULTS = TARGET_OPS_PER_S // 10
#: A long path (NAME_MAX-sized names), so that a default batch is over 1 MiB.
LONG_PATH = "/" + "/".join(["d" * 255] * 2)
#: How long the published burst gets to arrive, seconds.
ARRIVAL_TIMEOUT_S = 30.0


def test_idle_flush_backs_off_and_snaps_back_on_the_first_events() -> None:
    interval = DEFAULT_FLUSH_INTERVAL_S
    waits, wait = [], interval
    for _ in range(6):  # nothing buffered
        wait = next_flush_wait(wait, False, interval)
        waits.append(wait)
    assert waits == sorted(waits) and waits[0] == 2 * interval and waits[-1] == IDLE_FLUSH_INTERVAL_MAX_S
    assert next_flush_wait(wait, True, interval) == interval  # events: back to the busy rate at once
    # The longest idle wait still leaves the buffer room for a burst at the target rate.
    assert IDLE_FLUSH_INTERVAL_MAX_S * TARGET_OPS_PER_S <= DEFAULT_EVENT_BUFFER / 2
    # A configured interval above the idle cap is kept as it is.
    assert next_flush_wait(2.0, False, 2.0) == 2.0


def test_fitting_splits_until_each_message_fits() -> None:
    encode = msgspec.msgpack.encode
    items = [b"x" * 100] * 64
    parts = list(fitting(items, encode, 1000))
    assert sum(count for _, count in parts) == 64 and all(len(payload) <= 1000 for payload, _ in parts)
    assert [payload for payload, _ in fitting(items, encode, 1 << 20)] == [encode(items)], "fits: one message"
    [(payload, count)] = fitting([b"y" * 5000], encode, 1000)
    assert count == 1 and len(payload) > 1000, "a single oversized item is yielded alone (and fails to publish)"


def test_a_burst_at_50k_ops_per_s_is_buffered_and_published_in_full_with_the_defaults(nats_url: str) -> None:
    volume = f"burst-{uuid.uuid4().hex[:8]}"
    config = WorkerConfig(volume_id=volume, backing_dir="/unused", mountpoint="/unused", nats_url=nats_url)
    assert config.flush_interval_s * TARGET_OPS_PER_S <= config.batch_max_events, "one batch per flush at 50k ops/s"
    telemetry = Telemetry(config.event_buffer, volume=volume)
    for i in range(BURST_EVENTS):
        op = Op("read", 2, LONG_PATH, offset=i * 4096, size=4096, pid=1234, uid=1000, session=1 + i % 64)
        if i < BURST_FAULTS:
            op.inject(0, "errno", "EIO")
        telemetry.record(op, errno.EIO if i < BURST_FAULTS else 0, 0 if i < BURST_FAULTS else 4096,
                         1_700_000_000_000_000_000 + i, 20_000)
    assert (telemetry.events_dropped_total, len(telemetry.buffer)) == (0, BURST_EVENTS)
    assert (telemetry.faults_dropped_total, len(telemetry.faults)) == (0, BURST_FAULTS)

    bus = Bus(config, telemetry, lambda policy, revision: None, lambda: 0, None)  # type: ignore[arg-type]
    received = asyncio.run(_publish_and_receive(nats_url, bus, volume))
    batches, faults, sizes, max_payload = received
    assert max(sizes) <= max_payload
    assert len(batches) > BURST_EVENTS // config.batch_max_events, "long paths: default batches were split"
    assert sum(len(batch.events) for batch in batches) == BURST_EVENTS
    assert [batch.seq for batch in batches] == list(range(1, len(batches) + 1))
    assert [event.offset for batch in batches for event in batch.events] == [i * 4096 for i in range(BURST_EVENTS)]
    assert len(faults) == BURST_FAULTS and faults[0].worker_id == telemetry.worker_id
    assert (telemetry.events_dropped_total, telemetry.events_published_total) == (0, BURST_EVENTS)
    assert (telemetry.faults_dropped_total, telemetry.faults_published_total) == (0, BURST_FAULTS)


async def _publish_and_receive(nats_url: str, bus: Bus, volume: str,
                               ) -> tuple[list[EventBatch], list[FaultRecord], list[int], int]:
    batch_decoder = msgspec.msgpack.Decoder(EventBatch)
    faults_decoder = msgspec.msgpack.Decoder(list[FaultRecord])
    batches: list[EventBatch] = []
    faults: list[FaultRecord] = []
    sizes: list[int] = []
    done = asyncio.Event()

    async def on_batch(msg) -> None:  # noqa: ANN001 - nats Msg
        sizes.append(len(msg.data))
        batches.append(batch_decoder.decode(msg.data))
        check()

    async def on_faults(msg) -> None:  # noqa: ANN001 - nats Msg
        sizes.append(len(msg.data))
        faults.extend(faults_decoder.decode(msg.data))
        check()

    def check() -> None:
        if sum(len(b.events) for b in batches) >= BURST_EVENTS and len(faults) >= BURST_FAULTS:
            done.set()

    tap = await nats.connect(nats_url, name="burst-test-tap")
    publisher = await nats.connect(nats_url, name="burst-test-worker")
    try:
        await tap.subscribe(subjects.events(volume), cb=on_batch, pending_bytes_limit=256 * 1024 * 1024)
        await tap.subscribe(subjects.faults(volume), cb=on_faults, pending_bytes_limit=256 * 1024 * 1024)
        await tap.flush()
        await bus._publish_events(publisher)
        await bus._publish_faults(publisher)
        await publisher.flush()
        dropped = (bus.telemetry.events_dropped_total, bus.telemetry.faults_dropped_total)
        assert dropped == (0, 0), f"events and fault records dropped while publishing: {dropped}"
        try:
            await asyncio.wait_for(done.wait(), ARRIVAL_TIMEOUT_S)
        except asyncio.TimeoutError:
            pytest.fail(f"only {sum(len(b.events) for b in batches)} events and {len(faults)} fault records arrived")
        return batches, faults, sizes, publisher.max_payload
    finally:
        await publisher.close()
        await tap.close()
