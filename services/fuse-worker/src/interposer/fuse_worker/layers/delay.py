"""Delay layer: hold matching ops for a time drawn from a distribution (added to the op, or as a latency floor)."""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from statistics import NormalDist
from typing import Any

import msgspec
import trio

from interposer.proto import DelayLayer
from interposer.proto.policy import (
    LOOKUP_CACHE_ENTRIES,
    MAX_DELAY_S,
    WRITE_BEHIND_OPS,
    Distribution,
    FixedDistribution,
    LognormalDistribution,
    NormalDistribution,
    ParetoDistribution,
    UniformDistribution,
)

from .._inodes import join_path
from .._op import SYNC_WRITE_FLAGS, BackendCall, Handler, Op, opened_for_writing, transferred_bytes
from ._attr_cache import ClientAttrCache
from ._chains import FloorChains, Unchained
from ._match import compile_glob
from ._streams import FileStreams
from ._timer import lead_ns, sleep

#: Ops whose offsets make an access sequential or random (``DelayLayer.skip_sequential``).
_SEQUENTIAL_OPS = frozenset({"read", "write"})
#: Ops whose held reply brings an inode's attributes to a client's attribute cache
#: (``DelayLayer.attr_cache``): an NFS LOOKUP returns the attributes of what it found.
_ATTRS_FETCHED_BY = frozenset({"getattr", "lookup"})


class DelayStatistics(msgspec.Struct, frozen=True):
    """Counters of a delay layer: ops it drew a delay for, and the time it slept in total, seconds."""

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


def always_zero(dist: Distribution) -> bool:
    """True if every draw of ``dist`` is 0 s (fixed 0, uniform on [0, 0], normal with mean and sd 0)."""
    match dist:
        case FixedDistribution(delay_s=d):
            return d == 0.0
        case UniformDistribution(max_s=hi):
            return hi == 0.0
        case NormalDistribution(mean_s=mu, stddev_s=sd):
            return mu == 0.0 and sd == 0.0
    return False  # log-normal and Pareto draws are > 0


def quantile(dist: Distribution, q: float, *, max_s: float = MAX_DELAY_S, probability: float = 1.0) -> float:
    """The ``q``-quantile of the delay a layer draws, seconds (the targets of bench/fidelity).

    Args:
        dist: the distribution (parameters in seconds).
        q: probability level, 0 < q < 1.
        max_s: cap of every draw, seconds.
        probability: chance an op is delayed at all (the other ops draw 0 s).

    Raises:
        ValueError: ``q`` outside (0, 1).
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level q={q} outside (0, 1)")
    if q <= 1.0 - probability:
        return 0.0
    q = (q - (1.0 - probability)) / probability  # level within the delayed ops
    z = NormalDist().inv_cdf(q)
    match dist:
        case FixedDistribution(delay_s=d):
            value = d
        case UniformDistribution(min_s=lo, max_s=hi):
            value = lo + q * (hi - lo)
        case NormalDistribution(mean_s=mu, stddev_s=sd):
            value = max(0.0, mu + z * sd)
        case LognormalDistribution(median_s=median, sigma=sigma):
            value = median * math.exp(sigma * z)
        case ParetoDistribution(scale_s=scale, alpha=alpha):
            value = scale * (1.0 - q) ** (-1.0 / alpha)
        case _:
            raise TypeError(f"unknown distribution {type(dist).__name__}")
    return min(value, max_s)


class Delay:
    """Runtime of a :class:`~interposer.proto.DelayLayer`.

    The wait is a precise sleep (:func:`._timer.sleep`: a timerfd trio waits on,
    not ``trio.sleep``, which rounds up to whole milliseconds), so a delayed op
    holds only its own request task; other requests keep being served meanwhile.
    A read the worker answers itself (``Op.defer_holds``: ``_held_reads``) holds no
    task at all: the layer notes when its reply is due, the timer sends it then.

    In ``add`` mode the layer sleeps the draw, then passes the op on; in ``floor``
    mode it passes the op on first, then sleeps what is left of the draw after the
    time the layers below and the backend took (measured on trio's clock, so
    ``MockClock`` tests see it), also when the op failed, but not after a read that
    returned nothing: a read at or past the end of a file never reaches a device
    (the kernel checks the size first; through a direct-I/O mount it reaches the
    worker, e.g. the second ``read(2)`` of every whole-file read), so a latency
    target does not apply to it. ``Op.delay_ns`` gets the time asked to sleep (ns),
    ``Op.delay_late_ns`` how much later than that the op resumed (ns).
    Both modes arm the timer early by the worker's wake-up compensation
    (:mod:`._timer`): the wake-up after the sleep is part of the delay the
    application sees (an uncompensated ``add`` of 2 ms added 2.2 ms, p50 at QD1).
    ``add`` compensates the worker's own wake-up only: the application's after the
    reply is in the op's own time (with both, ``interposer demo``'s 2 ms added 1.87).

    With ``skip_sequential``, a read or write starting where the previous one of
    its file ended (by arrival order, so requests of one stream in flight together
    still count as sequential) passes undelayed and uncounted; with ``"buffered"``,
    only if its file was not opened ``O_DIRECT`` (``Op.open_flags``).

    With ``write_behind``, a ``write`` passes unheld (with ``"buffered"``, unless the
    file was opened with a flag of ``SYNC_WRITE_FLAGS``) and marks its file written; the file's next
    ``fsync``, or ``flush`` of a descriptor opened for writing, is then held as a
    matching op would be, once for every write since the last one. Any other
    ``flush`` or ``fsync`` is held only if ``ops`` names it.

    An op a ``staged_writes`` layer before this one has charged (``Op.charged_by_client``:
    a read or write of a client's local copy, a close whose upload it charged) passes
    unheld and uncounted; a ``write_behind`` layer also forgets the writes it deferred
    for that file.

    A ``floor`` spans the requests the kernel sends for one system call where the
    emulated file system would answer one (:mod:`._chains`: the GETATTR and LOOKUP
    before a CREATE): the floor of a request continuing such a chain counts from
    the chain's first request. A ``floor`` holds no read at or past the end of its
    file, and no ``readdir`` the emulated client would answer without the store: the
    one that finds the listing's end, and, with ``list_page_entries``, those inside a
    page the listing's first request (or an earlier one) fetched.

    Args:
        spec: the validated layer from the policy.
        rng: shared random source, used unless the layer has its own ``seed``.
        chains: the stack's :class:`~._chains.FloorChains`, shared by its delay
            layers; None = a chain of this layer's own. Not used when
            ``spec.one_floor_per_call`` is False.

    Attributes:
        acts: False when the layer can never delay an op (probability 0, or every
            draw is 0 s: a fixed 0, ``max_s`` 0…); the stack leaves such a layer
            out of its chains.
    """

    def __init__(self, spec: DelayLayer, rng: random.Random | None = None, chains: FloorChains | None = None) -> None:
        self.spec = spec
        self._chains = (chains or FloorChains()) if spec.one_floor_per_call else Unchained()
        self._rng = random.Random(spec.seed) if spec.seed is not None else (rng or random.Random())
        self.draw = sampler(spec.resolved_distribution, self._rng, spec.max_s)
        self._match = compile_glob(spec.path_glob)
        self._delayed = 0
        self._delay_s_total = 0.0
        self._next_offset: FileStreams[int] | None = FileStreams() if spec.skip_sequential else None
        self._buffered_only = spec.skip_sequential == "buffered"
        #: Files written since their last flush or fsync (``write_behind``): ino → True.
        self._unsynced: FileStreams[bool] | None = FileStreams() if spec.write_behind else None
        #: Paths looked up and held (``lookup_cache_s``): path → when, trio's clock, seconds.
        self._looked_up: FileStreams[float] | None = (
            FileStreams(LOOKUP_CACHE_ENTRIES) if spec.lookup_cache_s else None)
        #: Attribute timeouts per inode (``attr_cache``).
        self._attrs = ClientAttrCache(spec.attr_cache) if spec.attr_cache is not None else None
        #: A listing's entries go to the lookup or the attribute cache (:meth:`_note_listed`).
        self._notes_listings = self._looked_up is not None or self._attrs is not None
        self.acts = spec.probability > 0.0 and spec.max_s > 0.0 and not always_zero(spec.resolved_distribution)

    def bind(self, inner: Handler) -> Handler:
        """Return a handler that applies this layer, then calls ``inner``."""
        match, draw, rng, probability, chains = self._match, self.draw, self._rng, self.spec.probability, self._chains
        sequential = self._sequential if self._next_offset is not None else None
        cached = self._cached_lookup if self._looked_up is not None else None
        attrs = self._attrs
        noting_listings = self._notes_listings

        async def delay(op: Op, call: BackendCall) -> Any:
            if not op.charged_by_client and (match is None or match(op.path)) and not (
                    sequential and sequential(op)) and not (
                    cached and op.name == "lookup" and cached(op.path)) and not (
                    attrs and op.name == "getattr" and attrs.fresh(op.ino, trio.current_time())) and (
                    probability >= 1.0 or rng.random() < probability):
                delay_s = draw()
                self._delayed += 1
                if delay_s > 0.0:
                    self._delay_s_total += delay_s
                    op.delay_ns += int(delay_s * 1e9)
                    if op.defer_holds:
                        try:
                            return await inner(op, call)
                        finally:  # added after the op's end, or after the holds already left to its reply
                            self._add_after(op, delay_s)
                    # the reply's wake-up is in the op's own time
                    op.delay_late_ns += await sleep(delay_s, compensate=True, own_wake_only=True)
                if attrs and op.name in _ATTRS_FETCHED_BY:
                    return self._fetched(await inner(op, call))
            if op.name == "readdir" and noting_listings:
                result = await inner(op, call)
                self._note_listed(op, result)
                return result
            return await inner(op, call)

        async def floor(op: Op, call: BackendCall) -> Any:
            if op.charged_by_client or (match is not None and not match(op.path)) or (sequential and sequential(op)):
                return await inner(op, call)
            if cached and op.name == "lookup" and cached(op.path):
                return await self._unheld_in_chain(op, call, inner)
            if attrs and op.name == "getattr" and attrs.fresh(op.ino, trio.current_time()):
                return await self._unheld_in_chain(op, call, inner)
            if probability < 1.0 and rng.random() >= probability:
                return await inner(op, call)
            target_s = draw()
            self._delayed += 1
            start_s = chains.chain_start(op.name, op.path, op.pid, trio.current_time())
            try:
                result = await inner(op, call)
            except Exception as exc:
                await self._hold(op, start_s + target_s)
                chains.answered(op.name, op.path, op.pid, start_s, trio.current_time(), exc)
                raise
            if op.name == "read" and transferred_bytes(result, op.size) == 0:
                return result  # at or past the end of the file: a device is never asked
            if op.name == "readdir" and not self._asks_for_a_page(op.offset, self._note_listed(op, result)):
                return result  # the client has these entries from a page it fetched, or knows the listing ended
            await self._hold(op, start_s + target_s)
            chains.answered(op.name, op.path, op.pid, start_s, trio.current_time(), None)
            return self._fetched(result) if attrs and op.name in _ATTRS_FETCHED_BY else result

        held = floor if self.spec.mode == "floor" else delay
        return held if self._unsynced is None else self._write_behind(held, inner)

    def _fetched(self, result: Any) -> Any:
        """Note the attributes a held ``getattr`` or ``lookup`` brought (``attr_cache``); return ``result``."""
        assert self._attrs is not None
        if result.st_ino:  # 0: a negative entry, no inode
            self._attrs.fetched(result.st_ino, result, trio.current_time())
        return result

    def _cached_lookup(self, path: str) -> bool:
        """True if a lookup of ``path`` was held within the last ``lookup_cache_s`` (the client's cache
        answers it, keeping the entry's age); else note this one as the lookup that fills the cache."""
        looked_up = self._looked_up
        assert looked_up is not None
        now_s = trio.current_time()
        last_s = looked_up.take(path)
        if last_s is None or now_s - last_s >= self.spec.lookup_cache_s:
            looked_up.put(path, now_s)
            return False
        looked_up.put(path, last_s)
        return True

    async def _unheld_in_chain(self, op: Op, call: BackendCall, inner: Handler) -> Any:
        """Serve ``op`` unheld, still linking its system call's requests (:mod:`._chains`): a lookup
        answered from ``lookup_cache_s`` keeps the GETATTR before it and the CREATE after it one floor."""
        chains = self._chains
        start_s = chains.chain_start(op.name, op.path, op.pid, trio.current_time())
        try:
            result = await inner(op, call)
        except Exception as exc:
            chains.answered(op.name, op.path, op.pid, start_s, trio.current_time(), exc)
            raise
        chains.answered(op.name, op.path, op.pid, start_s, trio.current_time(), None)
        return result

    def _write_behind(self, held: Handler, inner: Handler) -> Handler:
        """``held`` with writes left unheld and their latency paid by the file's next flush or fsync."""
        unsynced, match = self._unsynced, self._match
        assert unsynced is not None
        own_ops = self.spec.ops
        held_flags = SYNC_WRITE_FLAGS if self.spec.write_behind == "buffered" else 0

        async def write_behind(op: Op, call: BackendCall) -> Any:
            if op.charged_by_client:  # a client staged the file: it finalized what was deferred, and charged it
                unsynced.take(op.ino)
                return await inner(op, call)
            if op.name == "write" and not op.open_flags & held_flags:
                result = await inner(op, call)
                if match is None or match(op.path):
                    unsynced.put(op.ino, True)  # in the client's page cache: sent at close or fsync
                return result
            if op.name in WRITE_BEHIND_OPS:
                # fsync sends what the file has; a close, what a descriptor that could write left
                sends = op.name == "fsync" or opened_for_writing(op.open_flags)
                if not (sends and unsynced.take(op.ino)) and own_ops and op.name not in own_ops:
                    return await inner(op, call)  # nothing to send
            return await held(op, call)

        return write_behind

    def _note_listed(self, op: Op, result: Any) -> int | None:
        """Note the entries a ``readdir`` of ``op.path`` replied (``result``: (name, attributes) pairs) as a client
        notes what a listing returned: their paths in the lookup cache (``lookup_cache_s``: gcsfuse's stat cache
        takes every object a listing returns, ``fastStatBucket.ListObjects``; blobfuse2's attribute cache, its
        ``StreamDir`` results; an NFS READDIRPLUS primes the client's dentry cache) and their attributes in the
        attribute cache (``attr_cache``). Return how many entries, None if the backend does not say (a fake)."""
        if not isinstance(result, list):
            return None
        looked_up, attrs = self._looked_up, self._attrs
        if self._notes_listings and (self._match is None or self._match(op.path)):
            now_s = trio.current_time()
            for name, entry in result:
                if name == b"." or name == b"..":
                    continue
                if looked_up is not None:
                    looked_up.put(join_path(op.path, name), now_s)
                if attrs is not None and entry.st_ino:
                    attrs.fetched(entry.st_ino, entry, now_s)
        return len(result)

    def _asks_for_a_page(self, offset: int, replied: int | None) -> bool:
        """True if a ``readdir`` at listing position ``offset`` ("." and ".." are 0 and 1) that replied ``replied``
        entries makes the client ask the store (``list_page_entries``): the listing's start, or an entry in a page
        it has not fetched; never the reply that found the listing's end."""
        if offset == 0:
            return True
        if replied is None:
            return True  # a backend that does not say (a fake in a test): every request asks
        if replied == 0:
            return False
        page = self.spec.list_page_entries
        if page is None:
            return True
        first = offset - 2  # entries of the store before this reply ("." and ".." are the client's own)
        next_page = max(page, -(-first // page) * page)  # page 0 came with the listing's start
        return next_page < first + replied

    def _sequential(self, op: Op) -> bool:
        """True if ``op`` is a read or write continuing the previous one of its file; note where it ends."""
        if op.name not in _SEQUENTIAL_OPS:
            return False
        assert self._next_offset is not None
        expected = self._next_offset.take(op.ino)
        self._next_offset.put(op.ino, op.offset + op.size)
        if self._buffered_only and op.open_flags & os.O_DIRECT:
            return False  # no client cache in between: each direct request goes to the server
        return expected == op.offset

    async def _hold(self, op: Op, end_s: float) -> None:
        """Hold ``op`` until ``end_s`` (trio's clock): sleep, or leave it to the reply (``Op.defer_holds``)."""
        if op.defer_holds:
            if op.after_hold is not None:  # a layer below still acts once its own hold ends: count from then
                op.then(lambda: self._floor_left(op, end_s))
            else:
                remaining_s = self._floor_left(op, end_s)[0]
                if remaining_s > 0.0:
                    op.hold_reply_until(time.monotonic_ns() + round(remaining_s * 1e9), lead_ns(remaining_s))
            return
        remaining_s = self._floor_left(op, end_s)[0]
        if remaining_s > 0.0:
            op.delay_late_ns += await sleep(remaining_s, compensate=True)  # a latency target: wake-ups count

    def _floor_left(self, op: Op, end_s: float) -> tuple[float, float]:
        """What is left of a floor ending at ``end_s`` (trio's clock), counted as held; the timer's lead, seconds."""
        remaining_s = end_s - trio.current_time()
        if remaining_s <= 0.0:
            return 0.0, 0.0
        self._delay_s_total += remaining_s
        op.delay_ns += int(remaining_s * 1e9)
        return remaining_s, lead_ns(remaining_s) / 1e9

    def _add_after(self, op: Op, delay_s: float) -> None:
        """Add ``delay_s`` after the op and any hold already left to its reply (an ``add`` delay, deferred)."""
        if op.after_hold is not None:
            op.then(lambda: (delay_s, lead_ns(delay_s, own_wake_only=True) / 1e9))
        else:
            op.hold_reply_until(max(time.monotonic_ns(), op.reply_due_ns) + round(delay_s * 1e9),
                                lead_ns(delay_s, own_wake_only=True))

    def statistics(self) -> DelayStatistics:
        """Snapshot of this layer's counters."""
        return DelayStatistics(delayed=self._delayed, delay_s_total=self._delay_s_total)
