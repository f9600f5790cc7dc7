"""The FUSE requests of one system call, so that a latency floor is paid once per call.

For an ``open(O_CREAT)`` of a new name the kernel sends up to three requests from
the calling thread, one after the other: a GETATTR of the parent directory when
its attributes are no longer valid (every create in a directory invalidates
them), a LOOKUP of the name, which finds nothing, then CREATE (``fuse_atomic_open``
in fs/fuse/dir.c looks the name up itself before creating it); ``mkdir``,
``mknod`` and ``symlink`` go the same way. An NFSv4 client sends one OPEN for the
same call (RFC 8881, section 18.16), and the directory's new attributes come back
in the same reply. A latency floor on each request would charge the call two or
three round trips where the emulated file system charges one: measured with the
``efs`` profile (fio ``filecreate``, QD1), 4.88 ms per create against its 2.7 ms.

An ``open`` of an existing name the kernel has no valid entry for goes the same
way: a LOOKUP that finds it, then OPEN; an NFSv4 client sends one OPEN by name
(``nfs_atomic_open`` in fs/nfs/dir.c), so the call costs one round trip, not two
(measured with ``efs``, an ``open(O_RDONLY)`` of an unseen file: 2.06 ms against its
1 ms before this link).

:class:`FloorChains` links such requests: a LOOKUP of ``D/name`` that follows the
same thread's GETATTR of ``D``, a creation of ``D/name`` that follows the same
thread's LOOKUP of ``D/name`` which found nothing, and an OPEN of ``D/name`` that
follows the same thread's LOOKUP of it which found it, each start their floor when
the first request of the chain started. "Follows" means: the next request of that
thread, arriving at most :data:`CHAIN_WINDOW_S` after the previous one was
answered (the kernel sends it at once; any other request of the thread in
between breaks the chain). Two system calls can look the same — a ``stat`` that
finds nothing then a ``mkdir`` of the name — but the second call does its own
LOOKUP (no negative entry is cached while a layer acts on lookups), so it chains
to that one and pays its own floor. A ``stat`` then an ``open`` of the same file
by one thread within the window do look like one ``open`` (the kernel keeps the
entry the ``stat`` found, so no second LOOKUP comes), and pay one floor where an
NFS client sends a LOOKUP and an OPEN.
"""

from __future__ import annotations

import errno
import typing

#: Longest gap between a request's answer and the next request of the same system
#: call, seconds: the kernel sends it at once (tens of µs here, waking an idle vCPU
#: included), an application's next call takes at least as long.
CHAIN_WINDOW_S = 0.001
#: Ops that create the name a LOOKUP just found missing (the kernel looks it up first).
CREATIONS = frozenset({"create", "mkdir", "mknod", "symlink"})
#: Ops that use the name a LOOKUP just found, in the same call (an NFSv4 OPEN by name).
USES_OF_FOUND = frozenset({"open"})
#: Threads remembered at most; beyond, the oldest half is dropped (a thread's chain
#: lasts one system call, so only a burst of callers needs more).
MAX_THREADS = 4096


class _Link(typing.NamedTuple):
    kind: str  # "getattr", "missing" (a lookup that found nothing) or "found" (one that found the name)
    path: str
    chain_start_s: float
    answered_s: float


def _parent(path: str) -> str:
    head = path.rpartition("/")[0]
    return head or "/"


class FloorChains:
    """Per calling thread, the last request that a next one of the same system call may continue.

    Shared by the delay layers of one stack (the requests of one call may match
    different layers: ``efs`` holds lookups to its read latency, creates to its
    write latency). Times are trio's clock, seconds.
    """

    def __init__(self) -> None:
        self._last: dict[int, _Link] = {}

    def chain_start(self, op_name: str, path: str, pid: int, start_s: float) -> float:
        """When the floor of this request starts: ``start_s``, or the start of the chain it continues."""
        link = self._last.get(pid) if pid else None
        if link is None or start_s - link.answered_s > CHAIN_WINDOW_S:
            return start_s
        if op_name == "lookup" and link.kind == "getattr" and link.path == _parent(path):
            return link.chain_start_s
        if op_name in CREATIONS and link.kind == "missing" and link.path == path:
            return link.chain_start_s
        if op_name in USES_OF_FOUND and link.kind == "found" and link.path == path:
            return link.chain_start_s
        return start_s

    def answered(self, op_name: str, path: str, pid: int, chain_start_s: float, answered_s: float,
                 error: BaseException | None) -> None:
        """Note that a request was answered at ``answered_s``; ``error``: what it raised, if anything."""
        if not pid:
            return
        if op_name == "getattr" and error is None:
            kind = "getattr"
        elif op_name == "lookup" and getattr(error, "errno", None) == errno.ENOENT:
            kind = "missing"
        elif op_name == "lookup" and error is None:
            kind = "found"
        else:
            self._last.pop(pid, None)  # anything else ends the thread's chain
            return
        if len(self._last) >= MAX_THREADS:
            for stale in list(self._last)[: MAX_THREADS // 2]:
                del self._last[stale]
        self._last.pop(pid, None)  # re-insert: dict order is age
        self._last[pid] = _Link(kind, path, chain_start_s, answered_s)


class Unchained:
    """:class:`FloorChains`' interface for a layer whose every request pays its own floor
    (``DelayLayer.one_floor_per_call`` False: an NFSv3 client's LOOKUP, ACCESS, CREATE)."""

    @staticmethod
    def chain_start(op_name: str, path: str, pid: int, start_s: float) -> float:
        """``start_s``: no request continues another."""
        return start_s

    @staticmethod
    def answered(op_name: str, path: str, pid: int, chain_start_s: float, answered_s: float,
                 error: BaseException | None) -> None:
        """Nothing to remember."""
