"""A network file system client's attribute cache, for a delay layer's ``attr_cache``.

The Linux NFS client answers ``stat(2)`` from cached attributes until they are
older than the inode's timeout; then it sends a GETATTR. The timeout starts at
``acregmin`` (``acdirmin`` for a directory), doubles each time a GETATTR after
it expired finds the attributes unchanged, and falls back to the minimum when they
changed, never above ``acregmax`` / ``acdirmax`` (``nfs_update_inode`` in the
kernel's fs/nfs/inode.c; defaults in nfs(5)). The delay layer holds a ``getattr``
only where that client would have sent one.
"""

from __future__ import annotations

import stat
from typing import Any, NamedTuple

from interposer.proto.policy import ATTR_CACHE_ENTRIES, AttrCache

from ._streams import FileStreams


class _Cached(NamedTuple):
    refreshed_s: float  # when the attributes were last fetched, trio's clock
    timeout_s: float
    version: tuple[int, int, int]  # (ctime ns, mtime ns, size): a change of any is a change


class ClientAttrCache:
    """Per-inode attribute timeouts as :class:`~interposer.proto.policy.AttrCache` describes them.

    Args:
        spec: the minimum and maximum timeouts, seconds.
        entries: most inodes remembered (the least recently asked go first).
    """

    def __init__(self, spec: AttrCache, entries: int = ATTR_CACHE_ENTRIES) -> None:
        self._spec = spec
        self._inodes: FileStreams[_Cached] = FileStreams(entries)

    def fresh(self, ino: int, now_s: float) -> bool:
        """True if the client would answer a ``getattr`` of ``ino`` at ``now_s`` (trio's clock, s) from its cache."""
        cached = self._inodes.take(ino)
        if cached is None:
            return False
        self._inodes.put(ino, cached)
        return now_s - cached.refreshed_s < cached.timeout_s

    def fetched(self, ino: int, attrs: Any, now_s: float) -> None:
        """Note the attributes a held ``getattr`` of ``ino`` returned at ``now_s`` (an ``EntryAttributes``)."""
        spec = self._spec
        is_dir = stat.S_ISDIR(attrs.st_mode)
        least, most = (spec.dir_min_s, spec.dir_max_s) if is_dir else (spec.file_min_s, spec.file_max_s)
        version = (attrs.st_ctime_ns, attrs.st_mtime_ns, attrs.st_size)
        cached = self._inodes.take(ino)
        if cached is None or cached.version != version:
            timeout_s = least
        else:
            timeout_s = min(max(cached.timeout_s * 2.0, least), most)
        self._inodes.put(ino, _Cached(now_s, timeout_s, version))
