"""The request object layers see, and the handler signature they implement."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

#: The backend call of one request, bound to its arguments: ``await call()``.
BackendCall = Callable[[], Awaitable[Any]]
#: A layer chain entry point: ``await handler(op, call)`` returns the backend's reply
#: (or raises ``pyfuse3.FUSEError``).
Handler = Callable[["Op", BackendCall], Awaitable[Any]]
#: What a layer does once the holds below it have ended (``Op.then``): returns how much
#: longer to hold the reply, and how much earlier than that to arm the timer, seconds.
HoldStep = Callable[[], tuple[float, float]]
#: Order of one directory listing: gets the entry names (without ``.`` and ``..``) and
#: returns a permutation of their positions (``Backend.order_dir``).
DirOrder = Callable[[Sequence[bytes]], list[int]]

#: Open flags whose writes return only once the data is stable (O_SYNC includes O_DSYNC) or
#: bypassed every cache (O_DIRECT).
SYNC_WRITE_FLAGS = os.O_DSYNC | os.O_DIRECT

def opened_for_writing(flags: int) -> bool:
    """Whether open flags ``flags`` give write access (``O_WRONLY`` or ``O_RDWR``)."""
    return (flags & os.O_ACCMODE) != os.O_RDONLY


#: ``fallocate(2)`` mode bits (<linux/falloc.h>) that ``Op.mode`` may carry.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class Op(msgspec.Struct):
    """One FUSE request on its way through the layers.

    Layers read the request fields and record what they did in the outcome fields;
    the adapter turns the finished op into an ``OpEvent``.

    Attributes:
        name: FUSE op name (``read``, ``lookup``…).
        ino: inode the op addresses (the parent directory for entry ops).
        path: path inside the volume, starting with ``/`` (the entry's path for entry ops).
        offset: byte offset for read/write/fallocate/lseek (the destination's for
            copy_file_range), else 0.
        size: bytes requested for read/write/fallocate/copy_file_range, else 0.
        mode: fallocate's mode (``FALLOC_FL_*``), copy_file_range's flags,
            lseek's whence, mknod's mode (file type and permission bits),
            rename's flags (``RENAME_*``); else 0.
        pid: caller pid (0 when FUSE gives none).
        uid: caller uid.
        fault: errno name a fault layer injected (outcome).
        delay_ns: delay injected by delay layers, ns (outcome).
        throttle_ns: time spent waiting for throttle tokens, ns (outcome).
        session: file session id (``OpEvent.session``) of the file handle the op
            uses, 0 if none.
        short_size: bytes the backend call transfers when a layer shortened a
            write (the adapter passes ``buf[:short_size]``); -1 = all.
        injected: ``list[Injection]`` of faults layers injected (outcome), ``None``
            if none; each becomes a ``FaultRecord``.
        dir_order: for ``opendir``: the order a metadata layer chose for the
            listing (outcome), applied by the adapter through the backend's
            ``order_dir``; ``None`` = the backend's own order.
        open_flags: for ``open``, ``create``, ``read``, ``write``, ``flush`` and
            ``fsync``: the flags the application opened the file with
            (``O_ACCMODE`` bits, ``O_SYNC``, ``O_DIRECT``, ``O_TRUNC``…); 0
            (``O_RDONLY``) when not known.
        delay_late_ns: how much later than its delay layers asked the op resumed
            after their holds, ns (outcome; ``_timer.sleep``'s return, summed).
        defer_holds: the reply is written by the worker, which can send it later:
            delay layers then leave their holds to it (``reply_due_ns``) instead of
            sleeping (``_held_reads``: READ requests while a delay layer acts on them).
        reply_due_ns: with ``defer_holds``, when the holds end and the reply is due,
            ``time.monotonic_ns()`` ns (outcome); 0 = no hold.
        reply_armed_ns: when to send it so that it lands at ``reply_due_ns``: earlier
            by the wake compensation (``_timer.lead_ns``), ns (outcome).
        after_hold: with ``defer_holds``, what layers above a hold still do once it
            has ended (a throttle's charge, a later delay), in order (outcome; run by
            ``_held_reads`` when the reply is due); None = nothing.
        sequential: for ``read`` and ``write``: the request continues its file's
            previous one (``OpEvent.sequential``; ``Telemetry.continues``).
        target: the op's second path (``OpEvent.target``): rename's destination,
            link's existing file, symlink's contents, copy_file_range's source.
        file_size: for ``open`` while a layer asks for it
            (``Stack.sizes_opened_files``): the file's size as the open found it
            (before ``O_TRUNC`` empties it), bytes, set by the backend call; -1 = not read.
        charged_by_client: a ``staged_writes`` layer, standing for an object-store
            client, has charged what the store costs this op: nothing for a read
            or write of its local copy, the upload or the finalization for a
            ``flush`` or ``fsync``. The throttle and delay layers after it (the
            store) pass the op unheld, and a ``write_behind`` delay forgets the
            writes it deferred for the file (the client sent them).
    """

    name: str
    ino: int
    path: str
    offset: int = 0
    size: int = 0
    mode: int = 0
    pid: int = 0
    uid: int = 0
    fault: str = ""
    delay_ns: int = 0
    throttle_ns: int = 0
    session: int = 0
    short_size: int = -1
    injected: "list[Injection] | None" = None
    dir_order: "DirOrder | None" = None
    open_flags: int = 0
    delay_late_ns: int = 0
    defer_holds: bool = False
    reply_due_ns: int = 0
    reply_armed_ns: int = 0
    after_hold: "list[HoldStep] | None" = None
    sequential: bool = False
    target: str = ""
    file_size: int = -1
    charged_by_client: bool = False

    def hold_reply_until(self, due_ns: int, lead_ns: int) -> None:
        """Hold the reply (``defer_holds``) until at least ``due_ns``, armed ``lead_ns`` early (ns)."""
        if due_ns > self.reply_due_ns:
            self.reply_due_ns = due_ns
            self.reply_armed_ns = due_ns - lead_ns

    def holding(self) -> bool:
        """Whether a hold left to the reply has not ended yet: what a layer does after it must wait (:meth:`then`)."""
        return self.after_hold is not None or self.reply_due_ns > time.monotonic_ns()

    def then(self, step: HoldStep) -> None:
        """Run ``step`` when the holds noted so far have ended, as a sleeping layer would have run it then."""
        if self.after_hold is None:
            self.after_hold = []
        self.after_hold.append(step)

    def inject(self, layer: int, kind: str, errno_name: str = "", result: int = 0) -> None:
        """Note a fault layer ``layer`` injected into this op (``fault`` shows the first)."""
        if self.injected is None:
            self.injected = []
        self.injected.append(Injection(layer, kind, errno_name, result))
        if not self.fault:
            self.fault = errno_name or kind


class Injection(msgspec.Struct, frozen=True, array_like=True):
    """One injected fault of an op.

    Attributes:
        layer: index of the layer in the policy.
        kind: ``errno``, ``short_read``, ``short_write`` or ``corrupt``.
        errno_name: errno name for ``errno`` faults, else ``""``.
        result: bytes transferred after a short read/write, else 0.
    """

    layer: int
    kind: str
    errno_name: str = ""
    result: int = 0


def transferred_bytes(result: Any, requested: int) -> int:
    """Bytes a read or write moved: a read reply's length, a write's returned count.

    ``requested`` (bytes) when the result is neither (a fake backend in a test).
    """
    if isinstance(result, int):
        return result
    try:
        return len(result)
    except TypeError:
        return requested


async def invoke_backend(op: Op, call: BackendCall) -> Any:
    """The innermost handler of every chain: run the backend call."""
    return await call()
