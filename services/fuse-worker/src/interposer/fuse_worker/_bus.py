"""The worker's NATS side: policy watch, event batches and heartbeats, in an asyncio thread.

pyfuse3 runs on trio; nats-py runs on asyncio. The bus gets its own thread with its
own asyncio loop, so a slow or absent NATS can never stall a FUSE request: the data
path only appends to :class:`Telemetry`'s deque. A new policy revision is compiled
and swapped in on the bus thread when it touches no trio-side state
(``InterposerOperations.apply_off_trio``), else handed to the trio thread with
``TrioToken.run_sync_soon`` (applied there between requests); the bus thread never
waits for the trio thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import msgspec
import nats
import trio
from nats.js.errors import BucketNotFoundError

from interposer.proto import EventBatch, OpEvent, Policy, PolicyRecord, WorkerStatus, decode_record, subjects
from interposer.proto.connection import CredentialsError, NatsErrorLog, connect_options
from interposer.proto.selector import effective_policy, selected

from ._cgroup import memory_limit_bytes
from ._config import IDLE_FLUSH_INTERVAL_MAX_S, WorkerConfig
from ._telemetry import QuotaUsage, Telemetry

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Wait between reconnect attempts, seconds.
DEFAULT_RECONNECT_TIME_WAIT_S = 1.0
#: Wait before looking again for a policy bucket that does not exist yet, seconds.
DEFAULT_BUCKET_RETRY_S = 1.0
#: Time the bus gets to publish what is left when the worker stops, seconds.
DEFAULT_SHUTDOWN_FLUSH_S = 3.0
#: Bytes per page of ``/proc/self/statm`` (sysconf PAGESIZE).
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def resident_memory_bytes() -> int | None:
    """This process's resident set size, bytes (second field of ``/proc/self/statm``, proc(5)); None off Linux."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None


class Bus:
    """Connects one worker to NATS.

    Args:
        config: worker configuration (``nats_url`` must be set).
        telemetry: event buffer to drain.
        apply_policy: called on the trio thread as ``apply_policy(policy, revision)``.
        current_revision: returns the revision in force (for heartbeats).
        trio_token: token of the trio run that serves FUSE.
        quota_usage: returns the usage and limits of the quota in force, None if
            none (for heartbeats); called on the bus thread.
        burst_balance: returns ``WorkerStatus.burst_balance`` (how full the emptiest
            policy-sized throttle bucket is, None if none); called on the bus thread.
        apply_off_trio: called on the bus thread as ``apply_off_trio(policy,
            revision)``: puts the policy in force there and returns True when that
            is safe, else returns False and ``apply_policy`` runs on the trio thread.
        passthrough_files: returns ``(kernel_passthrough_files,
            files_bypassing_layers)`` for heartbeats (``WorkerStatus``); called on the
            bus thread.
    """

    def __init__(
        self, config: WorkerConfig, telemetry: Telemetry, apply_policy: Callable[[Policy, int], None],
        current_revision: Callable[[], int], trio_token: trio.lowlevel.TrioToken,
        quota_usage: Callable[[], QuotaUsage | None] = lambda: None,
        burst_balance: Callable[[], float | None] = lambda: None,
        apply_off_trio: Callable[[Policy, int], bool] = lambda policy, revision: False,
        passthrough_files: Callable[[], tuple[int, int]] = lambda: (0, 0),
    ) -> None:
        self.config = config
        self.telemetry = telemetry
        self.worker_id = telemetry.worker_id
        self._quota_usage = quota_usage
        self._burst_balance = burst_balance
        self._passthrough_files = passthrough_files
        self._apply_policy = apply_policy
        self._apply_off_trio = apply_off_trio
        self._current_revision = current_revision
        self._trio_token = trio_token
        self._started_at_s = time.time()
        self._seq = 0
        #: Set by stop(): the last heartbeat carries it (WorkerStatus.stopped).
        self._stopped_on_request = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._thread_main, name="interposer-bus", daemon=True)
        #: Set once the KV watch has delivered the volume's current policy (or found none).
        self.initial_policy = threading.Event()
        self._rewatch: asyncio.Event | None = None
        #: Set (on the bus loop, see _applied) when a revision was put in force: heartbeat now.
        self._beat: asyncio.Event | None = None
        #: Newest revision put in force on this thread or handed to the trio thread.
        self._handed_revision = 0
        self._encoder = msgspec.msgpack.Encoder()
        #: The volume's own stored policy (empty until the watch delivers one).
        self._own_policy = Policy()
        #: Selector name → its latest record (``_sel.<name>`` keys).
        self._selectors: dict[str, PolicyRecord] = {}
        #: Newest KV revision that changed this volume's effective policy.
        self._pending_revision = 0
        #: Which watches ("volume", "selectors") have delivered their initial values.
        self._initial = {"volume": False, "selectors": False}

    def start(self) -> None:
        """Start the bus thread; returns at once (connecting happens in the background)."""
        self._thread.start()

    def stop(self, timeout_s: float = DEFAULT_SHUTDOWN_FLUSH_S + 2, *, on_request: bool = False) -> None:
        """Publish what is buffered and a last heartbeat, drain the connection and end the thread.

        Args:
            timeout_s: longest wait for the thread, seconds.
            on_request: the worker ends because it was asked to (signal, unmount):
                the last heartbeat says so (``WorkerStatus.stopped``), and consumers
                do not call the worker down. False for a failure.
        """
        self._stopped_on_request = on_request
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)

    def wait_initial_policy(self, timeout_s: float) -> bool:
        """Block until the stored policy of the volume is in force (or none is stored).

        Call from a worker thread (``trio.to_thread.run_sync``): the policy is
        applied on the trio thread, which must keep running meanwhile.

        Args:
            timeout_s: longest wait, seconds.

        Returns:
            False if NATS or the bucket did not answer within ``timeout_s``.
        """
        return self.initial_policy.wait(timeout_s)

    def _thread_main(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._rewatch = asyncio.Event()
        self._beat = asyncio.Event()
        nc = await self._connect()
        if nc is None:
            return
        tasks = [asyncio.create_task(coro) for coro in (self._watch_policy(nc), self._flush_loop(nc), self._status_loop(nc))]
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self._final_flush(nc), DEFAULT_SHUTDOWN_FLUSH_S)
            await asyncio.wait_for(nc.drain(), DEFAULT_SHUTDOWN_FLUSH_S)
        except Exception as exc:  # noqa: BLE001 - shutting down; report and go
            log.warning("could not flush events on shutdown: %s", exc)

    async def _connect(self) -> nats.NATS | None:
        """Connect, retrying until it works or the bus is stopped."""
        assert self._stop is not None
        try:
            options = connect_options(self.config.nats_creds)
        except CredentialsError as exc:
            log.error("not connecting to NATS: %s", exc)
            return None
        while not self._stop.is_set():
            # nats-py retries an unreachable server itself (max_reconnect_attempts=-1)
            # and returns only once connected: a stop must not wait for that.
            connect = asyncio.create_task(nats.connect(
                self.config.nats_url, name=f"fuse-worker/{self.config.volume_id}",
                max_reconnect_attempts=-1, reconnect_time_wait=DEFAULT_RECONNECT_TIME_WAIT_S,
                connect_timeout=2, reconnected_cb=self._on_reconnected,
                error_cb=NatsErrorLog(log, self.config.nats_url).log, **options,
            ))
            stopped = asyncio.create_task(self._stop.wait())
            await asyncio.wait({connect, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not connect.done():
                connect.cancel()
                await asyncio.gather(connect, return_exceptions=True)
                return None
            try:
                return connect.result()
            except Exception as exc:  # noqa: BLE001 - any failure means: retry later
                log.warning("NATS %s unreachable (%s); serving with the last policy", self.config.nats_url, exc)
                try:
                    await asyncio.wait_for(self._stop.wait(), DEFAULT_RECONNECT_TIME_WAIT_S)
                except asyncio.TimeoutError:
                    pass
        return None

    async def _on_reconnected(self) -> None:
        # The KV watch is a JetStream consumer on the server; after a server restart
        # it may be gone without an error reaching us. Re-create it on every
        # reconnect: its first value is the newest revision, so we converge.
        log.info("reconnected to NATS; re-creating the policy watch")
        if self._rewatch is not None:
            self._rewatch.set()

    async def _watch_policy(self, nc: nats.NATS) -> None:
        """Apply every new revision of the volume's policy; start over after a reconnect.

        Two KV watches: the volume's own key and every selector key (``_sel.>``).
        Nothing is applied until both have delivered their initial values, so
        the first policy in force already holds every selector that matches.
        """
        assert self._rewatch is not None
        js = nc.jetstream()
        volume = self.config.volume_id
        while True:
            self._rewatch.clear()
            self._initial = {"volume": False, "selectors": False}
            watchers = []
            try:
                kv = await js.key_value(subjects.POLICY_KV_BUCKET)
                watchers.append(("volume", await kv.watch(volume)))
                watchers.append(("selectors", await kv.watch(f"{subjects.SELECTOR_KEY_PREFIX}>")))
            except BucketNotFoundError:
                self.initial_policy.set()  # NATS answers and no policy exists yet: nothing to wait for
                await asyncio.sleep(DEFAULT_BUCKET_RETRY_S)
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. JetStream not ready yet
                log.warning("policy watch failed (%s); retrying", exc)
                await self._stop_watchers(watchers)
                await asyncio.sleep(DEFAULT_BUCKET_RETRY_S)
                continue
            tasks = {asyncio.create_task(self._consume(kind, watcher)) for kind, watcher in watchers}
            tasks.add(asyncio.create_task(self._rewatch.wait()))
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            await self._stop_watchers(watchers)

    @staticmethod
    async def _stop_watchers(watchers: list) -> None:
        for _, watcher in watchers:
            try:
                await watcher.stop()
            except Exception:  # noqa: BLE001 - the consumer may have gone with the old server
                pass

    def _effective(self) -> Policy:
        config = self.config
        chosen = selected(self._selectors, volume=config.volume_id, namespace=config.pod_namespace,
                          pod=config.pod_name, node=config.node_name, labels=config.pod_labels)
        return effective_policy(self._own_policy, chosen)

    def _take(self, kind: str, entry) -> None:  # noqa: ANN001 - nats KeyValue.Entry
        """Record one KV entry; bump the revision to apply if it changes this volume's policy."""
        record = None
        if entry.operation not in ("DEL", "PURGE") and entry.value:
            try:
                record = decode_record(entry.value)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                log.error("ignoring undecodable policy revision %d of %s: %s", entry.revision, entry.key, exc)
                return
        if kind == "volume":
            # The volume's own key always counts (so `set --wait` sees its revision).
            self._own_policy = record.policy if record is not None else Policy()
            self._pending_revision = max(self._pending_revision, entry.revision)
            return
        # A selector change counts on the workers it selects (or selected): they
        # report its revision as applied (so acknowledgements can count them), and
        # rebuild their stack only if what they serve changed (InterposerOperations
        # keeps the stack's runtimes for an equal policy). Other workers ignore it.
        name = entry.key[len(subjects.SELECTOR_KEY_PREFIX):]
        before = self._selectors.get(name)
        if record is None:
            self._selectors.pop(name, None)
        else:
            self._selectors[name] = record
        if self._selects_me(before) or self._selects_me(record):
            self._pending_revision = max(self._pending_revision, entry.revision)

    def _selects_me(self, record: PolicyRecord | None) -> bool:
        """True if ``record`` is an active selector that matches this worker."""
        config = self.config
        return (record is not None and record.selector is not None
                and record.selector.matches(volume=config.volume_id, namespace=config.pod_namespace,
                                            pod=config.pod_name, node=config.node_name, labels=config.pod_labels))

    async def _consume(self, kind: str, watcher) -> None:  # noqa: ANN001 - nats KeyWatcher
        async for entry in watcher:
            if entry is None:  # end of the initial values
                self._initial[kind] = True
            else:
                self._take(kind, entry)
                if entry.delta == 0:
                    self._initial[kind] = True
            if not all(self._initial.values()):
                continue  # apply once both watches have delivered what is stored
            revision = self._pending_revision
            current = self._current_revision()
            if revision > max(current, self._handed_revision):
                policy = self._effective()
                nothing_in_flight = self._handed_revision <= current
                self._handed_revision = revision
                # Most revisions are compiled and swapped in right here (no trio
                # wake-up at all); those that touch trio-side state (quota, layer
                # expiry), or that would overtake one still queued for the trio
                # thread, are handed over. Either way this thread never waits for
                # the trio thread (trio.from_thread.run_sync would, and would spawn
                # a task there per revision).
                try:
                    done = nothing_in_flight and self._apply_off_trio(policy, revision)
                except Exception:  # noqa: BLE001 - cannot happen for a decoded policy; the trio path logs it
                    log.exception("could not apply policy revision %d on the bus thread", revision)
                    done = False
                if done:
                    self._applied()
                    continue
                try:
                    self._trio_token.run_sync_soon(self._apply_on_trio, policy, revision)
                except trio.RunFinishedError:
                    return  # the worker is shutting down
            elif self._handed_revision <= current:
                # Nothing newer than what is in force, and nothing in flight (an
                # apply in flight sets it itself once the policy is in force).
                self.initial_policy.set()

    def _apply_on_trio(self, policy: Policy, revision: int) -> None:
        """Trio thread: put ``policy`` in force, then have the bus thread send a heartbeat."""
        try:
            self._apply_policy(policy, revision)
        except Exception:  # noqa: BLE001 - a bad revision must not end the trio run; the old one stays
            log.exception("could not apply policy revision %d; serving the previous one", revision)
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._applied)
            except RuntimeError:  # the bus loop has closed (shutting down)
                self.initial_policy.set()

    def _applied(self) -> None:
        """Bus thread: a revision is in force; heartbeat at once and release the initial wait."""
        if self._beat is not None:
            self._beat.set()
        self.initial_policy.set()

    def _batch(self, events: Sequence[OpEvent]) -> bytes:
        """Encode ``events`` as the next ``EventBatch`` (its ``seq`` is taken only once it is sent)."""
        return self._encoder.encode(EventBatch(
            volume=self.config.volume_id, worker_id=self.worker_id, seq=self._seq + 1, events=list(events),
            dropped_total=self.telemetry.events_dropped_total,
            namespace=self.config.pod_namespace, pod=self.config.pod_name,
            sampled_out_total=self.telemetry.sampled_out_total, pod_uid=self.config.pod_uid,
        ))

    async def _publish_events(self, nc: nats.NATS) -> None:
        subject = subjects.events(self.config.volume_id)
        telemetry = self.telemetry
        while telemetry.buffer:
            events = telemetry.take(self.config.batch_max_events)
            # Encode (and number) every part before the first await: the flush and
            # status loops both publish, and must not interleave sequence numbers.
            parts = []
            for payload, count in fitting(events, self._batch, nc.max_payload):
                self._seq += 1
                parts.append((payload, count))
            done = 0
            for payload, count in parts:
                try:
                    await nc.publish(subject, payload)
                except Exception as exc:  # noqa: BLE001 - outbound buffer full while disconnected
                    telemetry.events_dropped_total += len(events) - done
                    log.debug("dropped %d events: %s", len(events) - done, exc)
                    return
                done += count
                telemetry.events_published_total += count

    async def _publish_faults(self, nc: nats.NATS) -> None:
        subject = subjects.faults(self.config.volume_id)
        telemetry = self.telemetry
        while telemetry.faults:
            records = telemetry.take_faults(self.config.batch_max_events)
            done = 0
            for payload, count in fitting(records, self._encoder.encode, nc.max_payload):
                try:
                    await nc.publish(subject, payload)
                except Exception as exc:  # noqa: BLE001 - outbound buffer full while disconnected
                    telemetry.faults_dropped_total += len(records) - done
                    log.debug("dropped %d fault records: %s", len(records) - done, exc)
                    return
                done += count
                telemetry.faults_published_total += count

    async def _flush_loop(self, nc: nats.NATS) -> None:
        wait_s = self.config.flush_interval_s
        while True:
            await asyncio.sleep(wait_s)
            found = bool(self.telemetry.buffer or self.telemetry.faults)
            await self._publish_events(nc)
            await self._publish_faults(nc)
            wait_s = next_flush_wait(wait_s, found, self.config.flush_interval_s)

    def _status(self, stopped: bool = False) -> bytes:
        t = self.telemetry
        quota = self._quota_usage()
        passthrough_files, bypassing = self._passthrough_files()
        return self._encoder.encode(WorkerStatus(
            volume=self.config.volume_id, worker_id=self.worker_id, policy_revision=self._current_revision(),
            ops_total=t.ops_total, events_total=t.events_total, events_dropped_total=t.events_dropped_total,
            events_published_total=t.events_published_total, started_at_s=self._started_at_s,
            sent_at_s=time.time(), namespace=self.config.pod_namespace, pod=self.config.pod_name,
            faults_total=t.faults_total, faults_dropped_total=t.faults_dropped_total,
            status_interval_s=self.config.status_interval_s, open_files=t.open_files,
            quota_bytes_used=quota.bytes_used if quota else None,
            quota_bytes_limit=quota.bytes_limit if quota else None,
            quota_inodes_used=quota.inodes_used if quota else None,
            quota_inodes_limit=quota.inodes_limit if quota else None, labels=self.config.pod_labels,
            pod_uid=self.config.pod_uid, service_account=self.config.service_account,
            node=self.config.node_name, kernel_passthrough_files=passthrough_files,
            files_bypassing_layers=bypassing, burst_balance=self._burst_balance(),
            resident_memory_bytes=resident_memory_bytes(), internal_errors_total=t.internal_errors_total,
            stopped=stopped, memory_limit_bytes=memory_limit_bytes(),
        ))

    async def _status_loop(self, nc: nats.NATS) -> None:
        """Heartbeat every ``status_interval_s``, and at once when a revision was applied
        (``_beat`` is set from the trio thread), so "applied" is seen without waiting."""
        assert self._beat is not None
        subject = subjects.status(self.config.volume_id)
        while True:
            self._beat.clear()
            await self._publish_events(nc)  # events before the status that counts them
            try:
                await nc.publish(subject, self._status())
            except Exception as exc:  # noqa: BLE001
                log.debug("status not published: %s", exc)
            try:
                async with asyncio.timeout(self.config.status_interval_s):
                    await self._beat.wait()
            except TimeoutError:
                pass

    async def _final_flush(self, nc: nats.NATS) -> None:
        await self._publish_events(nc)
        await self._publish_faults(nc)
        await nc.publish(subjects.status(self.config.volume_id), self._status(stopped=self._stopped_on_request))
        await nc.flush()


def next_flush_wait(wait_s: float, found_events: bool, interval_s: float) -> float:
    """Seconds until the next event flush, after one that waited ``wait_s``.

    Back to ``interval_s`` when that flush found events or fault records; otherwise
    twice the last wait, at most :data:`IDLE_FLUSH_INTERVAL_MAX_S` (never below
    ``interval_s``): an idle worker wakes 2.5 times a second instead of 10.
    """
    if found_events:
        return interval_s
    return max(interval_s, min(2 * wait_s, IDLE_FLUSH_INTERVAL_MAX_S))


def fitting(items: Sequence[T], encode: Callable[[Sequence[T]], bytes], max_payload: int,
            ) -> Iterator[tuple[bytes, int]]:
    """Encode ``items`` in as few consecutive messages as fit in ``max_payload`` bytes.

    The whole sequence is encoded first (one message in the common case); a message
    larger than ``max_payload`` (NATS refuses it with ``MaxPayloadError``, and
    everything in it would be lost) is split in halves until each part fits. A
    single item larger than ``max_payload`` is yielded alone (publishing it fails
    and it is counted as dropped).

    Args:
        items: events or fault records, in order.
        encode: turns a run of items into one message.
        max_payload: the server's largest message, bytes (``nc.max_payload``).

    Yields:
        ``(payload, number of items in it)``, in order; each part is encoded only
        when the previous one has been taken.
    """
    payload = encode(items)
    if len(payload) <= max_payload or len(items) <= 1:
        yield payload, len(items)
        return
    half = len(items) // 2
    yield from fitting(items[:half], encode, max_payload)
    yield from fitting(items[half:], encode, max_payload)
