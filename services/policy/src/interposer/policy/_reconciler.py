"""Reconcile ``InterposerPolicy`` resources into the policy bucket and report their status.

Knows nothing of HTTP: it is handed the resources as the API server returns them
(dicts, from ``_kubernetes.ResourceFeed``) and coroutines that write a status and
read a resource.

* **Write path.** An accepted spec is stored through :class:`PolicyService`
  (``set_policy`` for a volume target, ``select`` for a selector target) — the
  same validation and compare-and-set write as a NATS request — with the author
  ``k8s:<namespace>/<name>``.
* **Once per generation.** A resource whose ``status.observedGeneration`` is its
  ``metadata.generation`` (and whose status says it was stored under the same
  key) is left alone: a later ``interposer policy set`` or an expiry of the same
  volume stands until the resource's spec changes. Before writing, the current
  record is compared with the spec: if it is already this resource's (same
  author, policy, selector and priority), nothing is written. Together with the
  compare-and-set this makes two replicas (or a restart between the write and
  the status) store each generation once.
* **Ownership marker instead of a finalizer.** The author of the current record
  says which resource owns a key. Deleting a resource clears (volume) or
  unselects (selector) the keys whose current record it wrote — never a key
  someone changed after it. The watch's ``DELETED`` event does it at once; every
  full list (start, ``410 Gone``, periodic resync) also sweeps: any key whose
  current record a resource wrote that is not in the list is released — after a
  ``get`` confirms the resource is gone, because another replica may have stored
  a resource created after this replica's list was taken. So a deletion while no
  policy service ran is caught up, and no finalizer can keep a resource (or its
  namespace) from being deleted when the policy service is not installed any
  more. A finalizer would also need ``update`` on the resources themselves; this
  needs ``get`` on them and ``patch`` on their status only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import msgspec
from nats.js.errors import KeyWrongLastSequenceError

from interposer.proto import Policy, PolicyError, PolicyRecord, subjects
from interposer.proto.resource import (
    AUTHOR_PREFIX,
    CONDITION_ACCEPTED,
    ResourceSpec,
    author_of,
    decode_spec,
    key_of,
    relocate_policy_error,
)

from ._service import PolicyService
from ._store import StoreConflict

log = logging.getLogger(__name__)

#: ``(namespace, name, status)`` → writes ``status`` (the whole ``status`` object).
StatusWriter = Callable[[str, str, dict[str, Any]], Awaitable[None]]
#: ``(namespace, name)`` → the resource as the API server has it now, None if it does not exist.
ResourceReader = Callable[[str, str], Awaitable[dict[str, Any] | None]]

#: ``reason`` of the ``Accepted`` condition: the spec is stored.
REASON_STORED = "Stored"
#: ``reason`` of the ``Accepted`` condition: the spec was rejected (the message names the field).
REASON_INVALID = "Invalid"
#: Compare-and-set attempts for one key before giving up until the next event or resync.
DEFAULT_CAS_ATTEMPTS = 8
#: Longest condition message (``metav1.Condition.message`` allows 32768), characters.
MAX_MESSAGE_CHARS = 32768


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _live(key: str, record: PolicyRecord) -> bool:
    """The record still has an effect a release would undo (not already cleared/unselected)."""
    if key.startswith(subjects.SELECTOR_KEY_PREFIX):
        return record.selector is not None
    return record.action != "clear"


def _same(record: PolicyRecord, spec: ResourceSpec, policy: Policy) -> bool:
    return (record.action in ("set", "select") and record.policy == policy
            and record.selector == spec.target.selector and record.priority == (spec.priority or 0))


class Reconciler:
    """Applies ``InterposerPolicy`` resources to the bucket (see the module docstring).

    Args:
        service: the policy service whose validation and writes are used.
        write_status: writes a resource's ``status``.
        read_resource: reads a resource (the sweep's check that it is gone).
        now: RFC 3339 time for ``lastTransitionTime`` (tests).
    """

    def __init__(self, service: PolicyService, write_status: StatusWriter, read_resource: ResourceReader,
                 now: Callable[[], str] = _now) -> None:
        self.service = service
        self.write_status = write_status
        self.read_resource = read_resource
        self.now = now

    async def sync(self, objects: list[dict[str, Any]]) -> None:
        """Handle a full list: apply every resource, then release what no resource owns any more."""
        owners: dict[str, set[str]] = {}
        for obj in objects:
            meta = obj["metadata"]
            owners[author_of(meta["namespace"], meta["name"])] = await self.apply(obj)
        await self.sweep(owners)

    async def apply(self, obj: dict[str, Any]) -> set[str]:
        """Store the resource's spec if this generation is not stored yet; write its status.

        Returns:
            The keys the resource may own: its target's key, or, while its spec
            is invalid, the key of its last accepted generation (kept in force).

        Raises:
            Exception: the bucket is unreachable (the caller retries).
        """
        meta = obj["metadata"]
        namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation", 0)
        status = obj.get("status") or {}
        previous_key = status.get("key") or ""
        author = author_of(namespace, name)
        kept = {previous_key} if previous_key else set()
        try:
            spec, policy = decode_spec(obj.get("spec"))
        except PolicyError as exc:
            log.info("InterposerPolicy %s/%s generation %s rejected: %s", namespace, name, generation, exc)
            await self._report(obj, REASON_INVALID, str(exc), status.get("revision", 0), previous_key)
            return kept
        key = key_of(namespace, name, spec)
        if (status.get("observedGeneration") == generation and previous_key == key
                and self._accepted(status) == "True"):
            return {key}
        try:
            revision = await self._write(key, spec, policy, author)
        except PolicyError as exc:  # accepted by the decoder, refused by the store (a past expires_at_s)
            await self._report(obj, REASON_INVALID, str(exc), status.get("revision", 0), previous_key)
            return kept
        if previous_key and previous_key != key:
            await self.release(previous_key, author, f"InterposerPolicy {namespace}/{name} now targets {key}")
        await self._report(obj, REASON_STORED, f"stored as revision {revision} of {key}", revision, key)
        return {key}

    async def delete(self, obj: dict[str, Any]) -> None:
        """The resource is gone: release the keys whose current record it wrote."""
        meta = obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        keys = {(obj.get("status") or {}).get("key") or ""}
        try:
            keys.add(key_of(namespace, name, decode_spec(obj.get("spec"))[0]))
        except PolicyError:
            pass  # an invalid last spec wrote nothing; its status names the key it had
        for key in sorted(k for k in keys if k):
            await self.release(key, author_of(namespace, name),
                               f"InterposerPolicy {namespace}/{name} deleted")

    async def sweep(self, owners: dict[str, set[str]]) -> None:
        """Release every key whose current record a resource wrote that is gone.

        A resource in ``owners`` that no longer targets a key it wrote released it
        when it was applied (its status names the old key); here only resources
        missing from the list are considered, and each is read first: one
        created after the list was taken may already have been stored by another
        replica, and its own event follows.

        Args:
            owners: author (``k8s:<namespace>/<name>``) → the keys it may own, for
                every resource in the list.
        """
        for key in await self.service.store.volumes():
            _, record = await self.service.store.current(key)
            if (record is None or not record.author.startswith(AUTHOR_PREFIX) or not _live(key, record)
                    or key in owners.get(record.author, set())):
                continue
            namespace, _, name = record.author[len(AUTHOR_PREFIX):].partition("/")
            if record.author not in owners and await self.read_resource(namespace, name) is not None:
                log.info("%s: InterposerPolicy %s/%s exists but was not listed; left to its events",
                         key, namespace, name)
                continue
            await self.release(key, record.author, f"InterposerPolicy {namespace}/{name} deleted")

    async def release(self, key: str, author: str, why: str) -> int | None:
        """Clear (volume) or unselect (selector) ``key`` if its current record is ``author``'s.

        Returns:
            The new revision, or None if the key is not (or no longer) ``author``'s
            or already released.
        """
        for _ in range(DEFAULT_CAS_ATTEMPTS):
            current, record = await self.service.store.current(key)
            if record is None or record.author != author or not _live(key, record):
                return None
            try:
                if key.startswith(subjects.SELECTOR_KEY_PREFIX):
                    reply = await self.service.unselect(key[len(subjects.SELECTOR_KEY_PREFIX):], author,
                                                        expect_revision=current)
                else:
                    reply = await self.service.clear_policy(key, author, expect_revision=current,
                                                            description=why[:1024])
            except KeyWrongLastSequenceError:
                continue  # changed meanwhile (another replica released it, or a request won): look again
            log.info("%s: released %s as revision %s (%s)", author, key, reply.revision, why)
            return reply.revision
        raise StoreConflict(f"{key}: {DEFAULT_CAS_ATTEMPTS} concurrent writes in a row while releasing it")

    async def _write(self, key: str, spec: ResourceSpec, policy: Policy, author: str) -> int:
        """Store ``spec`` under ``key`` unless the current record already is it; return the revision.

        Raises:
            PolicyError: the store refused it (message relocated under ``spec.policy``).
            StoreConflict: concurrent writers kept winning.
        """
        for _ in range(DEFAULT_CAS_ATTEMPTS):
            current, record = await self.service.store.current(key)
            if record is not None and record.author == author and _same(record, spec, policy):
                return current
            try:
                if spec.target.selector is None:
                    reply = await self.service.set_policy(key, bytes(spec.policy), author,
                                                          expect_revision=current)
                else:
                    body = msgspec.json.encode({"selector": spec.target.selector, "policy": spec.policy,
                                                "priority": spec.priority or 0})
                    reply = await self.service.select(key[len(subjects.SELECTOR_KEY_PREFIX):], body, author,
                                                      expect_revision=current)
            except KeyWrongLastSequenceError:
                continue  # another replica (or a request) wrote first: compare again
            if not reply.ok or reply.revision is None:
                raise PolicyError(relocate_policy_error(reply.error or "refused"))
            return reply.revision
        raise StoreConflict(f"{key}: {DEFAULT_CAS_ATTEMPTS} concurrent writes in a row")

    @staticmethod
    def _accepted(status: dict[str, Any]) -> str:
        for condition in status.get("conditions") or []:
            if condition.get("type") == CONDITION_ACCEPTED:
                return condition.get("status", "Unknown")
        return "Unknown"

    async def _report(self, obj: dict[str, Any], reason: str, message: str, revision: int, key: str) -> None:
        """Write the status of this generation unless it already says exactly that."""
        meta = obj["metadata"]
        generation = meta.get("generation", 0)
        old = obj.get("status") or {}
        accepted = "True" if reason == REASON_STORED else "False"
        conditions = [c for c in old.get("conditions") or [] if c.get("type") != CONDITION_ACCEPTED]
        transition = self.now()
        for condition in old.get("conditions") or []:
            if condition.get("type") == CONDITION_ACCEPTED and condition.get("status") == accepted:
                transition = condition.get("lastTransitionTime") or transition
        conditions.append({
            "type": CONDITION_ACCEPTED, "status": accepted, "reason": reason,
            "message": message[:MAX_MESSAGE_CHARS], "observedGeneration": generation,
            "lastTransitionTime": transition,
        })
        status = {"observedGeneration": generation, "revision": revision, "key": key,
                  "conditions": conditions}
        if all(old.get(field) == value for field, value in status.items()):
            return
        await self.write_status(meta["namespace"], meta["name"], status)


async def run(reconciler: Reconciler, events: asyncio.Queue[tuple[str, Any]], retry_s: float,
              attempts: int) -> None:
    """Handle feed events in order until cancelled.

    Args:
        reconciler: what handles them.
        events: ``("SYNC", [objects])`` after each full list, ``("ADDED" | "MODIFIED" |
            "DELETED", object)`` from the watch.
        retry_s: wait before handling a failed event again (NATS away), seconds.
        attempts: tries per event; after that it is dropped (logged) and left to the
            next resync.
    """
    handlers = {"SYNC": reconciler.sync, "ADDED": reconciler.apply, "MODIFIED": reconciler.apply,
                "DELETED": reconciler.delete}
    while True:
        kind, payload = await events.get()
        handler = handlers.get(kind)
        if handler is None:
            continue
        for attempt in range(1, attempts + 1):
            try:
                await handler(payload)
                break
            except Exception as exc:  # noqa: BLE001 - the bucket or the API away: try again
                log.warning("handling %s failed (attempt %d of %d): %s", kind, attempt, attempts, exc)
                if attempt == attempts:
                    log.error("giving up on this %s event until the next resync", kind)
                else:
                    await asyncio.sleep(retry_s)
