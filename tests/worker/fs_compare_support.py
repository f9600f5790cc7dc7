"""Helpers for comparing a directory tree on a native file system with one through a mount."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Fields of ``lstat`` that must be equal through the mount (times, st_dev, st_ino
#: and st_blocks legitimately differ; inode identity is compared as equality classes;
#: a directory's st_size is file-system specific).
COMPARED_STAT_FIELDS = ("st_mode", "st_nlink", "st_uid", "st_gid")


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """Run ``fn`` and return ``("ok", result)`` or ``("err", errno name)``."""
    try:
        return "ok", fn(*args, **kwargs)
    except OSError as exc:
        return "err", errno.errorcode.get(exc.errno or 0, str(exc.errno))


def snapshot(root: Path) -> dict[str, Any]:
    """Everything about the tree under ``root`` that must match across file systems.

    Returns:
        ``{"entries": {relpath: record}, "inode_classes": sorted groups of relpaths
        sharing an inode}``; a record holds the compared stat fields, the size of
        non-directories, the contents of regular files, the target of symlinks and
        the ``user.*`` xattrs of files and directories.
    """
    entries: dict[str, Any] = {}
    by_inode: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            record: dict[str, Any] = {field: getattr(st, field) for field in COMPARED_STAT_FIELDS}
            if stat.S_ISREG(st.st_mode):
                record["size"] = st.st_size
                with open(path, "rb") as f:
                    record["data"] = f.read()
            elif stat.S_ISLNK(st.st_mode):
                record["size"] = st.st_size
                record["target"] = os.readlink(path)
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                record["xattrs"] = {n: os.getxattr(path, n) for n in sorted(os.listxattr(path)) if n.startswith("user.")}
            entries[rel] = record
            by_inode.setdefault(st.st_ino, []).append(rel)
    return {"entries": entries, "inode_classes": sorted(sorted(group) for group in by_inode.values())}


def describe_difference(left: dict[str, Any], right: dict[str, Any]) -> str:
    """A short account of where two snapshots differ (for assertion messages)."""
    lines = []
    for rel in sorted(set(left["entries"]) | set(right["entries"])):
        a, b = left["entries"].get(rel), right["entries"].get(rel)
        if a != b:
            lines.append(f"{rel}: native={a!r}\n{' ' * len(rel)}  mount ={b!r}")
    if left["inode_classes"] != right["inode_classes"]:
        lines.append(f"inode classes: native={left['inode_classes']} mount={right['inode_classes']}")
    return "\n".join(lines)
