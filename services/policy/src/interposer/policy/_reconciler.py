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
* **Acknowledgement.** Each resource's status also says how many volumes its
  target selects (``targetedVolumes``: volumes with a live worker — heartbeat within
  ``worker_stale_after_s`` — that is the target volume, or that the selector
  matches by the worker's volume, namespace, pod, node and labels), how many of
  them run the stored revision or a later one on every live worker
  (``appliedVolumes``), and which do not yet (``laggingVolumes``, sorted, at most
  ``MAX_LAGGING_LISTED``). It follows the heartbeats (the service's
  ``StatusCache``): a pass runs when a worker appears or reports another revision,
  and at least every ``refresh_s`` (workers going stale), and patches only the
  resources whose figures changed, each at most once per ``interval_s``. These
  fields are written by their own merge patch, apart from the ``Accepted`` ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import msgspec
from nats.js.errors import KeyWrongLastSequenceError

from interposer.proto import Policy, PolicyError, PolicyRecord, Selector, WorkerState, subjects
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
#: Least time between two acknowledgement passes (so between two patches of one resource), seconds.
DEFAULT_ACK_INTERVAL_S = 1.0
#: Longest time between two acknowledgement passes without a heartbeat change (stale workers), seconds.
DEFAULT_ACK_REFRESH_S = 2.0
#: Most lagging volume ids a status lists; the others are only counted.
MAX_LAGGING_LISTED = 20
#: The status fields of the acknowledgement (written by their own patch).
ACK_FIELDS = ("targetedVolumes", "appliedVolumes", "laggingVolumes")


class Target(msgspec.Struct, frozen=True):
    """What a resource's stored revision is for.

    Attributes:
        key: the bucket key written (a volume id, or ``_sel.<name>``).
        revision: the revision stored for the resource's current generation.
        selector: the selector of a selector target; None = the volume ``key``.
    """

    key: str
    revision: int
    selector: Selector | None = None


def acknowledgement(target: Target, live: dict[str, list[WorkerState]]) -> dict[str, Any]:
    """The acknowledgement status fields of ``target``.

    Args:
        target: the resource's key, revision and selector.
        live: volume → its live workers (``StatusCache.live()``).

    Returns:
        ``{"targetedVolumes": int, "appliedVolumes": int, "laggingVolumes": [volume id, …]}``:
        a volume is applied when every live worker it has that the target selects
        reports ``target.revision`` or later; the list is sorted and cut at
        ``MAX_LAGGING_LISTED``.
    """
    if target.selector is None:
        chosen = {target.key: live[target.key]} if target.key in live else {}
    else:
        selector = target.selector
        chosen = {}
        for volume, workers in live.items():
            matching = [w for w in workers if selector.matches(volume=volume, namespace=w.namespace, pod=w.pod,
                                                               node=w.node, labels=w.labels)]
            if matching:
                chosen[volume] = matching
    lagging = sorted(v for v, workers in chosen.items() if any(w.applied_revision < target.revision
                                                              for w in workers))
    return {"targetedVolumes": len(chosen), "appliedVolumes": len(chosen) - len(lagging),
            "laggingVolumes": lagging[:MAX_LAGGING_LISTED]}


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
        #: (namespace, name) → what its stored revision is for (resources with one).
        self.targets: dict[tuple[str, str], Target] = {}
        #: (namespace, name) → the acknowledgement fields its status has (as last written or read).
        self._acked: dict[tuple[str, str], dict[str, Any]] = {}
        self._heartbeats_changed = asyncio.Event()

    async def sync(self, objects: list[dict[str, Any]]) -> None:
        """Handle a full list: apply every resource, then release what no resource owns any more."""
        owners: dict[str, set[str]] = {}
        for obj in objects:
            meta = obj["metadata"]
            owners[author_of(meta["namespace"], meta["name"])] = await self.apply(obj)
        listed = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in objects}
        for gone in set(self.targets) - listed:
            self._untrack(*gone)
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
            self._track(namespace, name, Target(key, status.get("revision", 0), spec.target.selector), status)
            return {key}
        try:
            revision = await self._write(key, spec, policy, author)
        except PolicyError as exc:  # accepted by the decoder, refused by the store (a past expires_at_s)
            await self._report(obj, REASON_INVALID, str(exc), status.get("revision", 0), previous_key)
            return kept
        if previous_key and previous_key != key:
            await self.release(previous_key, author, f"InterposerPolicy {namespace}/{name} now targets {key}")
        await self._report(obj, REASON_STORED, f"stored as revision {revision} of {key}", revision, key)
        self._track(namespace, name, Target(key, revision, spec.target.selector), status)
        return {key}

    def _track(self, namespace: str, name: str, target: Target, status: dict[str, Any]) -> None:
        """Follow the acknowledgement of ``target`` for this resource (``status``: as it has it now)."""
        if self.targets.get((namespace, name)) != target:
            self.targets[(namespace, name)] = target
            self._heartbeats_changed.set()  # recount at the next pass
        self._acked.setdefault((namespace, name), {f: status.get(f) for f in ACK_FIELDS})

    def _untrack(self, namespace: str, name: str) -> None:
        self.targets.pop((namespace, name), None)
        self._acked.pop((namespace, name), None)

    async def acknowledge(self) -> None:
        """One pass: patch the acknowledgement fields of every resource whose figures changed.

        A failed patch is logged and tried again at the next pass.
        """
        live = self.service.status.live()
        for (namespace, name), target in list(self.targets.items()):
            fields = acknowledgement(target, live)
            if self._acked.get((namespace, name)) == fields:
                continue
            try:
                await self.write_status(namespace, name, fields)
            except Exception as exc:  # noqa: BLE001 - the API away: the next pass tries again
                log.warning("InterposerPolicy %s/%s: acknowledgement not written (%s)", namespace, name, exc)
                self._heartbeats_changed.set()
                continue
            if (namespace, name) in self.targets:  # not deleted meanwhile
                self._acked[(namespace, name)] = fields

    async def run_acknowledgements(self, interval_s: float = DEFAULT_ACK_INTERVAL_S,
                                   refresh_s: float = DEFAULT_ACK_REFRESH_S) -> None:
        """Keep every resource's acknowledgement current until cancelled.

        Args:
            interval_s: least time between two passes (rate limit of the patches), seconds.
            refresh_s: longest time between two passes when no heartbeat changed
                (so a worker going stale is seen), seconds.
        """
        listeners = self.service.status.listeners
        listeners.append(self._heartbeats_changed.set)
        try:
            await self._acknowledge_forever(interval_s, refresh_s)
        finally:
            listeners.remove(self._heartbeats_changed.set)

    async def _acknowledge_forever(self, interval_s: float, refresh_s: float) -> None:
        while True:
            try:
                await asyncio.wait_for(self._heartbeats_changed.wait(), refresh_s)
            except asyncio.TimeoutError:
                pass
            self._heartbeats_changed.clear()
            await self.acknowledge()
            await asyncio.sleep(interval_s)

    async def delete(self, obj: dict[str, Any]) -> None:
        """The resource is gone: release the keys whose current record it wrote."""
        meta = obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        self._untrack(namespace, name)
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
