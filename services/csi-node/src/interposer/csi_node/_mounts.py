"""What is mounted where, and how to get rid of a mount that will not go away.

Mount state is read from ``/proc/self/mountinfo`` rather than by ``stat``: a FUSE
mount whose worker died answers every ``stat`` with ``ENOTCONN`` (so
``os.path.ismount`` says False), and one whose worker hangs blocks ``stat``
forever; the mount table answers in both cases.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading

log = logging.getLogger(__name__)

MOUNTINFO_PATH = "/proc/self/mountinfo"
#: Readahead of the FUSE mounts the csi-node makes, KiB: one maximal FUSE request.
READ_AHEAD_KIB = 1024
#: How long ``fusermount3 -uz`` / ``umount -l`` may take, seconds.
DEFAULT_UNMOUNT_COMMAND_TIMEOUT_S = 10.0


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        octal = field[i + 1 : i + 4]
        if field[i] == "\\" and len(octal) == 3 and all(c in "01234567" for c in octal):
            out.append(chr(int(octal, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mountinfo() -> list[tuple[str, str, str]]:
    """``(mount point, file system type, major:minor)`` of every mount, in table order."""
    mounts = []
    with open(MOUNTINFO_PATH, encoding="utf-8", errors="surrogateescape") as mountinfo:
        for line in mountinfo:
            # id parent major:minor root mountpoint options [optional...] - fstype source superopts
            before, _, after = line.partition(" - ")
            fields = before.split()
            if len(fields) < 5 or not after:
                continue
            mounts.append((_unescape(fields[4]), after.split()[0], fields[2]))
    return mounts


def mount_table() -> dict[str, str]:
    """Return the current mounts of this mount namespace.

    Returns:
        ``dict[str, str]``: mount point → file system type (``fuse.interposer``,
        ``ext4``…). Where mounts are stacked, the topmost wins.
    """
    return {point: fstype for point, fstype, _ in _mountinfo()}


def set_read_ahead(path: str, kib: int = READ_AHEAD_KIB, sysfs: str = "/sys/class/bdi") -> bool:
    """Set the kernel readahead of the mount at ``path`` (its bdi ``read_ahead_kb``) to ``kib``.

    For the mounts the csi-node makes (fd handoff), once their worker has answered
    FUSE_INIT (which resets it): sequential reads then reach the worker as 1 MiB
    requests instead of 128 KiB ones (what the worker does for its own mounts,
    ``interposer.fuse_worker._readahead``). Best effort: False when not mounted or
    sysfs is read-only.
    """
    devices = {point: device for point, _, device in _mountinfo()}
    device = devices.get(os.path.normpath(path))
    if device is None:
        return False
    try:
        with open(os.path.join(sysfs, device, "read_ahead_kb"), "w") as setting:
            setting.write(str(kib))
    except OSError as exc:
        log.warning("cannot set the readahead of %s (%s)", path, exc)
        return False
    return True


def mount_type(path: str) -> str | None:
    """Return the file system type mounted exactly at ``path``, or None if none is."""
    return mount_table().get(os.path.normpath(path))


def is_fuse_mount(path: str) -> bool:
    """Return True if a FUSE file system (``fuse`` or ``fuse.*``) is mounted at ``path``."""
    fstype = mount_type(path)
    return fstype is not None and (fstype == "fuse" or fstype.startswith("fuse."))


def real_path_of_target(target_path: str) -> str:
    """Return ``target_path`` with its parent's symlinks resolved (the target itself may not exist).

    The mount table names mount points by their real path; a FUSE mount point
    itself must not be resolved (``realpath`` would ``stat`` it, which hangs on a
    hung mount).

    Args:
        target_path: absolute, normalized path.
    """
    return os.path.join(os.path.realpath(os.path.dirname(target_path)), os.path.basename(target_path))


def _call_within(function, path: str, timeout_s: float):
    """Run ``function(path)`` in a daemon thread; return its result, or None on OSError or timeout.

    A hung FUSE mount blocks the call in the kernel forever; the thread parks
    there instead of the caller.
    """
    outcome: list[object] = []

    def probe() -> None:
        try:
            outcome.append(function(path))
        except OSError:
            outcome.append(None)

    thread = threading.Thread(target=probe, name=f"{function.__name__} {path}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else None


def stat_answers(path: str, timeout_s: float) -> bool:
    """Return True if ``os.stat(path)`` succeeds within ``timeout_s`` seconds.

    The stat runs in a daemon thread, so a hung FUSE mount costs one parked thread
    instead of the caller.

    Args:
        path: path to stat.
        timeout_s: how long to wait, seconds.
    """
    return _call_within(os.stat, path, timeout_s) is not None


def statvfs_within(path: str, timeout_s: float) -> os.statvfs_result | None:
    """Return ``os.statvfs(path)``, or None if it fails (``ENOTCONN``…) or takes over ``timeout_s``.

    Args:
        path: a path on the file system to measure.
        timeout_s: how long to wait, seconds.
    """
    return _call_within(os.statvfs, path, timeout_s)


def unmount_lazily(path: str, timeout_s: float = DEFAULT_UNMOUNT_COMMAND_TIMEOUT_S) -> bool:
    """Detach whatever is mounted at ``path`` (``fusermount3 -uz``, else ``umount -l``).

    Args:
        path: the mount point.
        timeout_s: time limit for each command, seconds.

    Returns:
        True if nothing is mounted at ``path`` afterwards.
    """
    commands = []
    if shutil.which("fusermount3"):
        commands.append(["fusermount3", "-u", "-z", path])
    if shutil.which("umount"):
        commands.append(["umount", "-l", path])
    for argv in commands:
        if mount_type(path) is None:
            break
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            log.warning("%s timed out after %.1f s", argv[0], timeout_s)
            continue
        if result.returncode != 0:
            log.warning("%s failed (%d): %s", " ".join(argv), result.returncode, result.stderr.strip())
    return mount_type(path) is None
