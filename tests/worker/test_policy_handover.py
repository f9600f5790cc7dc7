"""How a new policy revision gets from the bus thread into force on the trio thread.

Most revisions are compiled and swapped in on the bus thread (no trio wake-up:
issue #5's CPU per applied revision); those touching trio-side state — a quota
layer, a layer that expires — go through the trio thread. These tests pin the
rules a user relies on: the newest revision always ends up in force (a quick
plain revision never overtakes a quota revision still queued for trio), a
refused off-trio apply changes nothing, and the expiry task never puts back a
stack that a newer revision replaced.
"""

from __future__ import annotations

import asyncio
import threading
import time

import trio
from nats.js.kv import KeyValue

from interposer.fuse_worker import InterposerOperations, MemoryBackend, Telemetry, WorkerConfig
from interposer.fuse_worker._bus import Bus
from interposer.fuse_worker._expiry import expire_layers
from interposer.fuse_worker.layers import QuotaContext, Usage
from interposer.proto import DelayLayer, Policy, PolicyRecord, QuotaLayer, encode_record

PLAIN = Policy(layers=[DelayLayer(delay_s=0.001)], description="plain")
QUOTA = Policy(layers=[QuotaLayer(bytes=1 << 20)], description="quota")
EXPIRING = Policy(layers=[DelayLayer(delay_s=0.001, expires_after_s=60)], description="expiring")


def _operations() -> InterposerOperations:
    backend = MemoryBackend()
    return InterposerOperations(backend, Telemetry(), quota=QuotaContext(backend, lambda: Usage(0, 0)))


def _off_trio(operations: InterposerOperations, policy: Policy, revision: int) -> bool:
    """Call ``apply_off_trio`` from a plain thread, as the bus does."""
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(operations.apply_off_trio(policy, revision)))
    thread.start()
    thread.join()
    return result[0]


def test_a_plain_revision_is_put_in_force_from_another_thread() -> None:
    operations = _operations()
    assert _off_trio(operations, PLAIN, 7)
    assert operations.revision == 7 and operations.stack.policy == PLAIN and "read" in operations.stack.chains


def test_revisions_that_touch_trio_state_are_refused_off_trio_and_change_nothing() -> None:
    operations = _operations()
    before = operations.stack
    assert not _off_trio(operations, QUOTA, 3)  # quota usage is the trio thread's
    assert not _off_trio(operations, EXPIRING, 4)  # the expiry task must be woken
    assert operations.stack is before and operations.revision == 0

    async def apply_quota() -> None:
        operations.apply(QUOTA, 5)

    trio.run(apply_quota)
    assert operations.stack.has_quota
    assert not _off_trio(operations, PLAIN, 6)  # leaving quota must stop its tracking on trio
    assert operations.revision == 5


def _entry(revision: int, policy: Policy) -> KeyValue.Entry:
    record = PolicyRecord(policy=policy, updated_at_s=time.time())
    return KeyValue.Entry(bucket="interposer-policy", key="vol", value=encode_record(record), revision=revision,
                          delta=0, created=None, operation=None)


def test_a_plain_revision_never_overtakes_one_queued_for_the_trio_thread() -> None:
    """A quota revision (trio thread) followed at once by a plain one: the plain one ends in force."""
    operations = _operations()

    async def main() -> None:
        config = WorkerConfig(volume_id="vol", backing_dir="/unused", mountpoint="/unused",
                              nats_url="nats://unused")
        bus = Bus(config, Telemetry(), operations.apply, lambda: operations.revision,
                  trio.lowlevel.current_trio_token(), apply_off_trio=operations.apply_off_trio)
        bus._initial = {"volume": True, "selectors": True}

        async def watcher():  # both revisions arrive back to back, before trio runs
            yield _entry(10, QUOTA)
            yield _entry(11, PLAIN)

        async def consume() -> None:
            bus._loop = asyncio.get_running_loop()
            bus._beat = asyncio.Event()
            await bus._consume("volume", watcher())

        # The bus thread runs while this (trio) thread is held, as when it is busy
        # serving: what the bus queues for it runs only afterwards.
        thread = threading.Thread(target=lambda: asyncio.run(consume()))
        thread.start()
        thread.join()
        await trio.sleep(0.1)  # run whatever the bus queued for this thread
        assert bus.initial_policy.is_set()

    trio.run(main)
    assert operations.revision == 11 and operations.stack.policy == PLAIN and not operations.stack.has_quota


def test_the_expiry_task_never_reinstates_a_stack_a_newer_revision_replaced() -> None:
    operations = _operations()
    now = [1000.0]

    async def main() -> None:
        operations.apply(Policy(layers=[DelayLayer(delay_s=0.001, expires_at=1001.0), DelayLayer(delay_s=0.002)]), 1)
        expiring = operations.stack
        async with trio.open_nursery() as nursery:
            nursery.start_soon(expire_layers, operations, lambda: now[0])
            await trio.sleep(0.05)
            # The bus thread swaps in revision 2 while the expiry task is due to act on revision 1.
            assert await trio.to_thread.run_sync(operations.apply_off_trio, PLAIN, 2)
            now[0] = 1002.0
            operations.stack_changed.set()  # wake the task as if its deadline passed
            await trio.sleep(0.05)
            assert operations.stack is not expiring
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert operations.revision == 2 and operations.stack.policy == PLAIN


def test_a_revision_with_the_policy_in_force_is_acknowledged_without_recompiling() -> None:
    """A selector change that leaves a selected worker's policy as it is (say, its priority):
    the worker reports the revision, and its layers keep their state (token buckets, counters)."""
    operations = _operations()
    assert _off_trio(operations, PLAIN, 3)
    runtimes = operations.stack.layers
    assert _off_trio(operations, Policy(layers=list(PLAIN.layers), description="plain"), 4)
    assert operations.revision == 4 and operations.stack.layers == runtimes
    assert all(new is old for new, old in zip(operations.stack.layers, runtimes))

    async def apply_on_trio() -> None:
        operations.apply(PLAIN, 5)

    trio.run(apply_on_trio)
    assert operations.revision == 5 and all(new is old for new, old in zip(operations.stack.layers, runtimes))
    assert _off_trio(operations, Policy(layers=[DelayLayer(delay_s=0.002)]), 6)
    assert operations.stack.layers[0] is not runtimes[0]  # another policy: compiled anew
