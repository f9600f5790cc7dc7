"""Quota layer: byte and inode limits of the volume, reflected in statfs."""

from __future__ import annotations

import errno as _errno
import os
import stat
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import pyfuse3

from interposer.proto import QuotaLayer

from .._op import FALLOC_FL_KEEP_SIZE, BackendCall, Handler, Op

#: Ops a quota layer acts on.
QUOTA_OPS: frozenset[str] = frozenset({"write", "fallocate", "setattr", "create", "mkdir", "mknod", "symlink", "unlink", "rmdir", "statfs"})
_CREATING_OPS = frozenset({"create", "mkdir", "mknod", "symlink"})
#: Block size reported by statfs when the backend reports none, bytes.
DEFAULT_FRSIZE = 4096


class Usage:
    """Bytes (apparent sizes of regular files) and inodes in use in the volume.

    Args:
        bytes_used: bytes, at the start of tracking.
        inodes_used: files, directories, links (the root not counted).
    """

    def __init__(self, bytes_used: int, inodes_used: int) -> None:
        self.bytes_used = bytes_used
        self.inodes_used = inodes_used


def walk_usage(root: str) -> Usage:
    """Measure a directory tree: apparent bytes of its regular files and its entries.

    Symlinks are not followed; hard links count once (by ``(st_dev, st_ino)``).

    Args:
        root: directory to walk.

    Raises:
        OSError: ``root`` cannot be read.
    """
    seen: set[tuple[int, int]] = set()
    total, inodes = 0, 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                inodes += 1
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
                elif stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return Usage(total, inodes)


class QuotaBackend(Protocol):
    """What the quota layer needs from a backend (every backend has these ops)."""

    async def getattr(self, ino: int, ctx: Any) -> pyfuse3.EntryAttributes: ...
    async def lookup(self, parent_ino: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes: ...
    async def forget(self, inode_list: Any) -> None: ...


class QuotaContext:
    """Worker-lifetime state of quotas: the backend and the tracked usage.

    Usage is measured (``measure()``) when a quota comes into force and then kept
    up to date by the quota layers; when a policy without quota is installed,
    tracking stops and the next quota measures again.

    Args:
        backend: the backend (``getattr`` / ``lookup`` / ``forget``).
        measure: returns the usage of the backing store (e.g. ``walk_usage(dir)``,
            or a backend's own ``usage()``).
    """

    def __init__(self, backend: QuotaBackend, measure: Callable[[], Usage]) -> None:
        self.backend = backend
        self.measure = measure
        self.usage: Usage | None = None

    def track(self) -> Usage:
        """The tracked usage, measuring it first if tracking is not running."""
        if self.usage is None:
            self.usage = self.measure()
        return self.usage

    def stop(self) -> None:
        """Stop tracking (no quota in force)."""
        self.usage = None


class QuotaStatistics(msgspec.Struct, frozen=True):
    """Counters of a quota layer: usage now and ops refused."""

    bytes_used: int
    inodes_used: int
    refused: int


class Quota:
    """Runtime of a :class:`~interposer.proto.QuotaLayer`.

    A write is refused when it would grow the volume past ``bytes`` (the growth is
    ``offset + size`` past the file's size, asked from the backend first), and so
    is a ``fallocate`` that extends the file (one with ``FALLOC_FL_KEEP_SIZE``
    changes no apparent size, which is what usage counts); a
    create/mkdir/mknod/symlink when the inodes are used up. Truncation is not
    refused (a sparse extension takes no space) but is counted. Concurrent
    extending writes of one file may overshoot the limit by one request. Renames
    over an existing file do not give its space back until the next measurement.

    Args:
        spec: the validated layer.
        context: worker-lifetime quota state.
        index: index of the layer in the policy (for fault records).

    Attributes:
        acts: always True: even a quota no write can reach keeps usage and shapes ``statfs``.
    """

    acts = True

    def __init__(self, spec: QuotaLayer, context: QuotaContext, index: int = 0) -> None:
        self.spec = spec
        self.index = index
        self.context = context
        self.usage = context.track()
        self._errno = getattr(_errno, spec.errno)
        self._refused = 0

    def _refuse(self, op: Op) -> None:
        self._refused += 1
        op.inject(self.index, "errno", self.spec.errno)
        raise pyfuse3.FUSEError(self._errno)

    async def _size(self, ino: int) -> int:
        attrs = await self.context.backend.getattr(ino, None)
        return attrs.st_size if stat.S_ISREG(attrs.st_mode) else 0

    def bind(self, inner: Handler) -> Handler:
        """Return a handler that applies this layer, then calls ``inner``."""
        spec, usage, backend = self.spec, self.usage, self.context.backend

        async def quota(op: Op, call: BackendCall) -> Any:
            name = op.name
            if name == "write":
                before = await self._size(op.ino)
                if spec.bytes is not None and usage.bytes_used + max(0, op.offset + op.size - before) > spec.bytes:
                    self._refuse(op)
                written = await inner(op, call)
                usage.bytes_used += max(0, op.offset + written - before)
                return written
            if name == "fallocate":
                before = await self._size(op.ino)
                grows = 0 if op.mode & FALLOC_FL_KEEP_SIZE else max(0, op.offset + op.size - before)
                if spec.bytes is not None and usage.bytes_used + grows > spec.bytes:
                    self._refuse(op)
                result = await inner(op, call)
                usage.bytes_used += await self._size(op.ino) - before
                return result
            if name == "setattr":
                before = await self._size(op.ino)
                attrs = await inner(op, call)
                if stat.S_ISREG(attrs.st_mode):
                    usage.bytes_used += attrs.st_size - before
                return attrs
            if name in _CREATING_OPS:
                if spec.inodes is not None and usage.inodes_used + 1 > spec.inodes:
                    self._refuse(op)
                result = await inner(op, call)
                usage.inodes_used += 1
                return result
            if name in ("unlink", "rmdir"):
                entry = os.fsencode(op.path.rpartition("/")[2])
                try:
                    attrs = await backend.lookup(op.ino, entry, None)
                except (OSError, pyfuse3.FUSEError):
                    return await inner(op, call)  # let the backend report the error
                await backend.forget([(attrs.st_ino, 1)])
                result = await inner(op, call)
                if attrs.st_nlink <= 1 or name == "rmdir":
                    usage.inodes_used -= 1
                    if stat.S_ISREG(attrs.st_mode):
                        usage.bytes_used -= attrs.st_size
                return result
            if name == "statfs":
                return self._statfs(await inner(op, call))
            return await inner(op, call)

        return quota

    def _statfs(self, data: pyfuse3.StatvfsData) -> pyfuse3.StatvfsData:
        spec, usage = self.spec, self.usage
        if spec.bytes is not None:
            frsize = data.f_frsize or DEFAULT_FRSIZE
            free = max(0, spec.bytes - usage.bytes_used) // frsize
            data.f_blocks = spec.bytes // frsize
            data.f_bfree = min(data.f_bfree, free)
            data.f_bavail = min(data.f_bavail, free)
        if spec.inodes is not None:
            free_inodes = max(0, spec.inodes - usage.inodes_used)
            data.f_files = spec.inodes
            data.f_ffree = min(data.f_ffree, free_inodes)
            data.f_favail = min(data.f_favail, free_inodes)
        return data

    def statistics(self) -> QuotaStatistics:
        """Snapshot of usage and refusals."""
        return QuotaStatistics(bytes_used=self.usage.bytes_used, inodes_used=self.usage.inodes_used,
                               refused=self._refused)
