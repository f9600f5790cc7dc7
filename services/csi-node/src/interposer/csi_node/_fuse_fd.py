"""The privileged half of a FUSE mount: open ``/dev/fuse``, mount it, hand the fd over.

The csi-node mounts the volume at the target path itself with ``fd=N`` — the
``mount(2)`` options libfuse's own ``fusermount3`` passes (``lib/mount.c``) — and
sends the fd over a unix socket (``SCM_RIGHTS``) to the fuse-worker, which serves
it through libfuse's ``/dev/fd/N`` mountpoint (``fuse_session_mount`` in libfuse ≥
3.3). The worker never calls ``mount(2)``, needs no ``CAP_SYS_ADMIN`` and no
``/dev/fuse`` device: it can run unprivileged, in its own pod. The same scheme as
gcs-fuse-csi-driver's ``pkg/csi_mounter`` and juicefs-csi-driver's ``passfd``.

Protocol on the per-volume socket (the worker side is
``interposer.fuse_worker._worker.receive_fuse_fd``): the worker connects and
sends its volume id (UTF-8, then shuts its write side); the csi-node answers
``b"OK"`` with the fd as ancillary data, or ``b"ERR <reason>"`` without one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"
#: File system type in the mount table: ``fuse.<subtype>``, as the worker's own mounts.
FUSE_FSTYPE = "fuse.interposer"
#: ``rootmode`` of the mount: the root is a directory (``S_IFDIR``, octal).
FUSE_ROOTMODE = "40000"
#: How long ``mount(8)`` may take, seconds.
DEFAULT_MOUNT_COMMAND_TIMEOUT_S = 10.0
#: How often a handoff waiting for the worker checks that it is still alive, seconds.
HANDOFF_POLL_INTERVAL_S = 0.1
#: Most bytes of a worker's request (its volume id, ≤ 128 characters).
HANDOFF_REQUEST_MAX_BYTES = 256
#: Longest volume id used as is in a handoff path: a unix socket path has at most
#: 107 bytes (``sun_path``), and volume ids up to 128.
HANDOFF_NAME_MAX_LENGTH = 40


def handoff_name(volume_id: str) -> str:
    """A short file name for ``volume_id``'s handoff socket or directory.

    The id itself when it has at most 40 characters (``pvc-<uid>`` has 40), else
    ``h`` + 39 hex digits of its SHA-256.
    """
    if len(volume_id) <= HANDOFF_NAME_MAX_LENGTH:
        return volume_id
    return "h" + hashlib.sha256(volume_id.encode()).hexdigest()[: HANDOFF_NAME_MAX_LENGTH - 1]


def fuse_mount_options(fd: int, *, read_only: bool) -> list[str]:
    """The ``mount(2)`` data options of a FUSE mount served through ``fd``.

    ``user_id``/``group_id`` 0: the mount belongs to root (the kernel's
    ``allow_other`` check is against them); ``allow_other``: pods run as any uid;
    ``default_permissions``: the kernel checks permissions against the attributes
    the worker returns, as the worker's own mounts do (pyfuse3's default options).

    Args:
        fd: the open ``/dev/fuse`` fd in the process that calls ``mount(2)``.
        read_only: add ``ro``.
    """
    options = [f"fd={fd}", f"rootmode={FUSE_ROOTMODE}", "user_id=0", "group_id=0", "allow_other",
               "default_permissions", "nosuid", "nodev"]
    if read_only:
        options.append("ro")
    return options


def mount_fuse_fd(
    target_path: str,
    volume_id: str,
    *,
    read_only: bool,
    timeout_s: float = DEFAULT_MOUNT_COMMAND_TIMEOUT_S,
) -> int:
    """Open ``/dev/fuse`` and mount it at ``target_path``; return the fd.

    Runs ``mount -i -t fuse.interposer -o fd=N,… interposer:<volume id> TARGET``
    with the fd inherited (``-i``: no ``mount.fuse`` helper, which would try to run
    the "source" as a program). Until a process serves the fd, every access to the
    mount waits for the kernel's ``FUSE_INIT`` answer.

    Args:
        target_path: existing directory to mount on (absolute).
        volume_id: names the mount's source (``interposer:<id>``, as the worker's own).
        read_only: mount read-only.
        timeout_s: time limit of ``mount(8)``, seconds.

    Returns:
        The ``/dev/fuse`` fd (close-on-exec); the caller hands it over and closes it.

    Raises:
        OSError: ``/dev/fuse`` cannot be opened, or the mount failed (message has
            ``mount``'s stderr).
    """
    fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    argv = ["mount", "-i", "-t", FUSE_FSTYPE, "-o", ",".join(fuse_mount_options(fd, read_only=read_only)),
            f"interposer:{volume_id}", target_path]
    try:
        result = subprocess.run(argv, pass_fds=(fd,), capture_output=True, text=True, timeout=timeout_s,
                                check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        os.close(fd)
        raise OSError(f"cannot run {' '.join(argv)}: {exc}") from None
    if result.returncode != 0:
        os.close(fd)
        raise OSError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return fd


class FdHandoff:
    """A listening unix socket on which one worker receives its volume's FUSE fd.

    Bound before the worker starts, so the worker can connect as soon as it runs;
    removed by :meth:`close`. The socket file is created mode 0600 (root only).

    Args:
        socket_path: where to listen; a stale file there is replaced.

    Raises:
        OSError: the socket cannot be bound.
    """

    def __init__(self, socket_path: str | os.PathLike[str]) -> None:
        self.socket_path = Path(socket_path)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            self._listener.bind(str(self.socket_path))
        finally:
            os.umask(old_umask)
        self._listener.listen(1)
        self._listener.settimeout(HANDOFF_POLL_INTERVAL_S)

    def __enter__(self) -> FdHandoff:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, fd: int, volume_id: str, timeout_s: float, is_alive: Callable[[], bool]) -> None:
        """Wait for the worker of ``volume_id`` to connect and send it ``fd``.

        A connection announcing another volume id is answered ``ERR`` and the wait
        goes on.

        Args:
            fd: the mounted ``/dev/fuse`` fd.
            volume_id: the volume whose worker may receive it.
            timeout_s: how long to wait for the worker, seconds.
            is_alive: returns False once the worker is gone (stop waiting).

        Raises:
            TimeoutError: no worker asked within ``timeout_s``.
            ChildProcessError: the worker exited before asking.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                conn, _addr = self._listener.accept()
            except TimeoutError:
                if not is_alive():
                    raise ChildProcessError(f"fuse-worker of volume {volume_id} exited before taking its fd")
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"fuse-worker of volume {volume_id} did not ask for its fd within {timeout_s:.1f} s"
                    ) from None
                continue
            with conn:
                conn.settimeout(max(HANDOFF_POLL_INTERVAL_S, deadline - time.monotonic()))
                try:
                    request = _read_request(conn)
                    if request != volume_id:
                        log.warning("fd handoff for %s: a worker asked for volume %r", volume_id, request)
                        conn.sendall(f"ERR this socket serves volume {volume_id}".encode())
                        continue
                    socket.send_fds(conn, [b"OK"], [fd])
                except OSError as exc:
                    log.warning("fd handoff for %s: connection failed (%s); waiting for another", volume_id, exc)
                    continue
            log.info("handed the FUSE fd of volume %s to its worker", volume_id)
            return

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        self._listener.close()
        self.socket_path.unlink(missing_ok=True)


def _read_request(conn: socket.socket) -> str:
    chunks = []
    size = 0
    while size < HANDOFF_REQUEST_MAX_BYTES:
        chunk = conn.recv(HANDOFF_REQUEST_MAX_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")
