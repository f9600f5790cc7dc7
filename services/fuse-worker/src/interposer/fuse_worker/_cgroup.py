"""The memory limit of the worker's cgroup: what its resident memory is measured against.

A passthrough worker grows ~260 B per name the kernel knows; past its pod's memory
limit the kernel's OOM killer ends it and every process using the mount gets
ENOTCONN. The heartbeat carries the limit beside the RSS so the collector (and the
``InterposerWorkerMemoryNearLimit`` alert) can compare the two without joining
kubelet metrics on pod names the volume metrics do not carry.
"""

from __future__ import annotations

import os
from typing import NamedTuple

#: Where the cgroup file systems are mounted (v2: the unified hierarchy itself;
#: v1: one directory per controller).
CGROUP_ROOT = "/sys/fs/cgroup"
#: cgroup v1 reports "no limit" as the largest page counter in bytes
#: (9223372036854771712 with 4 KiB pages); anything this large is no limit.
_V1_UNLIMITED_BYTES = 1 << 62


class MemoryCgroup(NamedTuple):
    """Where a process's memory limit is: ``hierarchy`` (the memory controller's mount),
    ``path`` (its cgroup in it, ``/``-rooted) and ``limit_file`` (``memory.max`` on v2,
    ``memory.limit_in_bytes`` on v1)."""

    hierarchy: str
    path: str
    limit_file: str


def memory_cgroup(proc_cgroup: str = "/proc/self/cgroup", cgroup_root: str = CGROUP_ROOT) -> MemoryCgroup | None:
    """The memory cgroup of the process whose membership file is ``proc_cgroup`` (cgroups(7) format);
    None if it cannot be read or names no memory controller. cgroup v1's memory controller
    (``N:memory:<path>``) wins over the unified hierarchy (``0::<path>``), as on hybrid hosts."""
    try:
        with open(proc_cgroup) as membership:
            lines = membership.read().splitlines()
    except OSError:
        return None
    v1_path = v2_path = None
    for line in lines:
        _hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            v1_path = path
        elif controllers == "":
            v2_path = path
    if v1_path is not None:
        return MemoryCgroup(os.path.join(cgroup_root, "memory"), v1_path, "memory.limit_in_bytes")
    if v2_path is not None:
        return MemoryCgroup(cgroup_root, v2_path, "memory.max")
    return None


def memory_limit_bytes(proc_cgroup: str = "/proc/self/cgroup", cgroup_root: str = CGROUP_ROOT) -> int | None:
    """The memory limit that applies to this process's cgroup, bytes; None if none or unknown.

    The kernel charges a cgroup's memory to each of its ancestors, so the tightest
    limit on the path from the process's cgroup up to the root that is visible here
    applies (in a container with a cgroup namespace only its own cgroup is).
    cgroup v2 (``0::<path>`` in ``/proc/self/cgroup``): ``memory.max``, ``max`` = none
    (Documentation/admin-guide/cgroup-v2.rst, "Memory Interface Files"). cgroup v1
    (``N:memory:<path>``): ``memory.limit_in_bytes`` under the memory controller's
    mount (Documentation/admin-guide/cgroup-v1/memory.rst).

    Args:
        proc_cgroup: the process's cgroup membership file, cgroups(7) format.
        cgroup_root: where the cgroup file systems are mounted.
    """
    cgroup = memory_cgroup(proc_cgroup, cgroup_root)
    return None if cgroup is None else _tightest(*cgroup)


def _tightest(hierarchy: str, path: str, file_name: str) -> int | None:
    """Smallest finite limit in ``file_name`` from ``hierarchy/path`` up to ``hierarchy``."""
    limits = []
    relative = path.strip("/")
    while True:
        limit = _read_limit(os.path.join(hierarchy, relative, file_name))
        if limit is not None:
            limits.append(limit)
        if not relative:
            break
        relative = os.path.dirname(relative)
    return min(limits, default=None)


def _read_limit(file_path: str) -> int | None:
    try:
        with open(file_path) as limit_file:
            text = limit_file.read().strip()
    except OSError:
        return None  # above a cgroup namespace's root, or no memory controller here
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value < _V1_UNLIMITED_BYTES else None
