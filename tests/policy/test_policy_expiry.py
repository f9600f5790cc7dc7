"""Experiments with a duration: the stored deadline is honoured, also across a restart."""

from __future__ import annotations

import asyncio
import time

import nats

from interposer.cli._policy_client import get_policy, policy_history, set_policy
from interposer.proto import decode_record, subjects

from interposer_testing import wait_until

BASE = b'{"layers": [{"type": "delay", "delay_s": 0.001}], "description": "base"}'


async def _kv_description(url: str, volume: str) -> str:
    """Read the bucket directly (no policy service needed)."""
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(subjects.POLICY_KV_BUCKET)
        return decode_record((await kv.get(volume)).value).policy.description
    finally:
        await nc.close()


def _experiment(after_s: float) -> bytes:
    return (b'{"layers": [{"type": "fault", "errno": "EIO"}], "description": "experiment", '
            b'"expires_after_s": %.3f}' % after_s)


def test_experiment_reverts_to_the_previous_revision(private_bus) -> None:
    url = private_bus.url
    base = asyncio.run(set_policy(url, "exp", BASE))
    started = time.time()
    experiment = asyncio.run(set_policy(url, "exp", _experiment(1.5)))
    assert experiment.ok
    entry = asyncio.run(policy_history(url, "exp")).entries[-1]
    assert entry.expires_at_s is not None and abs(entry.expires_at_s - (started + 1.5)) < 1.0
    assert asyncio.run(get_policy(url, "exp")).policy.description == "experiment"

    wait_until(lambda: asyncio.run(get_policy(url, "exp")).policy.description == "base",
               "the experiment to be reverted", timeout_s=10)
    assert time.time() - started >= 1.5
    last = asyncio.run(policy_history(url, "exp")).entries[-1]
    assert (last.action, last.source_revision, last.expires_at_s) == ("expire", base.revision, None)


def test_experiment_on_a_volume_without_policy_reverts_to_empty(private_bus) -> None:
    assert asyncio.run(set_policy(private_bus.url, "fresh", _experiment(0.5))).ok
    wait_until(lambda: not asyncio.run(get_policy(private_bus.url, "fresh")).policy.layers,
               "the revert to the empty policy")
    last = asyncio.run(policy_history(private_bus.url, "fresh")).entries[-1]
    assert (last.action, last.source_revision) == ("expire", 0)


def test_a_newer_change_cancels_the_pending_revert(private_bus) -> None:
    url = private_bus.url
    asyncio.run(set_policy(url, "vol", BASE))
    asyncio.run(set_policy(url, "vol", _experiment(1.0)))
    newer = asyncio.run(set_policy(url, "vol", b'{"description": "newer"}'))
    time.sleep(2.5)
    current = asyncio.run(get_policy(url, "vol"))
    assert (current.revision, current.policy.description) == (newer.revision, "newer")


def test_nested_experiments_unwind_in_order(private_bus) -> None:
    url = private_bus.url
    base = asyncio.run(set_policy(url, "nest", BASE))
    outer = asyncio.run(set_policy(url, "nest", _experiment(1.0)))
    asyncio.run(set_policy(url, "nest", b'{"description": "inner", "expires_after_s": 2.5}'))
    time.sleep(1.5)  # the outer deadline passed, but the inner revision is in force
    assert asyncio.run(get_policy(url, "nest")).policy.description == "inner"
    # The inner one expires → the outer revision comes back, already overdue → base.
    wait_until(lambda: asyncio.run(get_policy(url, "nest")).policy.description == "base",
               "both experiments to unwind", timeout_s=10)
    tail = [(e.action, e.source_revision) for e in asyncio.run(policy_history(url, "nest")).entries[-2:]]
    assert tail == [("expire", outer.revision), ("expire", base.revision)]


def test_absolute_deadline_in_the_past_is_refused(private_bus) -> None:
    reply = asyncio.run(set_policy(private_bus.url, "past", b'{"expires_at_s": 1000}'))
    assert not reply.ok and "expires_at_s" in reply.error and "not in the future" in reply.error
    assert asyncio.run(get_policy(private_bus.url, "past")).revision == 0


def test_expiry_survives_a_policy_service_restart(private_bus) -> None:
    url = private_bus.url
    base = asyncio.run(set_policy(url, "durable", BASE))
    experiment = asyncio.run(set_policy(url, "durable", _experiment(1.0)))
    private_bus.stop_policy()  # no service at the deadline: nothing can revert
    time.sleep(2.0)
    assert asyncio.run(_kv_description(url, "durable")) == "experiment"
    restarted_at = time.time()
    private_bus.start_policy()  # waits until it answers get requests
    wait_until(lambda: asyncio.run(get_policy(url, "durable")).policy.description == "base",
               "the restarted service to carry out the overdue expiry", timeout_s=10)
    history = asyncio.run(policy_history(url, "durable")).entries
    assert [e.revision for e in history][:2] == [base.revision, experiment.revision]
    assert history[-1].action == "expire" and history[-1].updated_at_s >= restarted_at


def test_pending_expiry_survives_a_restart_before_its_deadline(private_bus) -> None:
    url = private_bus.url
    asyncio.run(set_policy(url, "pending", BASE))
    asyncio.run(set_policy(url, "pending", _experiment(4.0)))
    private_bus.stop_policy()
    private_bus.start_policy()  # restarted well before the deadline
    assert asyncio.run(get_policy(url, "pending")).policy.description == "experiment"
    wait_until(lambda: asyncio.run(get_policy(url, "pending")).policy.description == "base",
               "the pending expiry after the restart", timeout_s=15)
