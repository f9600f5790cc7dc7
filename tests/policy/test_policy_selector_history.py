"""`interposer policy history|rollback` of a selector policy by its name, over a real nats-server.

A selector's KV key ``_sel.<name>`` cannot be a subject token, so selectors have
their own request subjects (``interposer.policy.selector.history|rollback.<name>``);
the CLI takes ``_sel.NAME`` (as ``list`` shows it) or ``NAME --selector``.
"""

from __future__ import annotations

import asyncio
import errno
import json

from click.testing import CliRunner
from interposer_testing import read_errno, wait_until

from interposer.cli.__main__ import main as cli
from interposer.cli._policy_client import policy_history, request, rollback_policy, set_policy
from interposer.proto import Selector, subjects

EIO_READS = {"layers": [{"type": "fault", "errno": "EIO", "ops": ["read"]}]}
DELAY = {"layers": [{"type": "delay", "delay_s": 0.001}]}


def _select(nats_url: str, name: str, body: dict, author: str = "ana@lab") -> int:
    reply = asyncio.run(request(nats_url, subjects.policy_select(name), json.dumps(body).encode(), author=author))
    assert reply.ok, reply.error
    return reply.revision or 0


def _unselect(nats_url: str, name: str) -> int:
    reply = asyncio.run(request(nats_url, subjects.policy_unselect(name), b""))
    assert reply.ok, reply.error
    return reply.revision or 0


def test_a_selectors_history_shows_each_revision_with_its_selector(nats_url, policy_service, fresh_volume) -> None:
    name = f"h-{fresh_volume}"
    r1 = _select(nats_url, name, {"selector": {"namespace": "ml"}, "policy": EIO_READS})
    r2 = _select(nats_url, name, {"selector": {"all": True}, "policy": DELAY, "priority": 5}, author="bo@lab")
    r3 = _unselect(nats_url, name)
    history = asyncio.run(policy_history(nats_url, name, selector=True))
    assert history.ok and history.volume == f"_sel.{name}"
    got = [(e.revision, e.author, e.action, e.selector, e.priority) for e in history.entries]
    assert got == [(r1, "ana@lab", "select", Selector(namespace="ml"), 0),
                   (r2, "bo@lab", "select", Selector(all=True), 5),
                   (r3, "", "unselect", None, 0)]

    runner = CliRunner()
    table = runner.invoke(cli, ["policy", "history", f"_sel.{name}", "--nats-url", nats_url])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert "SELECTOR" in lines[0] and "namespace=ml" in lines[1] and "all p=5" in lines[2]
    assert "(inactive)" in lines[3] and "unselect" in lines[3]
    by_flag = runner.invoke(cli, ["policy", "history", name, "--selector", "--json", "--nats-url", nats_url])
    assert [e["revision"] for e in json.loads(by_flag.output)["entries"]] == [r1, r2, r3]
    # A selector's name is not a volume: the volume of that name has no history.
    assert asyncio.run(policy_history(nats_url, name)).entries == []


def test_rolling_a_selector_back_restores_its_selector_priority_and_policy_on_the_workers(
        nats_url, policy_service, mount_worker, fresh_volume) -> None:
    name = f"rb-{fresh_volume}"
    volume = mount_worker(f"{fresh_volume}-v", nats_url=nats_url)
    (volume.mountpoint / "data").write_bytes(b"x" * 4096)
    faulty = _select(nats_url, name, {"selector": {"volume": f"{fresh_volume}-*"}, "policy": EIO_READS,
                                      "priority": 7})
    wait_until(lambda: read_errno(volume.mountpoint / "data") == errno.EIO, "the selector to reach the worker")
    _unselect(nats_url, name)
    wait_until(lambda: read_errno(volume.mountpoint / "data") == 0, "unselect to reach the worker")

    runner = CliRunner()
    back = runner.invoke(cli, ["policy", "rollback", f"_sel.{name}", str(faulty), "--author", "cy@lab",
                               "--nats-url", nats_url])
    assert back.exit_code == 0, back.output
    revision = json.loads(back.output)["revision"]
    wait_until(lambda: read_errno(volume.mountpoint / "data") == errno.EIO, "the rolled-back selector")
    last = asyncio.run(policy_history(nats_url, name, selector=True)).entries[-1]
    assert (last.revision, last.action, last.source_revision, last.author) == (revision, "rollback", faulty, "cy@lab")
    assert last.selector == Selector(volume=f"{fresh_volume}-*") and last.priority == 7
    _unselect(nats_url, name)


def test_bad_selector_rollbacks_are_refused_and_change_nothing(nats_url, policy_service, fresh_volume) -> None:
    name = f"bad-{fresh_volume}"
    mine = _select(nats_url, name, {"selector": {"namespace": "ml"}, "policy": DELAY})
    volume_revision = asyncio.run(set_policy(nats_url, fresh_volume, json.dumps(EIO_READS).encode())).revision
    for revision in (volume_revision, 10**9):  # another key's revision, and none at all
        reply = asyncio.run(rollback_policy(nats_url, name, revision, selector=True))
        assert not reply.ok and f"selector {name} has no revision {revision}" in reply.error
        assert "$.revision" in reply.error
    # ... and a selector's revision is not a volume's.
    reply = asyncio.run(rollback_policy(nats_url, fresh_volume, mine))
    assert not reply.ok and f"volume {fresh_volume} has no revision {mine}" in reply.error
    bad = asyncio.run(request(nats_url, subjects.selector_rollback(name), b'{"rev": 1}'))
    assert not bad.ok and "rev" in bad.error
    assert [e.revision for e in asyncio.run(policy_history(nats_url, name, selector=True)).entries] == [mine]

    runner = CliRunner()
    waited = runner.invoke(cli, ["policy", "rollback", name, str(mine), "--selector", "--wait",
                                 "--nats-url", nats_url])
    assert waited.exit_code == 2 and "--wait is per volume" in waited.output
    malformed = runner.invoke(cli, ["policy", "history", "_sel.a.b", "--nats-url", nats_url])
    assert malformed.exit_code == 2 and "TARGET" in malformed.output
    assert [e.revision for e in asyncio.run(policy_history(nats_url, name, selector=True)).entries] == [mine]
