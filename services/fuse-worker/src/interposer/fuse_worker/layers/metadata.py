"""Metadata layer: override and jitter the attributes entry and attribute replies carry,
and reorder directory listings."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

import msgspec
import pyfuse3

from interposer.proto import MetadataLayer

from .._op import BackendCall, Handler, Op
from ._match import compile_glob

_NS_PER_S = 1_000_000_000
_PERMISSION_BITS = 0o7777


class MetadataStatistics(msgspec.Struct, frozen=True):
    """Counters of a metadata layer: attribute replies altered, directory listings reordered."""

    altered: int
    reordered: int = 0


class Metadata:
    """Runtime of a :class:`~interposer.proto.MetadataLayer`.

    Alters the ``EntryAttributes`` of lookup/getattr/setattr/mknod/mkdir/symlink/
    link replies and the attributes half of create's reply, in place (backends
    return a fresh object per reply). The kernel caches attributes for the
    attribute timeout, so a change shows within that time; with
    ``default_permissions`` the kernel checks access against the altered mode and
    owner.

    With ``readdir_order`` other than ``backend``, a matching ``opendir`` leaves an
    order function on ``Op.dir_order``; the adapter hands it to the backend's
    ``order_dir`` hook, which orders the listing snapshot the handle's first
    readdir takes. Readdir offsets are positions in that snapshot, so every
    readdir, seekdir and rewinddir of the handle sees the same order; a rewind that
    finds the entries changed takes a new snapshot, ordered again
    (``backends._base.OpenDir``).

    Args:
        spec: the validated layer.
        rng: shared random source, used unless the layer has its own ``seed``.

    Attributes:
        acts: False when the layer changes nothing (no override, no jitter,
            ``readdir_order`` ``backend``); the stack leaves it out of its chains.
    """

    def __init__(self, spec: MetadataLayer, rng: random.Random | None = None) -> None:
        self.spec = spec
        self._rng = random.Random(spec.seed) if spec.seed is not None else (rng or random.Random())
        # Listing orders draw from a source of their own, so attribute jitter (drawn per
        # reply) does not change which permutation the n-th opendir gets.
        self._order_rng = random.Random(f"readdir-order:{spec.seed}") if spec.seed is not None else self._rng
        self._hash_key = b""
        if spec.readdir_order == "hash":
            self._hash_key = (spec.seed if spec.seed is not None else self._rng.getrandbits(63)).to_bytes(8, "little")
        self._match = compile_glob(spec.path_glob)
        self._altered = 0
        self._reordered = 0
        self.acts = spec.alters_attributes or spec.readdir_order != "backend"

    def order(self, names: Sequence[bytes]) -> list[int]:
        """The order of one listing: a permutation of ``range(len(names))`` (positions in ``names``).

        ``shuffle``: a fresh uniform permutation per call. ``hash``: positions sorted
        by BLAKE2b of the name keyed with the seed, so equal for equal names and
        seed. ``backend``: unchanged.
        """
        self._reordered += 1
        positions = list(range(len(names)))
        if self.spec.readdir_order == "shuffle":
            self._order_rng.shuffle(positions)
        elif self.spec.readdir_order == "hash":
            key = self._hash_key
            positions.sort(key=lambda i: hashlib.blake2b(names[i], key=key, digest_size=8).digest())
        return positions

    def alter(self, attrs: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        """Apply the overrides and jitter to ``attrs`` (in place) and return it."""
        spec = self.spec
        if spec.size is not None:
            attrs.st_size = spec.size
        if spec.mode is not None:
            attrs.st_mode = (attrs.st_mode & ~_PERMISSION_BITS) | spec.mode
        if spec.nlink is not None:
            attrs.st_nlink = spec.nlink
        if spec.uid is not None:
            attrs.st_uid = spec.uid
        if spec.gid is not None:
            attrs.st_gid = spec.gid
        jitter_ns = int(spec.time_jitter_s * _NS_PER_S)
        for field, override in (("st_atime_ns", spec.atime), ("st_mtime_ns", spec.mtime), ("st_ctime_ns", spec.ctime)):
            value = getattr(attrs, field) if override is None else int(override * _NS_PER_S)
            if jitter_ns:
                value = max(0, value + self._rng.randint(-jitter_ns, jitter_ns))
            setattr(attrs, field, value)
        self._altered += 1
        return attrs

    def bind(self, inner: Handler) -> Handler:
        """Return a handler that applies this layer, then calls ``inner``."""
        match, reorder, alters = self._match, self.spec.readdir_order != "backend", self.spec.alters_attributes

        async def metadata(op: Op, call: BackendCall) -> Any:
            result = await inner(op, call)
            if match is None or match(op.path):
                if op.name == "opendir":
                    if reorder:
                        op.dir_order = self.order
                    return result
                if not alters:
                    return result
                if op.name == "create":
                    info, attrs = result
                    return info, self.alter(attrs)
                if isinstance(result, pyfuse3.EntryAttributes):
                    return self.alter(result)
            return result

        return metadata

    def statistics(self) -> MetadataStatistics:
        """Snapshot of this layer's counters."""
        return MetadataStatistics(altered=self._altered, reordered=self._reordered)
