"""The policy bucket: revisions, history and compare-and-set writes.

Every write goes through :meth:`PolicyStore.store`, which writes with JetStream's
expected-last-subject-sequence header (``KeyValue.update(last=…)``) against the
key's current revision. Two replicas (or a request racing an expiry) can
therefore never interleave: the loser re-reads and retries, so ``revert_to``
always names the revision that was really in force before.

The current revision is taken from a per-key cache (the store's own writes and
reads, and the service's bucket watch feed it through :meth:`PolicyStore.observe`)
instead of a KV ``get`` before every write: a stale entry only costs a refused
compare-and-set and a re-read, and the write path is one round trip instead of
two (the ``get`` was ~60 % of a write's CPU in the service, issue #5).
"""

from __future__ import annotations

import logging
import time

import msgspec
from nats.js.api import KeyValueConfig
from nats.js.errors import (
    BucketNotFoundError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from interposer.proto import (
    Policy,
    PolicyError,
    PolicyRecord,
    Selector,
    decode_record,
    encode_record,
    subjects,
)

from ._config import PolicyServiceConfig

log = logging.getLogger(__name__)

#: Compare-and-set attempts before a write gives up (only concurrent writers retry).
DEFAULT_CAS_ATTEMPTS = 8


async def ensure_bucket(js, config: PolicyServiceConfig) -> KeyValue:  # noqa: ANN001 - JetStreamContext
    """Return the policy KV bucket, creating it if it does not exist."""
    try:
        return await js.key_value(subjects.POLICY_KV_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(
            bucket=subjects.POLICY_KV_BUCKET, history=config.kv_history, replicas=config.kv_replicas,
            description="interposer: desired policy per volume",
        ))


class StoreConflict(RuntimeError):
    """The volume changed under a compare-and-set write too many times in a row."""


class PolicyStore:
    """Typed access to the ``interposer-policy`` bucket.

    Args:
        kv: the bucket.
        js: the JetStream context it lives in (lists the keys, :meth:`volumes`).
    """

    def __init__(self, kv: KeyValue, js) -> None:  # noqa: ANN001 - JetStreamContext
        self.kv = kv
        self.js = js
        #: key → the newest revision of it seen (written, read or watched); a hint
        #: for compare-and-set, never trusted without the server's check.
        self._revisions: dict[str, int] = {}

    def observe(self, key: str, revision: int) -> None:
        """Note that ``key`` has (at least) ``revision`` (from a bucket watch)."""
        if revision > self._revisions.get(key, 0):
            self._revisions[key] = revision

    async def current(self, volume: str) -> tuple[int, PolicyRecord | None]:
        """Return ``(revision, record)`` of ``volume``; ``(0, None)`` if nothing is stored."""
        try:
            entry = await self.kv.get(volume)
        except (KeyNotFoundError, KeyDeletedError):
            self._revisions.pop(volume, None)
            return 0, None
        self._revisions[volume] = entry.revision
        return entry.revision, decode_record(entry.value)

    async def record_at(self, volume: str, revision: int) -> PolicyRecord | None:
        """Return the record stored as ``revision`` of ``volume``.

        Returns:
            None if that revision does not exist, belongs to another volume, or
            has left the bucket's history.
        """
        try:
            entry = await self.kv.get(volume, revision=revision)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if entry.key != volume or entry.value is None:
            return None
        try:
            return decode_record(entry.value)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None

    async def history(self, volume: str) -> list[tuple[int, PolicyRecord]]:
        """Every revision of ``volume`` still in the bucket's history, oldest first.

        Read message by message (STREAM.MSG.GET with ``next_by_subj``), as many as
        STREAM.INFO counts for the key's subject, not with ``KeyValue.history()``:
        that one is a watch that can end before its backlog is delivered and then
        returns nothing (the race :meth:`volumes` avoids too; seen under load in
        ``test_rolling_a_selector_back_restores_…``, 2026-12-05).
        """
        stream, subject = subjects.POLICY_KV_STREAM, f"{subjects.POLICY_KV_SUBJECT_PREFIX}{volume}"
        info = await self.js.stream_info(stream, subjects_filter=subject)
        out: list[tuple[int, PolicyRecord]] = []
        seq = 0
        for _ in range((info.state.subjects or {}).get(subject, 0)):
            try:
                msg = await self.js.get_msg(stream, seq=seq + 1, subject=subject, next=True)
            except NotFoundError:
                break  # purged meanwhile
            seq = msg.seq
            if (msg.headers or {}).get(subjects.KV_OPERATION_HEADER) or not msg.data:
                continue  # a delete or purge marker
            try:
                out.append((seq, decode_record(msg.data)))
            except (msgspec.ValidationError, msgspec.DecodeError):
                log.warning("volume %s: revision %d is not a PolicyRecord; left out", volume, seq)
        return out

    async def volumes(self) -> list[str]:
        """Every key of the bucket (a volume, or a selector's ``_sel.`` key), sorted.

        Keys whose last revision is a delete or purge are listed too; their
        :meth:`current` is ``(0, None)``. The list comes from one STREAM.INFO
        request with a subjects filter (the bucket is stream ``KV_<bucket>``, a key
        is subject ``$KV.<bucket>.<key>``: NATS ADR-8), not from ``KeyValue.keys()``:
        that one ends its watch early when the consumer's backlog is delivered
        before its own consumer-info check returns, and then lists nothing (CI run
        on 2026-11-22, ``test_list_shows_every_volume_with_a_policy``).
        """
        prefix = subjects.POLICY_KV_SUBJECT_PREFIX
        info = await self.js.stream_info(subjects.POLICY_KV_STREAM, subjects_filter=f"{prefix}>")
        return sorted(subject[len(prefix):] for subject in (info.state.subjects or {}))

    async def store(self, volume: str, policy: Policy, *, author: str, action: str,
                    source_revision: int = 0, expires_at_s: float | None = None,
                    revert_to: int | None = None, expect_revision: int | None = None,
                    now_s: float | None = None, selector: Selector | None = None, priority: int = 0) -> int:
        """Store ``policy`` as the next revision of ``volume``.

        Args:
            volume: volume id.
            policy: validated policy.
            author: who asked for it.
            action: ``set``, ``clear``, ``rollback`` or ``expire``.
            source_revision: revision re-stored by ``rollback``/``expire``.
            expires_at_s: explicit deadline (``expire`` carries the restored
                revision's own); None = derived from ``policy.expires_after_s`` /
                ``policy.expires_at_s``.
            revert_to: revision restored at the deadline; None = the revision in
                force before this write.
            expect_revision: write only if this is still the current revision
                (``expire`` uses it so that a newer change wins); None = retry
                on concurrent writes.
            now_s: the time of acceptance, seconds since the Unix epoch (tests).
            selector: for a selector key (``_sel.<name>``): the volumes it selects;
                None = a volume key, or an inactive selector.
            priority: for a selector key: its merge priority.

        Returns:
            The new revision.

        Raises:
            PolicyError: ``policy.expires_at_s`` is not in the future.
            KeyWrongLastSequenceError: ``expect_revision`` is no longer current.
            StoreConflict: concurrent writers kept winning.
        """
        now_s = time.time() if now_s is None else now_s
        if expires_at_s is None:
            if policy.expires_after_s is not None:
                expires_at_s = now_s + policy.expires_after_s
            elif policy.expires_at_s is not None:
                if policy.expires_at_s <= now_s:
                    raise PolicyError(f"field `expires_at_s`: {policy.expires_at_s} is not in the future "
                                      f"(now is {now_s:.3f}) - at `$.expires_at_s`")
                expires_at_s = policy.expires_at_s
        cached = self._revisions.get(volume)
        for _ in range(DEFAULT_CAS_ATTEMPTS):
            if expect_revision is not None:
                current = expect_revision
            elif cached is not None:
                current, cached = cached, None  # one try with the cached revision, then read
            else:
                current = (await self.current(volume))[0]
            record = PolicyRecord(
                policy=policy, updated_at_s=now_s, author=author, action=action, source_revision=source_revision,
                expires_at_s=expires_at_s, revert_to=current if revert_to is None else revert_to,
                selector=selector, priority=priority,
            )
            try:
                revision = await self.kv.update(volume, encode_record(record), last=current)
            except KeyWrongLastSequenceError:
                if expect_revision is not None:
                    raise
                log.debug("volume %s changed during a write; retrying", volume)
                continue
            self.observe(volume, revision)
            return revision
        raise StoreConflict(f"volume {volume}: {DEFAULT_CAS_ATTEMPTS} concurrent writes in a row; try again")
