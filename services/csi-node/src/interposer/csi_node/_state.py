"""Per-volume publish state, persisted as one JSON file per volume.

Files are written temp → fsync → ``os.replace`` → fsync(dir), so a crash leaves
either the old or the new state, never a torn file. Secrets and mount flags are
never stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from ._worker_tuning import WorkerTuning


class VolumeState(msgspec.Struct, frozen=True, kw_only=True):
    """What NodePublishVolume did for one volume.

    Attributes:
        volume_id: the CSI volume id.
        target_path: where the volume is published (the worker's mountpoint).
        backing_dir: resolved backing directory (empty for the memory and null
            backends, and for a backing claim).
        backing_claim: PersistentVolumeClaim the worker pod mounts as its backing
            directory (Kubernetes launcher); empty = none.
        backend: the worker's backend (``passthrough``, ``memory``, ``null``).
        readonly: published read-only.
        access_mode: ``VolumeCapability.AccessMode.Mode`` value it was published with.
        worker_pid: the worker's handle: its pid (local launcher) or its pod's
            incarnation (Kubernetes launcher).
        worker_argv: full worker command line.
        log_path: the worker's log file.
        policy_file: the policy file passed to the worker; empty if none.
        published_at_s: when the worker answered, seconds since the Unix epoch;
            0 while NodePublishVolume still waits for it.
        pod_namespace, pod_name, pod_uid, service_account: the pod the volume
            was published for (kubelet's ``podInfoOnMount`` keys); empty if unknown.
        ephemeral: a CSI ephemeral inline volume (its id is kubelet's ``csi-<hash>``).
        restarts: how many times the watcher restored a dead worker.
        last_restore_s: how long the last restore took, from noticing the dead
            worker to the mount answering again, seconds.
        tuning: the worker's kernel cache times and busy polling from the volume
            context (also in ``worker_argv``; the Kubernetes launcher builds a
            restarted worker's pod from the fields, not from the argv).
    """

    volume_id: str
    target_path: str
    backing_dir: str
    readonly: bool
    access_mode: int
    worker_pid: int
    worker_argv: list[str]
    log_path: str
    policy_file: str = ""
    published_at_s: float = 0.0
    backend: str = "passthrough"
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    service_account: str = ""
    ephemeral: bool = False
    restarts: int = 0
    last_restore_s: float = 0.0
    backing_claim: str = ""
    tuning: WorkerTuning = WorkerTuning()


_decoder = msgspec.json.Decoder(VolumeState)


class StateStore:
    """The ``volumes/`` directory of the csi-node state dir.

    Layout: ``<id>.json`` (state), ``<id>.policy.json`` (policy handed to the
    worker), ``<id>.log`` (worker output).

    Args:
        state_dir: the csi-node state directory; ``volumes/`` is created in it.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.volumes_dir = Path(state_dir) / "volumes"
        self.volumes_dir.mkdir(parents=True, exist_ok=True)

    def state_path(self, volume_id: str) -> Path:
        return self.volumes_dir / f"{volume_id}.json"

    def policy_path(self, volume_id: str) -> Path:
        return self.volumes_dir / f"{volume_id}.policy.json"

    def log_path(self, volume_id: str) -> Path:
        return self.volumes_dir / f"{volume_id}.log"

    def load(self, volume_id: str) -> VolumeState | None:
        """Return the state of ``volume_id``, or None if it is not published.

        Raises:
            msgspec.DecodeError, msgspec.ValidationError: the file is corrupt.
        """
        try:
            data = self.state_path(volume_id).read_bytes()
        except FileNotFoundError:
            return None
        return _decoder.decode(data)

    def all(self) -> list[VolumeState]:
        """Return every readable state (corrupt files are skipped)."""
        states = []
        for path in sorted(self.volumes_dir.glob("*.json")):
            if path.name.endswith(".policy.json"):
                continue
            try:
                states.append(_decoder.decode(path.read_bytes()))
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                continue
        return states

    def find_by_target(self, target_path: str) -> VolumeState | None:
        """Return the state of the volume published at ``target_path``, if any."""
        for state in self.all():
            if state.target_path == target_path:
                return state
        return None

    def save(self, state: VolumeState) -> None:
        """Persist ``state`` atomically."""
        write_atomically(self.state_path(state.volume_id), msgspec.json.encode(state))

    def delete(self, volume_id: str) -> None:
        """Forget ``volume_id``: its state and policy files (the log is kept)."""
        for path in (self.state_path(volume_id), self.policy_path(volume_id)):
            path.unlink(missing_ok=True)
        _fsync_dir(self.volumes_dir)


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so readers see the old or new content, never a mix.

    Args:
        path: destination file.
        data: new content.
        mode: permission bits of the new file.

    Raises:
        OSError: the directory is not writable or the disk is full.
    """
    tmp_path = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as tmp_file:
            tmp_file.write(data)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
