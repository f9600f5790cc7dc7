"""Fault layer: fail matching ops with an errno, with a probability."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pyfuse3

from interposer.proto import ERRNO_BY_NAME, FaultLayer

from .._op import BackendCall, Handler, Op
from ._match import compile_glob


class FaultStatistics(msgspec.Struct, frozen=True):
    """Counters of a fault layer: ops it matched and faults it injected."""

    matched: int
    injected: int


class Fault:
    """Runtime of a :class:`~interposer.proto.FaultLayer`.

    A matching op fails before it reaches the layers below and the backend, so an
    injected write error writes nothing.

    Args:
        spec: the validated layer from the policy.
        rng: random source (seed it for reproducible runs).
    """

    def __init__(self, spec: FaultLayer, rng: random.Random) -> None:
        self.spec = spec
        self._errno = ERRNO_BY_NAME[spec.errno]
        self._match = compile_glob(spec.path_glob)
        self._rng = rng
        self._matched = 0
        self._injected = 0

    def bind(self, inner: Handler) -> Handler:
        """Return a handler that applies this layer, then calls ``inner``."""
        errno_value, errno_name, probability = self._errno, self.spec.errno, self.spec.probability
        match, rng = self._match, self._rng

        async def fault(op: Op, call: BackendCall) -> Any:
            if match is None or match(op.path):
                self._matched += 1
                if probability >= 1.0 or rng.random() < probability:
                    self._injected += 1
                    op.fault = errno_name
                    raise pyfuse3.FUSEError(errno_value)
            return await inner(op, call)

        return fault

    def statistics(self) -> FaultStatistics:
        """Snapshot of this layer's counters."""
        return FaultStatistics(matched=self._matched, injected=self._injected)
