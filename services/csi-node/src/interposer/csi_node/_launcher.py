"""Starting and stopping fuse-workers as local processes (the embedded default).

A worker is started in its own session (so a terminal's Ctrl-C does not reach it)
with stdout and stderr in a per-volume log file. Workers outlive the csi-node on
purpose: a restarted csi-node finds them again through their persisted pid, and the
mounts of running pods stay up meanwhile. Before signalling a pid the launcher did
not start itself, it checks ``/proc/<pid>/cmdline`` names the same volume, so a
recycled pid is never killed.

With ``fd_handoff_dir`` the csi-node mounts each target itself and hands the
``/dev/fuse`` fd to the worker over a per-volume unix socket (``_fuse_fd``), so
the worker never calls ``mount(2)`` and may run without ``CAP_SYS_ADMIN``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
import msgspec.structs

from ._fuse_fd import FdHandoff, handoff_name, mount_fuse_fd
from ._mounts import unmount_lazily
from ._state import VolumeState
from ._worker_tuning import WorkerTuning

log = logging.getLogger(__name__)

#: Poll interval while waiting for a worker to exit, seconds.
EXIT_POLL_INTERVAL_S = 0.05
#: How long to wait after SIGKILL before giving up on a worker, seconds.
KILL_WAIT_S = 5.0
#: How long a started worker may take to ask for its FUSE fd, seconds.
DEFAULT_HANDOFF_TIMEOUT_S = 20.0


class WorkerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The fuse-worker command-line contract for one volume.

    Attributes:
        volume_id: CSI volume id (matches ``subjects.VOLUME_ID_PATTERN``).
        backing_dir: absolute, resolved backing directory; empty (not passed) for
            the memory and null backends.
        backend: the worker's ``--backend``; passed only when not ``passthrough``.
        mountpoint: absolute target path the worker mounts on.
        nats_url: bus URL; empty = not passed.
        nats_creds: the worker role's ``--nats-creds`` file; empty = not passed.
        policy_file: JSON policy file; empty = not passed.
        pod_namespace: namespace of the pod the volume is for; empty = unknown.
        pod_name: name of that pod; empty = unknown.
        pod_uid: uid of that pod; empty = unknown.
        service_account: that pod's ServiceAccount name; empty = unknown.
        node_name: the node id (for selector policies); empty = not passed.
        pod_labels: labels of the pod the volume is for (``--pod-label KEY=VALUE``
            each, for selector policies); the Kubernetes launcher reads them from
            the API; empty = unknown.
        read_only: mount read-only.
        fuse_fd_socket: the csi-node socket the worker receives its mounted FUSE fd
            from (``--fuse-fd-socket``); empty = the worker mounts ``mountpoint`` itself.
        backing_claim: PersistentVolumeClaim the backing directory is on (Kubernetes
            launcher: mounted into the worker pod); empty = ``backing_dir`` is a host path.
        tuning: the worker's kernel cache times (seconds) and busy polling (µs), see
            :class:`WorkerTuning`; a setting left None is not passed (the worker's default).
    """

    volume_id: str
    backing_dir: str = ""
    mountpoint: str
    backend: str = "passthrough"
    nats_url: str = ""
    nats_creds: str = ""
    policy_file: str = ""
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    service_account: str = ""
    node_name: str = ""
    pod_labels: dict[str, str] = {}
    read_only: bool = False
    fuse_fd_socket: str = ""
    backing_claim: str = ""
    tuning: WorkerTuning = WorkerTuning()

    @classmethod
    def of_volume(cls, volume: Any, **settings: Any) -> WorkerSpec:
        """The spec of a volume being published (a publish plan) or restored (a ``VolumeState``).

        Args:
            volume: anything with ``volume_id``, ``backing_dir``, ``backing_claim``,
                ``backend``, ``target_path``, ``readonly``, ``tuning`` and the pod fields
                (``pod_namespace``, ``pod_name``, ``pod_uid``, ``service_account``).
            settings: the remaining fields (``nats_url``, ``policy_file``…).
        """
        return cls(
            volume_id=volume.volume_id, backing_dir=volume.backing_dir, backing_claim=volume.backing_claim,
            backend=volume.backend, mountpoint=volume.target_path, read_only=volume.readonly,
            pod_namespace=volume.pod_namespace, pod_name=volume.pod_name, pod_uid=volume.pod_uid,
            service_account=volume.service_account, tuning=volume.tuning, **settings,
        )

    def arguments(self) -> list[str]:
        """Return the worker flags for this spec (without the command itself)."""
        args = ["--backing-dir", self.backing_dir] if self.backing_dir else []
        if self.mountpoint:
            args += ["--mountpoint", self.mountpoint]
        args += ["--volume-id", self.volume_id]
        if self.backend != "passthrough":
            args += ["--backend", self.backend]
        optional = (
            ("--nats-url", self.nats_url),
            ("--nats-creds", self.nats_creds),
            ("--policy-file", self.policy_file),
            ("--pod-namespace", self.pod_namespace),
            ("--pod-name", self.pod_name),
            ("--pod-uid", self.pod_uid),
            ("--service-account", self.service_account),
            ("--node-name", self.node_name),
            ("--fuse-fd-socket", self.fuse_fd_socket),
        )
        args += optional_flags(optional)
        args += label_arguments(self.pod_labels)
        args += self.tuning.arguments()
        if self.read_only:
            args.append("--read-only")
        return args


def optional_flags(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """``[flag, value, …]`` for each ``(flag, value)`` pair whose value is not empty."""
    return [item for flag, value in pairs if value for item in (flag, value)]


def label_arguments(labels: dict[str, str]) -> list[str]:
    """``--pod-label KEY=VALUE`` for each label, sorted by key (stable command lines)."""
    args = []
    for key, value in sorted(labels.items()):
        args += ["--pod-label", f"{key}={value}"]
    return args


class Launcher(Protocol):
    """What the Node service and the recovery watcher need from a launcher.

    A worker is named by an ``int`` handle stored as ``VolumeState.worker_pid``:
    the process id for :class:`LocalProcessLauncher`, the pod's incarnation
    number (1, 2, … per volume and node) for ``KubernetesLauncher``.
    """

    def argv(self, spec: WorkerSpec) -> list[str]: ...

    def start(self, spec: WorkerSpec, log_path: Path) -> int: ...

    def restart(self, state: VolumeState) -> int: ...

    def is_running(self, pid: int, volume_id: str) -> bool: ...

    def exit_code(self, pid: int) -> int | None: ...

    def stop(self, pid: int, volume_id: str, timeout_s: float) -> bool: ...


class LocalProcessLauncher:
    """Runs each volume's fuse-worker as a child process of the csi-node.

    Args:
        command: argv prefix of the worker (``python -m interposer.fuse_worker``).
        fd_handoff_dir: directory for the per-volume fd-handoff sockets; None =
            workers mount their targets themselves.
        handoff_timeout_s: how long a started worker may take to ask for its fd, seconds.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        fd_handoff_dir: str | os.PathLike[str] | None = None,
        handoff_timeout_s: float = DEFAULT_HANDOFF_TIMEOUT_S,
    ) -> None:
        if not command:
            raise ValueError("worker command is empty")
        self._command = list(command)
        self._handoff_dir = Path(fd_handoff_dir) if fd_handoff_dir is not None else None
        self._handoff_timeout_s = handoff_timeout_s
        # pid → Popen of the workers this process started (so they can be reaped).
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def argv(self, spec: WorkerSpec) -> list[str]:
        """Return the full command line that :meth:`start` runs for ``spec``."""
        if self._handoff_dir is not None:
            # No --mountpoint: the worker must not touch the target, whose first
            # access blocks until the worker itself answers FUSE_INIT.
            spec = msgspec.structs.replace(
                spec, mountpoint="", fuse_fd_socket=str(self.handoff_socket(spec.volume_id))
            )
        return [*self._command, *spec.arguments()]

    def handoff_socket(self, volume_id: str) -> Path:
        """The fd-handoff socket of ``volume_id`` (only with ``fd_handoff_dir``)."""
        assert self._handoff_dir is not None
        return self._handoff_dir / f"{handoff_name(volume_id)}.sock"

    def start(self, spec: WorkerSpec, log_path: Path) -> int:
        """Start the worker of ``spec``; its output replaces ``log_path``.

        Args:
            spec: what to mount where.
            log_path: file for the worker's stdout and stderr.

        Returns:
            The worker's pid.

        Raises:
            OSError: the command could not be executed; with fd handoff also: the
                target could not be mounted, or the worker did not ask for its fd in time.
        """
        pid = self._launch(self.argv(spec), spec.volume_id, spec.mountpoint, spec.read_only, log_path, append=False)
        log.info("started fuse-worker pid %d for volume %s at %s", pid, spec.volume_id, spec.mountpoint)
        return pid

    def restart(self, state: VolumeState) -> int:
        """Start a worker again with the command line it had (``state.worker_argv``).

        The output is appended to ``state.log_path``, so the dead worker's last
        words stay. The dead mount must be gone from ``state.target_path``.

        Args:
            state: the volume's persisted state.

        Returns:
            The new worker's pid.

        Raises:
            OSError: as :meth:`start`.
        """
        pid = self._launch(
            list(state.worker_argv), state.volume_id, state.target_path, state.readonly, Path(state.log_path),
            append=True,
        )
        log.info("restarted fuse-worker for volume %s: pid %d", state.volume_id, pid)
        return pid

    def _launch(
        self, argv: list[str], volume_id: str, target_path: str, read_only: bool, log_path: Path, *, append: bool
    ) -> int:
        if self._handoff_dir is None:
            return self._spawn(argv, log_path, append=append)
        with FdHandoff(self.handoff_socket(volume_id)) as handoff:
            fd = mount_fuse_fd(target_path, volume_id, read_only=read_only)
            try:
                pid = self._spawn(argv, log_path, append=append)
                try:
                    handoff.send(fd, volume_id, self._handoff_timeout_s, lambda: self.is_running(pid, volume_id))
                except ChildProcessError:
                    # The caller's wait for the mount reports the exit with the log tail.
                    return pid
                except OSError:
                    self.stop(pid, volume_id, KILL_WAIT_S)
                    unmount_lazily(target_path)
                    raise
            finally:
                os.close(fd)  # the worker holds its own reference now (or nobody needs one)
        return pid

    def _spawn(self, argv: list[str], log_path: Path, *, append: bool) -> int:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab" if append else "wb") as log_file:
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        self._children[child.pid] = child
        return child.pid

    def is_running(self, pid: int, volume_id: str) -> bool:
        """Return True if ``pid`` is alive and is the worker of ``volume_id``.

        Reaps the child if it was started here and has exited.
        """
        child = self._children.get(pid)
        if child is not None:
            if child.poll() is None:
                # poll() also says None when it cannot take Popen's waitpid lock; a
                # killed child may already be a zombie. Ask /proc too.
                return _process_state(pid) not in (None, b"Z")
            del self._children[pid]
            return False
        return _is_worker_of(pid, volume_id)

    def exit_code(self, pid: int) -> int | None:
        """Return the exit status of a worker started here, or None while it runs / if unknown."""
        child = self._children.get(pid)
        return None if child is None else child.poll()

    def stop(self, pid: int, volume_id: str, timeout_s: float) -> bool:
        """Stop a worker: SIGTERM (it unmounts itself), then SIGKILL after ``timeout_s``.

        Args:
            pid: worker pid.
            volume_id: the volume it must serve; a pid serving anything else is
                left alone (it was recycled).
            timeout_s: seconds to wait after SIGTERM.

        Returns:
            True if the worker is gone (or was not running); False if it survived
            SIGKILL (stuck in the kernel).
        """
        if not self.is_running(pid, volume_id):
            return True
        self._signal(pid, signal.SIGTERM)
        if self._wait_gone(pid, volume_id, timeout_s):
            return True
        log.warning(
            "fuse-worker pid %d (volume %s) ignored SIGTERM for %.1f s: killing it", pid, volume_id, timeout_s
        )
        self._signal(pid, signal.SIGKILL)
        return self._wait_gone(pid, volume_id, KILL_WAIT_S)

    def _signal(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def _wait_gone(self, pid: int, volume_id: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.is_running(pid, volume_id):
            if time.monotonic() >= deadline:
                return False
            time.sleep(EXIT_POLL_INTERVAL_S)
        return True


def _process_state(pid: int) -> bytes | None:
    """The state letter of process ``pid`` (``R``, ``S``, ``Z``…; proc(5)), None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            return stat_file.read().rpartition(b")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _is_worker_of(pid: int, volume_id: str) -> bool:
    """Return True if process ``pid`` exists and its command line has ``--volume-id volume_id``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline_file:
            argv = cmdline_file.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    if _process_state(pid) in (None, b"Z"):  # gone, or a zombie of another parent: already exited
        return False
    needle = volume_id.encode()
    return any(arg == b"--volume-id" and nxt == needle for arg, nxt in zip(argv, argv[1:]))
