"""The deployed Prometheus scrape job, run by a real Prometheus against a real collector.

Only Kubernetes service discovery cannot run here: the job's ``kubernetes_sd_configs``
is replaced by a static target carrying the ``__meta_kubernetes_*`` labels an
EndpointSlice of the collector Service would give; its relabelling runs unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from collector_helpers import (
    COLLECTOR_NAMESPACE,
    COLLECTOR_POD,
    CollectorProcess,
    PrometheusServer,
    deployed_scrape_job,
    wait_for,
)

from interposer_testing import MountedVolume

APP_NAMESPACE, APP_POD = "team-x", "trainer-0"


def test_volume_metrics_keep_the_application_pods_namespace_and_pod(
        nats_url: str, start_collector: Callable[..., CollectorProcess],
        start_prometheus: Callable[..., PrometheusServer], mount_worker: Callable[..., MountedVolume]) -> None:
    """The dashboards filter on the namespace and pod of the pod using the volume; the
    scrape target's own namespace/pod (the collector's) must not replace them."""
    collector = start_collector()
    prometheus = start_prometheus([], job=deployed_scrape_job(collector.port))
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
