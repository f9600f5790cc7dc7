"""Fault layer: fail matching ops with an errno, shorten their I/O, or corrupt read data."""

from __future__ import annotations

import itertools
import random
from typing import Any

import msgspec
import pyfuse3

from interposer.proto import ERRNO_BY_NAME, FaultLayer

from .._op import BackendCall, Handler, Op, transferred_bytes
from ._match import compile_glob

#: Ops whose moved bytes count towards ``after_bytes``.
_MOVING_OPS = frozenset({"read", "write", "copy_file_range"})


class FaultStatistics(msgspec.Struct, frozen=True):
    """Counters of a fault layer: ops it matched, faults it injected, bytes the ops it let through moved."""

    matched: int
    injected: int
    bytes_seen: int


class Fault:
    """Runtime of a :class:`~interposer.proto.FaultLayer`.

    An ``errno`` fault fails the op before it reaches the layers below and the
    backend, so an injected write error writes nothing. A short write passes only
    the first bytes down (``Op.short_size``) and reports that count; a short read
    or a corruption alters what the layers below returned.

    Args:
        spec: the validated layer from the policy.
        rng: random source (seed it for reproducible runs).
        index: index of the layer in the policy (for fault records).

    Attributes:
        acts: False when the layer can never fault an op (``probability`` 0); the
            stack leaves such a layer out of its chains, so its counters stay 0.
    """

    def __init__(self, spec: FaultLayer, rng: random.Random, index: int = 0) -> None:
        self.spec = spec
        self.index = index
        if spec.errnos:
            self._names = list(spec.errnos)
            self._cum_weights: list[float] | None = list(itertools.accumulate(spec.errnos.values()))
        else:
            self._names, self._cum_weights = [spec.errno], None
        self._match = compile_glob(spec.path_glob)
        self._rng = rng
        self.acts = spec.probability > 0.0
        self._matched = 0
        self._injected = 0
        self._bytes_seen = 0

    def _eligible(self, op: Op) -> bool:
        """Count ``op`` and say whether it may be faulted (every_nth, after_bytes, probability)."""
        spec = self.spec
        self._matched += 1
        if self._bytes_seen < spec.after_bytes:
            return False
        if spec.every_nth > 1 and self._matched % spec.every_nth:
            return False
        return spec.probability >= 1.0 or self._rng.random() < spec.probability

    def _errno_name(self) -> str:
        if self._cum_weights is None:
            return self._names[0]
        return self._rng.choices(self._names, cum_weights=self._cum_weights)[0]

    def _shorten(self, size: int) -> int:
        return max(1, int(size * self.spec.short_ratio))

    def _corrupt(self, data: bytes) -> bytes:
        rng, out = self._rng, bytearray(data)
        for pos in rng.sample(range(len(out)), min(self.spec.corrupt_bytes, len(out))):
            out[pos] = 0 if self.spec.corrupt_mode == "zero" else (out[pos] + rng.randrange(1, 256)) % 256
        return bytes(out)

    def bind(self, inner: Handler) -> Handler:
        """Return a handler that applies this layer, then calls ``inner``."""
        match, kind, index = self._match, self.spec.kind, self.index

        async def fault(op: Op, call: BackendCall) -> Any:
            if match is not None and not match(op.path):
                return await inner(op, call)
            if not self._eligible(op):
                if op.name not in _MOVING_OPS:
                    return await inner(op, call)
                result = await inner(op, call)
                self._bytes_seen += transferred_bytes(result, op.size)
                return result
            if kind == "errno":
                name = self._errno_name()
                self._injected += 1
                op.inject(index, "errno", name)
                raise pyfuse3.FUSEError(ERRNO_BY_NAME[name])
            if kind == "short_write":
                if op.size < 2:
                    return await inner(op, call)
                op.short_size = self._shorten(op.size)
                written = await inner(op, call)
                self._injected += 1
                self._bytes_seen += written
                op.inject(index, kind, result=written)
                return written
            data = await inner(op, call)
            if kind == "short_read" and len(data) >= 2:
                data = data[: self._shorten(len(data))]
                self._injected += 1
                op.inject(index, kind, result=len(data))
            elif kind == "corrupt" and data:
                data = self._corrupt(data)
                self._injected += 1
                op.inject(index, kind, result=len(data))
            if op.name in _MOVING_OPS:
                self._bytes_seen += transferred_bytes(data, op.size)
            return data

        return fault

    def statistics(self) -> FaultStatistics:
        """Snapshot of this layer's counters."""
        return FaultStatistics(matched=self._matched, injected=self._injected, bytes_seen=self._bytes_seen)
