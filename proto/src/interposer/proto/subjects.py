"""Every NATS subject, queue group and JetStream bucket name the services use.

Subjects put the volume id in the last token, so a subscriber can use the ``*``
wildcard (``interposer.events.*``) and a volume id can never contain ``.``, ``*``
or ``>`` (see :data:`VOLUME_ID_PATTERN`).
"""

from __future__ import annotations

import re

#: A volume id: what CSI's ``volume_id`` may be for this driver. One NATS subject
#: token and one JetStream KV key (KV keys allow ``[-/_=.a-zA-Z0-9]``; ``.`` is left
#: out because it separates subject tokens).
VOLUME_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

POLICY_SET_PREFIX = "interposer.policy.set"
POLICY_GET_PREFIX = "interposer.policy.get"
POLICY_CLEAR_PREFIX = "interposer.policy.clear"
POLICY_HISTORY_PREFIX = "interposer.policy.history"
POLICY_ROLLBACK_PREFIX = "interposer.policy.rollback"
#: ``interposer.policy.status`` (every volume) and ``interposer.policy.status.<volume>``.
POLICY_STATUS = "interposer.policy.status"
#: Every volume with a stored policy (no volume token).
POLICY_LIST = "interposer.policy.list"
#: ``interposer.policy.select.<name>``: store a selector policy (``SelectorRequest``).
POLICY_SELECT_PREFIX = "interposer.policy.select"
#: ``interposer.policy.unselect.<name>``: deactivate a selector (a new revision).
POLICY_UNSELECT_PREFIX = "interposer.policy.unselect"
#: ``interposer.policy.selector.history.<name>``: every stored revision of the selector
#: policy ``name`` (reply ``HistoryReply``); a selector's key ``_sel.<name>`` cannot be
#: a subject token, so selectors have their own history and rollback subjects.
SELECTOR_HISTORY_PREFIX = "interposer.policy.selector.history"
#: ``interposer.policy.selector.rollback.<name>``: re-store an earlier revision of the
#: selector policy ``name`` (body ``RollbackRequest``; reply ``PolicyReply``).
SELECTOR_ROLLBACK_PREFIX = "interposer.policy.selector.rollback"
#: KV keys of selector policies are ``_sel.<name>`` (a volume id has no ``.``, so
#: they cannot collide); every worker watches ``_sel.>``.
SELECTOR_KEY_PREFIX = "_sel."
EVENTS_PREFIX = "interposer.events"
STATUS_PREFIX = "interposer.status"
FAULTS_PREFIX = "interposer.faults"

#: JetStream key-value bucket holding one ``PolicyRecord`` per volume id.
POLICY_KV_BUCKET = "interposer-policy"
#: The JetStream stream behind that bucket, and the subject prefix of its keys
#: (key ``k`` is subject ``$KV.<bucket>.k``; NATS ADR-8).
POLICY_KV_STREAM = f"KV_{POLICY_KV_BUCKET}"
POLICY_KV_SUBJECT_PREFIX = f"$KV.{POLICY_KV_BUCKET}."
#: Header a KV delete or purge marker carries (``DEL``/``PURGE``; none on a put).
KV_OPERATION_HEADER = "KV-Operation"
#: Queue group of the policy service replicas (each request is answered once).
POLICY_QUEUE = "interposer-policy"
#: NATS message header naming who made a policy request (``user@host``); stored in
#: the record as ``author`` and shown by ``interposer policy history``.
AUTHOR_HEADER = "Interposer-Author"
#: Queue group of the collectors (each event batch is counted once).
COLLECTOR_QUEUE = "interposer-collector"


def is_valid_volume_id(volume: str) -> bool:
    """Return True if ``volume`` can be used as a subject token and KV key."""
    return VOLUME_ID_PATTERN.fullmatch(volume) is not None


def _subject(prefix: str, volume: str) -> str:
    if not is_valid_volume_id(volume):
        raise ValueError(f"invalid volume id {volume!r}: must match {VOLUME_ID_PATTERN.pattern}")
    return f"{prefix}.{volume}"


def policy_set(volume: str) -> str:
    """Subject on which a JSON ``Policy`` for ``volume`` is published (reply: ``PolicyReply``)."""
    return _subject(POLICY_SET_PREFIX, volume)


def policy_get(volume: str) -> str:
    """Subject answered with the stored policy of ``volume`` (reply: ``PolicyReply``)."""
    return _subject(POLICY_GET_PREFIX, volume)


def policy_clear(volume: str) -> str:
    """Subject that stores an empty policy for ``volume`` (reply: ``PolicyReply``)."""
    return _subject(POLICY_CLEAR_PREFIX, volume)


def policy_history(volume: str) -> str:
    """Subject answered with every stored revision of ``volume`` (reply: ``HistoryReply``)."""
    return _subject(POLICY_HISTORY_PREFIX, volume)


def policy_rollback(volume: str) -> str:
    """Subject that re-stores an older revision of ``volume`` (body ``RollbackRequest``; reply ``PolicyReply``)."""
    return _subject(POLICY_ROLLBACK_PREFIX, volume)


def policy_status(volume: str | None = None) -> str:
    """Subject answered with desired vs applied revisions (reply: ``StatusReply``).

    Args:
        volume: one volume, or None for every volume the service knows.
    """
    return POLICY_STATUS if volume is None else _subject(POLICY_STATUS, volume)


def policy_select(name: str) -> str:
    """Subject that stores the selector policy ``name`` (body ``SelectorRequest``; reply ``PolicyReply``)."""
    return _subject(POLICY_SELECT_PREFIX, name)


def policy_unselect(name: str) -> str:
    """Subject that deactivates the selector policy ``name`` (reply ``PolicyReply``)."""
    return _subject(POLICY_UNSELECT_PREFIX, name)


def selector_history(name: str) -> str:
    """Subject answered with every stored revision of the selector policy ``name`` (reply ``HistoryReply``)."""
    return _subject(SELECTOR_HISTORY_PREFIX, name)


def selector_rollback(name: str) -> str:
    """Subject that re-stores an earlier revision of the selector policy ``name`` (body ``RollbackRequest``)."""
    return _subject(SELECTOR_ROLLBACK_PREFIX, name)


def selector_key(name: str) -> str:
    """KV key of the selector policy ``name`` (a selector name follows the volume id rules)."""
    if not is_valid_volume_id(name):
        raise ValueError(f"invalid selector name {name!r}: must match {VOLUME_ID_PATTERN.pattern}")
    return f"{SELECTOR_KEY_PREFIX}{name}"


def events(volume: str) -> str:
    """Subject of the msgpack ``EventBatch`` messages of ``volume``."""
    return _subject(EVENTS_PREFIX, volume)


def status(volume: str) -> str:
    """Subject of the msgpack ``WorkerStatus`` heartbeats of ``volume``."""
    return _subject(STATUS_PREFIX, volume)


def faults(volume: str) -> str:
    """Subject of the msgpack arrays of ``FaultRecord`` of ``volume``."""
    return _subject(FAULTS_PREFIX, volume)


def volume_of(subject: str) -> str:
    """Return the volume id, the last token of ``subject``."""
    return subject.rpartition(".")[2]
