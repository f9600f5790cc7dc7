"""The alerting rules the monitoring overlay ships (``deploy/overlays/monitoring/alerts.yml``).

Each alert runs in ``promtool test rules`` (Prometheus's own rule unit tests) over
synthetic series: it fires when it should, with the labels and the rendered text an
on-call engineer gets, and stays quiet where it must (a collector cut off from NATS,
a volume silent for over an hour, delays served on time, a pending ``for``).
``tests/collector/test_collector_alerts.py`` runs the same file in a real Prometheus
against a real collector and worker. Nothing skips: without promtool these fail.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from deploy_support import DEPLOY_DIR, Manifest, find_by_prefix, metric_names

from interposer.collector._metrics import METRICS
from interposer.collector._recorder import RECORDER_METRICS

#: The Debian package's promtool (``make setup`` installs prometheus).
PROMTOOL = "/usr/bin/promtool"
RULES = DEPLOY_DIR / "overlays" / "monitoring" / "alerts.yml"
SEVERITIES = {"critical", "warning", "info"}

#: Labels a volume metric has once scraped by the deployed job (honor_labels keeps its namespace/pod).
VOL = 'volume="v1",namespace="team-x",pod="trainer-0",instance="10.0.0.5:9464",job="interposer"'
#: Labels of the collector replica's own metrics (target labels of the deployed job).
REPLICA = {"namespace": "interposer-system", "pod": "interposer-collector-0", "service": "interposer-collector",
           "instance": "10.0.0.5:9464", "job": "interposer"}
COLL = ",".join(f'{k}="{v}"' for k, v in REPLICA.items())
VOLUME_LABELS = {"volume": "v1", "namespace": "team-x", "pod": "trainer-0"}


@dataclass
class Case:
    """One evaluation of one alert.

    Attributes:
        alert: alert name.
        series: input series (``name{labels}``) → promtool's expanding notation, one
            sample per minute (``'1 0x5'``, ``'0+10x30'``).
        at: evaluation time (``'5m'``).
        fires: the alerts expected then: (labels besides ``severity``, the text
            ``$value`` renders to); empty = quiet.
    """

    alert: str
    series: dict[str, str]
    at: str
    fires: list[tuple[dict[str, str], str]] = field(default_factory=list)


def _worker_down_series(up: str, nats_connected: str = "1x200") -> dict[str, str]:
    return {f"interposer_worker_up{{{VOL}}}": up, f"interposer_collector_nats_connected{{{COLL}}}": nats_connected}


def _delay_series(late_s_per_min: int, delayed_ops_per_min: int) -> dict[str, str]:
    # 1 s of injected delay per second (60 s a minute) on reads.
    return {f'interposer_injected_delay_seconds_total{{{VOL},op="read"}}': "0+60x30",
            f'interposer_delay_lateness_seconds_sum{{{VOL},op="read"}}': f"0+{late_s_per_min}x30",
            f'interposer_delay_lateness_seconds_count{{{VOL},op="read"}}': f"0+{delayed_ops_per_min}x30"}


CASES = [
    # Silent from minute 2: pending at 3 m, firing once `for: 2m` has passed.
    Case("InterposerWorkerDown", _worker_down_series("1 1 0x200"), "3m"),
    Case("InterposerWorkerDown", _worker_down_series("1 1 0x200"), "5m", [(VOLUME_LABELS, "")]),
    # The only replica is cut off from NATS: its 0 says nothing about the worker.
    Case("InterposerWorkerDown", _worker_down_series("1 1 0x200", nats_connected="1 1 0x200"), "5m"),
    # Another replica still hears the worker.
    Case("InterposerWorkerDown", {**_worker_down_series("0x200"),
                                  f'interposer_worker_up{{{VOL.replace("10.0.0.5", "10.0.0.6")}}}': "1x200"}, "5m"),
    # The collector forgets a silent worker after an hour (--forget-silent-after): its series ends, so does
    # the alert (Prometheus marks a series stale 5 minutes after its last sample).
    Case("InterposerWorkerDown", _worker_down_series("0x60"), "50m", [(VOLUME_LABELS, "")]),
    Case("InterposerWorkerDown", _worker_down_series("0x60"), "70m"),

    Case("InterposerWorkerInternalErrors", {f"interposer_worker_internal_errors_total{{{VOL}}}": "0x10 0+1x30"},
         "25m", [(VOLUME_LABELS, "10")]),
    Case("InterposerWorkerInternalErrors", {f"interposer_worker_internal_errors_total{{{VOL}}}": "3x30"}, "25m"),

    Case("InterposerWorkerMemoryNearLimit", {f"interposer_worker_resident_memory_bytes{{{VOL}}}": "1020054733x10",
                                             f"interposer_worker_memory_limit_bytes{{{VOL}}}": "1073741824x10"},
         "6m", [(VOLUME_LABELS, "95%")]),  # 0.95 of 1 GiB
    Case("InterposerWorkerMemoryNearLimit", {f"interposer_worker_resident_memory_bytes{{{VOL}}}": "1020054733x10"},
         "6m"),  # no limit: nothing to be near
    Case("InterposerEventsDropped", {f"interposer_events_dropped_total{{{VOL}}}": "0+50x30"}, "25m",
         [(VOLUME_LABELS, "500")]),
    Case("InterposerEventsDropped", {f"interposer_events_dropped_total{{{VOL}}}": "7x30"}, "25m"),

    # 0.2 s late per s of delay (20 %), 1000 delayed ops/s: 200 µs each.
    Case("InterposerDelaysLate", _delay_series(12, 60_000), "8m"),  # pending: for 10m
    Case("InterposerDelaysLate", _delay_series(12, 60_000), "16m", [(VOLUME_LABELS, "")]),
    Case("InterposerDelaysLate", _delay_series(3, 60_000), "16m"),  # 5 %: within the emulation's slack
    Case("InterposerDelaysLate", _delay_series(12, 6_000_000), "16m"),  # 2 µs each: timer slack

    Case("InterposerQuotaNearlyFull", {f"interposer_quota_used_bytes{{{VOL}}}": "950x10",
                                       f"interposer_quota_limit_bytes{{{VOL}}}": "1000x10"}, "6m",
         [(VOLUME_LABELS, "95%")]),
    Case("InterposerQuotaNearlyFull", {f"interposer_quota_used_bytes{{{VOL}}}": "10x10",
                                       f"interposer_quota_limit_bytes{{{VOL}}}": "1000x10",
                                       f"interposer_quota_used_inodes{{{VOL}}}": "50x10",
                                       f"interposer_quota_limit_inodes{{{VOL}}}": "50x10"}, "6m",
         [(VOLUME_LABELS, "100%")]),
    # No limit (a quota that counts only): nothing to be near.
    Case("InterposerQuotaNearlyFull", {f"interposer_quota_used_bytes{{{VOL}}}": "950x10"}, "6m"),

    Case("InterposerBurstBalanceLow", {f"interposer_burst_balance_ratio{{{VOL}}}": "0.1x10"}, "6m",
         [(VOLUME_LABELS, "10%")]),
    Case("InterposerBurstBalanceLow", {f"interposer_burst_balance_ratio{{{VOL}}}": "0.5x10"}, "6m"),

    Case("InterposerOpenFilesBypassingPolicy", {f"interposer_open_files_bypassing_layers{{{VOL}}}": "2x20"}, "11m",
         [(VOLUME_LABELS, "2")]),
    Case("InterposerOpenFilesBypassingPolicy", {f"interposer_open_files_bypassing_layers{{{VOL}}}": "0x20"}, "11m"),

    Case("InterposerCollectorDown", {f"up{{{COLL}}}": "1 0x10"}, "7m", [(REPLICA, "")]),
    Case("InterposerCollectorDown", {f"up{{{COLL}}}": "1x10"}, "7m"),

    # Only the collector's own `up` counts (another job's target is not it).
    Case("InterposerCollectorMissing", {'up{job="kubelet",instance="10.0.0.9:10250"}': "1x20"}, "11m",
         [({"service": "interposer-collector"}, "")]),
    Case("InterposerCollectorMissing", {f"up{{{COLL}}}": "0x20"}, "11m"),  # there, if down: CollectorDown's case
    Case("InterposerCollectorNatsDisconnected", {f"interposer_collector_nats_connected{{{COLL}}}": "0x5"}, "3m",
         [(REPLICA, "")]),
    Case("InterposerCollectorNatsDisconnected", {f"interposer_collector_nats_connected{{{COLL}}}": "1x5"}, "3m"),

    Case("InterposerCollectorFallingBehind", {f"interposer_collector_slow_consumer_drops_total{{{COLL}}}": "0+5x20"},
         "15m", [(REPLICA, "50")]),
    Case("InterposerCollectorFallingBehind", {f"interposer_collector_slow_consumer_drops_total{{{COLL}}}": "0x20"},
         "15m"),

    Case("InterposerCollectorDecodeErrors", {f"interposer_collector_decode_errors_total{{{COLL}}}": "0+2x20"},
         "15m", [(REPLICA, "20")]),
    Case("InterposerCollectorDecodeErrors", {f"interposer_collector_decode_errors_total{{{COLL}}}": "4x20"}, "15m"),

    Case("InterposerCollectorRecordingFailing", {f"interposer_collector_record_errors_total{{{COLL}}}": "0+1x20"},
         "15m", [(REPLICA, "10")]),
    Case("InterposerCollectorRecordingFailing", {f"interposer_collector_record_errors_total{{{COLL}}}": "3x20"},
         "15m"),
]


def _alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
            if "alert" in rule]


_VALUE = re.compile(r'\$value(?:\s*\|\s*(?:humanize|humanizePercentage))?|printf\s+"%\.0f"\s+\$value')


def _rendered(template: str, labels: dict[str, str], value_text: str) -> str:
    """The annotation text Prometheus renders, for the few template forms the rules use."""
    def one(m: re.Match[str]) -> str:
        inner = m.group(1).strip()
        if label := re.fullmatch(r"\$labels\.(\w+)", inner):
            return labels[label.group(1)]
        if _VALUE.fullmatch(inner):
            return value_text
        raise AssertionError(f"template form not handled by this test: {{{{ {inner} }}}}")

    return re.sub(r"\{\{(.*?)\}\}", one, template)


def _promtool_tests() -> dict:
    rules = {rule["alert"]: rule for rule in _alert_rules()}
    tests = []
    for case in CASES:
        rule = rules[case.alert]
        expected = []
        for labels, value_text in case.fires:
            alert_labels = {**labels, **rule.get("labels", {})}
            annotations = {k: _rendered(v, alert_labels, value_text) for k, v in rule["annotations"].items()}
            expected.append({"exp_labels": alert_labels, "exp_annotations": annotations})
        tests.append({
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
            "alert_rule_test": [{"eval_time": case.at, "alertname": case.alert, "exp_alerts": expected}],
        })
    return {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}


@pytest.fixture(scope="module")
def promtool() -> str:
    if not os.access(PROMTOOL, os.X_OK):
        pytest.fail(f"{PROMTOOL} is missing: apt-get install prometheus (make setup does)")
    return PROMTOOL


def test_the_rules_file_is_valid(promtool: str) -> None:
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_alert_fires_when_it_should_and_only_then(promtool: str, tmp_path: Path) -> None:
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(yaml.safe_dump(_promtool_tests(), sort_keys=False))
    done = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    names = {rule["alert"] for rule in _alert_rules()}
    assert names == {case.alert for case in CASES if case.fires}
    assert names == {case.alert for case in CASES if not case.fires}


def test_alerts_have_a_severity_and_say_what_happened_and_what_to_do() -> None:
    for rule in _alert_rules():
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert rule["alert"].startswith("Interposer"), rule["alert"]


def _exported_metric_names() -> set[str]:
    """Every sample name the collector's /metrics can carry (from its metric tables; the recorder's
    counters only while it records)."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    return ({name + suffix for name, kind, _labels, _help in METRICS for suffix in suffixes[kind]}
            | {name + "_total" for name, _help in RECORDER_METRICS})


def test_alerts_use_only_metrics_the_collector_exports() -> None:
    exported = _exported_metric_names() | {"up"}
    for rule in _alert_rules():
        used = metric_names(rule["expr"])
        assert used and used <= exported, (rule["alert"], used - exported)


def test_the_deployed_prometheus_loads_the_rules(promtool: str, render, tmp_path: Path) -> None:  # noqa: ANN001
    """The rendered ConfigMap holds prometheus.yml and the rules it names, and promtool accepts both.

    Debian's Prometheus is built without Kubernetes service discovery, so the scrape
    jobs' ``kubernetes_sd_configs`` are swapped for static targets before the check.
    """
    objects: list[Manifest] = render("deploy/overlays/monitoring")
    config_map = find_by_prefix(objects, "ConfigMap", "prometheus-config")
    for key, text in config_map["data"].items():
        (tmp_path / key).write_text(text)
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    assert config["rule_files"] == ["alerts.yml"]
    assert config_map["data"]["alerts.yml"] == RULES.read_text()
    for job in config["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["127.0.0.1:9464"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in done.stdout, done.stdout
