"""What is mounted at a path, read from the mount table (mountinfo(5)), never from the mount.

A ``stat`` of a FUSE mount waits for its worker: the worker's own mount before it
serves, a hung one forever, and one whose worker died answers ``ENOTCONN``. The
table answers in every case.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

MOUNTINFO_PATH = "/proc/self/mountinfo"

# The kernel escapes space, tab, newline and backslash in paths as \ooo (octal).
_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


class Mount(NamedTuple):
    """One line of mountinfo(5): ``device`` ``major:minor``, ``fstype`` (``fuse.interposer``), ``source``."""

    device: str
    fstype: str
    source: str


def _unescape(field: bytes) -> bytes:
    return _OCTAL_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field)


def mounts_at(path: str, mountinfo: str = MOUNTINFO_PATH) -> list[Mount]:
    """The mounts stacked at ``path``, oldest first (the last one is the visible one).

    Args:
        path: absolute path, compared with the table's mount points as given
            (no symlinks resolved: resolving would ``stat`` the mount).
    """
    wanted = os.fsencode(os.path.normpath(path))
    found = []
    for line in Path(mountinfo).read_bytes().splitlines():
        # id parent major:minor root mountpoint options [optional…] - fstype source superoptions
        before, _, after = line.partition(b" - ")
        fields, tail = before.split(), after.split()
        if len(fields) > 4 and len(tail) > 1 and _unescape(fields[4]) == wanted:
            found.append(Mount(fields[2].decode(), tail[0].decode(), os.fsdecode(_unescape(tail[1]))))
    return found


def refuse_to_cover_an_interposer_mount(mountpoint: str, mountinfo: str = MOUNTINFO_PATH) -> None:
    """Raise if an interposer mount is the visible mount at ``mountpoint``.

    A second mount there would hide the first and its volume (its worker keeps
    running, serving nobody), and ``policy set`` on the first would seem to do
    nothing; one whose worker died leaves the path answering ``ENOTCONN``, which a
    new mount cannot fix either. Mounting over other file systems (even the
    backing directory itself) stays allowed.

    Raises:
        RuntimeError: naming the volume found and the command that unmounts it.
    """
    # The table names real paths; resolve the parent only (a stat of the mount point may hang).
    absolute = os.path.abspath(mountpoint)
    real = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    stacked = mounts_at(real, mountinfo)
    if stacked and stacked[-1].fstype == "fuse.interposer":
        volume = stacked[-1].source.partition(":")[2] or "?"
        raise RuntimeError(f"{mountpoint} is already an interposer mount (volume {volume}); a second mount would "
                           f"hide it. Unmount it first (fusermount3 -u {real}) or choose another mountpoint")
