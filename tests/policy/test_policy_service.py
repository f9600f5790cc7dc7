"""The policy service over a real nats-server: validation, storage, live application."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import nats
import pytest

from interposer.cli._policy_client import get_policy, request, set_policy
from interposer.proto import EventBatch, PolicyReply, decode_reply, subjects
from interposer_testing import read_errno, wait_until

_volume_ids = itertools.count(1)


@pytest.fixture
def volume() -> str:
    return f"vol-{os.getpid()}-{next(_volume_ids)}"


FAULT_READS = b'{"layers": [{"type": "fault", "errno": "EIO", "ops": ["read"]}]}'


def test_set_then_get_returns_the_policy_and_its_revision(nats_url, policy_service, volume) -> None:
    reply = asyncio.run(set_policy(nats_url, volume, FAULT_READS))
    assert reply.ok and reply.revision and reply.revision > 0
    stored = asyncio.run(get_policy(nats_url, volume))
    assert stored.revision == reply.revision
    assert stored.policy is not None and stored.policy.layers[0].errno == "EIO"


@pytest.mark.parametrize(("body", "field"), [
    (b"{bad json", "malformed JSON"),
    (b'{"layers": [{"type": "fault", "colour": "red"}]}', "unknown field `colour`"),
    (b'{"layers": [{"type": "fault", "probability": 1.5}]}', "$.layers[0].probability"),
    (b'{"layers": [{"type": "fault", "errno": "EFOO"}]}', "EFOO"),
])
def test_malformed_policy_gets_an_error_and_changes_nothing(nats_url, policy_service, volume, body, field) -> None:
    good = asyncio.run(set_policy(nats_url, volume, FAULT_READS))
    raw = asyncio.run(request(nats_url, subjects.policy_set(volume), body))
    assert raw == PolicyReply(ok=False, error=raw.error)
    assert field in (raw.error or "")
    stored = asyncio.run(get_policy(nats_url, volume))
    assert stored.revision == good.revision
    assert stored.policy is not None and stored.policy.layers[0].errno == "EIO"


def test_reply_is_the_documented_json(nats_url, policy_service, volume) -> None:
    async def go() -> tuple[dict, dict]:
        nc = await nats.connect(nats_url)
        ok = await nc.request(subjects.policy_set(volume), b"{}", timeout=5)
        bad = await nc.request(subjects.policy_set(volume), b'{"layers": 1}', timeout=5)
        await nc.close()
        return msgspec.json.decode(ok.data), msgspec.json.decode(bad.data)

    ok, bad = asyncio.run(go())
    assert set(ok) == {"ok", "revision"} and ok["ok"] is True and ok["revision"] > 0
    assert set(bad) == {"ok", "error"} and bad["ok"] is False and "$.layers" in bad["error"]


def test_plain_publish_without_reply_is_applied(nats_url, policy_service, volume) -> None:
    async def publish() -> None:  # what `nats pub SUBJECT BODY` does
        nc = await nats.connect(nats_url)
        await nc.publish(subjects.policy_set(volume), FAULT_READS)
        await nc.flush()
        await nc.close()

    asyncio.run(publish())
    deadline = time.monotonic() + 5
    while asyncio.run(get_policy(nats_url, volume)).revision == 0:
        assert time.monotonic() < deadline, "policy published without reply was never stored"
        time.sleep(0.05)


def test_a_burst_of_sets_is_stored_in_arrival_order_per_volume(nats_url, policy_service, volume) -> None:
    """Requests are handled concurrently across volumes, but one volume's changes land
    in the order they were sent: the last one sent is the one in force."""
    other = f"{volume}-other"
    delays = [round(0.001 * (i + 1), 3) for i in range(30)]

    async def burst() -> list[PolicyReply]:
        nc = await nats.connect(nats_url)
        bodies = [b'{"layers": [{"type": "delay", "delay_s": %g}]}' % d for d in delays]
        # Sent back to back, interleaved with another volume's, without waiting for answers.
        replies = [asyncio.ensure_future(nc.request(subjects.policy_set(v), body, timeout=10))
                   for body in bodies for v in (volume, other)]
        answers = [decode_reply((await r).data) for r in replies]
        await nc.close()
        return answers

    answers = asyncio.run(burst())
    assert all(a.ok for a in answers), [a.error for a in answers if not a.ok]
    mine = [a.revision for a in answers[0::2]]
    assert mine == sorted(mine), f"revisions out of send order: {mine}"
    for name in (volume, other):
        stored = asyncio.run(get_policy(nats_url, name))
        assert stored.policy is not None and stored.policy.layers[0].delay_s == delays[-1]


def test_worker_applies_policy_changes_live_and_keeps_the_last_good_one(
        nats_url, policy_service, mount_worker, volume) -> None:
    vol = mount_worker(volume, nats_url=nats_url)
    data = vol.mountpoint / "data.bin"
    data.write_bytes(b"x" * 8192)
    assert read_errno(data) == 0

    assert asyncio.run(set_policy(nats_url, volume, FAULT_READS)).ok
    wait_until(lambda: read_errno(data) == errno.EIO, "the fault policy to reach the worker")

    bad = asyncio.run(request(nats_url, subjects.policy_set(volume), b'{"layers": [{"type": "fault", "errno": "EFOO"}]}'))
    assert not bad.ok
    time.sleep(0.5)
    assert read_errno(data) == errno.EIO  # still the last accepted policy

    assert asyncio.run(request(nats_url, subjects.policy_clear(volume))).ok
    wait_until(lambda: read_errno(data) == 0, "the cleared policy to reach the worker")
    assert vol.proc.poll() is None, "the worker must not remount or restart"


def test_worker_publishes_events_with_injected_faults(nats_url, policy_service, mount_worker, volume) -> None:
    assert asyncio.run(set_policy(nats_url, volume, b'{"layers": [{"type": "fault", "errno": "ENOSPC", "ops": ["write"], "path_glob": "/full/*"}]}')).ok
    vol = mount_worker(volume, nats_url=nats_url)

    async def collect() -> list:
        nc = await nats.connect(nats_url)
        decoder = msgspec.msgpack.Decoder(EventBatch)
        events = []

        async def on_batch(msg) -> None:
            events.extend(decoder.decode(msg.data).events)

        await nc.subscribe(subjects.events(volume), cb=on_batch)
        await nc.flush()
        os.mkdir(vol.mountpoint / "full")

        def write() -> int:
            try:
                (vol.mountpoint / "full" / "f").write_bytes(b"abc")
            except OSError as exc:
                return exc.errno
            return 0

        deadline = time.monotonic() + 10
        while await asyncio.to_thread(write) != errno.ENOSPC:
            assert time.monotonic() < deadline, "worker never applied the stored policy"
            await asyncio.sleep(0.1)
        (vol.mountpoint / "ok.txt").write_bytes(b"12345")
        await asyncio.sleep(1.0)
        await nc.close()
        return events

    events = asyncio.run(collect())
    faults = [e for e in events if e.fault]
    assert faults and all(e.op == "write" and e.fault == "ENOSPC" and e.errno == errno.ENOSPC
                          and e.path == "/full/f" for e in faults)
    ok_writes = [e for e in events if e.op == "write" and e.path == "/ok.txt"]
    assert ok_writes and ok_writes[0].result == 5 and ok_writes[0].errno == 0


def test_cli_policy_set_and_get(nats_url, policy_service, volume, tmp_path) -> None:
    env = {**os.environ, "INTERPOSER_NATS_URL": nats_url}
    cli = [sys.executable, "-m", "interposer.cli"]
    ok = subprocess.run([*cli, "policy", "set", volume, "-"], input=FAULT_READS, capture_output=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert decode_reply(ok.stdout).ok
    got = subprocess.run([*cli, "policy", "get", volume], capture_output=True, env=env)
    assert got.returncode == 0 and decode_reply(got.stdout).policy.layers[0].errno == "EIO"
    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": [{"type": "delay", "delay_s": 100}]}')
    rejected = subprocess.run([*cli, "policy", "set", volume, str(bad)], capture_output=True, env=env)
    assert rejected.returncode == 1 and b"delay_s" in rejected.stdout
