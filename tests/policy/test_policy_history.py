"""History, rollback and list over a real nats-server and policy service."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import msgspec
import nats

from interposer.cli._policy_client import (
    get_policy,
    list_policies,
    policy_history,
    request,
    rollback_policy,
    set_policy,
)
from interposer.proto import HistoryReply, ListReply, subjects

DELAY = b'{"layers": [{"type": "delay", "delay_s": 0.001}]}'
FAULT = b'{"layers": [{"type": "fault", "errno": "EIO", "ops": ["read"]}], "description": "fault"}'


def _cli(nats_url: str, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "INTERPOSER_NATS_URL": nats_url}
    return subprocess.run([sys.executable, "-m", "interposer.cli", "policy", *args], input=stdin,
                          capture_output=True, env=env, timeout=60)


def test_history_records_who_when_and_what(nats_url, policy_service, fresh_volume) -> None:
    volume = fresh_volume
    r1 = asyncio.run(set_policy(nats_url, volume, DELAY, author="alice@lab"))
    r2 = asyncio.run(set_policy(nats_url, volume, FAULT))  # no author header (plain `nats req`)
    r3 = asyncio.run(request(nats_url, subjects.policy_clear(volume), author="bob@lab"))
    assert r1.ok and r2.ok and r3.ok and r1.revision < r2.revision < r3.revision

    history = asyncio.run(policy_history(nats_url, volume))
    assert history.ok and history.volume == volume
    got = [(e.revision, e.author, e.action, len(e.policy.layers)) for e in history.entries]
    assert got == [(r1.revision, "alice@lab", "set", 1), (r2.revision, "", "set", 1),
                   (r3.revision, "bob@lab", "clear", 0)]
    times = [e.updated_at_s for e in history.entries]
    assert times == sorted(times) and times[0] > 1.6e9


def test_rollback_restores_an_old_revision_as_a_new_one(nats_url, policy_service, fresh_volume) -> None:
    volume = fresh_volume
    r1 = asyncio.run(set_policy(nats_url, volume, FAULT))
    asyncio.run(set_policy(nats_url, volume, DELAY))
    back = asyncio.run(rollback_policy(nats_url, volume, r1.revision, author="carol@lab"))
    assert back.ok and back.revision > r1.revision
    current = asyncio.run(get_policy(nats_url, volume))
    assert current.revision == back.revision and current.policy.description == "fault"
    last = asyncio.run(policy_history(nats_url, volume)).entries[-1]
    assert (last.action, last.source_revision, last.author) == ("rollback", r1.revision, "carol@lab")


def test_rollback_to_a_missing_revision_is_refused_and_changes_nothing(nats_url, policy_service, fresh_volume) -> None:
    volume, other = fresh_volume, fresh_volume + "-other"
    mine = asyncio.run(set_policy(nats_url, volume, DELAY))
    foreign = asyncio.run(set_policy(nats_url, other, FAULT))
    for revision in (foreign.revision, 10**9):
        reply = asyncio.run(rollback_policy(nats_url, volume, revision))
        assert not reply.ok and f"no revision {revision}" in reply.error and "$.revision" in reply.error
    bad = asyncio.run(request(nats_url, subjects.policy_rollback(volume), b'{"rev": 1}'))
    assert not bad.ok and "rev" in bad.error
    assert asyncio.run(get_policy(nats_url, volume)).revision == mine.revision


def test_list_shows_every_volume_with_a_policy(nats_url, policy_service, fresh_volume) -> None:
    a, b = fresh_volume + "-a", fresh_volume + "-b"
    ra = asyncio.run(set_policy(nats_url, a, FAULT, author="dave@lab"))
    rb = asyncio.run(set_policy(nats_url, b, DELAY))
    listed = {v.volume: v for v in asyncio.run(list_policies(nats_url)).volumes}
    assert listed[a].revision == ra.revision and listed[a].author == "dave@lab" and listed[a].layers == 1
    assert listed[b].revision == rb.revision


def test_list_never_misses_a_volume_just_set(nats_url, policy_service, fresh_volume) -> None:
    # Regression: KeyValue.keys() ended its watch early about once in 300 calls and
    # listed nothing (CI, 2026-11-22); every list right after a set must show it.
    async def go() -> list[int]:
        missing = []
        for i in range(200):
            volume = f"{fresh_volume}-n{i}"
            assert (await set_policy(nats_url, volume, DELAY)).ok
            if volume not in {v.volume for v in (await list_policies(nats_url)).volumes}:
                missing.append(i)
        return missing

    assert asyncio.run(go()) == []


def test_raw_json_replies_for_nats_req(nats_url, policy_service, fresh_volume) -> None:
    async def go() -> tuple[dict, dict]:
        nc = await nats.connect(nats_url)
        await nc.request(subjects.policy_set(fresh_volume), DELAY, timeout=5,
                         headers={subjects.AUTHOR_HEADER: "erin@lab"})
        hist = await nc.request(subjects.policy_history(fresh_volume), b"", timeout=5)
        listed = await nc.request(subjects.POLICY_LIST, b"", timeout=5)
        await nc.close()
        return msgspec.json.decode(hist.data), msgspec.json.decode(listed.data)

    hist, listed = asyncio.run(go())
    assert hist["ok"] is True and hist["entries"][0]["author"] == "erin@lab"
    assert hist["entries"][0]["policy"]["layers"][0]["delay_s"] == 0.001
    assert any(v["volume"] == fresh_volume for v in listed["volumes"])


def test_cli_history_rollback_and_list(nats_url, policy_service, fresh_volume) -> None:
    volume = fresh_volume
    first = _cli(nats_url, "set", volume, "-", "--author", "frank@lab", stdin=FAULT)
    assert first.returncode == 0, first.stderr
    rev1 = msgspec.json.decode(first.stdout)["revision"]
    assert _cli(nats_url, "set", volume, "-", stdin=DELAY).returncode == 0
    rolled = _cli(nats_url, "rollback", volume, str(rev1), "--author", "grace@lab")
    assert rolled.returncode == 0, rolled.stderr

    table = _cli(nats_url, "history", volume)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.decode().splitlines()
    assert lines[0].split() == ["REV", "WHEN", "AUTHOR", "ACTION", "EXPIRES", "POLICY"]
    assert "frank@lab" in lines[1] and "set" in lines[1] and '"fault"' in lines[1]
    assert "grace@lab" in lines[3] and f"rollback r{rev1}" in lines[3]
    as_json = msgspec.json.decode(_cli(nats_url, "history", volume, "--json").stdout, type=HistoryReply)
    assert [e.action for e in as_json.entries] == ["set", "set", "rollback"]

    listed = _cli(nats_url, "list", "--json")
    assert volume in {v.volume for v in msgspec.json.decode(listed.stdout, type=ListReply).volumes}
    assert volume in _cli(nats_url, "list").stdout.decode()
    missing = _cli(nats_url, "rollback", volume, "999999999")
    assert missing.returncode == 1 and b"no revision 999999999" in missing.stdout
