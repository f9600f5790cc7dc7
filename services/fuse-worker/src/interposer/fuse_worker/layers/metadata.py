"""Metadata layer: override and jitter the attributes entry and attribute replies carry."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pyfuse3

from interposer.proto import MetadataLayer

from .._op import BackendCall, Handler, Op
from ._match import compile_glob

_NS_PER_S = 1_000_000_000
_PERMISSION_BITS = 0o7777


class MetadataStatistics(msgspec.Struct, frozen=True):
    """Counters of a metadata layer: replies altered."""

    altered: int


class Metadata:
    """Runtime of a :class:`~interposer.proto.MetadataLayer`.

    Alters the ``EntryAttributes`` of lookup/getattr/setattr/mknod/mkdir/symlink/
    link replies and the attributes half of create's reply, in place (backends
    return a fresh object per reply). The kernel caches attributes for the
    attribute timeout, so a change shows within that time; with
    ``default_permissions`` the kernel checks access against the altered mode and
    owner.

    Args:
        spec: the validated layer.
        rng: shared random source, used unless the layer has its own ``seed``.
    """

    def __init__(self, spec: MetadataLayer, rng: random.Random | None = None) -> None:
        self.spec = spec
        self._rng = random.Random(spec.seed) if spec.seed is not None else (rng or random.Random())
        self._match = compile_glob(spec.path_glob)
        self._altered = 0

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
        match = self._match

        async def metadata(op: Op, call: BackendCall) -> Any:
            result = await inner(op, call)
            if match is None or match(op.path):
                if op.name == "create":
                    info, attrs = result
                    return info, self.alter(attrs)
                if isinstance(result, pyfuse3.EntryAttributes):
                    return self.alter(result)
            return result

        return metadata

    def statistics(self) -> MetadataStatistics:
        """Snapshot of this layer's counters."""
        return MetadataStatistics(altered=self._altered)
