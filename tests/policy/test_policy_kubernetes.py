"""``InterposerPolicy`` resources reconciled by the real policy service (``--kubernetes``).

A fake API server stands in for Kubernetes (``tests/kube_api_fake.py``) because
no Kubernetes API server can run here: no cluster, no container engine, no etcd.
It is real HTTP, so the policy service runs unchanged as a process with the real
``kubernetes`` client and a kubeconfig, against a real nats-server; the tests
create, change and delete resources with the same client, as ``kubectl`` would,
and the fake enforces the CRD's schema from ``deploy/base/crd``.

What this cannot show: the real API server's watch cache and when it answers
``410 Gone`` (the fake does on demand), RBAC enforcement (the calls the service
makes are compared with the ClusterRole instead: here and in tests/deploy),
field pruning and CEL, and in-cluster configuration (service account token).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from interposer.cli._policy_client import get_policy, policy_history, set_policy
from interposer.proto import PolicyRecord, decode_policy, resource, subjects
from interposer_testing import wait_until

DELAY = {"layers": [{"type": "delay", "delay_s": 0.001}], "description": "from k8s"}
FAULT = {"layers": [{"type": "fault", "errno": "EIO", "ops": ["read"]}]}
#: The calls the ClusterRole interposer-policy grants (deploy/base/rbac/policy-role.yaml).
GRANTED = {("get", resource.PLURAL), ("list", resource.PLURAL), ("watch", resource.PLURAL),
           ("patch", f"{resource.PLURAL}/status")}


def _accepted(status: dict[str, Any]) -> dict[str, Any]:
    (condition,) = [c for c in status["conditions"] if c["type"] == "Accepted"]
    return condition


def test_a_resource_is_stored_with_its_revision_and_accepted(kube) -> None:
    kube.create("team-a", "slow-data", {"target": {"volume": "k8s-vol-a"}, "policy": DELAY})
    status = kube.status_of("team-a", "slow-data", 1)
    condition = _accepted(status)
    assert (condition["status"], condition["reason"], condition["observedGeneration"]) == (
        "True", "Stored", 1)
    assert status["key"] == "k8s-vol-a"
    assert f"revision {status['revision']} of k8s-vol-a" in condition["message"]
    revision, record = kube.current("k8s-vol-a")
    assert revision == status["revision"]
    assert (record.author, record.action) == ("k8s:team-a/slow-data", "set")
    assert record.policy.description == "from k8s" and record.policy.layers[0].delay_s == 0.001
    stored = asyncio.run(get_policy(kube.url, "k8s-vol-a"))
    assert stored.revision == revision  # what `interposer policy get` shows

    kube.patch_spec("team-a", "slow-data", {"policy": FAULT})
    status = kube.status_of("team-a", "slow-data", 2)
    assert status["revision"] > revision and _accepted(status)["status"] == "True"
    revision2, record = kube.current("k8s-vol-a")
    assert revision2 == status["revision"] and record.policy.layers[0].errno == "EIO"
    assert kube.service_calls() <= GRANTED, "the service used a call its ClusterRole does not grant"


@pytest.mark.parametrize(("spec", "field"), [
    ({"target": {"volume": "k8s-vol-bad"}, "policy": {"layers": [{"type": "fault", "probability": 2}]}},
     "`spec.policy.layers[0].probability`"),
    ({"target": {"volume": "k8s-vol-bad"}, "policy": {"layers": [], "descripton": "typo"}}, "`descripton`"),
    ({"target": {"selector": {"namepsace": "ml"}}, "policy": {"layers": []}}, "`spec.target.selector`"),
    ({"target": {"volume": "k8s-vol-bad"}, "priority": 5, "policy": {}}, "field `priority`"),
    ({"target": {"volume": "k8s-vol-bad"}, "policy": {"expires_at_s": 1000.0}},
     "`spec.policy.expires_at_s`"),  # refused by the store, not by the decoder
])
def test_a_malformed_resource_names_the_field_and_changes_nothing(kube, spec, field) -> None:
    before = asyncio.run(set_policy(kube.url, "k8s-vol-bad", b'{"layers": []}', author="alice@lab"))
    selector_key = subjects.selector_key(resource.selector_name_of("team-b", "bad"))
    selector_before = kube.current(selector_key)
    kube.create("team-b", "bad", spec)
    try:
        status = kube.status_of("team-b", "bad", 1)
        condition = _accepted(status)
        assert (condition["status"], condition["reason"]) == ("False", "Invalid"), condition
        assert field in condition["message"], condition["message"]
        assert status["revision"] == 0 and status["key"] == ""
        assert kube.current("k8s-vol-bad")[0] == before.revision, "a rejected resource stored something"
        assert kube.current(selector_key) == selector_before
    finally:
        kube.delete("team-b", "bad")


def test_a_rejected_generation_keeps_the_last_accepted_one(kube) -> None:
    kube.create("team-c", "fix-me", {"target": {"volume": "k8s-vol-c"}, "policy": DELAY})
    good = kube.status_of("team-c", "fix-me", 1)
    kube.patch_spec("team-c", "fix-me", {"policy": {"layers": [{"type": "delay"}]}})
    bad = kube.status_of("team-c", "fix-me", 2)
    assert _accepted(bad)["status"] == "False" and "delay_s" in _accepted(bad)["message"]
    assert (bad["revision"], bad["key"]) == (good["revision"], "k8s-vol-c"), (
        "the accepted revision stays named")
    assert kube.current("k8s-vol-c")[0] == good["revision"]
    kube.patch_spec("team-c", "fix-me", {"policy": FAULT})
    fixed = kube.status_of("team-c", "fix-me", 3)
    assert _accepted(fixed)["status"] == "True" and fixed["revision"] > good["revision"]


def test_deleting_a_resource_clears_its_policy_but_not_one_set_after_it(kube) -> None:
    kube.create("team-d", "gone", {"target": {"volume": "k8s-vol-d"}, "policy": DELAY})
    stored = kube.status_of("team-d", "gone", 1)["revision"]
    kube.delete("team-d", "gone")
    wait_until(lambda: kube.current("k8s-vol-d")[0] > stored, "the clear after the deletion")
    revision, record = kube.current("k8s-vol-d")
    assert (record.action, record.author, record.policy.layers) == ("clear", "k8s:team-d/gone", [])
    assert "team-d/gone deleted" in record.policy.description

    kube.create("team-d", "overridden", {"target": {"volume": "k8s-vol-d2"}, "policy": DELAY})
    kube.status_of("team-d", "overridden", 1)
    mine = asyncio.run(set_policy(kube.url, "k8s-vol-d2", b'{"layers": []}', author="bob@lab"))
    kube.delete("team-d", "overridden")
    # Proof the deletion was handled: a resource created after it is handled after it.
    kube.create("team-d", "marker", {"target": {"volume": "k8s-vol-d3"}, "policy": DELAY})
    kube.status_of("team-d", "marker", 1)
    revision, record = kube.current("k8s-vol-d2")
    assert (revision, record.author) == (mine.revision, "bob@lab"), "the deletion cleared bob's later policy"


def test_a_selector_resource_and_its_deletion(kube) -> None:
    key = subjects.selector_key(resource.selector_name_of("ml", "train.slow"))
    assert key == "_sel.k8s_ml_train_slow"
    kube.create("ml", "train.slow", {"target": {"selector": {"namespace": "ml", "pod": "train-*",
                                                             "labels": {"app": "trainer"}}},
                                     "priority": 7, "policy": DELAY})
    status = kube.status_of("ml", "train.slow", 1)
    assert status["key"] == key and _accepted(status)["status"] == "True"
    revision, record = kube.current(key)
    assert revision == status["revision"] and record.action == "select"
    assert (record.selector.namespace, record.selector.pod, record.priority) == ("ml", "train-*", 7)
    assert record.selector.labels == {"app": "trainer"}
    kube.delete("ml", "train.slow")
    wait_until(lambda: kube.current(key)[0] > revision, "the unselect after the deletion")
    _, record = kube.current(key)
    assert (record.action, record.selector, record.author) == ("unselect", None, "k8s:ml/train.slow")


def test_a_retargeted_resource_releases_its_old_volume(kube) -> None:
    kube.create("team-e", "moving", {"target": {"volume": "k8s-vol-e1"}, "policy": DELAY})
    first = kube.status_of("team-e", "moving", 1)
    kube.patch_spec("team-e", "moving", {"target": {"volume": "k8s-vol-e2"}})
    second = kube.status_of("team-e", "moving", 2)
    assert second["key"] == "k8s-vol-e2" and kube.current("k8s-vol-e2")[0] == second["revision"]
    revision, record = kube.current("k8s-vol-e1")
    assert revision > first["revision"] and record.action == "clear", "the old volume kept the policy"


def test_a_410_gone_relists_and_catches_a_deletion_the_watch_missed(kube) -> None:
    kube.create("team-f", "missed", {"target": {"volume": "k8s-vol-f"}, "policy": DELAY})
    stored = kube.status_of("team-f", "missed", 1)["revision"]
    lists_before = sum(1 for verb, *_ in kube.kube.requests if verb == "list")
    with kube.kube.watches_paused():
        kube.delete("team-f", "missed")  # logged, never delivered to the open watch
        kube.kube.expire_watches()  # ...and compacted away: watching again gets 410 Gone
    wait_until(lambda: kube.current("k8s-vol-f")[0] > stored, "the sweep after the relist")
    _, record = kube.current("k8s-vol-f")
    assert (record.action, record.author) == ("clear", "k8s:team-f/missed")
    assert sum(1 for verb, *_ in kube.kube.requests if verb == "list") > lists_before


def test_a_later_cli_change_stands_across_a_relist_until_the_spec_changes(kube) -> None:
    kube.create("team-g", "base", {"target": {"volume": "k8s-vol-g"}, "policy": DELAY})
    kube.status_of("team-g", "base", 1)
    mine = asyncio.run(set_policy(kube.url, "k8s-vol-g", b'{"layers": []}', author="carol@lab"))
    lists_before = sum(1 for verb, *_ in kube.kube.requests if verb == "list")
    with kube.kube.watches_paused():
        kube.create("team-g", "marker", {"target": {"volume": "k8s-vol-g2"}, "policy": DELAY})
        kube.kube.expire_watches()  # the watch missed the marker: 410, and the service lists again
    kube.status_of("team-g", "marker", 1)  # handled in that list, after "base"
    assert sum(1 for verb, *_ in kube.kube.requests if verb == "list") > lists_before
    assert kube.current("k8s-vol-g")[0] == mine.revision, "a relist overwrote carol's later change"
    kube.patch_spec("team-g", "base", {"policy": FAULT})
    status = kube.status_of("team-g", "base", 2)
    revision, record = kube.current("k8s-vol-g")
    assert revision == status["revision"] > mine.revision and record.author == "k8s:team-g/base"


def test_nats_requests_cannot_claim_a_resource_as_author(kube) -> None:
    reply = asyncio.run(set_policy(kube.url, "k8s-vol-h", b'{"layers": []}', author="k8s:team-h/forged"))
    assert not reply.ok and "reserved for InterposerPolicy" in reply.error
    assert kube.current("k8s-vol-h") == (0, None)


def test_a_deletion_while_no_service_runs_is_caught_up_at_start(kube) -> None:
    kube.create("team-i", "offline", {"target": {"volume": "k8s-vol-i"}, "policy": DELAY})
    stored = kube.status_of("team-i", "offline", 1)["revision"]
    for child in kube.services:
        child.stop()
    kube.services.clear()
    kube.delete("team-i", "offline")
    kube.start_service()
    wait_until(lambda: kube.current("k8s-vol-i")[0] > stored, "the sweep at start")
    assert kube.current("k8s-vol-i")[1].action == "clear"


def test_two_replicas_store_each_generation_once(kube) -> None:
    watches = sum(1 for verb, *_ in kube.kube.requests if verb == "watch")
    kube.start_service()
    wait_until(lambda: sum(1 for verb, *_ in kube.kube.requests if verb == "watch") > watches,
               "the second replica to watch")
    try:
        kube.create("team-j", "twice", {"target": {"volume": "k8s-vol-j"}, "policy": DELAY})
        kube.status_of("team-j", "twice", 1)
        kube.patch_spec("team-j", "twice", {"policy": FAULT})
        kube.status_of("team-j", "twice", 2)
        kube.delete("team-j", "twice")
        wait_until(lambda: kube.current("k8s-vol-j")[1].action == "clear", "the clear")
        # Each replica handles events in order and writes the status of a new
        # resource once: two status writes of a later resource mean both replicas
        # are past the deletion.
        kube.create("team-j", "marker", {"target": {"volume": "k8s-vol-j2"}, "policy": DELAY})
        marker_status = ("patch", f"{resource.PLURAL}/status", "team-j/marker")
        wait_until(lambda: sum(1 for r in list(kube.kube.requests) if r[:3] == marker_status) >= 2,
                   "both replicas to report the later resource")
        history = asyncio.run(policy_history(kube.url, "k8s-vol-j"))
        assert [(e.action, e.author) for e in history.entries] == [
            ("set", "k8s:team-j/twice"), ("set", "k8s:team-j/twice"), ("clear", "k8s:team-j/twice")]
    finally:
        kube.services.pop().stop()
    assert kube.service_calls() <= GRANTED


def test_policy_service_flags_for_kubernetes(tmp_path) -> None:
    # Not in a pod, even where the tests themselves run in one (CI): no in-cluster config.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "interposer.policy", *args], capture_output=True,
                              text=True, timeout=60, env=env)

    alone = run("--kubeconfig", str(tmp_path / "k"))
    assert alone.returncode == 2 and "only used with --kubernetes" in alone.stderr
    missing = run("--kubernetes", "--kubeconfig", str(tmp_path / "missing"))
    assert missing.returncode == 2 and "no usable Kubernetes configuration" in missing.stderr
    outside = run("--kubernetes")  # no service account here
    assert outside.returncode == 2 and "--kubernetes" in outside.stderr


def test_a_condition_keeps_its_transition_time_until_its_status_changes() -> None:
    """``lastTransitionTime`` changes only with the condition's status; unchanged statuses are not written."""
    from interposer.policy._reconciler import Reconciler

    written: list[dict[str, Any]] = []
    ticks = iter(range(1, 100))

    async def write(namespace: str, name: str, status: dict[str, Any]) -> None:
        written.append(status)

    reconciler = Reconciler(service=None, write_status=write, read_resource=None,  # type: ignore[arg-type]
                            now=lambda: f"2024-01-01T00:00:{next(ticks):02d}Z")  # _report uses neither
    other = {"type": "Ready", "status": "True", "reason": "Elsewhere", "message": "",
             "lastTransitionTime": "2023-01-01T00:00:00Z"}
    obj: dict[str, Any] = {"metadata": {"namespace": "a", "name": "b", "generation": 1},
                           "status": {"conditions": [other]}}

    def report(reason: str, revision: int, generation: int) -> dict[str, Any]:
        obj["metadata"]["generation"] = generation
        asyncio.run(reconciler._report(obj, reason, f"{reason} {revision}", revision, "v"))
        obj["status"] = written[-1]
        return _accepted(written[-1])

    first = report("Stored", 3, 1)
    assert (first["status"], first["lastTransitionTime"], written[-1]["observedGeneration"]) == (
        "True", "2024-01-01T00:00:01Z", 1)
    assert other in written[-1]["conditions"], "another controller's condition was dropped"
    again = report("Stored", 4, 2)
    assert (again["lastTransitionTime"], again["observedGeneration"]) == ("2024-01-01T00:00:01Z", 2)
    count = len(written)
    report("Stored", 4, 2)
    assert len(written) == count, "an unchanged status was written again"
    rejected = report("Invalid", 4, 3)
    assert (rejected["status"], rejected["lastTransitionTime"]) == ("False", "2024-01-01T00:00:04Z")


def test_the_sweep_spares_a_resource_created_after_its_list(kube) -> None:
    """Another replica may store a resource this replica's list did not have yet: it is not cleared."""
    with kube.kube.watches_paused():
        kube.create("team-l", "early", {"target": {"volume": "k8s-vol-l0"}, "policy": DELAY})
        kube.create("team-l", "late", {"target": {"volume": "k8s-vol-l"}, "policy": DELAY})
        # What the other replica stored for "late" (same policy, its author).
        revision = kube.put_record("k8s-vol-l", PolicyRecord(
            policy=decode_policy(json.dumps(DELAY)), updated_at_s=time.time(), author="k8s:team-l/late"))
        lists = sum(1 for r in list(kube.kube.requests) if r.verb == "list")
        with kube.kube.lists_before("team-l", "late"):
            kube.kube.expire_watches()  # 410: this replica lists again, without "late"; then sweeps
            wait_until(lambda: sum(1 for r in list(kube.kube.requests) if r.verb == "list") > lists,
                       "the list without the late resource")
    status = kube.status_of("team-l", "late", 1)  # its ADDED event, after that list's sweep
    assert status["revision"] == revision and _accepted(status)["status"] == "True"
    history = asyncio.run(policy_history(kube.url, "k8s-vol-l"))
    assert [(e.revision, e.action) for e in history.entries] == [(revision, "set")], "the sweep cleared it"
    assert ("get", resource.PLURAL) in kube.service_calls()


def _ack(kube, namespace: str, name: str) -> tuple[int, int, list[str]] | None:
    status = (kube.kube.get(namespace, name) or {}).get("status") or {}
    if "targetedVolumes" not in status:
        return None
    return status["targetedVolumes"], status["appliedVolumes"], status["laggingVolumes"]


def _wait_ack(kube, namespace: str, name: str, expected: tuple[int, int, list[str]], timeout_s: float = 30) -> None:
    wait_until(lambda: _ack(kube, namespace, name) == expected,
               f"{namespace}/{name} to report (targeted, applied, lagging) = {expected}, "
               f"not {_ack(kube, namespace, name)}", timeout_s=timeout_s)


def test_the_status_counts_the_targeted_volumes_that_applied_the_revision_and_names_the_laggards(
        kube, mount_worker, fresh_volume) -> None:
    """Real workers heartbeat to the service; the resource's status follows what they applied."""
    import signal

    namespace = f"ack-{fresh_volume}"
    workers = {v: mount_worker(v, nats_url=kube.url, extra=["--pod-namespace", ns, "--pod-name", "train-0"])
               for v, ns in ((f"{fresh_volume}-a", namespace), (f"{fresh_volume}-b", namespace),
                             (f"{fresh_volume}-c", "elsewhere"))}
    a, b, _c = sorted(workers)
    started = time.monotonic()
    kube.create(namespace, "fleet", {"target": {"selector": {"namespace": namespace}}, "policy": DELAY})
    kube.status_of(namespace, "fleet", 1)
    _wait_ack(kube, namespace, "fleet", (2, 2, []))  # c is in another namespace: not targeted
    kube.create(namespace, "one", {"target": {"volume": a}, "policy": DELAY})
    _wait_ack(kube, namespace, "one", (1, 1, []))

    # b cannot apply the next generation while it is stopped (it stays "live" for
    # the service's worker_stale_after_s, 5 s, after its last heartbeat).
    os.kill(workers[b].proc.pid, signal.SIGSTOP)
    try:
        kube.patch_spec(namespace, "fleet", {"policy": FAULT})
        kube.status_of(namespace, "fleet", 2)
        _wait_ack(kube, namespace, "fleet", (2, 1, [b]), timeout_s=4)
    finally:
        os.kill(workers[b].proc.pid, signal.SIGCONT)
    _wait_ack(kube, namespace, "fleet", (2, 2, []))
    assert kube.kube.get(namespace, "fleet")["status"]["revision"] == kube.current(
        subjects.selector_key(resource.selector_name_of(namespace, "fleet")))[0]

    # Rate-limited: at most one acknowledgement patch per resource per second.
    elapsed_s = time.monotonic() - started
    patches = [r for r in list(kube.kube.requests)
               if r.verb == "patch" and r.resource == f"{resource.PLURAL}/status"
               and r.name == f"{namespace}/fleet"]
    assert len(patches) <= 2 * (elapsed_s + 2), patches  # Accepted and acknowledgement writes
    kube.delete(namespace, "fleet")
    kube.delete(namespace, "one")
