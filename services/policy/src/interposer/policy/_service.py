"""The policy service: validate policy changes from NATS and store them in JetStream KV.

Requests (any client; plain ``nats pub`` works, ``nats req`` gets a reply):

- ``interposer.policy.set.<volume>`` — body: JSON ``Policy``. Reply
  ``{"ok": true, "revision": N}`` or ``{"ok": false, "error": "..."}``; a rejected
  policy changes nothing.
- ``interposer.policy.get.<volume>`` — reply ``{"ok": true, "revision": N, "policy": {...}}``
  (revision 0 and an empty policy when none is stored).
- ``interposer.policy.clear.<volume>`` — stores an empty policy (workers serve plain
  passthrough); reply ``{"ok": true, "revision": N}``.

Replicas subscribe in one queue group, so each request is handled once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import nats
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue

from interposer.proto import (
    Policy,
    PolicyError,
    PolicyRecord,
    PolicyReply,
    decode_policy,
    decode_record,
    encode_policy,
    encode_record,
    encode_reply,
    subjects,
)

from ._config import PolicyServiceConfig

log = logging.getLogger(__name__)

#: Wait between reconnect attempts, seconds.
DEFAULT_RECONNECT_TIME_WAIT_S = 1.0


async def ensure_bucket(js, config: PolicyServiceConfig) -> KeyValue:
    """Return the policy KV bucket, creating it if it does not exist."""
    try:
        return await js.key_value(subjects.POLICY_KV_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(
            bucket=subjects.POLICY_KV_BUCKET, history=config.kv_history, replicas=config.kv_replicas,
            description="interposer: desired policy per volume",
        ))


class PolicyService:
    """Answers policy requests; the only writer of the KV bucket.

    Args:
        kv: the policy bucket.
    """

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def set_policy(self, volume: str, body: bytes) -> PolicyReply:
        """Validate ``body`` and store it as the policy of ``volume``.

        Returns:
            ``ok`` with the new revision, or ``ok=False`` with the reason; nothing is
            stored on error.
        """
        if not subjects.is_valid_volume_id(volume):
            return PolicyReply(ok=False, error=f"invalid volume id {volume!r}")
        try:
            policy = decode_policy(body)
        except PolicyError as exc:
            log.info("rejected policy for %s: %s", volume, exc)
            return PolicyReply(ok=False, error=str(exc))
        revision = await self.kv.put(volume, encode_record(PolicyRecord(policy=policy, updated_at_s=time.time())))
        log.info("volume %s: policy revision %d (%d layers)", volume, revision, len(policy.layers))
        return PolicyReply(ok=True, revision=revision)

    async def get_policy(self, volume: str) -> PolicyReply:
        """Return the stored policy of ``volume`` (empty, revision 0, if none)."""
        if not subjects.is_valid_volume_id(volume):
            return PolicyReply(ok=False, error=f"invalid volume id {volume!r}")
        try:
            entry = await self.kv.get(volume)
        except (KeyNotFoundError, KeyDeletedError):
            return PolicyReply(ok=True, revision=0, policy=Policy())
        return PolicyReply(ok=True, revision=entry.revision, policy=decode_record(entry.value).policy)

    async def clear_policy(self, volume: str) -> PolicyReply:
        """Store an empty policy for ``volume``: workers serve plain passthrough.

        Clearing is a revision like any other (not a KV delete), so it has a
        revision number that ``--wait`` and the history can refer to.
        """
        return await self.set_policy(volume, encode_policy(Policy(description="cleared")))

    async def handle(self, msg: Msg) -> None:
        """Dispatch one request by its subject prefix and reply if asked to."""
        prefix, _, volume = msg.subject.rpartition(".")
        try:
            if prefix == subjects.POLICY_SET_PREFIX:
                reply = await self.set_policy(volume, msg.data)
            elif prefix == subjects.POLICY_GET_PREFIX:
                reply = await self.get_policy(volume)
            elif prefix == subjects.POLICY_CLEAR_PREFIX:
                reply = await self.clear_policy(volume)
            else:
                reply = PolicyReply(ok=False, error=f"unknown subject {msg.subject}")
        except Exception as exc:  # noqa: BLE001 - a store failure must still get an answer
            log.exception("request on %s failed", msg.subject)
            reply = PolicyReply(ok=False, error=f"internal error: {exc}")
        if msg.reply:
            await msg.respond(encode_reply(reply))


async def serve(config: PolicyServiceConfig) -> None:
    """Connect, subscribe and answer requests until SIGTERM/SIGINT; then drain."""
    nc = await nats.connect(
        config.nats_url, name="interposer-policy", max_reconnect_attempts=-1,
        reconnect_time_wait=DEFAULT_RECONNECT_TIME_WAIT_S,
    )
    service = PolicyService(await ensure_bucket(nc.jetstream(), config))
    for prefix in (subjects.POLICY_SET_PREFIX, subjects.POLICY_GET_PREFIX, subjects.POLICY_CLEAR_PREFIX):
        await nc.subscribe(f"{prefix}.*", queue=subjects.POLICY_QUEUE, cb=service.handle)
    await nc.flush()
    log.info("policy service ready on %s", config.nats_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await nc.drain()
