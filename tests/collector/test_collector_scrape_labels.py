"""The deployed Prometheus scrape job, run by a real Prometheus against a real collector.

Only Kubernetes service discovery cannot run here: the job's ``kubernetes_sd_configs``
is replaced by a static target carrying the ``__meta_kubernetes_*`` labels an
EndpointSlice of the collector Service would give; its relabelling runs unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import yaml
from collector_helpers import CollectorProcess, PrometheusServer, wait_for

from interposer_testing import REPO_ROOT, MountedVolume

DEPLOYED_CONFIG = REPO_ROOT / "deploy" / "overlays" / "monitoring" / "prometheus.yml"
APP_NAMESPACE, APP_POD = "team-x", "trainer-0"
COLLECTOR_NAMESPACE, COLLECTOR_POD = "interposer-system", "interposer-collector-7d9f-abcde"


def _deployed_job_scraping(port: int) -> dict:
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


def test_volume_metrics_keep_the_application_pods_namespace_and_pod(
        nats_url: str, start_collector: Callable[..., CollectorProcess],
        start_prometheus: Callable[..., PrometheusServer], mount_worker: Callable[..., MountedVolume]) -> None:
    """The dashboards filter on the namespace and pod of the pod using the volume; the
    scrape target's own namespace/pod (the collector's) must not replace them."""
    collector = start_collector()
    prometheus = start_prometheus([], job=_deployed_job_scraping(collector.port))
    vol = mount_worker("scrape-labels", nats_url=nats_url,
                       extra=["--pod-namespace", APP_NAMESPACE, "--pod-name", APP_POD])
    (vol.mountpoint / "f").write_bytes(b"x" * 4096)
    os.listdir(vol.mountpoint)

    def scraped() -> list[dict]:
        return prometheus.query('interposer_worker_ops_total{volume="scrape-labels"}')

    wait_for(lambda: bool(scraped()), timeout_s=30, interval_s=0.5, what="the worker's ops in Prometheus")
    [series] = scraped()
    assert (series["metric"]["namespace"], series["metric"]["pod"]) == (APP_NAMESPACE, APP_POD), series["metric"]
    assert "exported_namespace" not in series["metric"]
    # The collector's own metrics carry no pod labels: there the target's say which replica.
    [own] = prometheus.query("interposer_collector_nats_connected")
    assert (own["metric"]["namespace"], own["metric"]["pod"]) == (COLLECTOR_NAMESPACE, COLLECTOR_POD)
