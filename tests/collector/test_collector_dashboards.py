"""Every Grafana panel, with its template variables filled in, returns data from a real Prometheus.

A real worker mount (initial policy: faults, delay and throttling on some paths, a quota) runs a
small workload; its events go over a real NATS to a real collector, which a real
Prometheus (``/usr/bin/prometheus``, loopback, 1 s scrapes) scrapes. Each template
variable is resolved through Prometheus's label-values API (and must offer the test's
pod and volume), then every target of every panel is evaluated through the HTTP API.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from collector_helpers import SCRAPE_TIMEOUT_S, CollectorProcess, PrometheusServer, wait_for

from interposer_testing import REPO_ROOT, MountedVolume

pytestmark = [pytest.mark.nats, pytest.mark.prometheus, pytest.mark.fuse]

MONITORING_DIR = REPO_ROOT / "deploy" / "overlays" / "monitoring"
DASHBOARD_DIR = MONITORING_DIR / "dashboards"
#: How long every panel gets to show data once the workload runs, seconds.
PANELS_TIMEOUT_S = 60.0
#: What the test substitutes for Grafana's ``$__rate_interval`` (≥ 4 scrape intervals).
RATE_INTERVAL = "1m"
NAMESPACE, POD = "team-a", "trainer-0"
#: Initial policy: EIO on reads of /faulty*, 1 ms delay on reads of /data/*, 256 KiB/s on /slow/*,
#: a quota far above what the workload uses (for the quota panels), and a read throttle with a
#: credit bucket far above what the workload spends (for the burst-balance panel).
POLICY = {"layers": [
    {"type": "quota", "bytes": 1 << 30, "inodes": 100_000},
    {"type": "throttle", "iops": 100_000, "burst_ops": 1_000_000, "ops": ["read"], "path_glob": "/data/*"},
    {"type": "fault", "errno": "EIO", "probability": 1.0, "ops": ["read"], "path_glob": "/faulty*"},
    {"type": "delay", "delay_s": 0.001, "ops": ["read"], "path_glob": "/data/*"},
    {"type": "throttle", "rate_bytes_per_s": 262144, "ops": ["write"], "path_glob": "/slow/*"},
]}


def _dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))}


def test_every_dashboard_file_is_provisioned() -> None:
    kustomization = yaml.safe_load((DASHBOARD_DIR / "kustomization.yaml").read_text())
    [generator] = [g for g in kustomization["configMapGenerator"] if g["name"] == "grafana-dashboards-interposer"]
    assert sorted(Path(f).name for f in generator["files"]) == sorted(_dashboards())
    assert {"interposer-overview.json", "interposer-volume.json"} <= set(_dashboards())
    uids = [d["uid"] for d in _dashboards().values()]
    assert len(uids) == len(set(uids))


def test_drill_down_has_chained_pod_and_volume_variables() -> None:
    dashboard = _dashboards()["interposer-volume.json"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "$namespace" in variables["pod"]["query"]["query"]
    assert "$pod" in variables["volume"]["query"]["query"]
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert '$volume' in target["expr"], f"{panel['title']} ignores the volume selector"


def _label_values(prometheus: PrometheusServer, query: str) -> list[str]:
    """Evaluate a Grafana ``label_values([selector, ]label)`` variable query through the API."""
    m = re.fullmatch(r"\s*label_values\((?:(.*),\s*)?(\w+)\s*\)\s*", query)
    assert m, f"unsupported variable query {query!r}"
    selector, label = m.groups()
    params = urllib.parse.urlencode({"match[]": selector} if selector else {})
    url = f"{prometheus.base_url}/api/v1/label/{label}/values?{params}"
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def _fill(text: str, values: dict[str, str]) -> str:
    """Replace ``$name`` / ``${name}`` by regex-escaped values (variables are used with ``=~``)."""
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name == "__rate_interval":
            return RATE_INTERVAL
        return re.escape(values[name]).replace("\\", "\\\\")

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, text)


def _resolve_variables(prometheus: PrometheusServer, dashboard: dict[str, Any], wanted: dict[str, str]) -> dict[str, str]:
    """Fill the dashboard's query variables in order, checking each offers the wanted value."""
    values: dict[str, str] = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = _fill(variable["query"]["query"], values)
        offered = _label_values(prometheus, query)
        name = variable["name"]
        if wanted[name] not in offered:
            return {}
        values[name] = wanted[name]
    return values


def _has_data(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def _workload(mountpoint: Path, stop: threading.Event, errors: list[BaseException]) -> None:
    """Reads/writes with faults and delay; throttled writes in a second thread."""

    def data() -> None:
        (mountpoint / "data").mkdir(exist_ok=True)
        (mountpoint / "faulty").write_bytes(b"f" * 4096)
        block = os.urandom(65536)
        i = 0
        while not stop.is_set():
            path = mountpoint / "data" / f"f{i % 8}"
            path.write_bytes(block)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            os.read(fd, 65536)
            os.close(fd)
            fd = os.open(mountpoint / "faulty", os.O_RDONLY | os.O_DIRECT)
            try:
                os.read(fd, 4096)
                raise AssertionError("the fault layer did not fail a read of /faulty")
            except OSError as exc:
                assert exc.errno == errno.EIO, exc
            finally:
                os.close(fd)
            i += 1

    def slow() -> None:
        (mountpoint / "slow").mkdir(exist_ok=True)
        with open(mountpoint / "slow" / "x", "wb") as out:
            while not stop.is_set():
                out.write(b"s" * 65536)
                out.flush()

    def guarded(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(fn,), daemon=True) for fn in (data, slow)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join(10)


def test_every_panel_returns_data_from_a_real_prometheus(
        nats_url: str, start_collector: Callable[..., CollectorProcess],
        start_prometheus: Callable[[list[int]], PrometheusServer],
        mount_worker: Callable[..., MountedVolume]) -> None:
    collector = start_collector()
    prometheus = start_prometheus([collector.port])
    volume = f"dash-{uuid.uuid4().hex[:8]}"
    vol = mount_worker(volume, nats_url=nats_url, policy=json.dumps(POLICY),
                       extra=["--pod-namespace", NAMESPACE, "--pod-name", POD])
    wanted = {"namespace": NAMESPACE, "pod": POD, "volume": volume}
    stop, errors = threading.Event(), []
    workload = threading.Thread(target=_workload, args=(vol.mountpoint, stop, errors), daemon=True)
    workload.start()
    missing: list[str] = []
    try:
        def all_panels_have_data() -> bool:
            assert not errors, errors
            missing.clear()
            for file_name, dashboard in _dashboards().items():
                values = _resolve_variables(prometheus, dashboard, wanted)
                if not values:
                    missing.append(f"{file_name}: template variables do not offer {wanted} yet")
                    continue
                for panel in dashboard["panels"]:
                    for target in panel["targets"]:
                        expr = _fill(target["expr"], values)
                        if not _has_data(prometheus.query(expr)):
                            missing.append(f"{file_name} / {panel['title']} / {target['refId']}: {expr}")
            return not missing

        try:
            wait_for(all_panels_have_data, timeout_s=PANELS_TIMEOUT_S, interval_s=1.0, what="every panel's data")
        except AssertionError:
            raise AssertionError("panels without data:\n" + "\n".join(missing)) from None
    finally:
        stop.set()
        workload.join(15)
    assert not errors, errors
