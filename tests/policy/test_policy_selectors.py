"""Selector policies ("fleet push"): validation, merge order, and real workers picking them up."""

from __future__ import annotations

import asyncio
import errno
import json
import time

import pytest
from interposer_testing import read_errno, wait_until

from click.testing import CliRunner

from interposer.cli.__main__ import main as cli
from interposer.cli._policy_client import policy_status, request, set_policy
from interposer.proto import (
    FaultLayer,
    Policy,
    PolicyError,
    PolicyRecord,
    Selector,
    decode_selector_request,
    subjects,
)
from interposer.proto.selector import effective_policy, selected


def _record(selector: Selector | None, errno_name: str, priority: int = 0) -> PolicyRecord:
    policy = Policy(layers=[FaultLayer(errno=errno_name)])
    return PolicyRecord(policy=policy, updated_at_s=0.0, selector=selector, priority=priority)


def test_selectors_match_by_glob_and_never_on_unknown_values() -> None:
    ml = Selector(namespace="ml", pod="train-*")
    assert ml.matches(volume="v", namespace="ml", pod="train-3", node="")
    assert not ml.matches(volume="v", namespace="ml", pod="infer-3", node="")
    assert not ml.matches(volume="v", namespace="", pod="train-3", node="")
    assert not Selector(node="n1").matches(volume="v", namespace="ml", pod="p", node="")
    assert Selector(all=True).matches(volume="v", namespace="", pod="", node="")
    assert Selector(volume="db-*").matches(volume="db-1", namespace="", pod="", node="")


def test_label_selectors_need_every_label_exactly_and_never_match_unknown_labels() -> None:
    trainer = Selector(namespace="ml", labels={"app": "trainer", "tier": "gpu"})
    pod = {"app": "trainer", "tier": "gpu", "other": "x"}
    assert trainer.matches(volume="v", namespace="ml", pod="p", node="", labels=pod)
    assert not trainer.matches(volume="v", namespace="ml", pod="p", node="", labels={"app": "trainer"})
    assert not trainer.matches(volume="v", namespace="ml", pod="p", node="", labels={**pod, "tier": "cpu"})
    assert not trainer.matches(volume="v", namespace="web", pod="p", node="", labels=pod)
    assert not trainer.matches(volume="v", namespace="ml", pod="p", node="")  # labels unknown
    assert not Selector(labels={"app": "trainer*"}).matches(volume="v", namespace="", pod="", node="",
                                                             labels=pod), "label values are not globs"
    assert Selector(labels={"canary": ""}).matches(volume="v", namespace="", pod="", node="",
                                                   labels={"canary": ""})


@pytest.mark.parametrize(("body", "where"), [
    (b'{"selector": {}, "policy": {}}', "`all: true`"),
    (b'{"selector": {"all": true, "pod": "x"}, "policy": {}}', "field `all`"),
    (b'{"selector": {"labels": {"a b": "c"}}, "policy": {}}', "`key` in `$.selector.labels`"),
    (b'{"selector": {"labels": {"app": "-x"}}, "policy": {}}', "$.selector.labels"),
    (b'{"selector": {"lables": {"app": "x"}}, "policy": {}}', "lables"),
    (b'{"selector": {"all": true}, "policy": {"layers": [{"type": "fault", "errno": "EFOO"}]}}', "EFOO"),
    (b'{"selector": {"all": true}, "priority": 5000}', "$.priority"),
    (b'{"policy": {}}', "selector"),
])
def test_bad_selector_requests_are_rejected_naming_the_field(body: bytes, where: str) -> None:
    with pytest.raises(PolicyError) as info:
        decode_selector_request(body)
    assert where in str(info.value)


def test_merge_order_is_own_policy_then_priority_then_name() -> None:
    own = Policy(layers=[FaultLayer(errno="EPERM")], description="own")
    selectors = {
        "b-low": _record(Selector(namespace="ml"), "EIO", priority=0),
        "a-low": _record(Selector(namespace="ml"), "ENOSPC", priority=0),
        "high": _record(Selector(all=True), "EACCES", priority=10),
        "other": _record(Selector(namespace="web"), "EROFS", priority=99),
        "gone": _record(None, "EBUSY", priority=99),  # unselected
    }
    chosen = selected(selectors, volume="v", namespace="ml", pod="p", node="n")
    assert [name for name, _ in chosen] == ["high", "a-low", "b-low"]
    merged = effective_policy(own, chosen)
    assert [layer.errno for layer in merged.layers] == ["EPERM", "EACCES", "ENOSPC", "EIO"]
    assert "_sel.high" in merged.description
    assert effective_policy(own, []) is own


def _select(nats_url: str, name: str, body: dict) -> int:
    reply = asyncio.run(request(nats_url, subjects.policy_select(name), json.dumps(body).encode()))
    assert reply.ok, reply.error
    return reply.revision or 0


def _unselect(nats_url: str, name: str) -> None:
    reply = asyncio.run(request(nats_url, subjects.policy_unselect(name), b""))
    assert reply.ok, reply.error


EIO_READS = {"layers": [{"type": "fault", "errno": "EIO", "ops": ["read"]}]}


def test_a_selector_reaches_matching_workers_only_and_unselect_removes_it(
        nats_url, policy_service, mount_worker, fresh_volume) -> None:
    namespace = f"ml-{fresh_volume}"
    inside = mount_worker(f"{fresh_volume}-a", nats_url=nats_url,
                          extra=["--pod-namespace", namespace, "--pod-name", "train-0"])
    outside = mount_worker(f"{fresh_volume}-b", nats_url=nats_url,
                           extra=["--pod-namespace", f"web-{fresh_volume}", "--pod-name", "train-0"])
    for volume in (inside, outside):
        (volume.mountpoint / "data").write_bytes(b"x" * 8192)
    name = f"sel-{fresh_volume}"
    revision = _select(nats_url, name, {"selector": {"namespace": namespace}, "policy": EIO_READS})
    try:
        wait_until(lambda: read_errno(inside.mountpoint / "data") == errno.EIO, "the selector to reach the worker")
        time.sleep(0.3)  # the other worker got the same KV update at the same moment
        assert read_errno(outside.mountpoint / "data") == 0
        # Only the selected worker reports the selector's revision as applied (the
        # other one did not rebuild its stack).
        applied = {v.volume: max((w.applied_revision for w in v.workers), default=0)
                   for v in asyncio.run(policy_status(nats_url)).volumes}
        assert applied[f"{fresh_volume}-a"] == revision
        assert applied[f"{fresh_volume}-b"] < revision
    finally:
        _unselect(nats_url, name)
    wait_until(lambda: read_errno(inside.mountpoint / "data") == 0, "unselect to reach the worker")


def test_a_worker_starting_later_serves_its_own_and_its_selectors_policy_from_the_first_request(
        nats_url, policy_service, mount_worker, fresh_volume, tmp_path) -> None:
    name = f"late-{fresh_volume}"
    _select(nats_url, name, {"selector": {"pod": f"late-{fresh_volume}-*"}, "policy": EIO_READS,
                             "priority": 3})
    own = b'{"layers": [{"type": "fault", "errno": "ENOSPC", "ops": ["write"]}]}'
    assert asyncio.run(set_policy(nats_url, fresh_volume, own)).ok
    backing = tmp_path / "late-backing"
    backing.mkdir()
    (backing / "data").write_bytes(b"x" * 8192)
    try:
        volume = mount_worker(fresh_volume, nats_url=nats_url, backing=backing,
                              extra=["--pod-namespace", "any", "--pod-name", f"late-{fresh_volume}-0"])
        assert read_errno(volume.mountpoint / "data") == errno.EIO  # the very first read
        with pytest.raises(OSError) as info:
            (volume.mountpoint / "new").write_bytes(b"y")
        assert info.value.errno == errno.ENOSPC  # the volume's own policy is in force too
    finally:
        _unselect(nats_url, name)


def test_cli_select_validates_offline_and_unselect_needs_an_active_selector(
        nats_url, policy_service, fresh_volume, tmp_path) -> None:
    runner = CliRunner()
    bad = tmp_path / "bad.json"
    bad.write_text('{"selector": {}, "policy": {}}')
    rejected = runner.invoke(cli, ["policy", "select", "x", str(bad), "--nats-url", nats_url])
    assert rejected.exit_code == 1 and "all: true" in rejected.output
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"selector": {"volume": f"{fresh_volume}-*"}, "policy": EIO_READS}))
    name = f"cli-{fresh_volume}"
    stored = runner.invoke(cli, ["policy", "select", name, str(good), "--nats-url", nats_url])
    assert stored.exit_code == 0 and json.loads(stored.output)["ok"], stored.output
    listed = runner.invoke(cli, ["policy", "list", "--json", "--nats-url", nats_url])
    assert f"_sel.{name}" in {v["volume"] for v in json.loads(listed.output)["volumes"]}
    assert runner.invoke(cli, ["policy", "unselect", name, "--nats-url", nats_url]).exit_code == 0
    again = runner.invoke(cli, ["policy", "unselect", name, "--nats-url", nats_url])
    assert again.exit_code == 1 and "no active selector" in again.output
    assert runner.invoke(cli, ["policy", "select", "a.b", str(good), "--nats-url", nats_url]).exit_code == 2


def test_a_label_selector_reaches_the_workers_whose_pod_carries_the_labels(
        nats_url, policy_service, mount_worker, fresh_volume) -> None:
    trainer_labels = {"app": f"{fresh_volume}-trainer", "tier": "gpu"}
    trainer = mount_worker(f"{fresh_volume}-t", nats_url=nats_url, extra=[
        "--pod-namespace", "ml", "--pod-name", "train-0",
        "--pod-label", f"app={fresh_volume}-trainer", "--pod-label", "tier=gpu"])
    web = mount_worker(f"{fresh_volume}-w", nats_url=nats_url, extra=[
        "--pod-namespace", "ml", "--pod-name", "web-0", "--pod-label", f"app={fresh_volume}-web",
        "--pod-label", "tier=gpu"])
    for volume in (trainer, web):
        (volume.mountpoint / "data").write_bytes(b"x" * 8192)
    name, marker = f"lbl-{fresh_volume}", f"lbl-{fresh_volume}-web"
    _select(nats_url, name, {"selector": {"labels": trainer_labels}, "policy": EIO_READS})
    # A second selector that only the web worker matches: selectors reach a worker
    # through one watch, in order, so once it applied this one it has seen the first.
    marker_revision = _select(nats_url, marker, {"selector": {"labels": {"app": f"{fresh_volume}-web"}},
                                                 "policy": {"layers": [{"type": "delay", "delay_s": 0}]}})
    try:
        wait_until(lambda: read_errno(trainer.mountpoint / "data") == errno.EIO, "the label selector")

        def web_applied() -> int:
            status = asyncio.run(policy_status(nats_url, f"{fresh_volume}-w"))
            return max((w.applied_revision for v in status.volumes for w in v.workers), default=0)

        wait_until(lambda: web_applied() == marker_revision, "the web worker to apply the later selector")
        assert read_errno(web.mountpoint / "data") == 0, "the web pod lacks app=…-trainer"
        status = asyncio.run(policy_status(nats_url, f"{fresh_volume}-t"))
        assert [w.labels for v in status.volumes for w in v.workers] == [trainer_labels]  # from the heartbeat
    finally:
        _unselect(nats_url, name)
        _unselect(nats_url, marker)


def test_the_worker_refuses_malformed_pod_labels(tmp_path) -> None:
    import subprocess
    import sys

    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    base = [sys.executable, "-m", "interposer.fuse_worker", "--backing-dir", str(tmp_path / "b"),
            "--mountpoint", str(tmp_path / "m")]
    for label, message in (("tier", "'tier' is not KEY=VALUE"), ("a b=c", "pod_labels")):
        proc = subprocess.run([*base, "--pod-label", label], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
