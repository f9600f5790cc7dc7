"""Compile a policy into per-op handler chains.

A policy is an ordered list of layers. For every FUSE op name the stack keeps only
the layers whose op set can match that op, bound inside out (Starlette's
``build_middleware_stack`` pattern), so an op no layer targets goes straight to the
backend. A layer's runtime object (its counters, its token bucket) is shared by all
the chains it appears in.
"""

from __future__ import annotations

import random
import typing

from interposer.proto import DelayLayer, FaultLayer, Layer, Policy, ThrottleLayer
from interposer.proto.policy import DataOpName, OpName

from ._op import Handler, invoke_backend
from .layers import Delay, Fault, Throttle
from .layers._match import compile_glob

ALL_OPS: frozenset[str] = frozenset(typing.get_args(OpName))
DATA_OPS: frozenset[str] = frozenset(typing.get_args(DataOpName))

LayerRuntime = Fault | Delay | Throttle


def _ops_of(spec: Layer) -> frozenset[str]:
    if isinstance(spec, ThrottleLayer):
        return spec.ops or DATA_OPS
    return spec.ops or ALL_OPS


def _runtime(spec: Layer, rng: random.Random) -> LayerRuntime:
    if isinstance(spec, FaultLayer):
        return Fault(spec, rng)
    if isinstance(spec, DelayLayer):
        return Delay(spec)
    if isinstance(spec, ThrottleLayer):
        return Throttle(spec)
    raise TypeError(f"no runtime for layer {type(spec).__name__}")


class Stack:
    """The compiled form of one policy revision.

    Args:
        policy: validated policy.
        revision: KV revision it came from (0 = initial/local policy).
        rng: random source for probabilistic layers.

    Attributes:
        chains: ``dict[str, Handler]``: op name → entry handler, only for ops at
            least one layer applies to.
        layers: the layer runtimes in policy order.
    """

    def __init__(self, policy: Policy, revision: int, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.revision = revision
        rng = rng or random.Random()
        self.layers: list[LayerRuntime] = [_runtime(spec, rng) for spec in policy.layers]
        self.chains: dict[str, Handler] = {}
        for op_name in ALL_OPS:
            handler: Handler = invoke_backend
            for spec, runtime in zip(reversed(policy.layers), reversed(self.layers)):
                if op_name in _ops_of(spec):
                    handler = runtime.bind(handler)
            if handler is not invoke_backend:
                self.chains[op_name] = handler
        # Data-path layers decide the page-cache mode of files opened under them.
        self._data_globs = [
            compile_glob(spec.path_glob) for spec in policy.layers if _ops_of(spec) & DATA_OPS
        ]

    def touches_data(self, path: str) -> bool:
        """True if some layer may act on reads or writes of ``path``.

        Files opened under such a layer bypass the page cache (FOPEN_DIRECT_IO), so
        every read and write reaches the layers: a cached read would hide an
        injected fault or delay.
        """
        return any(match is None or match(path) for match in self._data_globs)
