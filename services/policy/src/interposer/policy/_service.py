"""The policy service: validate policy changes from NATS and store them in JetStream KV.

Requests (any client; plain ``nats pub`` works, ``nats req`` gets a reply). A
request may carry the header ``Interposer-Author: user@host``; it is stored with
the revision and shown by ``interposer policy history``.

- ``interposer.policy.set.<volume>`` — body: JSON ``Policy``. Reply
  ``{"ok": true, "revision": N}`` or ``{"ok": false, "error": "..."}``; a rejected
  policy changes nothing.
- ``interposer.policy.get.<volume>`` — reply ``{"ok": true, "revision": N, "policy": {...}}``
  (revision 0 and an empty policy when none is stored).
- ``interposer.policy.clear.<volume>`` — stores an empty policy (workers serve plain
  passthrough); reply ``{"ok": true, "revision": N}``.
- ``interposer.policy.history.<volume>`` — reply ``HistoryReply``: every revision
  still in the bucket's history (who, when, what), oldest first.
- ``interposer.policy.rollback.<volume>`` — body ``{"revision": N}``: re-stores that
  revision's policy as a new revision; reply ``PolicyReply``.
- ``interposer.policy.selector.history.<name>``, ``interposer.policy.selector.rollback.<name>``
  — the same for the selector policy ``name`` (key ``_sel.<name>``); a rollback
  restores that revision's selector and priority with its policy.
- ``interposer.policy.list`` — reply ``ListReply``: every volume with a policy.
- ``interposer.policy.status`` / ``interposer.policy.status.<volume>`` — reply
  ``StatusReply``: desired (KV) vs applied (worker heartbeats) revision.

Replicas subscribe in one queue group, so each request is handled once; every
replica watches the bucket (expiries) and the heartbeats (status).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import msgspec
import nats
from nats.aio.msg import Msg

from interposer.proto import (
    HistoryEntry,
    HistoryReply,
    ListReply,
    Policy,
    PolicyError,
    Selector,
    PolicyReply,
    RollbackRequest,
    StatusReply,
    VolumeSummary,
    decode_json,
    decode_policy,
    decode_selector_request,
    encode_json,
    subjects,
)
from interposer.proto import resource
from interposer.proto.connection import NatsErrorLog, connect_options

from ._config import PolicyServiceConfig
from ._expiry import ExpiryScheduler
from ._ordering import OrderedPerKey
from ._status import StatusCache
from ._store import PolicyStore, ensure_bucket

log = logging.getLogger(__name__)

#: Wait between reconnect attempts, seconds.
DEFAULT_RECONNECT_TIME_WAIT_S = 1.0
#: Wait before retrying a failed bucket watch, seconds.
DEFAULT_WATCH_RETRY_S = 1.0
#: Longest author name kept, characters.
MAX_AUTHOR_LENGTH = 256

Reply = PolicyReply | HistoryReply | ListReply | StatusReply


def _author(msg: Msg) -> str:
    value = (msg.headers or {}).get(subjects.AUTHOR_HEADER, "")
    return value[:MAX_AUTHOR_LENGTH]


class PolicyService:
    """Answers policy requests; the only writer of the KV bucket.

    Args:
        store: the policy bucket.
        status: heartbeat view (for ``status`` requests); a fresh one if None.
    """

    def __init__(self, store: PolicyStore, status: StatusCache | None = None,
                 config: PolicyServiceConfig | None = None) -> None:
        config = config or PolicyServiceConfig()
        self.store = store
        self.status = status or StatusCache(config.worker_stale_after_s, config.worker_forget_after_s)
        self.requests = OrderedPerKey()

    async def _store(self, volume: str, policy: Policy, author: str, action: str,
                     source_revision: int = 0, selector: Selector | None = None,
                     priority: int = 0, expect_revision: int | None = None) -> PolicyReply:
        try:
            revision = await self.store.store(volume, policy, author=author, action=action,
                                              source_revision=source_revision, selector=selector,
                                              priority=priority, expect_revision=expect_revision)
        except PolicyError as exc:
            return PolicyReply(ok=False, error=str(exc))
        log.info("volume %s: revision %d (%s by %s, %d layers)", volume, revision, action, author or "?",
                 len(policy.layers))
        return PolicyReply(ok=True, revision=revision)

    async def set_policy(self, volume: str, body: bytes, author: str = "",
                         expect_revision: int | None = None) -> PolicyReply:
        """Validate ``body`` and store it as the policy of ``volume``.

        Args:
            volume: volume id.
            body: JSON ``Policy``.
            author: recorded with the revision.
            expect_revision: store only if this is still the current revision
                (0 = no revision yet); None = whatever is current (retried on races).

        Returns:
            ``ok`` with the new revision, or ``ok=False`` with the reason; nothing is
            stored on error.

        Raises:
            KeyWrongLastSequenceError: ``expect_revision`` is no longer current.
        """
        if not subjects.is_valid_volume_id(volume):
            return PolicyReply(ok=False, error=f"invalid volume id {volume!r}")
        try:
            policy = decode_policy(body)
        except PolicyError as exc:
            log.info("rejected policy for %s: %s", volume, exc)
            return PolicyReply(ok=False, error=str(exc))
        return await self._store(volume, policy, author, "set", expect_revision=expect_revision)

    async def select(self, name: str, body: bytes, author: str = "",
                     expect_revision: int | None = None) -> PolicyReply:
        """Validate a ``SelectorRequest`` and store it under ``_sel.<name>``.

        Every worker watches ``_sel.>`` and merges the selector's policy into its
        own when the selector matches it (``interposer.proto.selector``).
        ``expect_revision`` as in :meth:`set_policy`.

        Returns:
            ``ok`` with the new revision, or ``ok=False`` naming the field; nothing
            is stored on error.
        """
        if not subjects.is_valid_volume_id(name):
            return PolicyReply(ok=False, error=f"invalid selector name {name!r}")
        try:
            request = decode_selector_request(body)
        except PolicyError as exc:
            log.info("rejected selector %s: %s", name, exc)
            return PolicyReply(ok=False, error=str(exc))
        return await self._store(subjects.selector_key(name), request.policy, author, "select",
                                 selector=request.selector, priority=request.priority,
                                 expect_revision=expect_revision)

    async def unselect(self, name: str, author: str = "", expect_revision: int | None = None) -> PolicyReply:
        """Deactivate the selector ``name`` (a new revision without a selector).

        ``expect_revision`` as in :meth:`set_policy`.
        """
        if not subjects.is_valid_volume_id(name):
            return PolicyReply(ok=False, error=f"invalid selector name {name!r}")
        _, record = await self.store.current(subjects.selector_key(name))
        if record is None or record.selector is None:
            return PolicyReply(ok=False, error=f"no active selector {name!r}")
        return await self._store(subjects.selector_key(name), Policy(description="unselected"), author,
                                 "unselect", expect_revision=expect_revision)

    async def get_policy(self, volume: str) -> PolicyReply:
        """Return the stored policy of ``volume`` (empty, revision 0, if none)."""
        if not subjects.is_valid_volume_id(volume):
            return PolicyReply(ok=False, error=f"invalid volume id {volume!r}")
        revision, record = await self.store.current(volume)
        return PolicyReply(ok=True, revision=revision, policy=record.policy if record else Policy())

    async def clear_policy(self, volume: str, author: str = "", expect_revision: int | None = None,
                           description: str = "cleared") -> PolicyReply:
        """Store an empty policy for ``volume``: workers serve plain passthrough.

        Clearing is a revision like any other (not a KV delete), so it has a
        revision number that ``--wait`` and the history can refer to.
        ``expect_revision`` as in :meth:`set_policy`; ``description`` says why.
        """
        if not subjects.is_valid_volume_id(volume):
            return PolicyReply(ok=False, error=f"invalid volume id {volume!r}")
        return await self._store(volume, Policy(description=description), author, "clear",
                                 expect_revision=expect_revision)

    async def rollback(self, volume: str, body: bytes, author: str = "") -> PolicyReply:
        """Re-store the policy of an earlier revision of ``volume`` as a new revision.

        A relative ``expires_after_s`` in that policy is armed again from now; an
        absolute ``expires_at_s`` that has passed is refused.

        Returns:
            ``ok`` with the new revision, or ``ok=False`` naming ``$.revision`` (no
            such revision of this volume in the history) or the body's field;
            nothing is stored on error.
        """
        if not subjects.is_valid_volume_id(volume):
            return PolicyReply(ok=False, error=f"invalid volume id {volume!r}")
        return await self._rollback(volume, f"volume {volume}", body, author)

    async def rollback_selector(self, name: str, body: bytes, author: str = "") -> PolicyReply:
        """Re-store an earlier revision of the selector policy ``name`` as a new revision.

        The revision's selector, priority and policy come back together (an
        ``unselect`` revision restores "inactive"). Expiry as in :meth:`rollback`.

        Returns:
            As :meth:`rollback`; a revision of another key (a volume, another
            selector) is refused.
        """
        if not subjects.is_valid_volume_id(name):
            return PolicyReply(ok=False, error=f"invalid selector name {name!r}")
        return await self._rollback(subjects.selector_key(name), f"selector {name}", body, author)

    async def _rollback(self, key: str, what: str, body: bytes, author: str) -> PolicyReply:
        try:
            request = decode_json(body, RollbackRequest)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return PolicyReply(ok=False, error=f"bad rollback request ({{\"revision\": N}} expected): {exc}")
        record = await self.store.record_at(key, request.revision)
        if record is None:
            return PolicyReply(ok=False, error=f"{what} has no revision {request.revision} in its history "
                                               f"- at `$.revision`")
        return await self._store(key, record.policy, author, "rollback", source_revision=request.revision,
                                 selector=record.selector, priority=record.priority)

    async def history(self, volume: str) -> HistoryReply:
        """Every revision of ``volume`` still in the bucket's history, oldest first."""
        if not subjects.is_valid_volume_id(volume):
            return HistoryReply(ok=False, error=f"invalid volume id {volume!r}")
        return await self._history(volume)

    async def selector_history(self, name: str) -> HistoryReply:
        """Every revision of the selector policy ``name`` still in the bucket's history, oldest first.

        Each entry carries the revision's ``selector`` (None once unselected) and
        ``priority``; the reply's ``volume`` is the key ``_sel.<name>``.
        """
        if not subjects.is_valid_volume_id(name):
            return HistoryReply(ok=False, error=f"invalid selector name {name!r}")
        return await self._history(subjects.selector_key(name))

    async def _history(self, key: str) -> HistoryReply:
        entries = [
            HistoryEntry(revision=rev, updated_at_s=r.updated_at_s, author=r.author, action=r.action,
                         source_revision=r.source_revision, expires_at_s=r.expires_at_s, policy=r.policy,
                         selector=r.selector, priority=r.priority)
            for rev, r in await self.store.history(key)
        ]
        return HistoryReply(ok=True, volume=key, entries=entries)

    async def list_volumes(self) -> ListReply:
        """Every volume with a stored policy and its current revision."""
        summaries = []
        for volume in await self.store.volumes():
            revision, record = await self.store.current(volume)
            if record is not None:
                summaries.append(VolumeSummary(
                    volume=volume, revision=revision, updated_at_s=record.updated_at_s, author=record.author,
                    action=record.action, layers=len(record.policy.layers), expires_at_s=record.expires_at_s,
                ))
        return ListReply(ok=True, volumes=summaries)

    async def volume_status(self, volume: str | None) -> StatusReply:
        """Desired vs applied revision of ``volume``, or of every known volume (None)."""
        if volume is not None and not subjects.is_valid_volume_id(volume):
            return StatusReply(ok=False, error=f"invalid volume id {volume!r}")
        volumes = [volume] if volume is not None else sorted(set(await self.store.volumes()) | set(self.status.workers))
        volumes = [v for v in volumes if not v.startswith(subjects.SELECTOR_KEY_PREFIX)]  # no workers of their own
        out = []
        for name in volumes:
            revision, record = await self.store.current(name)
            out.append(self.status.volume_status(name, revision, record.updated_at_s if record else 0.0))
        return StatusReply(ok=True, volumes=out)

    async def dispatch(self, msg: Msg) -> Reply:
        """Answer one request according to its subject.

        Dispatch on ``msg.subject`` (never on the subscription's subject): any
        client allowed to create a JetStream consumer (workers, for their KV
        watch) could point its deliver subject at ``interposer.policy.clear.<v>``;
        such deliveries keep their ``$KV.…`` subject and are refused here.
        """
        author = _author(msg)
        if author.startswith(resource.AUTHOR_PREFIX):
            # The reconciler's ownership marker (see _reconciler.py): a request may not forge it.
            return PolicyReply(ok=False, error=f"author {author!r}: the prefix {resource.AUTHOR_PREFIX!r} is "
                                               f"reserved for InterposerPolicy resources - header "
                                               f"{subjects.AUTHOR_HEADER}")
        if msg.subject == subjects.POLICY_LIST:
            return await self.list_volumes()
        if msg.subject == subjects.POLICY_STATUS:
            return await self.volume_status(None)
        prefix, _, volume = msg.subject.rpartition(".")
        handlers: dict[str, Callable[[], Awaitable[Reply]]] = {
            subjects.POLICY_SET_PREFIX: lambda: self.set_policy(volume, msg.data, author),
            subjects.POLICY_GET_PREFIX: lambda: self.get_policy(volume),
            subjects.POLICY_CLEAR_PREFIX: lambda: self.clear_policy(volume, author),
            subjects.POLICY_ROLLBACK_PREFIX: lambda: self.rollback(volume, msg.data, author),
            subjects.POLICY_HISTORY_PREFIX: lambda: self.history(volume),
            subjects.POLICY_STATUS: lambda: self.volume_status(volume),
            subjects.POLICY_SELECT_PREFIX: lambda: self.select(volume, msg.data, author),
            subjects.POLICY_UNSELECT_PREFIX: lambda: self.unselect(volume, author),
            subjects.SELECTOR_HISTORY_PREFIX: lambda: self.selector_history(volume),
            subjects.SELECTOR_ROLLBACK_PREFIX: lambda: self.rollback_selector(volume, msg.data, author),
        }
        handler = handlers.get(prefix)
        if handler is None:
            return PolicyReply(ok=False, error=f"unknown subject {msg.subject}")
        return await handler()

    async def handle(self, msg: Msg) -> None:
        """Queue one request (subscription callback): requests for different volumes run
        concurrently, those for one volume (the subject's last token) in arrival order."""
        await self.requests.submit(msg.subject.rpartition(".")[2], lambda: self.answer(msg))

    async def answer(self, msg: Msg) -> None:
        """Dispatch one request and reply if asked to; a failure still gets an answer."""
        try:
            reply = await self.dispatch(msg)
        except Exception as exc:  # noqa: BLE001 - a store failure must still get an answer
            log.exception("request on %s failed", msg.subject)
            reply = PolicyReply(ok=False, error=f"internal error: {exc}")
        if msg.reply:
            await msg.respond(encode_json(reply))

    async def on_status(self, msg: Msg) -> None:
        """Record one worker heartbeat."""
        self.status.observe(msg.data)


async def watch_bucket(store: PolicyStore, expiry: ExpiryScheduler, restart: asyncio.Event) -> None:
    """Feed every change of the bucket to ``expiry`` (and its revision to ``store``'s
    compare-and-set cache); start over when ``restart`` is set.

    A KV watch is a JetStream consumer on the server; after a NATS restart it may be
    gone, so the watch is re-created on every reconnect (its first values are the
    latest record of each volume, which re-arms every pending deadline).
    """
    while True:
        restart.clear()
        try:
            watcher = await store.kv.watchall()
        except Exception as exc:  # noqa: BLE001 - JetStream not ready, NATS away
            log.warning("bucket watch failed (%s); retrying", exc)
            await asyncio.sleep(DEFAULT_WATCH_RETRY_S)
            continue

        async def consume() -> None:
            async for entry in watcher:
                if entry is not None:
                    store.observe(entry.key, entry.revision)
                    expiry.observe(entry.key, entry.revision, None if entry.operation else entry.value)

        consumer = asyncio.create_task(consume())
        waiter = asyncio.create_task(restart.wait())
        await asyncio.wait({consumer, waiter}, return_when=asyncio.FIRST_COMPLETED)
        for task in (consumer, waiter):
            task.cancel()
        try:
            await watcher.stop()
        except Exception:  # noqa: BLE001 - the consumer may already be gone with the old server
            pass
        log.info("re-creating the bucket watch")


def _log_failure(task: asyncio.Task[None]) -> None:
    """A background task must not die silently (it would only show at shutdown)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %r", task.get_coro().__qualname__, task.exception(), exc_info=task.exception())


async def serve(config: PolicyServiceConfig) -> None:
    """Connect, subscribe and answer requests until SIGTERM/SIGINT; then drain."""
    restart_watch = asyncio.Event()

    async def on_reconnect() -> None:
        log.info("reconnected to NATS")
        restart_watch.set()

    nc = await nats.connect(
        config.nats_url, name="interposer-policy", max_reconnect_attempts=-1,
        reconnect_time_wait=DEFAULT_RECONNECT_TIME_WAIT_S, reconnected_cb=on_reconnect,
        error_cb=NatsErrorLog(log, config.nats_url).log, **connect_options(config.nats_creds),
    )
    js = nc.jetstream()
    store = PolicyStore(await ensure_bucket(js, config), js)
    service = PolicyService(store, config=config)
    expiry = ExpiryScheduler(store)
    requests = []
    for prefix in (subjects.POLICY_SET_PREFIX, subjects.POLICY_GET_PREFIX, subjects.POLICY_CLEAR_PREFIX,
                   subjects.POLICY_HISTORY_PREFIX, subjects.POLICY_ROLLBACK_PREFIX, subjects.POLICY_STATUS,
                   subjects.POLICY_SELECT_PREFIX, subjects.POLICY_UNSELECT_PREFIX,
                   subjects.SELECTOR_HISTORY_PREFIX, subjects.SELECTOR_ROLLBACK_PREFIX):
        requests.append(await nc.subscribe(f"{prefix}.*", queue=subjects.POLICY_QUEUE, cb=service.handle))
    for subject in (subjects.POLICY_LIST, subjects.POLICY_STATUS):
        requests.append(await nc.subscribe(subject, queue=subjects.POLICY_QUEUE, cb=service.handle))
    await nc.subscribe(f"{subjects.STATUS_PREFIX}.*", cb=service.on_status)
    tasks = [asyncio.create_task(watch_bucket(store, expiry, restart_watch)), asyncio.create_task(expiry.run())]
    if config.kubernetes:
        from ._kubernetes import reconcile  # imports the kubernetes client: only when asked for

        tasks.append(asyncio.create_task(reconcile(service, config)))
    for task in tasks:
        task.add_done_callback(_log_failure)
    await nc.flush()
    log.info("policy service ready on %s", config.nats_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    # Stop taking requests, finish (store and answer) the ones taken, then close. With
    # NATS gone there is nothing to drain (nats-py would wait out its drain timeouts).
    if nc.is_connected:
        await asyncio.gather(*(sub.drain() for sub in requests), return_exceptions=True)
    await service.requests.drain()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if nc.is_connected:
        await nc.drain()
    else:
        log.info("NATS unreachable at shutdown: closing without draining")
        await nc.close()
