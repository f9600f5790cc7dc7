"""Experiments with a duration: revert a revision at its stored deadline.

The deadline is part of the KV record (``PolicyRecord.expires_at_s``), never only a
timer in memory. Each replica watches the whole bucket: the watch first delivers
the latest record of every volume (that is the scan on start, so an expiry that
fell due while no service ran is carried out at once) and then every change. A
revert is a compare-and-set write against the expiring revision, so a newer change
wins over the revert, and of several replicas exactly one reverts.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from nats.js.errors import KeyWrongLastSequenceError

from interposer.proto import Policy, decode_record

from ._store import PolicyStore

log = logging.getLogger(__name__)

#: Author recorded on the revisions the service writes when an experiment ends.
EXPIRY_AUTHOR = "interposer-policy (expiry)"
#: Longest sleep of the expiry loop between checks, seconds (bounds the effect of clock jumps).
DEFAULT_MAX_SLEEP_S = 5.0


class ExpiryScheduler:
    """Keeps ``volume → (revision, expires_at_s)`` from the KV watch and reverts when due.

    Args:
        store: the policy bucket.
    """

    def __init__(self, store: PolicyStore) -> None:
        self.store = store
        #: volume → (revision that expires, deadline in seconds since the Unix epoch).
        self.pending: dict[str, tuple[int, float]] = {}
        self._changed = asyncio.Event()

    def observe(self, volume: str, revision: int, value: bytes | None) -> None:
        """Take note of the latest record of ``volume`` (from the KV watch)."""
        expires_at_s = None
        if value:
            try:
                expires_at_s = decode_record(value).expires_at_s
            except (msgspec.ValidationError, msgspec.DecodeError):
                log.warning("volume %s: revision %d is not a PolicyRecord", volume, revision)
        known = self.pending.get(volume)
        if known is not None and known[0] > revision:
            return  # an older entry delivered late
        if expires_at_s is None:
            self.pending.pop(volume, None)
        else:
            self.pending[volume] = (revision, expires_at_s)
        self._changed.set()

    async def run(self) -> None:
        """Revert due experiments until cancelled."""
        while True:
            now_s = time.time()
            due = [(v, rev) for v, (rev, at) in self.pending.items() if at <= now_s]
            for volume, revision in due:
                await self.expire(volume, revision)
            upcoming = [at for _, at in self.pending.values() if at > now_s]
            sleep_s = min([DEFAULT_MAX_SLEEP_S, *[at - now_s for at in upcoming]])
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(sleep_s, 0.0))
            except asyncio.TimeoutError:
                pass

    async def expire(self, volume: str, revision: int) -> int | None:
        """Revert ``volume`` from ``revision`` to the revision before it.

        The restored revision keeps its own deadline and ``revert_to``, so nested
        experiments unwind in order (one whose deadline has passed too is reverted
        right after).

        Returns:
            The new revision, or None if ``revision`` was no longer current (a newer
            change or another replica won) or the store failed (retried later).
        """
        record = await self.store.record_at(volume, revision)
        if record is None:
            self.pending.pop(volume, None)
            return None
        target = record.revert_to
        restored = await self.store.record_at(volume, target) if target else None
        selector, priority = (restored.selector, restored.priority) if restored is not None else (None, 0)
        if restored is None:
            policy = Policy(description=f"empty: experiment r{revision} expired")
            expires_at_s, revert_to = None, 0
            if target:
                log.warning("volume %s: revision %d left the history; reverting to the empty policy", volume, target)
                target = 0
        else:
            policy, expires_at_s, revert_to = restored.policy, restored.expires_at_s, restored.revert_to
        try:
            new = await self.store.store(
                volume, policy, author=EXPIRY_AUTHOR, action="expire", source_revision=target,
                expires_at_s=expires_at_s, revert_to=revert_to, expect_revision=revision,
                selector=selector, priority=priority,
            )
        except KeyWrongLastSequenceError:
            log.info("volume %s: revision %d was superseded before it expired", volume, revision)
            if self.pending.get(volume, (0, 0.0))[0] == revision:
                self.pending.pop(volume, None)
            return None
        except Exception as exc:  # noqa: BLE001 - NATS down: keep the deadline, try again
            log.warning("volume %s: could not revert revision %d (%s); retrying", volume, revision, exc)
            await asyncio.sleep(1.0)
            return None
        log.info("volume %s: experiment revision %d expired; restored revision %d as %d", volume, revision, target, new)
        if self.pending.get(volume, (0, 0.0))[0] == revision:
            self.pending.pop(volume, None)
        return new
