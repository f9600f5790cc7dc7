"""Fixtures of the collector tests: real collector processes on loopback.

Nothing skips: without nats-server or prometheus the tests that need them fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from pathlib import Path

import pytest
import yaml
from collector_helpers import (
    COLLECTOR_READY_TIMEOUT_S,
    PROMETHEUS_READY_TIMEOUT_S,
    CollectorProcess,
    PrometheusServer,
)

from interposer.cli._procs import Child, free_port


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
        connected = int(wait_connected)
        child.wait_ready(lambda: collector.value("interposer_collector_nats_connected") == connected,
                         COLLECTOR_READY_TIMEOUT_S)
        return collector

    try:
        yield start
    finally:
        for child in started:
            child.stop()


#: The Debian package's Prometheus server, and its tool (backfills history into a TSDB).
PROMETHEUS_BINARY = "/usr/bin/prometheus"
PROMTOOL_BINARY = "/usr/bin/promtool"
#: Scrape (and rule evaluation) interval of the test Prometheus, seconds.
PROMETHEUS_SCRAPE_INTERVAL_S = 1


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """Factory: a real Prometheus on loopback scraping the given /metrics ports every second.

    ``start(ports, job=None, rule_files=(), history=None)``: ``job`` is a scrape job (a
    dict as in prometheus.yml, e.g. the deployed one with its service discovery
    replaced by static targets) to use instead of the plain one; ``rule_files`` are
    rule files to load (evaluated every second too); ``history`` is an OpenMetrics
    file of past samples, written into the TSDB by ``promtool tsdb
    create-blocks-from openmetrics`` before the server starts (days of history in a
    test). Fails (never skips) when the binaries are missing. Stopped after the test.
    """
    for binary in (PROMETHEUS_BINARY, PROMTOOL_BINARY):
        if not os.access(binary, os.X_OK):
            pytest.fail(f"{binary} is missing: apt-get install prometheus (make setup does)")
    children: list[Child] = []

    def start(target_ports: list[int], job: dict[str, Any] | None = None,
              rule_files: Sequence[Path] = (), history: Path | None = None) -> PrometheusServer:
        workdir = tmp_path / "prometheus"
        (workdir / "data").mkdir(parents=True)
        if history is not None:
            subprocess.run([PROMTOOL_BINARY, "tsdb", "create-blocks-from", "openmetrics", "--quiet",
                            str(history), str(workdir / "data")], check=True, capture_output=True, timeout=120)
        job = job or {"job_name": "interposer-collector",
                      "static_configs": [{"targets": [f"127.0.0.1:{port}" for port in target_ports]}]}
        interval = f"{PROMETHEUS_SCRAPE_INTERVAL_S}s"
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [{**job, "scrape_interval": interval}],
            "rule_files": [str(path) for path in rule_files],
        }))
        port = free_port()
        argv = [PROMETHEUS_BINARY, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
        child = Child("prometheus", argv, workdir / "prometheus.log").start()
        children.append(child)
        server = PrometheusServer(child, port)
        child.wait_ready(server.ready, PROMETHEUS_READY_TIMEOUT_S)
        return server

    try:
        yield start
    finally:
        for child in children:
            child.stop()
