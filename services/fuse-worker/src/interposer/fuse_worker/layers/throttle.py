"""Throttle layer: token buckets on the bytes and the operations of reads and writes."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import trio

from interposer.proto import ThrottleLayer

from .._op import BackendCall, Handler, Op, transferred_bytes
from ._match import compile_glob
from ._streams import FileStreams
from ._timer import sleep

#: Default bucket size as seconds of the rate, when the policy gives none.
DEFAULT_BURST_S = 0.05
#: Smallest default bucket, bytes: one maximal FUSE request (1 MiB) fits.
MIN_DEFAULT_BURST_BYTES = 1 << 20
#: Smallest default IOPS bucket, ops.
MIN_DEFAULT_BURST_OPS = 1
#: With ``max_io_bytes``, requests of at least this size that continue the previous
#: request of the same file fill its last unit before they count another op, bytes:
#: AWS EBS User Guide, "Amazon EBS I/O characteristics and monitoring" (8 sequential
#: 32 KiB I/Os count as 1 on SSD volumes; "each I/O operation under 32 KiB counts as 1").
MIN_MERGED_IO_BYTES = 32 << 10
#: A request at least this large was cut where the kernel's 1 MiB (256-page) FUSE request
#: ends, less up to one page of buffer misalignment, bytes: the request continuing it is
#: the rest of the same application I/O, and merges whatever its size.
CUT_REQUEST_BYTES = (1 << 20) - 4096
#: A bandwidth limit at or above this, with a bucket of at least ``DEFAULT_BURST_S`` of it,
#: can never make an op wait, bytes/s (2**40, 1 TiB/s): more than a whole host's memory
#: bandwidth (12 channels of DDR5-4800 move 12 x 38.4 GB/s = 461 GB/s, JEDEC JESD79-5),
#: let alone one FUSE worker's. Such a layer is left out of the chains (``Throttle.acts``).
UNREACHABLE_BYTES_PER_S = 1 << 40
#: An IOPS limit at or above this, with a bucket of at least ``DEFAULT_BURST_S`` of it, can
#: never make an op wait, ops/s (2**30, about 1.07e9): a FUSE request costs at least two
#: system calls and a context switch of the worker (read from /dev/fuse, write the reply),
#: about a microsecond each, so one worker serves well under 1e6 requests/s.
UNREACHABLE_IOPS = 1 << 30


class ThrottleStatistics(msgspec.Struct, frozen=True):
    """Counters of a throttle layer: ops and bytes admitted, ops that waited, total wait, seconds."""

    ops: int
    bytes: int
    wait_s_total: float
    waited: int = 0


class TokenBucket:
    """Token bucket as a virtual schedule (GCRA, ITU-T I.371 "virtual scheduling").

    Each request reserves ``size / rate`` seconds of the schedule at the moment it
    arrives, so waiters are served in arrival order (FIFO) and a request is never
    split. The schedule may run up to ``burst_bytes / rate`` seconds ahead of now
    before requests have to wait. The tokens are bytes for a bandwidth bucket and
    ops (``size_bytes=1`` per op) for an IOPS bucket.

    Args:
        rate_bytes_per_s: sustained rate, bytes per second.
        burst_bytes: bucket size, bytes.
        balance: how full the bucket is at the first reservation, 0..1 (an empty
            bucket is a schedule already ``burst_bytes / rate`` seconds ahead).
    """

    def __init__(self, rate_bytes_per_s: float, burst_bytes: float, balance: float = 1.0) -> None:
        self.rate_bytes_per_s = rate_bytes_per_s
        self.burst_bytes = burst_bytes
        self._burst_s = burst_bytes / rate_bytes_per_s
        self._empty_s = (1.0 - balance) * self._burst_s  # how far ahead the schedule starts
        self._tat: float | None = None  # theoretical arrival time of the next request

    def balance(self, now_s: float) -> float:
        """How full the bucket is at ``now_s``, 0..1 (tokens left over the bucket size)."""
        ahead_s = self._empty_s if self._tat is None else self._tat - now_s
        return min(1.0, max(0.0, 1.0 - ahead_s / self._burst_s))

    def reserve(self, size_bytes: int, now_s: float) -> float:
        """Reserve ``size_bytes`` at time ``now_s``; return the seconds to wait (≥ 0)."""
        if self._tat is None:
            self._tat = now_s + self._empty_s
        tat = max(self._tat, now_s) + size_bytes / self.rate_bytes_per_s
        self._tat = tat
        return max(0.0, tat - now_s - self._burst_s)


def _unreachable(bucket: TokenBucket, rate_limit: float) -> bool:
    """True if ``bucket`` runs at least ``rate_limit`` tokens/s with at least its default size."""
    return bucket.rate_bytes_per_s >= rate_limit and bucket.burst_bytes >= bucket.rate_bytes_per_s * DEFAULT_BURST_S


class Throttle:
    """Runtime of a :class:`~interposer.proto.ThrottleLayer`.

    Up to two buckets per layer (bytes, ops), shared by every op the layer matches
    (reads and writes together unless the policy names one of them). An op is
    charged once the layers below and the backend have served it, for what it
    moved: a read's reply length (a read at the end of a file moves nothing and
    costs nothing: a ``dd bs=1M`` of a 100 KiB file asks for 2 MiB, a device moves
    100 KiB), a write's count; a failed op is charged what it asked. It reserves
    in both buckets and waits for the later of the two release times, so waiters
    are served in the order they were charged (FIFO): each bucket's release times
    grow with that order, and so does their maximum. With ``max_io_bytes`` an op
    counts ``ceil(bytes / max_io_bytes)`` against ``iops``, as EBS counts a 1 MiB
    I/O as four 256 KiB ones; with ``charge_units`` too, the bandwidth bucket is
    charged ``count * max_io_bytes`` (EBS HDD throughput credits); a read's charge to
    it is scaled by ``read_charge`` (EFS metered throughput), a read's count against
    ``iops`` by ``read_iops_charge`` (pd-standard's shared budget). The wait is a precise sleep
    (:func:`._timer.sleep`, not ``trio.sleep``, which rounds up to whole
    milliseconds) and is added to ``Op.throttle_ns``.

    Args:
        spec: the validated layer from the policy.

    Attributes:
        acts: False when no bucket can ever make an op wait: every limit given is at
            least ``UNREACHABLE_BYTES_PER_S`` / ``UNREACHABLE_IOPS`` with a bucket of
            at least ``DEFAULT_BURST_S`` of it (the default). The stack leaves such a
            layer out of its chains, so its counters stay 0.
    """

    def __init__(self, spec: ThrottleLayer) -> None:
        self.spec = spec
        self.bucket: TokenBucket | None = None
        self.ops_bucket: TokenBucket | None = None
        if spec.rate_bytes_per_s is not None:
            burst = spec.burst_bytes or max(spec.rate_bytes_per_s * DEFAULT_BURST_S, MIN_DEFAULT_BURST_BYTES)
            self.bucket = TokenBucket(spec.rate_bytes_per_s, burst, spec.burst_balance)
        if spec.iops is not None:
            burst_ops = spec.burst_ops or max(spec.iops * DEFAULT_BURST_S, MIN_DEFAULT_BURST_OPS)
            self.ops_bucket = TokenBucket(spec.iops, burst_ops, spec.burst_balance)
        self.acts = not (
            (self.bucket is None or _unreachable(self.bucket, UNREACHABLE_BYTES_PER_S))
            and (self.ops_bucket is None or _unreachable(self.ops_bucket, UNREACHABLE_IOPS))
        )
        self._match = compile_glob(spec.path_glob)
        self._ops = 0
        self._bytes = 0
        self._waited = 0
        self._wait_s = 0.0
        # ino → (end offset of its last request, that request's size, bytes in its last unit)
        self._streams: FileStreams[tuple[int, int, int]] = FileStreams()

    def bind(self, inner: Handler) -> Handler:
        """Return a handler that applies this layer, then calls ``inner``."""
        match = self._match

        async def throttle(op: Op, call: BackendCall) -> Any:
            # charged_by_client: a staged_writes layer before this one charged it (a local copy, its upload)
            if op.charged_by_client or (match is not None and not match(op.path)):
                return await inner(op, call)
            try:
                result = await inner(op, call)
            except Exception:
                await self._admit(op, op.size)  # what moved is unknown: charge what was asked
                raise
            await self._admit(op, transferred_bytes(result, op.size))
            return result

        return throttle

    async def _admit(self, op: Op, size_bytes: int) -> None:
        """Charge an op that moved ``size_bytes`` to the buckets and wait for its turn.

        Nothing moved (a read at or past the end of the file) costs nothing: a device is
        never asked for it, as the kernel checks the file size first. An op whose
        holds are left to its reply (``Op.defer_holds``, ``_held_reads``) is charged
        when the holds below end, as it would reach this layer then, and its wait
        is added to the reply's hold (never armed early: a rate must not be exceeded).
        """
        if op.defer_holds:
            if op.holding():
                op.then(lambda: (self._charge(op, size_bytes), 0.0))
            else:
                wait_s = self._charge(op, size_bytes)
                if wait_s > 0:
                    op.hold_reply_until(time.monotonic_ns() + round(wait_s * 1e9), 0)
            return
        wait_s = self._charge(op, size_bytes)
        if wait_s > 0:
            await sleep(wait_s)

    def _charge(self, op: Op, size_bytes: int) -> float:
        """Charge the buckets for ``size_bytes`` moved by ``op`` now; return how long it must wait, seconds."""
        self._ops += 1
        if size_bytes <= 0:
            return 0.0
        self._bytes += size_bytes
        now = trio.current_time()
        count = self._io_count(op, size_bytes)
        wait_s = 0.0
        if self.bucket is not None:
            charged = count * self.spec.max_io_bytes if self.spec.charge_units else size_bytes
            if op.name == "read":
                charged *= self.spec.read_charge  # metered: EFS charges a read a third of its bytes
            if charged:
                wait_s = self.bucket.reserve(charged, now)
        if self.ops_bucket is not None and count:
            if op.name == "read":
                count *= self.spec.read_iops_charge  # pd-standard: a read takes two writes' share
            wait_s = max(wait_s, self.ops_bucket.reserve(count, now))
        if wait_s > 0:
            self._waited += 1
            self._wait_s += wait_s
            op.throttle_ns += int(wait_s * 1e9)
        return wait_s

    def _io_count(self, op: Op, size_bytes: int) -> int:
        """Ops that ``op``, having moved ``size_bytes``, counts against ``iops``.

        1 without ``max_io_bytes``. With it, ``ceil(size / max_io_bytes)``, except
        that a request continuing the previous one of the same file (starting where
        it ended) first fills that one's last unit, as EBS merges contiguous I/Os
        (8 contiguous 32 KiB writes count 1), if it is at least
        ``MIN_MERGED_IO_BYTES`` or the previous one was cut at the kernel's request
        size (``CUT_REQUEST_BYTES``: a 1 MiB read into an unaligned buffer arrives as
        1,020 + 4 KiB and counts 4, as the application's one I/O would, not 5).
        The result may be 0.
        """
        unit = self.spec.max_io_bytes
        if unit is None:
            return 1
        streams = self._streams
        previous = streams.take(op.ino)
        filled = 0  # bytes already in the unit this request continues
        if previous is not None and previous[0] == op.offset and (
                size_bytes >= MIN_MERGED_IO_BYTES or previous[1] >= CUT_REQUEST_BYTES):
            filled = previous[2]
        total = filled + size_bytes
        count = -(-total // unit) - (1 if filled else 0)
        # an unmerged request below the merge size counts whole: it closes its unit
        last_unit = unit if not filled and size_bytes < MIN_MERGED_IO_BYTES else total % unit or unit
        streams.put(op.ino, (op.offset + size_bytes, size_bytes, last_unit))
        return count

    def burst_balance(self, now_s: float) -> float | None:
        """How full, 0..1, the emptiest of this layer's buckets sized by the policy is at ``now_s``.

        Only buckets the policy gave a size (``burst_bytes``, ``burst_ops``): a
        default bucket (50 ms of the rate) fills and empties many times a second,
        a provider's credit bucket over minutes. None if there is none.
        """
        sized = [bucket for bucket, given in ((self.bucket, self.spec.burst_bytes),
                                              (self.ops_bucket, self.spec.burst_ops)) if bucket is not None and given]
        return min((bucket.balance(now_s) for bucket in sized), default=None)

    def statistics(self) -> ThrottleStatistics:
        """Snapshot of this layer's counters."""
        return ThrottleStatistics(ops=self._ops, bytes=self._bytes, wait_s_total=self._wait_s, waited=self._waited)
