"""Delay layer: hold matching ops for a fixed time before passing them on."""

from __future__ import annotations

from typing import Any

import msgspec
import trio

from interposer.proto import DelayLayer

from .._op import BackendCall, Handler, Op
from ._match import compile_glob


class DelayStatistics(msgspec.Struct, frozen=True):
    """Counters of a delay layer: ops delayed and total delay injected, seconds."""

    delayed: int
    delay_s_total: float


class Delay:
    """Runtime of a :class:`~interposer.proto.DelayLayer`.

    The wait is a ``trio.sleep``, so a delayed op holds only its own request task;
    other requests keep being served meanwhile.

    Args:
        spec: the validated layer from the policy.
    """

    def __init__(self, spec: DelayLayer) -> None:
        self.spec = spec
        self._match = compile_glob(spec.path_glob)
        self._delayed = 0

    def bind(self, inner: Handler) -> Handler:
        """Return a handler that applies this layer, then calls ``inner``."""
        delay_s, match = self.spec.delay_s, self._match
        delay_ns = int(delay_s * 1e9)

        async def delay(op: Op, call: BackendCall) -> Any:
            if match is None or match(op.path):
                self._delayed += 1
                op.delay_ns += delay_ns
                await trio.sleep(delay_s)
            return await inner(op, call)

        return delay

    def statistics(self) -> DelayStatistics:
        """Snapshot of this layer's counters."""
        return DelayStatistics(delayed=self._delayed, delay_s_total=self._delayed * self.spec.delay_s)
