"""Fixtures of the collector tests: real collector processes on loopback.

Nothing skips: without nats-server or prometheus the tests that need them fail.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from collector_helpers import COLLECTOR_READY_TIMEOUT_S, CollectorProcess

from interposer.cli._procs import Child


@pytest.fixture
def start_collector(nats_url: str, tmp_path: Path) -> Iterator[Callable[..., CollectorProcess]]:
    """Factory that starts real collector processes on loopback; all are stopped after the test.

    ``start(*extra_flags, nats_url=..., wait_connected=True)`` returns once /metrics
    answers and, unless ``wait_connected`` is False, the collector is subscribed.
    """
    started: list[Child] = []

    def start(*extra_args: str, nats_url: str = nats_url, wait_connected: bool = True) -> CollectorProcess:
        index = len(started)
        port_file = tmp_path / f"collector-{index}.port"
        argv = [sys.executable, "-m", "interposer.collector", "--listen", "127.0.0.1:0",
                "--port-file", str(port_file), "--nats-url", nats_url, "--log-level", "DEBUG", *extra_args]
        child = Child(f"collector-{index}", argv, tmp_path / f"collector-{index}.log").start()
        started.append(child)
        child.wait_ready(port_file.exists, COLLECTOR_READY_TIMEOUT_S)
        collector = CollectorProcess(child, int(port_file.read_text()))
        child.wait_ready(lambda: collector.value("interposer_collector_nats_connected") == int(wait_connected),
                         COLLECTOR_READY_TIMEOUT_S)
        return collector

    try:
        yield start
    finally:
        for child in started:
            child.stop()
