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
EVENTS_PREFIX = "interposer.events"
STATUS_PREFIX = "interposer.status"
FAULTS_PREFIX = "interposer.faults"

#: JetStream key-value bucket holding one ``PolicyRecord`` per volume id.
POLICY_KV_BUCKET = "interposer-policy"
#: Queue group of the policy service replicas (each request is answered once).
POLICY_QUEUE = "interposer-policy"
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
    """Subject that deletes the policy of ``volume`` (reply: ``PolicyReply``)."""
    return _subject(POLICY_CLEAR_PREFIX, volume)


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
