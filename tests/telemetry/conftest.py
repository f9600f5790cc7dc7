"""Fixtures of the telemetry tests: real collector processes on loopback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from telemetry_helpers import Collector

from interposer.cli._procs import Child

#: How long a collector gets to come up and subscribe, seconds.
COLLECTOR_READY_TIMEOUT_S = 20.0


@pytest.fixture
def start_collector(nats_url: str, tmp_path: Path) -> Iterator[Callable[..., Collector]]:
    """Factory: ``start(*flags)`` starts a collector on NATS and returns once it is subscribed."""
    children: list[Child] = []

    def start(*extra: str) -> Collector:
        index = len(children)
        port_file = tmp_path / f"collector{index}.port"
        argv = [sys.executable, "-m", "interposer.collector", "--listen", "127.0.0.1:0", "--port-file",
                str(port_file), "--nats-url", nats_url, *extra]
        child = Child(f"collector{index}", argv, tmp_path / f"collector{index}.log").start()
        children.append(child)
        child.wait_ready(port_file.exists, COLLECTOR_READY_TIMEOUT_S)
        collector = Collector(child, int(port_file.read_text()))
        child.wait_ready(lambda: collector.total("interposer_collector_nats_connected") == 1,
                         COLLECTOR_READY_TIMEOUT_S)
        return collector

    yield start
    for child in children:
        child.stop()
