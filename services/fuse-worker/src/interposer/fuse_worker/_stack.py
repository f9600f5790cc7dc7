"""Compile a policy into per-op handler chains.

A policy is an ordered list of layers. Profile layers are expanded into the
throttle and delay layers they stand for, and layers whose expiry has passed are
left out. For every FUSE op name the stack keeps only the layers whose op set can
match that op and that can act at all (``runtime.acts``: a fault of probability 0,
a delay that always draws 0 s, a throttle no worker can reach, a metadata layer
that changes nothing are compiled out), bound inside out (Starlette's
``build_middleware_stack`` pattern), so an op no layer acts on goes straight to the
backend. A layer's runtime object (its counters, its token bucket) is shared by all
the chains it appears in, and by the stack that replaces this one when a layer
expires.
"""

from __future__ import annotations

import random
import time
import typing

from interposer.proto import (
    DelayLayer,
    FaultLayer,
    Layer,
    MetadataLayer,
    Policy,
    ProfileLayer,
    QuotaLayer,
    S3SemanticsLayer,
    StagedWritesLayer,
    ThrottleLayer,
)
from interposer.proto.policy import (
    FAULT_KIND_OPS,
    OPEN_OPS,
    S3_SEMANTICS_OPS,
    STAGED_WRITES_OPS,
    WRITE_BEHIND_OPS,
    DataOpName,
    OpName,
)
from interposer.proto.profiles import expand_profile

from ._op import Handler, invoke_backend
from .layers import Delay, Fault, Metadata, Quota, QuotaContext, S3Semantics, StagedWrites, Throttle
from .layers._chains import FloorChains
from .layers._match import compile_glob
from .layers.quota import QUOTA_OPS

ALL_OPS: frozenset[str] = frozenset(typing.get_args(OpName))
DATA_OPS: frozenset[str] = frozenset(typing.get_args(DataOpName))

LayerRuntime = Fault | Delay | Throttle | Quota | Metadata | S3Semantics | StagedWrites


_READ_WRITE = frozenset({"read", "write"})


def ops_of(spec: Layer) -> frozenset[str]:
    """The FUSE ops a (non-profile) layer acts on."""
    if isinstance(spec, ThrottleLayer):
        return spec.ops or DATA_OPS
    if isinstance(spec, QuotaLayer):
        return QUOTA_OPS
    if isinstance(spec, MetadataLayer):
        return spec.ops or spec.default_ops
    if isinstance(spec, S3SemanticsLayer):
        return S3_SEMANTICS_OPS
    if isinstance(spec, StagedWritesLayer):
        return STAGED_WRITES_OPS
    if isinstance(spec, FaultLayer):
        ops = spec.ops or FAULT_KIND_OPS.get(spec.kind, ALL_OPS)
        return ops & OPEN_OPS if spec.on == "open" else ops
    if isinstance(spec, DelayLayer) and spec.write_behind:
        return (spec.ops or ALL_OPS) | WRITE_BEHIND_OPS
    return spec.ops or ALL_OPS


def _flushes_writes_only(spec: Layer) -> bool:
    """True if the layer acts on ``flush`` only after writes: to hold a close after writes it deferred
    (``write_behind``), or to complete an upload (``s3_semantics``, ``staged_writes``)."""
    if isinstance(spec, (S3SemanticsLayer, StagedWritesLayer)):
        return True
    return isinstance(spec, DelayLayer) and spec.write_behind and bool(spec.ops) and "flush" not in spec.ops


def needs_direct_io(spec: Layer) -> bool:
    """True if files the layer matches must bypass the page cache (FOPEN_DIRECT_IO).

    A layer acting on reads needs it (a read served from the cache never reaches
    the layer: the fault, delay or wait would be hidden), and so does a short-write
    fault (only with FOPEN_DIRECT_IO does the kernel hand a short count to
    ``write(2)``). A layer acting only on writes does not: writeback caching is
    off, so every ``write(2)`` is sent to the worker and waits for its reply
    (errno, delay and throttle reach the application unchanged). Quota refuses
    writes and metadata alters attributes: neither acts on reads; staged_writes
    only marks the reads of a local copy as local, and a read the page cache
    answers is local too. The caller also checks that the layer can act at all
    (``runtime.acts``). A layer with ``page_cache: keep`` never does: its user put
    the cache in front of it.
    """
    if isinstance(spec, (QuotaLayer, MetadataLayer, StagedWritesLayer)) or spec.page_cache == "keep":
        return False
    ops = ops_of(spec)
    if "read" in ops:
        return True
    return isinstance(spec, FaultLayer) and spec.kind == "short_write" and "write" in ops


def _acts_on_data(spec: Layer) -> bool:
    """True if the layer acts on reads or writes, or overrides ``st_size``.

    A size override changes what a read returns through the page cache (the
    kernel reads up to the size it was told); kernel passthrough would read the
    backing file's real size instead, so such files must not be passed through.
    """
    return bool(ops_of(spec) & _READ_WRITE) or (isinstance(spec, MetadataLayer) and spec.size is not None)


class QuotaUnavailable(RuntimeError):
    """A policy has a quota layer but the stack was built without a ``QuotaContext``."""


def _runtime(spec: Layer, index: int, rng: random.Random, quota: QuotaContext | None,
             chains: FloorChains) -> LayerRuntime:
    if isinstance(spec, FaultLayer):
        return Fault(spec, rng, index)
    if isinstance(spec, DelayLayer):
        return Delay(spec, rng, chains)
    if isinstance(spec, ThrottleLayer):
        return Throttle(spec)
    if isinstance(spec, MetadataLayer):
        return Metadata(spec, rng)
    if isinstance(spec, S3SemanticsLayer):
        return S3Semantics(spec, index)
    if isinstance(spec, StagedWritesLayer):
        return StagedWrites(spec, rng)
    if isinstance(spec, QuotaLayer):
        if quota is None:
            raise QuotaUnavailable("quota layers need the worker's QuotaContext")
        return Quota(spec, quota, index)
    raise TypeError(f"no runtime for layer {type(spec).__name__}")


def _deadline(spec: Layer, applied_at_s: float) -> float | None:
    if spec.expires_at is not None:
        return spec.expires_at
    if spec.expires_after_s is not None:
        return applied_at_s + spec.expires_after_s
    return None


class _Entry(typing.NamedTuple):
    index: int  # in policy.layers
    spec: Layer
    runtime: LayerRuntime
    deadline_s: float | None  # wall clock


class Stack:
    """The compiled form of one policy revision.

    Args:
        policy: validated policy.
        revision: KV revision it came from (0 = initial/local policy).
        rng: random source for probabilistic layers.
        quota: worker-lifetime quota state; needed when the policy has a quota layer.
        applied_at_s: when the worker applied the revision, seconds since the Unix
            epoch (``expires_after_s`` counts from here); default now.
        now_s: the time to compile for (layers expired by then are left out),
            seconds since the Unix epoch; default now.

    Raises:
        QuotaUnavailable: the policy has a quota layer and ``quota`` is None.

    Attributes:
        chains: ``dict[str, Handler]``: op name → entry handler, only for ops at
            least one layer that can act applies to.
        layers: the runtimes of the layers in force, in policy order (a profile
            contributes several), including those compiled out of the chains
            because they can never act (``runtime.acts`` False).
        next_expiry_s: earliest expiry of a layer in force, seconds since the Unix
            epoch; None if none expires.
        has_quota: a quota layer is in force (its state is the trio thread's).
        holds_reads: a delay layer that can act applies to ``read``.
        sizes_opened_files: a layer needs the size of each file opened
            (``Op.file_size``).
    """

    def __init__(
        self, policy: Policy, revision: int, rng: random.Random | None = None, *,
        quota: QuotaContext | None = None, applied_at_s: float | None = None, now_s: float | None = None,
        _entries: list[_Entry] | None = None,
    ) -> None:
        self.policy = policy
        self.revision = revision
        self.quota = quota
        self.applied_at_s = time.time() if applied_at_s is None else applied_at_s
        now_s = time.time() if now_s is None else now_s
        if _entries is None:
            rng = rng or random.Random()
            chains = FloorChains()  # one per stack: a system call's requests may match different delay layers
            _entries = []
            for index, spec in enumerate(policy.layers):
                for part in expand_profile(spec) if isinstance(spec, ProfileLayer) else [spec]:
                    deadline = _deadline(part, self.applied_at_s)
                    if deadline is None or deadline > now_s:
                        _entries.append(_Entry(index, part, _runtime(part, index, rng, quota, chains), deadline))
        self._entries = [e for e in _entries if e.deadline_s is None or e.deadline_s > now_s]
        self.layers: list[LayerRuntime] = [e.runtime for e in self._entries]
        deadlines = [e.deadline_s for e in self._entries if e.deadline_s is not None]
        self.next_expiry_s: float | None = min(deadlines) if deadlines else None
        self.has_quota = any(isinstance(e.spec, QuotaLayer) for e in self._entries)
        if quota is not None and not self.has_quota:
            quota.stop()
        # Layers that can never act are compiled out: no per-op cost, no direct I/O.
        active = [e for e in self._entries if e.runtime.acts]
        active_ops = [(e.runtime, ops_of(e.spec)) for e in reversed(active)]
        self.chains: dict[str, Handler] = {}
        for op_name in set().union(*(ops for _, ops in active_ops)):
            handler: Handler = invoke_backend
            for runtime, ops in active_ops:
                if op_name in ops:
                    handler = runtime.bind(handler)
            self.chains[op_name] = handler
        #: A delay layer that can act holds reads: READ is then served in the worker's
        #: own slot, its holds left to the reply (``_held_reads``).
        self.holds_reads = any(isinstance(e.runtime, Delay) and "read" in ops_of(e.spec) for e in active)
        # Layers acting on reads (or shortening writes) decide the page-cache mode of
        # files opened under them.
        self._direct_io_globs = [compile_glob(e.spec.path_glob) for e in active if needs_direct_io(e.spec)]
        #: A layer acts on reads or writes (of some path), or reports a size the data
        #: must agree with: such data must come to the worker (no copy offload; kernel
        #: passthrough per path, :meth:`acts_on_data_at`).
        self._data_globs = [compile_glob(e.spec.path_glob) for e in active if _acts_on_data(e.spec)]
        self.acts_on_data = bool(self._data_globs)
        #: A layer acts on ``flush``: files opened at a matching path must send FLUSH on close;
        #: one that does only for the writes it deferred (``write_behind``), files opened for writing.
        flushing = [e.spec for e in active if "flush" in ops_of(e.spec)]
        self._flush_globs = [compile_glob(spec.path_glob) for spec in flushing if not _flushes_writes_only(spec)]
        self._written_flush_globs = [compile_glob(spec.path_glob) for spec in flushing if _flushes_writes_only(spec)]
        #: A layer needs the size of each file opened (``Op.file_size``: ``staged_writes``).
        self.sizes_opened_files = any(isinstance(e.runtime, StagedWrites) for e in active)
        #: Layers keeping per-handle state (``s3_semantics``, ``staged_writes``), told when a handle is released.
        self._release_hooks = [e.runtime.released for e in active if isinstance(e.runtime, (S3Semantics, StagedWrites))]

    def relabel(self, revision: int) -> Stack:
        """The same compiled stack as ``revision`` (a new revision whose policy is this one).

        The layers keep their runtimes (token buckets, counters, quota usage) and
        their expiry deadlines: nothing is recompiled.
        """
        return Stack(self.policy, revision, quota=self.quota, applied_at_s=self.applied_at_s,
                     _entries=self._entries)

    def expire(self, now_s: float | None = None) -> Stack:
        """A stack of the same revision without the layers expired by ``now_s``.

        The remaining layers keep their runtimes (token buckets, counters, usage).
        """
        return Stack(self.policy, self.revision, quota=self.quota, applied_at_s=self.applied_at_s,
                     now_s=now_s, _entries=self._entries)

    def acts_on_data_at(self, path: str) -> bool:
        """True if a layer that can act acts on reads or writes of ``path``, or overrides its size.

        Such a file must not be served by kernel passthrough: that layer would
        never see its data. Decided on the path a file is opened at, like
        :meth:`needs_direct_io`.
        """
        return any(match is None or match(path) for match in self._data_globs)

    def released(self, session: int, ino: int) -> None:
        """Tell the layers keeping per-handle state that file session ``session`` (of inode ``ino``) was released."""
        for hook in self._release_hooks:
            hook(session, ino)

    def acts_on_flush_at(self, path: str, writable: bool = True) -> bool:
        """True if a layer that can act acts on ``flush`` of ``path`` (so ``close(2)`` must send FLUSH).

        Decided on the path a file is opened at, and whether it is opened for
        writing (``writable``: a ``write_behind`` delay holds only the close of a
        descriptor that could write): a file opened without FLUSH (FOPEN_NOFLUSH)
        sends none until it is reopened.
        """
        globs = [*self._flush_globs, *self._written_flush_globs] if writable else self._flush_globs
        return any(match is None or match(path) for match in globs)

    def needs_direct_io(self, path: str) -> bool:
        """True if files opened at ``path`` must bypass the page cache (FOPEN_DIRECT_IO).

        That is when a layer that can act (``runtime.acts``) acts on reads of
        ``path`` or shortens its writes (:func:`needs_direct_io`): a cached read would
        hide an injected fault or delay. Every other file keeps the page cache.
        """
        return any(match is None or match(path) for match in self._direct_io_globs)
