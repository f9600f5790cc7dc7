"""The shipped alerting rules in a real Prometheus, over a real collector and real workers.

``tests/deploy/test_deploy_alerts.py`` checks each rule on synthetic series; here the
rules run unchanged on what the deployed scrape job collects (only Kubernetes service
discovery is replaced, see :func:`collector_helpers.deployed_scrape_job`), so a join
that fails on real label sets, or a worker signal that does not arrive, shows.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import yaml
from collector_helpers import DEPLOYED_RULES, CollectorProcess, PrometheusServer, deployed_scrape_job, wait_for

from interposer_testing import MountedVolume

APP_NAMESPACE = "team-x"


def _alerts(prometheus: PrometheusServer, name: str) -> dict[str, str]:
    """volume → state (``pending``/``firing``) of the alerts called ``name``."""
    return {a["labels"]["volume"]: a["state"] for a in prometheus.api("alerts")["alerts"]
            if a["labels"]["alertname"] == name}


def test_a_killed_worker_raises_worker_down_and_an_unmounted_one_does_not(
        nats_url: str, start_collector: Callable[..., CollectorProcess],
        start_prometheus: Callable[..., PrometheusServer], mount_worker: Callable[..., MountedVolume]) -> None:
    collector = start_collector()
    prometheus = start_prometheus([], job=deployed_scrape_job(collector.port), rule_files=[DEPLOYED_RULES])
    unmounted = mount_worker("alert-unmounted", nats_url=nats_url,
                             extra=["--pod-namespace", APP_NAMESPACE, "--pod-name", "app-u"])
    killed = mount_worker("alert-killed", nats_url=nats_url,
                          extra=["--pod-namespace", APP_NAMESPACE, "--pod-name", "app-k"])
    wait_for(lambda: len(prometheus.query("interposer_worker_up == 1")) == 2, timeout_s=30, interval_s=0.5,
             what="both workers up in Prometheus")

    assert unmounted.unmount() == 0
    killed.proc.kill()
    killed.proc.wait()
    subprocess.run(["fusermount3", "-uz", str(killed.mountpoint)], check=False, capture_output=True)

    # Pending, not firing: the rule's `for: 2m` is not waited out here.
    wait_for(lambda: _alerts(prometheus, "InterposerWorkerDown").get("alert-killed") == "pending", timeout_s=30,
             interval_s=0.5, what="InterposerWorkerDown pending for the killed worker's volume")
    [down] = [a for a in prometheus.api("alerts")["alerts"] if a["labels"]["alertname"] == "InterposerWorkerDown"]
    assert (down["labels"]["namespace"], down["labels"]["pod"]) == (APP_NAMESPACE, "app-k")
    assert "alert-unmounted" not in _alerts(prometheus, "InterposerWorkerDown")
    assert prometheus.query('interposer_worker_up{volume="alert-unmounted"}') == []

    # Every rule evaluated on these real series without an error (a bad join fails only at run time).
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert len(rules) == sum(len(group["rules"]) for group in yaml.safe_load(DEPLOYED_RULES.read_text())["groups"])
    assert [(r["name"], r["lastError"]) for r in rules if r["health"] != "ok"] == []
