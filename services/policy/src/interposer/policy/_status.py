"""Applied-revision view of the fleet, from the workers' ``WorkerStatus`` heartbeats.

Every replica of the policy service subscribes to ``interposer.status.*`` (not in a
queue group: heartbeats carry absolute values and each replica keeps the whole
view), so any replica can answer ``interposer.policy.status`` at once — without it,
a client would have to listen for a full heartbeat interval to learn which workers
exist, and could not say since when they run a revision.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec

from interposer.proto import VolumeStatus, WorkerState, WorkerStatus

log = logging.getLogger(__name__)


class StatusCache:
    """Latest heartbeat per worker, grouped by volume.

    A worker whose heartbeat says it stopped (``WorkerStatus.stopped``) is dropped
    at once; one that falls silent is ``stale`` first, then forgotten.

    Args:
        stale_after_s: a worker whose last heartbeat is older than this is
            reported ``stale`` and does not count against ``converged``, seconds.
        forget_after_s: a worker silent for this long is dropped, seconds.
    """

    def __init__(self, stale_after_s: float, forget_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self.forget_after_s = forget_after_s
        #: volume → worker id → what it last reported.
        self.workers: dict[str, dict[str, WorkerState]] = {}
        #: Called (no arguments) when a worker appears or reports another revision.
        self.listeners: list[Callable[[], None]] = []
        self._decoder = msgspec.msgpack.Decoder(WorkerStatus)

    def observe(self, data: bytes, now_s: float | None = None) -> WorkerStatus | None:
        """Record one msgpack ``WorkerStatus``; ignores (and logs) anything else."""
        try:
            status = self._decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.warning("ignoring a heartbeat that is not a WorkerStatus: %s", exc)
            return None
        now_s = time.time() if now_s is None else now_s
        workers = self.workers.setdefault(status.volume, {})
        previous = workers.get(status.worker_id)
        if status.stopped:
            # Unmounted on purpose: gone now, not "stale" until forget_after_s.
            if workers.pop(status.worker_id, None) is not None:
                for listener in self.listeners:
                    listener()
            if not workers:
                del self.workers[status.volume]
            return status
        since = status.sent_at_s
        if previous is not None and previous.applied_revision == status.policy_revision:
            since = previous.applied_since_s
        workers[status.worker_id] = WorkerState(
            worker_id=status.worker_id, applied_revision=status.policy_revision, applied_since_s=since,
            last_seen_s=now_s, namespace=status.namespace, pod=status.pod, labels=status.labels,
            node=status.node,
        )
        if previous is None or previous.applied_revision != status.policy_revision:
            for listener in self.listeners:
                listener()
        return status

    def live(self, now_s: float | None = None) -> dict[str, list[WorkerState]]:
        """volume → its workers heard from within ``stale_after_s`` (volumes without any left out)."""
        now_s = time.time() if now_s is None else now_s
        out = {}
        for volume, workers in self.workers.items():
            fresh = [w for w in workers.values() if now_s - w.last_seen_s <= self.stale_after_s]
            if fresh:
                out[volume] = fresh
        return out

    def volume_status(self, volume: str, desired_revision: int, desired_since_s: float,
                      now_s: float | None = None) -> VolumeStatus:
        """Desired vs applied for ``volume``; forgets workers silent for ``forget_after_s``."""
        now_s = time.time() if now_s is None else now_s
        workers = self.workers.get(volume, {})
        for worker_id in [w for w, s in workers.items() if now_s - s.last_seen_s > self.forget_after_s]:
            del workers[worker_id]
        states = []
        for state in sorted(workers.values(), key=lambda s: s.worker_id):
            states.append(msgspec.structs.replace(state, stale=now_s - state.last_seen_s > self.stale_after_s))
        live = [s for s in states if not s.stale]
        converged = bool(live) and all(s.applied_revision >= desired_revision for s in live)
        return VolumeStatus(volume=volume, desired_revision=desired_revision, desired_since_s=desired_since_s,
                            workers=states, converged=converged)
