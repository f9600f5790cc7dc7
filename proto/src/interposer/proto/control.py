"""Replies of the policy service's read-side requests (history, list, status, rollback) and watch lines.

These are JSON (like ``PolicyReply``) so ``nats req`` shows them readably. Replies
only ever gain fields with defaults; requests from users (``RollbackRequest``)
forbid unknown fields so a typo is an error.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from .policy import Policy, Selector


class RollbackRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of ``interposer.policy.rollback.<volume>`` and ``…selector.rollback.<name>``: ``{"revision": N}``.

    Attributes:
        revision: the KV revision whose policy becomes the volume's policy again
            (stored as a new revision; history is never rewritten).
    """

    revision: Annotated[int, msgspec.Meta(gt=0)]


class HistoryEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One revision of a volume's policy, as kept in the KV bucket's history.

    Attributes:
        revision: KV revision.
        updated_at_s: when it was stored, seconds since the Unix epoch.
        author: who asked for it (``""`` = not said).
        action: ``set``, ``clear``, ``rollback`` or ``expire``.
        source_revision: for ``rollback``/``expire``, the revision re-stored.
        expires_at_s: the experiment deadline of this revision, if any.
        policy: the policy itself.
        selector: for a selector policy's revision: the volumes it selects (None =
            inactive: unselected); None for a volume's revisions.
        priority: for a selector policy's revision: its merge priority.
    """

    revision: int
    updated_at_s: float
    author: str = ""
    action: str = "set"
    source_revision: int = 0
    expires_at_s: float | None = None
    policy: Policy
    selector: Selector | None = None
    priority: int = 0


class HistoryReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Reply to ``interposer.policy.history.<volume>`` and ``interposer.policy.selector.history.<name>``:
    oldest revision first; ``volume`` is the KV key (``_sel.<name>`` for a selector)."""

    ok: bool
    volume: str = ""
    entries: list[HistoryEntry] = []
    error: str | None = None


class VolumeSummary(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One line of ``interposer.policy.list``: a volume and its current revision."""

    volume: str
    revision: int
    updated_at_s: float
    author: str = ""
    action: str = "set"
    layers: int = 0
    expires_at_s: float | None = None


class ListReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Reply to ``interposer.policy.list``: every volume with a stored policy, by name."""

    ok: bool
    volumes: list[VolumeSummary] = []
    error: str | None = None


class WorkerState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the policy service last heard from one worker (its ``WorkerStatus`` heartbeats).

    Attributes:
        worker_id: the worker's id.
        applied_revision: policy revision in force on the worker (0 = local/initial).
        applied_since_s: when that worker first reported that revision, seconds
            since the Unix epoch (its heartbeat's ``sent_at_s``).
        last_seen_s: time of its latest heartbeat, seconds since the Unix epoch.
        stale: no heartbeat for longer than the service's ``worker_stale_after_s``.
        namespace: pod namespace, if the worker knows it.
        pod: pod name, if the worker knows it.
        labels: the pod's labels, if the worker knows them (selectors match them).
        node: the worker's node, if it knows it (selectors match it).
    """

    worker_id: str
    applied_revision: int
    applied_since_s: float
    last_seen_s: float
    stale: bool = False
    namespace: str = ""
    pod: str = ""
    labels: dict[str, str] = {}
    node: str = ""


class VolumeStatus(msgspec.Struct, kw_only=True):
    """Desired (KV) versus applied (heartbeats) revision of one volume.

    Every field is always sent (no ``omit_defaults``): scripts test
    ``.converged`` and ``.workers`` of volumes that have no workers yet too.

    Attributes:
        volume: volume id.
        desired_revision: latest KV revision (0 = no policy stored).
        desired_since_s: when it was stored, seconds since the Unix epoch (0 = never).
        workers: live and recently stale workers of the volume.
        converged: every non-stale worker applied ``desired_revision`` (or a later one).
    """

    volume: str
    desired_revision: int
    desired_since_s: float = 0.0
    workers: list[WorkerState] = []
    converged: bool = False


class StatusReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Reply to ``interposer.policy.status`` (every volume) or ``….status.<volume>``."""

    ok: bool
    volumes: list[VolumeStatus] = []
    error: str | None = None


class PolicyChange(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One new revision of a key of the policy bucket, as ``interposer policy watch`` prints it.

    Attributes:
        volume: the KV key: a volume id, or ``_sel.<name>`` for a selector policy.
        revision: KV revision.
        action: what made it: ``set``, ``clear``, ``rollback``, ``expire``,
            ``select``, ``unselect`` (a ``PolicyRecord.action``); ``delete`` or
            ``purge`` when the key was removed from the bucket by hand (the service
            never does).
        updated_at_s: when it was stored, seconds since the Unix epoch (0 = unknown).
        author: who asked for it (``""`` = not said).
        source_revision: for ``rollback``/``expire``, the revision re-stored.
        expires_at_s: the experiment deadline of this revision, if any.
        selector: for a selector key, the volumes it selects (None = inactive).
        priority: for a selector key, its merge priority.
        policy: the policy stored (None for ``delete``/``purge``).
    """

    volume: str
    revision: int
    action: str
    updated_at_s: float = 0.0
    author: str = ""
    source_revision: int = 0
    expires_at_s: float | None = None
    selector: Selector | None = None
    priority: int = 0
    policy: Policy | None = None


def encode_json(message: msgspec.Struct) -> bytes:
    """Encode any reply of this module as canonical JSON."""
    return msgspec.json.encode(message, order="deterministic")


_decoders: dict[type, msgspec.json.Decoder] = {}


def decode_json(data: bytes, kind: type[msgspec.Struct]) -> msgspec.Struct:
    """Decode ``data`` as a ``kind`` message.

    Raises:
        msgspec.ValidationError, msgspec.DecodeError: ``data`` is not a ``kind``.
    """
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    return decoder.decode(data)
