"""Metrics plumbing: collector ports, Prometheus scrape config, Grafana dashboards."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from deploy_support import DEPLOY_DIR, NAMESPACE, Manifest, find, find_by_prefix, metric_names, pod_spec_of

#: The metric names the collector documents; dashboards may use no others.
DOCUMENTED_METRICS = {
    "interposer_ops_total",
    "interposer_bytes_total",
    "interposer_op_duration_seconds_bucket",
    "interposer_op_duration_seconds_sum",
    "interposer_op_duration_seconds_count",
    "interposer_injected_faults_total",
    "interposer_injected_delay_seconds_total",
    "interposer_delay_lateness_seconds_bucket",
    "interposer_delay_lateness_seconds_sum",
    "interposer_delay_lateness_seconds_count",
    "interposer_throttle_wait_seconds_total",
    "interposer_io_size_bytes_bucket",
    "interposer_io_size_bytes_sum",
    "interposer_io_size_bytes_count",
    "interposer_sequential_ops_total",
    "interposer_events_dropped_total",
    "interposer_events_sampled_out_total",
    "interposer_worker_policy_revision",
    "interposer_worker_last_heartbeat_timestamp_seconds",
    "interposer_worker_up",
    "interposer_fault_records_total",
    "interposer_open_files",
    "interposer_kernel_passthrough_open_files",
    "interposer_open_files_bypassing_layers",
    "interposer_quota_used_bytes",
    "interposer_quota_limit_bytes",
    "interposer_quota_used_inodes",
    "interposer_quota_limit_inodes",
    "interposer_burst_balance_ratio",
    "interposer_worker_resident_memory_bytes",
    "interposer_worker_memory_limit_bytes",
    "interposer_worker_internal_errors_total",
}
DASHBOARD_FILE = DEPLOY_DIR / "overlays" / "monitoring" / "dashboards" / "interposer-overview.json"
METRICS_PORT = 9464


def variable_metric_names(query: str) -> set[str]:
    """Metric names of a Grafana Prometheus variable query (``label_values(<selector>, <label>)``)."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
    return metric_names(m.group(1) if m else query)


def test_metric_names_parser() -> None:
    assert metric_names('sum by (op) (rate(interposer_ops_total{volume=~"$volume"}[1m]))') == {
        "interposer_ops_total"
    }
    assert metric_names(
        "histogram_quantile(0.99, sum by (op, le) (rate(interposer_op_duration_seconds_bucket[$__rate_interval])))"
    ) == {"interposer_op_duration_seconds_bucket"}
    assert variable_metric_names("label_values(interposer_ops_total, volume)") == {"interposer_ops_total"}
    assert metric_names('sum(rate(a_total{result!="ok"}[1m])) / sum(rate(b_total[1m])) > 1e-3') == {
        "a_total",
        "b_total",
    }


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def _dashboards(all_rendered: dict[str, list[Manifest]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every JSON file in every rendered ConfigMap, parsed: (where, document)."""
    for path, objects in all_rendered.items():
        for obj in objects:
            if obj["kind"] != "ConfigMap":
                continue
            for key, value in (obj.get("data") or {}).items():
                if key.endswith(".json"):
                    where = f"{path}: ConfigMap/{obj['metadata']['name']}[{key}]"
                    try:
                        yield where, json.loads(value)
                    except json.JSONDecodeError as exc:
                        pytest.fail(f"{where} is not JSON: {exc}")


def test_dashboards_use_only_documented_metrics(all_rendered: dict[str, list[Manifest]]) -> None:
    found = 0
    for where, dashboard in _dashboards(all_rendered):
        found += 1
        queries = [
            (t["expr"], metric_names(t["expr"]))
            for p in _panels(dashboard)
            for t in p.get("targets", [])
            if t.get("expr")
        ]
        for v in dashboard.get("templating", {}).get("list", []):
            if v.get("type") == "query":
                q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                queries.append((q, variable_metric_names(q)))
        assert queries, f"{where}: no queries"
        for query, names in queries:
            assert names, f"{where}: {query!r} selects no metric"
            unknown = names - DOCUMENTED_METRICS
            assert not unknown, f"{where}: {query!r} uses undocumented metrics {sorted(unknown)}"
    assert found, "no dashboard JSON in any rendered ConfigMap"


def test_overview_dashboard_is_provisioned_verbatim(monitoring: list[Manifest]) -> None:
    cm = find_by_prefix(monitoring, "ConfigMap", "grafana-dashboards-interposer-")
    assert json.loads(cm["data"][DASHBOARD_FILE.name]) == json.loads(DASHBOARD_FILE.read_text())
    assert cm["metadata"]["labels"].get("grafana_dashboard") == "1", "label for Grafana's dashboard sidecar"


@pytest.fixture(scope="module")
def overview() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def test_overview_dashboard_panels(overview: dict[str, Any]) -> None:
    panels = list(_panels(overview))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = []
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), f"panel {panel['title']} has no position"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"panel {panel['title']}: duplicate refId"
        exprs += [re.sub(r"\s+", " ", t["expr"]) for t in panel["targets"]]

    def has(*needles: str) -> bool:
        return any(all(n in e for n in needles) for e in exprs)

    assert has("sum by (op)", "rate(interposer_ops_total"), "ops/s by op"
    assert has("sum by (direction)", "rate(interposer_bytes_total"), "throughput by direction"
    assert has("histogram_quantile(0.5,", "interposer_op_duration_seconds_bucket", "le"), "p50 latency"
    assert has("histogram_quantile(0.99,", "interposer_op_duration_seconds_bucket", "le"), "p99 latency"
    assert has("interposer_ops_total", 'result!="ok"'), "error rate"
    assert has("interposer_injected_faults_total"), "injected faults"
    assert has("interposer_events_dropped_total"), "dropped events"
    for expr in exprs:
        assert "$volume" in expr, f"{expr!r} ignores the volume selector"


def test_overview_dashboard_variables(overview: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in overview["templating"]["list"]}
    volume = variables["volume"]
    assert volume["type"] == "query"
    assert volume["query"]["query"] == "label_values(interposer_ops_total, volume)"
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in _panels(overview):
        assert panel["datasource"]["uid"] == "${datasource}"


def test_grafana_provisioning_is_wired(monitoring: list[Manifest]) -> None:
    pod = pod_spec_of(find(monitoring, "Deployment", "grafana"))
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    def mounted_at(configmap_prefix: str) -> str:
        cm = find_by_prefix(monitoring, "ConfigMap", configmap_prefix)
        names = [
            n for n, v in volumes.items() if v.get("configMap", {}).get("name") == cm["metadata"]["name"]
        ]
        assert len(names) == 1, f"ConfigMap {cm['metadata']['name']} is not mounted once in Grafana"
        return mounts[names[0]]

    providers = yaml.safe_load(
        find_by_prefix(monitoring, "ConfigMap", "grafana-provisioning-dashboards-")["data"]["dashboards.yaml"]
    )
    assert mounted_at("grafana-provisioning-dashboards-") == "/etc/grafana/provisioning/dashboards"
    assert mounted_at("grafana-provisioning-datasources-") == "/etc/grafana/provisioning/datasources"
    assert [p["options"]["path"] for p in providers["providers"]] == [
        mounted_at("grafana-dashboards-interposer-")
    ]

    datasources = yaml.safe_load(
        find_by_prefix(monitoring, "ConfigMap", "grafana-provisioning-datasources-")["data"][
            "datasources.yaml"
        ]
    )
    [ds] = datasources["datasources"]
    assert ds["uid"] == "prometheus" and ds["type"] == "prometheus"
    service = find(monitoring, "Service", "prometheus")
    assert ds["url"] == f"http://prometheus.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}"


def _collector(objects: list[Manifest]) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = pod_spec_of(find(objects, "Deployment", "interposer-collector"))
    [container] = pod["containers"]
    return container, find(objects, "Service", "interposer-collector")


def test_collector_service_matches_container(base: list[Manifest]) -> None:
    container, service = _collector(base)
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    [port] = service["spec"]["ports"]
    assert port["name"] == "metrics" and port["port"] == METRICS_PORT
    target = port["targetPort"]
    assert (container_ports[target] if isinstance(target, str) else target) == METRICS_PORT
    assert container_ports["metrics"] == METRICS_PORT
    args = container["args"]
    assert args[args.index("--listen") + 1] == f":{METRICS_PORT}", (
        "listen on all addresses, where the Service points"
    )
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == container["readinessProbe"]["httpGet"]["path"] == "/metrics"
    labels = find(base, "Deployment", "interposer-collector")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), "the Service selects no collector pod"


def test_collectors_share_load(base: list[Manifest]) -> None:
    assert find(base, "Deployment", "interposer-collector")["spec"]["replicas"] >= 2


def test_prometheus_scrapes_every_collector(monitoring: list[Manifest]) -> None:
    config = yaml.safe_load(
        find_by_prefix(monitoring, "ConfigMap", "prometheus-config-")["data"]["prometheus.yml"]
    )
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "interposer"]
    [sd] = job["kubernetes_sd_configs"]
    assert sd["role"] in {"endpointslice", "endpoints", "pod"}, "scrape each replica, not the ClusterIP"
    assert NAMESPACE in sd["namespaces"]["names"]
    keep = {
        tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"
    }
    assert keep[("__meta_kubernetes_service_annotation_prometheus_io_scrape",)] == "true"
    _, service = _collector(monitoring)
    assert keep[("__meta_kubernetes_endpointslice_port_name",)] == service["spec"]["ports"][0]["name"]

    role = find(monitoring, "Role", "prometheus")
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert ("discovery.k8s.io", "endpointslices") in granted
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in role["rules"]), "read-only"


def _quantity_bytes(text: str) -> int:
    """A Kubernetes quantity of bytes (``1Gi``, ``512Mi``, ``1000``) as an int."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, scale in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * scale)
    return int(text)


def test_monitoring_collectors_record_into_a_volume_that_holds_the_cap(
        all_rendered: dict[str, list[Manifest]]) -> None:
    """`interposer analyze` needs recordings: each collector writes them to its own volume, and the
    retention cap plus the file being written (rotated at 64 MiB) must fit, or the kubelet evicts the pod."""
    from interposer.collector._config import DEFAULT_RECORD_ROTATE_BYTES

    deployment = find(all_rendered["deploy/overlays/monitoring"], "Deployment", "interposer-collector")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args, env = container["args"], {e["name"]: e.get("value", "") for e in container["env"]}

    def flag(name: str) -> str:
        value = args[args.index(name) + 1]
        return env[value[2:-1]] if value.startswith("$(") else value  # the kubelet expands $(VAR)

    record_dir, max_bytes = flag("--record-dir"), int(flag("--record-max-bytes"))
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == record_dir]
    assert not mount.get("readOnly")
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    room = _quantity_bytes(volume["emptyDir"]["sizeLimit"])
    assert max_bytes + DEFAULT_RECORD_ROTATE_BYTES <= room
    assert _quantity_bytes(container["resources"]["requests"]["ephemeral-storage"]) >= room
    [base] = find(all_rendered["deploy/base"], "Deployment", "interposer-collector")["spec"]["template"]["spec"][
        "containers"]
    assert {e["name"]: e["value"] for e in base["env"]}["INTERPOSER_RECORD_DIR"] == "", "opt-in, off in the base"
