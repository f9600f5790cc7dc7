"""Recovery: notice a dead fuse-worker and restore its volume in place.

A FUSE mount whose worker process exited stays in the mount table, and every
access to it fails with ``ENOTCONN`` ("Transport endpoint is not connected")
until it is unmounted. The kubelet never republishes a volume of a running pod,
so without help the pod keeps failing until it is recreated. The watcher polls
every published volume; for one whose worker is gone it lazily unmounts the
dead mount (``fusermount3 -uz``: the pod's open files on it keep failing, new
lookups reach the directory again), restarts the worker with the command line
it had, at the same target path, and waits for the mount to answer. The pod's
view of the target path is its bind mount of the kubelet's directory, so with
Bidirectional/HostToContainer propagation the new mount reaches it too.

Only process exit is handled here: a worker that is alive but hung is reported
by NodeGetVolumeStats as an abnormal condition, not killed.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import msgspec.structs

from ._launcher import Launcher
from ._mounts import is_fuse_mount, mount_type, real_path_of_target, set_read_ahead, stat_answers, unmount_lazily
from ._node import NodeService
from ._state import StateStore

log = logging.getLogger(__name__)

#: How often the watcher checks every published volume's worker, seconds.
DEFAULT_WATCH_INTERVAL_S = 0.5
#: Poll interval while waiting for a restored mount to answer, seconds.
RESTORE_POLL_INTERVAL_S = 0.05
#: Longest single ``stat`` of a restored mount, seconds.
RESTORE_STAT_TIMEOUT_S = 1.0


class WorkerWatcher:
    """A daemon thread restoring the volumes whose fuse-worker exited.

    Args:
        node: the Node service (its per-volume locks keep restores and CSI calls apart).
        launcher: restarts workers (a local process or a pod).
        store: persisted per-volume state.
        interval_s: seconds between checks.
        mount_timeout_s: how long a restored mount may take to answer, seconds.
    """

    def __init__(
        self,
        node: NodeService,
        launcher: Launcher,
        store: StateStore,
        *,
        interval_s: float = DEFAULT_WATCH_INTERVAL_S,
        mount_timeout_s: float,
    ) -> None:
        self._node = node
        self._launcher = launcher
        self._store = store
        self._interval_s = interval_s
        self._mount_timeout_s = mount_timeout_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-watcher", daemon=True)

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; a restore in progress finishes first."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            for state in self._store.all():
                if self._stopping.is_set():
                    return
                try:
                    self.restore_if_dead(state.volume_id)
                except Exception:
                    log.exception(
                        "volume %s: restore failed; retrying in %.1f s", state.volume_id, self._interval_s
                    )

    def restore_if_dead(self, volume_id: str) -> bool:
        """Restore ``volume_id`` if it is published and its worker process is gone.

        Args:
            volume_id: the volume to check.

        Returns:
            True if a new worker was started and its mount answers.

        Raises:
            OSError: the worker could not be started (retried at the next check).
        """
        with self._node.volume_lock(volume_id):
            state = self._store.load(volume_id)
            # published_at_s == 0: NodePublishVolume is still waiting for this worker.
            if state is None or not state.published_at_s:
                return False
            if self._launcher.is_running(state.worker_pid, volume_id):
                return False
            started = time.monotonic()
            log.warning(
                "volume %s: fuse-worker pid %d exited (status %s); restoring it at %s",
                volume_id,
                state.worker_pid,
                self._launcher.exit_code(state.worker_pid),
                state.target_path,
            )
            real_path = real_path_of_target(state.target_path)
            if mount_type(real_path) is not None and not unmount_lazily(real_path):
                log.error("volume %s: cannot unmount the dead mount at %s", volume_id, state.target_path)
                return False
            os.makedirs(state.target_path, mode=0o750, exist_ok=True)
            pid = self._launcher.restart(state)
            # Saved at once, so a csi-node restart meanwhile finds the new worker.
            state = msgspec.structs.replace(state, worker_pid=pid, restarts=state.restarts + 1)
            self._store.save(state)
            if not self._wait_until_answers(pid, volume_id, real_path):
                log.error(
                    "volume %s: restored worker pid %d did not answer within %.1f s",
                    volume_id,
                    pid,
                    self._mount_timeout_s,
                )
                return False
            elapsed_s = time.monotonic() - started
            self._store.save(msgspec.structs.replace(state, last_restore_s=elapsed_s))
            log.warning(
                "volume %s restored at %s in %.3f s (worker pid %d, restart %d)",
                volume_id,
                state.target_path,
                elapsed_s,
                pid,
                state.restarts,
            )
            return True

    def _wait_until_answers(self, pid: int, volume_id: str, real_path: str) -> bool:
        deadline = time.monotonic() + self._mount_timeout_s
        while time.monotonic() < deadline:
            if not self._launcher.is_running(pid, volume_id):
                return False
            if is_fuse_mount(real_path) and stat_answers(real_path, RESTORE_STAT_TIMEOUT_S):
                set_read_ahead(real_path)  # a new mount (fd handoff) starts at the kernel default
                return True
            time.sleep(RESTORE_POLL_INTERVAL_S)
        return False
