"""The prometheus-operator overlay: what a cluster already running kube-prometheus-stack applies.

Its ServiceMonitor must scrape what the monitoring overlay's scrape job scrapes, in
the same way (every collector endpoint, the volume metrics' own namespace/pod kept),
its PrometheusRule must be alerts.yml, and its dashboards the monitoring overlay's.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import yaml
from crd_schema import validation_errors
from deploy_support import DEPLOY_DIR, NAMESPACE, Manifest, find, find_by_prefix
from operator_schemas import PROMETHEUS_RULE, SERVICE_MONITOR

OVERLAY = "deploy/overlays/prometheus-operator"
ALERTS = DEPLOY_DIR / "overlays" / "monitoring" / "alerts.yml"
RENDER = DEPLOY_DIR / "overlays" / "prometheus-operator" / "render_rules.py"


def test_the_service_monitor_scrapes_every_collector_endpoint_keeping_the_volume_labels(
        all_rendered: dict[str, list[Manifest]]) -> None:
    objects = all_rendered[OVERLAY]
    monitor = find(objects, "ServiceMonitor", "interposer-collector")
    service = find(objects, "Service", "interposer-collector")
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"] == NAMESPACE
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    # The selector picks this Service only (the csi-node and policy Services are not scraped).
    services = [o for o in objects if o["kind"] == "Service" and selector.items() <= o["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in services] == ["interposer-collector"]
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == service["metadata"]["annotations"]["prometheus.io/path"]
    assert endpoint["honorLabels"] is True  # as the monitoring overlay's job (honor_labels): see its comment


def test_the_prometheus_rule_is_the_monitoring_overlays_alerts(all_rendered: dict[str, list[Manifest]]) -> None:
    rule = find(all_rendered[OVERLAY], "PrometheusRule", "interposer")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    current = subprocess.run([sys.executable, str(RENDER), "--check"], capture_output=True, text=True, timeout=60)
    assert current.returncode == 0, current.stderr


def test_the_dashboards_are_the_monitoring_overlays(all_rendered: dict[str, list[Manifest]]) -> None:
    here = find_by_prefix(all_rendered[OVERLAY], "ConfigMap", "grafana-dashboards-interposer-")
    there = find_by_prefix(all_rendered["deploy/overlays/monitoring"], "ConfigMap", "grafana-dashboards-interposer-")
    assert here["data"] == there["data"] and set(here["data"]) >= {"interposer-overview.json"}
    assert here["metadata"]["labels"]["grafana_dashboard"] == "1"  # what the Grafana sidecar watches for


def test_the_operator_schemas_catch_what_the_api_server_would_refuse(all_rendered: dict[str, list[Manifest]]) -> None:
    monitor = find(all_rendered[OVERLAY], "ServiceMonitor", "interposer-collector")
    assert validation_errors(SERVICE_MONITOR, monitor) == []
    bad = copy.deepcopy(monitor)
    bad["spec"]["endpoints"][0]["honorLabels"] = "true"
    bad["spec"]["endpoints"][0]["interval"] = "15 seconds"
    bad["spec"]["endpoints"][0]["honourLabels"] = True
    errors = "\n".join(validation_errors(SERVICE_MONITOR, bad))
    assert "honorLabels" in errors and "interval" in errors and "honourLabels: unknown field" in errors
    rule = find(all_rendered[OVERLAY], "PrometheusRule", "interposer")
    bad_rule = copy.deepcopy(rule)
    bad_rule["spec"]["groups"][0]["rules"][0]["for"] = "2 minutes"
    assert any("for" in e for e in validation_errors(PROMETHEUS_RULE, bad_rule))
