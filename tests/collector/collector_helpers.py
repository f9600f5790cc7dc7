"""Helpers of the collector tests: scraping and parsing /metrics, publishing as a worker does."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import msgspec
import nats
import yaml
from interposer.proto import EventBatch, OpEvent, WorkerStatus, subjects
from prometheus_client.parser import text_string_to_metric_families

from interposer.cli._procs import Child
from interposer_testing import REPO_ROOT

#: How long a collector gets to come up (port file + NATS subscriptions), seconds.
COLLECTOR_READY_TIMEOUT_S = 20.0
#: How long tests wait for published messages to show up in /metrics, seconds.
METRICS_TIMEOUT_S = 10.0
#: Timeout of one /metrics HTTP request, seconds.
SCRAPE_TIMEOUT_S = 5.0

#: How long Prometheus gets to answer /-/ready, seconds.
PROMETHEUS_READY_TIMEOUT_S = 30.0

MONITORING_DIR = REPO_ROOT / "deploy" / "overlays" / "monitoring"
#: The monitoring overlay's Prometheus configuration and alerting rules.
DEPLOYED_CONFIG = MONITORING_DIR / "prometheus.yml"
DEPLOYED_RULES = MONITORING_DIR / "alerts.yml"
#: Where the collector replica of :func:`deployed_scrape_job` runs (its target labels).
COLLECTOR_NAMESPACE, COLLECTOR_POD = "interposer-system", "interposer-collector-7d9f-abcde"


def deployed_scrape_job(port: int) -> dict[str, Any]:
    """The monitoring overlay's scrape job, with a static target for the collector on ``port``.

    Only Kubernetes service discovery cannot run here (Debian's Prometheus lacks it,
    and there is no API server): ``kubernetes_sd_configs`` becomes a static target
    carrying the ``__meta_kubernetes_*`` labels an EndpointSlice of the collector
    Service would give; the job's relabelling runs unchanged.
    """
    [job] = [j for j in yaml.safe_load(DEPLOYED_CONFIG.read_text())["scrape_configs"] if j["job_name"] == "interposer"]
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"], "labels": {
        "__meta_kubernetes_namespace": COLLECTOR_NAMESPACE,
        "__meta_kubernetes_service_name": "interposer-collector",
        "__meta_kubernetes_pod_name": COLLECTOR_POD,
        "__meta_kubernetes_service_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_service_annotation_prometheus_io_path": "/metrics",
        "__meta_kubernetes_endpointslice_port_name": "metrics",
    }}]
    return job

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout_s: float = METRICS_TIMEOUT_S, what: str = "condition",
             interval_s: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy and return that.

    Raises:
        AssertionError: still falsy after ``timeout_s`` (the last value is in the message).
    """
    deadline = time.monotonic() + timeout_s
    value = check()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; "
                                 f"last value {value!r}")
        time.sleep(interval_s)
        value = check()
    return value


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Parse Prometheus text exposition into ``(sample name, labels) → value``."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


class CollectorProcess:
    """A ``python -m interposer.collector`` child with its /metrics port."""

    def __init__(self, child: Child, port: int) -> None:
        self.child = child
        self.port = port

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def scrape_text(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=SCRAPE_TIMEOUT_S) as response:
            assert response.status == 200
            return response.read().decode()

    def scrape(self) -> Samples:
        """Fetch and parse /metrics.

        Raises:
            AssertionError: the process exited (its log tail is in the message).
        """
        proc = self.child.proc
        assert proc is not None and proc.poll() is None, f"collector exited:\n{self.child.log_tail()}"
        return parse_metrics(self.scrape_text())

    def value(self, name: str, **labels: str) -> float:
        return value(self.scrape(), name, **labels)


class PrometheusServer:
    """A Prometheus child process and its HTTP API."""

    def __init__(self, child: Child, port: int) -> None:
        self.child = child
        self.port = port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        """True once /-/ready answers 200."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/-/ready", timeout=SCRAPE_TIMEOUT_S) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Evaluate an instant query; return the ``result`` list of the vector.

        Raises:
            AssertionError: the query failed (Prometheus's error in the message).
        """
        url = f"{self.base_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def api(self, path: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data`` (e.g. ``"alerts"``, ``"rules"``).

        Raises:
            AssertionError: the API answered an error.
        """
        with urllib.request.urlopen(f"{self.base_url}/api/v1/{path}", timeout=SCRAPE_TIMEOUT_S) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def scalar(self, promql: str) -> float | None:
        """Value of a single-element query result, None when the result is empty."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])


def publish(nats_url: str, messages: Iterable[tuple[str, bytes]]) -> None:
    """Publish ``(subject, payload)`` pairs with nats-py, as a worker does, and flush."""

    async def run() -> None:
        nc = await nats.connect(nats_url, name="collector-test-publisher")
        try:
            for subject, payload in messages:
                await nc.publish(subject, payload)
            await nc.flush()
        finally:
            await nc.close()

    asyncio.run(run())


def event(op: str, *, result: int = 0, errno: int = 0, duration_ns: int = 20_000, fault: str = "",
          delay_ns: int = 0, throttle_ns: int = 0, size: int = 0, delay_late_ns: int = 0,
          sequential: bool = False) -> OpEvent:
    """An ``OpEvent`` with the fields the collector looks at; the rest are plausible."""
    return OpEvent(op=op, ino=2, path="/data/file.bin", offset=0, size=size or result, result=result,
                   errno=errno, start_ns=time.time_ns(), duration_ns=duration_ns, fault=fault,
                   delay_ns=delay_ns, throttle_ns=throttle_ns, pid=1234, uid=1000, delay_late_ns=delay_late_ns,
                   sequential=sequential)


def batch_message(volume: str, events: list[OpEvent], *, worker_id: str = "w-1", seq: int = 1,
                  dropped_total: int = 0, namespace: str = "default",
                  pod: str = "app-0") -> tuple[str, bytes]:
    """``(subject, msgpack payload)`` of an ``EventBatch`` exactly as a worker publishes it."""
    batch = EventBatch(volume=volume, worker_id=worker_id, seq=seq, events=events,
                       dropped_total=dropped_total, namespace=namespace, pod=pod)
    return subjects.events(volume), msgspec.msgpack.encode(batch)


def status_message(volume: str, *, worker_id: str = "w-1", policy_revision: int = 0, ops_total: int = 0,
                   events_dropped_total: int = 0, sent_at_s: float | None = None,
                   namespace: str = "default", pod: str = "app-0") -> tuple[str, bytes]:
    """``(subject, msgpack payload)`` of a ``WorkerStatus`` heartbeat."""
    now_s = time.time()
    status = WorkerStatus(volume=volume, worker_id=worker_id, policy_revision=policy_revision,
                          ops_total=ops_total, events_total=ops_total,
                          events_dropped_total=events_dropped_total,
                          events_published_total=ops_total - events_dropped_total, started_at_s=now_s - 60,
                          sent_at_s=now_s if sent_at_s is None else sent_at_s, namespace=namespace, pod=pod)
    return subjects.status(volume), msgspec.msgpack.encode(status)
