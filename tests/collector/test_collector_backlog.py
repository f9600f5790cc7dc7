"""A real collector behind on its NATS stream: events are counted, or their loss is.

Core NATS buffers what a subscriber has not read in two places: the collector's NATS
client (``--pending-msgs-limit``/``--pending-bytes-limit``, which drops single
messages and counts them in ``interposer_collector_slow_consumer_drops_total``) and
the server (``max_pending``, 64 MiB per client, which cuts the whole connection off
as a slow consumer). The telemetry benchmark once published 2M events faster than a
collector could aggregate them: the server cut the collector off, a quarter of the
events vanished and no counter said so. These tests pin down what the collector
does instead. The collector is paused with SIGSTOP where a test needs a backlog, so
nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest
from collector_helpers import CollectorProcess, batch_message, event, publish, status_message, wait_for

from interposer.cli._procs import start_nats_server

pytestmark = pytest.mark.nats

StartCollector = Callable[..., CollectorProcess]

#: The collector's defaults (``--pending-msgs-limit``, ``--pending-bytes-limit``) and
#: nats-server's default ``max_pending`` per client, bytes.
DEFAULT_PENDING_MSGS = 4096
DEFAULT_PENDING_BYTES = 64 * 1024 * 1024
SERVER_MAX_PENDING_BYTES = 64 * 1024 * 1024

#: Longest wait for a collector to work through what a test published, seconds.
CATCH_UP_TIMEOUT_S = 120.0


def volume_id(name: str) -> str:
    """A volume id no other test (or earlier run on the shared server) uses."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def paused(collector: CollectorProcess) -> Iterator[None]:
    """SIGSTOP the collector for the body (it reads nothing), SIGCONT it after, whatever happens."""
    proc = collector.child.proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def test_a_stream_larger_than_every_default_buffer_is_counted_exactly(
        nats_url: str, start_collector: StartCollector) -> None:
    # More messages than the client buffers by default, more bytes than either buffer
    # holds: the publisher keeps at most `window` batches ahead of what the collector
    # has counted, as workers publishing at a rate the collector sustains do.
    collector = start_collector()
    volume = volume_id("stream")
    events_per_batch, n_batches, window = 300, DEFAULT_PENDING_MSGS + 1000, 400
    subject, payload = batch_message(volume, [event("read", result=4096)] * events_per_batch)
    assert n_batches * len(payload) > max(DEFAULT_PENDING_BYTES, SERVER_MAX_PENDING_BYTES)

    def counted_batches() -> int:
        return int(collector.value("interposer_collector_batches_total"))

    async def run() -> None:
        nc = await nats.connect(nats_url, name="collector-test-stream")
        try:
            published = counted = 0
            while published < n_batches:
                while published < n_batches and published - counted < window:
                    await nc.publish(subject, payload)
                    published += 1
                await nc.flush()
                before, deadline = counted, time.monotonic() + CATCH_UP_TIMEOUT_S
                while counted == before and published - counted >= window:
                    assert time.monotonic() < deadline, f"the collector stopped counting at {counted} batches"
                    await asyncio.sleep(0.05)
                    counted = counted_batches()
        finally:
            await nc.close()

    asyncio.run(run())
    wait_for(lambda: counted_batches() == n_batches, timeout_s=CATCH_UP_TIMEOUT_S, what="every batch")
    samples = collector.scrape()
    assert collector.value("interposer_ops_total", volume=volume) == n_batches * events_per_batch
    assert collector.value("interposer_bytes_total", volume=volume, direction="read") == \
        n_batches * events_per_batch * 4096
    assert samples[("interposer_collector_slow_consumer_drops_total", frozenset())] == 0
    assert samples[("interposer_collector_nats_disconnects_total", frozenset())] == 0


def test_a_collector_too_slow_for_a_burst_drops_whole_batches_and_counts_each(
        nats_url: str, start_collector: StartCollector) -> None:
    # A client buffer of 8 messages and a backlog of 2,000: when the collector resumes,
    # nats-py parses dozens of messages per socket read into that buffer and must drop
    # most of them. Every batch is then either aggregated or counted as dropped.
    collector = start_collector("--pending-msgs-limit", "8")
    volume = volume_id("burst")
    events_per_batch, n_batches = 10, 2000
    messages = [batch_message(volume, [event("write", result=1)] * events_per_batch, seq=seq)
                for seq in range(1, n_batches + 1)]
    assert sum(len(payload) for _, payload in messages) < SERVER_MAX_PENDING_BYTES  # the server keeps all
    with paused(collector):
        publish(nats_url, messages)

    def accounted() -> bool:
        return (collector.value("interposer_collector_batches_total")
                + collector.value("interposer_collector_slow_consumer_drops_total")) == n_batches

    wait_for(accounted, timeout_s=CATCH_UP_TIMEOUT_S, what="every batch aggregated or counted as dropped")
    dropped = collector.value("interposer_collector_slow_consumer_drops_total")
    assert dropped > 0
    assert collector.value("interposer_ops_total", volume=volume) == (n_batches - dropped) * events_per_batch
    assert collector.value("interposer_collector_nats_disconnects_total") == 0
    assert "falling behind: NATS dropped a message" in collector.child.log_path.read_text()


def test_a_collector_the_server_cuts_off_as_a_slow_consumer_counts_the_disconnect(
        start_collector: StartCollector, tmp_path: Path) -> None:
    # What stalled the benchmark: more backlog than the server buffers per client (plus
    # what the sockets hold). The server disconnects the collector and throws the backlog
    # away; the collector must count and log that, reconnect, and keep counting. The
    # loss shows in the exported series: the worker's heartbeat says how many ops it
    # served, the collector counted fewer.
    own_nats, url = start_nats_server(tmp_path / "nats")
    try:
        collector = start_collector("--reconnect-time-wait", "0.2", nats_url=url)
        volume = volume_id("cutoff")
        events_per_batch = 5000  # the worker's largest batch, about 250 KB
        subject, payload = batch_message(volume, [event("read", result=4096)] * events_per_batch)
        n_batches = 2 * SERVER_MAX_PENDING_BYTES // len(payload)
        with paused(collector):
            publish(url, ((subject, payload) for _ in range(n_batches)))
        assert "Slow Consumer Detected" in (tmp_path / "nats" / "nats-server.log").read_text()

        wait_for(lambda: collector.value("interposer_collector_nats_disconnects_total") >= 1,
                 timeout_s=CATCH_UP_TIMEOUT_S, what="the disconnect counted")
        wait_for(lambda: collector.value("interposer_collector_nats_connected") == 1,
                 timeout_s=CATCH_UP_TIMEOUT_S, what="the reconnect")
        published_ops = n_batches * events_per_batch
        publish(url, [status_message(volume, ops_total=published_ops + 1),
                      batch_message(volume, [event("getattr")], seq=n_batches + 1)])
        wait_for(lambda: collector.value("interposer_ops_total", volume=volume, op="getattr") == 1,
                 what="a batch after the reconnect")
        wait_for(lambda: collector.value("interposer_worker_ops_total", volume=volume) == published_ops + 1,
                 what="the heartbeat after the reconnect")
        counted = collector.value("interposer_ops_total", volume=volume)
        assert counted < published_ops + 1  # lost, and visible as worker ops minus ops
        log_text = collector.child.log_path.read_text()
        assert "disconnected from NATS" in log_text
        assert "interposer_collector_nats_disconnects_total" in log_text
    finally:
        own_nats.stop()

