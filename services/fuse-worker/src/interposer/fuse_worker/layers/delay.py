"""Delay layer: hold matching ops for a time drawn from a distribution, then pass them on."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import msgspec
import trio

from interposer.proto import DelayLayer
from interposer.proto.policy import (
    Distribution,
    FixedDistribution,
    LognormalDistribution,
    NormalDistribution,
    ParetoDistribution,
    UniformDistribution,
)

from .._op import BackendCall, Handler, Op
from ._match import compile_glob


class DelayStatistics(msgspec.Struct, frozen=True):
    """Counters of a delay layer: ops delayed and total delay injected, seconds."""

    delayed: int
    delay_s_total: float


def sampler(dist: Distribution, rng: random.Random, max_s: float) -> Callable[[], float]:
    """Return a function drawing one delay in seconds from ``dist``, clamped to ``[0, max_s]``.

    Args:
        dist: the distribution (parameters in seconds).
        rng: random source.
        max_s: cap of every draw, seconds.
    """
    match dist:
        case FixedDistribution(delay_s=d):
            value = min(d, max_s)
            return lambda: value
        case UniformDistribution(min_s=lo, max_s=hi):
            return lambda: min(rng.uniform(lo, hi), max_s)
        case NormalDistribution(mean_s=mu, stddev_s=sd):
            return lambda: min(max(0.0, rng.gauss(mu, sd)), max_s)
        case LognormalDistribution(median_s=median, sigma=sigma):
            mu_log = math.log(median)
            return lambda: min(rng.lognormvariate(mu_log, sigma), max_s)
        case ParetoDistribution(scale_s=scale, alpha=alpha):
            return lambda: min(scale * rng.paretovariate(alpha), max_s)
    raise TypeError(f"unknown distribution {type(dist).__name__}")


class Delay:
    """Runtime of a :class:`~interposer.proto.DelayLayer`.

    The wait is a ``trio.sleep``, so a delayed op holds only its own request task;
    other requests keep being served meanwhile.

    Args:
        spec: the validated layer from the policy.
        rng: shared random source, used unless the layer has its own ``seed``.
    """

    def __init__(self, spec: DelayLayer, rng: random.Random | None = None) -> None:
        self.spec = spec
        self._rng = random.Random(spec.seed) if spec.seed is not None else (rng or random.Random())
        self.draw = sampler(spec.resolved_distribution, self._rng, spec.max_s)
        self._match = compile_glob(spec.path_glob)
        self._delayed = 0
        self._delay_s_total = 0.0

    def bind(self, inner: Handler) -> Handler:
        """Return a handler that applies this layer, then calls ``inner``."""
        match, draw, rng, probability = self._match, self.draw, self._rng, self.spec.probability

        async def delay(op: Op, call: BackendCall) -> Any:
            if (match is None or match(op.path)) and (probability >= 1.0 or rng.random() < probability):
                delay_s = draw()
                self._delayed += 1
                self._delay_s_total += delay_s
                op.delay_ns += int(delay_s * 1e9)
                await trio.sleep(delay_s)
            return await inner(op, call)

        return delay

    def statistics(self) -> DelayStatistics:
        """Snapshot of this layer's counters."""
        return DelayStatistics(delayed=self._delayed, delay_s_total=self._delay_s_total)
