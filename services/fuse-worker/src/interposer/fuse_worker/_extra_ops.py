"""Serve the FUSE ops pyfuse3 3.5 leaves out (fallocate, copy_file_range, lseek), and tune FUSE_INIT.

pyfuse3 fills libfuse's ``struct fuse_lowlevel_ops`` with its handlers and passes
it to ``fuse_session_new``, which copies it into the session. libfuse answers a
request whose slot is NULL with ENOSYS, and on ENOSYS the kernel stops sending
that op for the life of the mount (``fc->no_fallocate`` and the like in
fs/fuse/file.c): ``fallocate(2)`` then fails with EOPNOTSUPP (``posix_fallocate``
falls back to writing zeros, holes cannot be punched, ``KEEP_SIZE``
preallocation is impossible), ``copy_file_range(2)`` is carried out by the
kernel as read and write requests, and ``SEEK_DATA``/``SEEK_HOLE`` see every
file as one block of data.

:func:`install` writes ctypes callbacks into those three slots of the session's
copy, after ``pyfuse3.init`` and before the session loop runs. Finding that copy
uses two facts that no API gives:

* pyfuse3's extension module keeps the session pointer and the table it filled
  in module globals (Cython names ``__pyx_v_7pyfuse3_session`` and
  ``__pyx_v_7pyfuse3_fuse_ops``). They are not exported, but they are in the
  module's ELF symbol table (``.symtab``, read by ``_elf``); the module's
  load address comes from its exported ``PyInit_pyfuse3``.
* The table's offset inside libfuse's private ``struct fuse_session`` is found
  by searching the session for a byte-exact copy of pyfuse3's table.

The slot numbers are those of the public header (``fuse_lowlevel.h``; libfuse 3
only ever appends members) and are checked against the table itself: pyfuse3's
own ``write_buf``, ``forget_multi`` and ``readdirplus`` handlers must sit in
slots 36, 38 and 41, and the three slots to fill must be empty. If anything
does not match (a stripped module, another pyfuse3 or libfuse), nothing is
written, :class:`ExtraOpsUnavailable` says why, and the kernel's fallbacks stay.

The same way, pyfuse3's ``init`` slot is wrapped: pyfuse3's handler runs first
(its capability choices, then ``Operations.init``), then the wrapper sets what
pyfuse3 does not expose of ``struct fuse_conn_info`` (public, fuse_common.h):
``max_background`` and ``congestion_threshold``, the kernel's limit on
asynchronous requests in flight (``WorkerConfig.max_background``).

The ``open`` and ``create`` slots (pyfuse3's handlers checked in slots 14 and 30
first) are served here too when FOPEN_NOFLUSH or kernel passthrough is asked
for, because only a reply written by ``_raw_reply`` can carry them. The ``init``
wrapper also diverts the FUSE_INIT reply (``_init_reply``) to ask for what
libfuse cannot: ``FUSE_DIRECT_IO_ALLOW_MMAP`` and (when the kernel offers it)
``FUSE_PARALLEL_DIROPS`` always, ``FUSE_HANDLE_KILLPRIV_V2`` and kernel
passthrough when configured. If the
first request shows an unexpected libfuse request layout, opens and creates go
back to pyfuse3's handlers, and both stay off.

With ``held_reads``, the ``read`` slot (pyfuse3's handler checked in slot 15) is
switched between pyfuse3's handler and one here as the stack changes
(:meth:`ExtraOps.route_reads`, from ``Stack.holds_reads``): while a delay layer
acts on reads, reads are answered through ``_held_reads``, whose replies a hold
may send later from the timer task; the same request-layout check applies.

The callbacks run on the trio thread, inside ``fuse_session_process_buf``
called by a pyfuse3 reader task. Each reads what it needs from the request (the
``fuse_file_info`` is on libfuse's stack and gone once the callback returns),
hands a coroutine to pyfuse3's ``save_retval`` and returns, as pyfuse3's own
handlers do; the reader task then awaits it, which runs the op
through the adapter (layers, backend, telemetry) and replies with
``fuse_reply_err``/``fuse_reply_write``/``fuse_reply_lseek`` (opens and creates:
``RawReplies.open``/``create``). Every request
gets exactly one reply, EINTR if the worker is stopping.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol

import pyfuse3
import trio

from ._elf import ElfError, symbols as elf_symbols
from ._init_reply import (
    FLAGS2_DIRECT_IO_ALLOW_MMAP,
    FUSE_CAP_PARALLEL_DIROPS,
    FUSE_HANDLE_KILLPRIV_V2,
    FUSE_PARALLEL_DIROPS,
    InitReply,
    InitReplyUnavailable,
)
from ._kernel_passthrough import FLAGS2_PASSTHROUGH, MAX_STACK_DEPTH, KernelPassthrough
from ._held_reads import ReadReplier
from ._raw_reply import FOPEN_NOFLUSH, FuseCtx, RawReplies, RawReplyUnavailable, open_flags_of
from ._telemetry import Telemetry

log = logging.getLogger(__name__)

#: Slots of ``struct fuse_lowlevel_ops`` (fuse_lowlevel.h, libfuse 3.x), in pointers.
SLOT_INIT = 0
SLOT_OPEN = 14
SLOT_READ = 15
SLOT_CREATE = 30
SLOT_WRITE_BUF = 36
SLOT_FORGET_MULTI = 38
SLOT_FALLOCATE = 40
SLOT_READDIRPLUS = 41
SLOT_COPY_FILE_RANGE = 42
SLOT_LSEEK = 43
#: Offset of ``fh`` in ``struct fuse_file_info`` (fuse_common.h, libfuse 3.x), bytes.
FILE_INFO_FH_OFFSET = 16
#: How far into ``struct fuse_session`` the op table is searched for, bytes
#: (libfuse 3.14 has it at 56).
SESSION_SEARCH_BYTES = 256

_POINTER = ctypes.sizeof(ctypes.c_void_p)
_PYFUSE3 = "pyfuse3"
_SYMBOLS = {
    "session": f"__pyx_v_7{_PYFUSE3}_session",
    "fuse_ops": f"__pyx_v_7{_PYFUSE3}_fuse_ops",
    "fuse_init": f"__pyx_f_7{_PYFUSE3}_fuse_init",
    "fuse_open": f"__pyx_f_7{_PYFUSE3}_fuse_open",
    "fuse_create": f"__pyx_f_7{_PYFUSE3}_fuse_create",
    "fuse_read": f"__pyx_f_7{_PYFUSE3}_fuse_read",
    "write_buf": f"__pyx_f_7{_PYFUSE3}_fuse_write_buf",
    "forget_multi": f"__pyx_f_7{_PYFUSE3}_fuse_forget_multi",
    "readdirplus": f"__pyx_f_7{_PYFUSE3}_fuse_readdirplus",
    "save_retval": f"__pyx_f_7{_PYFUSE3}_save_retval",
    "init": f"PyInit_{_PYFUSE3}",
}

_FALLOCATE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64,
                              ctypes.c_int64, ctypes.c_void_p)
_COPY_FILE_RANGE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_size_t,
                                    ctypes.c_int)
_LSEEK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p)
#: ``void init(void *userdata, struct fuse_conn_info *conn)``: the slot's type, and
#: the type pyfuse3's own handler is called through (it needs the GIL kept).
_INIT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_PYFUSE3_INIT = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
#: pyfuse3's ``cdef void save_retval(object)``: hands a handler's coroutine to the
#: reader task that called ``fuse_session_process_buf``, which awaits it next.
_SAVE_RETVAL = ctypes.PYFUNCTYPE(None, ctypes.py_object)
#: ``void open(fuse_req_t, fuse_ino_t, struct fuse_file_info *)``, and pyfuse3's handler's.
_OPEN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p)
_PYFUSE3_OPEN = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p)
#: ``void create(fuse_req_t, fuse_ino_t parent, const char *name, mode_t, struct fuse_file_info *)``.
_CREATE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p)
_PYFUSE3_CREATE = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint,
                                    ctypes.c_void_p)
#: ``void read(fuse_req_t, fuse_ino_t, size_t size, off_t off, struct fuse_file_info *)``, and pyfuse3's handler's.
_READ = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int64, ctypes.c_void_p)
_PYFUSE3_READ = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int64,
                                  ctypes.c_void_p)


class Caller(NamedTuple):
    """Who sent a request (``struct fuse_ctx``): what the adapter's ops read of a context."""

    uid: int
    gid: int
    pid: int


class _ConnInfo(ctypes.Structure):
    """The leading fields of ``struct fuse_conn_info`` (fuse_common.h, libfuse 3.x)."""

    _fields_ = [(name, ctypes.c_uint) for name in (
        "proto_major", "proto_minor", "max_write", "max_read", "max_readahead", "capable", "want",
        "max_background", "congestion_threshold", "time_gran")]


class ExtraOpsUnavailable(RuntimeError):
    """The session's op table could not be found or did not look as expected (nothing was changed)."""


class ExtraOpsHandler(Protocol):
    """What serves the three ops (the adapter, ``InterposerOperations``).

    Each raises ``pyfuse3.FUSEError`` with the errno the application should see.
    """

    async def fallocate(self, fh: int, mode: int, offset: int, length: int, caller: Caller) -> None: ...

    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int,
                              flags: int, caller: Caller) -> int: ...

    async def lseek(self, fh: int, offset: int, whence: int, caller: Caller) -> int: ...

    async def open(self, inode: int, flags: int, ctx: Caller) -> pyfuse3.FileInfo: ...

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Caller) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]: ...

    async def release(self, fh: int) -> None: ...

    async def read_replying(self, req: int, fh: int, off: int, size: int, replier: ReadReplier) -> None: ...

    def flushless(self, fh: int) -> bool:
        """Whether file ``fh`` just opened may be closed without a FLUSH request (FOPEN_NOFLUSH)."""
        ...

    passthrough: KernelPassthrough | None
    #: Its counters: a request answered EIO for a bug here counts in ``internal_errors_total``.
    telemetry: Telemetry
    #: Set by :meth:`ExtraOps.install`: opens are answered here, so FOPEN_NOFLUSH can be sent.
    noflush_opens: bool
    #: Set by :meth:`ExtraOps.install` (with ``held_reads``): called with whether
    #: the worker's READ slot should serve reads, whenever the stack changes.
    route_reads: Callable[[bool], None] | None
    #: The stack in force (``_stack.Stack``): its ``holds_reads`` routes reads at install.
    stack: Any


def _libfuse() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("fuse3") or "libfuse3.so.3")
    lib.fuse_reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.fuse_reply_err.restype = ctypes.c_int
    lib.fuse_reply_write.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.fuse_reply_write.restype = ctypes.c_int
    lib.fuse_reply_lseek.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.fuse_reply_lseek.restype = ctypes.c_int
    lib.fuse_req_ctx.argtypes = [ctypes.c_void_p]
    lib.fuse_req_ctx.restype = ctypes.POINTER(FuseCtx)
    lib.fuse_reply_none.argtypes = [ctypes.c_void_p]
    lib.fuse_reply_none.restype = None
    lib.fuse_session_fd.argtypes = [ctypes.c_void_p]
    lib.fuse_session_fd.restype = ctypes.c_int
    return lib


def _pyfuse3_symbols() -> tuple[dict[str, int], int]:
    """Addresses of :data:`_SYMBOLS` in this process, and the size of pyfuse3's op table in bytes.

    Raises:
        ExtraOpsUnavailable: the module has no symbol table or lacks a symbol.
    """
    path = pyfuse3.__file__
    if path is None:
        raise ExtraOpsUnavailable("pyfuse3 has no module file")
    try:
        found = elf_symbols(path, _SYMBOLS.values())
    except (ElfError, OSError) as exc:
        raise ExtraOpsUnavailable(str(exc)) from None
    missing = sorted(set(_SYMBOLS.values()) - set(found))
    if missing:
        raise ExtraOpsUnavailable(f"{path} has no symbol {', '.join(missing)}")
    exported = ctypes.cast(getattr(ctypes.CDLL(path), _SYMBOLS["init"]), ctypes.c_void_p).value
    assert exported is not None
    base = exported - found[_SYMBOLS["init"]][0]
    address = {key: base + found[name][0] for key, name in _SYMBOLS.items()}
    return address, found[_SYMBOLS["fuse_ops"]][1]


def _session_op_table() -> tuple[int, int, dict[str, int]]:
    """Addresses of pyfuse3's libfuse session, of the op table inside it, and of pyfuse3's symbols (:data:`_SYMBOLS`).

    Raises:
        ExtraOpsUnavailable: no session yet (call after ``pyfuse3.init``), or the
            table is not where, or not what, it is expected to be.
    """
    address, table_bytes = _pyfuse3_symbols()
    session = ctypes.c_void_p.from_address(address["session"]).value
    if not session:
        raise ExtraOpsUnavailable("no FUSE session (pyfuse3.init has not run)")
    if table_bytes < (SLOT_LSEEK + 1) * _POINTER:
        raise ExtraOpsUnavailable(f"pyfuse3's op table has {table_bytes} bytes, too few for lseek")
    table = ctypes.string_at(address["fuse_ops"], table_bytes)

    def slot(index: int) -> int:
        return int.from_bytes(table[index * _POINTER:(index + 1) * _POINTER], "little")

    expected = {SLOT_INIT: address["fuse_init"], SLOT_WRITE_BUF: address["write_buf"], SLOT_FORGET_MULTI: address["forget_multi"],
                SLOT_OPEN: address["fuse_open"], SLOT_READ: address["fuse_read"], SLOT_CREATE: address["fuse_create"], SLOT_READDIRPLUS: address["readdirplus"], SLOT_FALLOCATE: 0,
                SLOT_COPY_FILE_RANGE: 0,
                SLOT_LSEEK: 0}
    wrong = [index for index, value in expected.items() if slot(index) != value]
    if wrong:
        raise ExtraOpsUnavailable(f"pyfuse3's op table does not have the libfuse 3 layout (slots {wrong})")
    window = ctypes.string_at(session, SESSION_SEARCH_BYTES + table_bytes)
    offset = window.find(table)
    if offset < 0 or offset % _POINTER or offset > SESSION_SEARCH_BYTES:
        raise ExtraOpsUnavailable("the session holds no copy of pyfuse3's op table")
    return session, session + offset, address


#: The :class:`ExtraOps` whose callbacks are in the session (one session per process).
_installed: ExtraOps | None = None


class ExtraOps:
    """The three callbacks, bound to a handler and a nursery; :meth:`install` puts them in the session.

    Args:
        handler: serves the ops (the adapter).
        max_background: most asynchronous requests the kernel may keep in flight,
            answered in FUSE_INIT; 0 leaves pyfuse3's ``init`` slot alone (the
            kernel's default, 12).
        kernel_passthrough: also serve ``open`` and ``create`` here, to answer them
            with kernel passthrough where the handler allows (``_kernel_passthrough``);
            the handler's ``passthrough`` is set on :meth:`install`.
        skip_needless_flush: also serve ``open`` and ``create`` here, to answer them
            with FOPEN_NOFLUSH where the handler's ``flushless`` allows; the
            handler's ``noflush_opens`` is set on :meth:`install`.
        handle_killpriv: ask for ``FUSE_HANDLE_KILLPRIV_V2`` in the FUSE_INIT reply
            (``_init_reply``): the handler then clears set-ID bits on writes and
            truncations itself, and the kernel stops asking for
            ``security.capability`` before each write.
        held_reads: serve ``read`` here while a delay layer acts on reads, so
            holds end in a reply sent from the timer task instead of a parked
            reader (``_held_reads``); the handler's ``route_reads`` is set on
            :meth:`install`, and pyfuse3's handler serves reads otherwise.
    """

    def __init__(self, handler: ExtraOpsHandler, max_background: int = 0, kernel_passthrough: bool = False,
                 skip_needless_flush: bool = False, handle_killpriv: bool = False, held_reads: bool = False) -> None:
        self._handler = handler
        self._lib = _libfuse()
        self._nursery: trio.Nursery | None = None
        self._max_background = max_background
        self._kernel_passthrough = kernel_passthrough
        self._skip_needless_flush = skip_needless_flush
        self._handle_killpriv = handle_killpriv
        self._init_reply: InitReply | None = None
        self._passthrough: KernelPassthrough | None = None
        self._replies: RawReplies | None = None
        self._pyfuse3_init: Any = None
        self._pyfuse3_open: Any = None
        self._pyfuse3_create: Any = None
        self._save_retval: Any = None
        #: Whether libfuse's requests have the layout raw replies rely on: None until
        #: the first request answered here (an open, a create or a read) checked it.
        self._request_layout_ok: bool | None = None
        self._held_reads = held_reads
        self._read_replier: ReadReplier | None = None
        #: Address of the session's READ slot, and what pyfuse3 put there.
        self._read_slot = 0
        self._pyfuse3_read_address = 0
        self._pyfuse3_read: Any = None
        # Kept here: the C pointers stay valid only while these objects live.
        self._callbacks: dict[int, Any] = {
            SLOT_FALLOCATE: _FALLOCATE(self._fallocate),
            SLOT_COPY_FILE_RANGE: _COPY_FILE_RANGE(self._copy_file_range),
            SLOT_LSEEK: _LSEEK(self._lseek),
        }
        # Always: the FUSE_INIT reply asks for FUSE_DIRECT_IO_ALLOW_MMAP at least.
        self._callbacks[SLOT_INIT] = _INIT(self._init)

    def install(self, nursery: trio.Nursery) -> None:
        """Fill the fallocate, copy_file_range and lseek slots of the current session (wrap ``init``, serve opens).

        Call on the trio thread after ``pyfuse3.init`` and before ``pyfuse3.main``;
        ``nursery`` must outlive the session loop (the FUSE_INIT reply and the
        release of an interrupted open are sent from its tasks) and close before
        ``pyfuse3.close``.

        Raises:
            ExtraOpsUnavailable: the table was not found as expected; nothing was written.
        """
        global _installed
        session, table, pyfuse3_address = _session_op_table()
        self._nursery = nursery
        self._save_retval = _SAVE_RETVAL(pyfuse3_address["save_retval"])
        try:
            self._init_reply = InitReply(self._lib, session)
        except InitReplyUnavailable as exc:
            log.warning("FUSE_INIT reply as libfuse builds it (no kernel passthrough, the kernel checks "
                        "security.capability before writes, no shared mmap of files layers act on): %s", exc)
        if self._kernel_passthrough and self._init_reply is not None:
            self._passthrough = KernelPassthrough(self._lib, session)
            self._handler.passthrough = self._passthrough
        if self._passthrough is not None or self._skip_needless_flush or self._held_reads:
            self._replies = RawReplies(self._lib, session)
        if self._passthrough is not None or self._skip_needless_flush:
            self._pyfuse3_open = _PYFUSE3_OPEN(pyfuse3_address["fuse_open"])
            self._pyfuse3_create = _PYFUSE3_CREATE(pyfuse3_address["fuse_create"])
            self._callbacks[SLOT_OPEN] = _OPEN(self._open)
            self._callbacks[SLOT_CREATE] = _CREATE(self._create)
            self._handler.noflush_opens = self._skip_needless_flush
        # libfuse keeps raw pointers to the callbacks: they (and so this object)
        # must live as long as the session, whatever the caller keeps.
        _installed = self
        self._pyfuse3_init = _PYFUSE3_INIT(ctypes.c_void_p.from_address(table + SLOT_INIT * _POINTER).value)
        for index, callback in self._callbacks.items():
            ctypes.c_void_p.from_address(table + index * _POINTER).value = ctypes.cast(callback, ctypes.c_void_p).value
        if self._held_reads:
            assert self._replies is not None
            self._read_slot = table + SLOT_READ * _POINTER
            self._pyfuse3_read_address = pyfuse3_address["fuse_read"]
            self._pyfuse3_read = _PYFUSE3_READ(self._pyfuse3_read_address)
            self._read_replier = ReadReplier(self._replies, self._lib.fuse_reply_err)
            self._read_callback = _READ(self._read)
            self._handler.route_reads = self.route_reads
            self.route_reads(self._handler.stack.holds_reads)

    @property
    def held_reads_total(self) -> int:
        """READ replies sent from the timer after a hold (``_held_reads``), since :meth:`install`."""
        return self._read_replier.held_total if self._read_replier is not None else 0

    def route_reads(self, held: bool) -> None:
        """Serve READ here (``held``: a delay layer acts on reads) or by pyfuse3's handler.

        One pointer store into the session's op table, which libfuse reads once per
        request: safe between requests from any thread holding the GIL.
        """
        if not self._read_slot:
            return
        here = held and self._request_layout_ok is not False
        address = ctypes.cast(self._read_callback, ctypes.c_void_p).value if here else self._pyfuse3_read_address
        ctypes.c_void_p.from_address(self._read_slot).value = address

    # ---- callbacks (C → Python, on the trio thread) ---------------------------------

    def _init(self, userdata: int, conn: int) -> None:
        self._pyfuse3_init(userdata, conn)
        info = _ConnInfo.from_address(conn)
        if self._max_background:
            info.max_background = self._max_background
            info.congestion_threshold = self._max_background * 3 // 4
        if self._init_reply is not None:
            assert self._nursery is not None
            passthrough = self._passthrough
            flags2 = FLAGS2_DIRECT_IO_ALLOW_MMAP | (FLAGS2_PASSTHROUGH if passthrough is not None else 0)
            flags = (FUSE_PARALLEL_DIROPS if info.capable & FUSE_CAP_PARALLEL_DIROPS else 0) | (
                FUSE_HANDLE_KILLPRIV_V2 if self._handle_killpriv else 0)
            try:
                self._init_reply.divert(
                    self._nursery, flags=flags,
                    flags2=flags2, max_stack_depth=MAX_STACK_DEPTH if passthrough is not None else 0,
                    sent=lambda _, flags2: passthrough.init_reply_sent(flags2) if passthrough is not None else None)
            except Exception:  # the reply then goes out as libfuse built it
                log.exception("cannot divert the FUSE_INIT reply: no kernel passthrough, FUSE_HANDLE_KILLPRIV_V2, "
                              "parallel lookups in a directory or shared mmap of files layers act on")

    def _serves_here(self, req: int) -> bool:
        """Whether requests are answered here (the layout checked on the first one), else by pyfuse3's handlers.

        If not, opens and creates lose kernel passthrough and FOPEN_NOFLUSH, and reads
        go back to pyfuse3's handler (delays held by sleeping readers).
        """
        assert self._replies is not None
        if self._request_layout_ok is None:
            try:
                self._replies.check_request(req)
                self._request_layout_ok = True
            except RawReplyUnavailable as exc:
                log.warning("opens, creates and reads answered by pyfuse3, without kernel passthrough, "
                            "FOPEN_NOFLUSH or held reads: %s", exc)
                if self._passthrough is not None:
                    self._passthrough.enabled = False
                self._handler.noflush_opens = False
                self._request_layout_ok = False
                self.route_reads(False)
        return self._request_layout_ok

    def _open_out(self, info: pyfuse3.FileInfo) -> tuple[int, int]:
        """``open_flags`` and ``backing_id`` of the reply opening ``info``."""
        flags = open_flags_of(info) | (FOPEN_NOFLUSH if self._handler.flushless(info.fh) else 0)
        return self._passthrough.open_out(info.fh, flags) if self._passthrough is not None else (flags, 0)

    def _open(self, req: int, ino: int, fi: int) -> None:
        if not self._serves_here(req):
            self._pyfuse3_open(req, ino, fi)
            return
        replies = self._replies
        assert replies is not None
        flags, caller = ctypes.c_int.from_address(fi).value, Caller(*replies.caller(req))
        self._start(req, lambda: self._handler.open(ino, flags, caller),
                    lambda r, info: self._replied(info, replies.open(r, info.fh, *self._open_out(info))))

    def _create(self, req: int, parent: int, name: int, mode: int, fi: int) -> None:
        if not self._serves_here(req):
            self._pyfuse3_create(req, parent, name, mode, fi)
            return
        replies = self._replies
        assert replies is not None
        entry, flags, caller = ctypes.string_at(name), ctypes.c_int.from_address(fi).value, Caller(*replies.caller(req))

        def reply(r: int, created: tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]) -> None:
            info, attrs = created
            self._replied(info, replies.create(r, attrs, info.fh, *self._open_out(info)))

        self._start(req, lambda: self._handler.create(parent, entry, mode, flags, caller), reply)

    def _replied(self, info: pyfuse3.FileInfo, error: int) -> None:
        if not error:
            return
        # The kernel did not take the open: interrupted (ENOENT: it forgot the
        # request), or a reply it refused (it failed the open with EIO). Either way
        # it will send no RELEASE, so the handle is released here.
        if error != errno.ENOENT:
            log.error("the kernel refused the reply to an open (%s); the open failed", errno.errorcode.get(error, error))
        assert self._nursery is not None
        self._nursery.start_soon(self._handler.release, info.fh)

    def _caller(self, req: int) -> Caller:
        ctx = self._lib.fuse_req_ctx(req).contents
        return Caller(ctx.uid, ctx.gid, ctx.pid)

    def _start(self, req: int, serve: Callable[[], Awaitable[Any]], reply: Callable[[int, Any], object]) -> None:
        # As pyfuse3's own handlers do: the reader task that read the request
        # awaits it. A task of its own per request cost more: create+stat+unlink
        # with kernel passthrough (opens and creates served here) 203 -> 168 µs of
        # worker CPU per op, against 161 with pyfuse3 serving them.
        try:
            self._save_retval(self._finish(req, serve, reply))
        except BaseException:  # never let an exception into libfuse: the request still needs its reply
            log.exception("cannot start a FUSE request")
            self._lib.fuse_reply_err(req, errno.EIO)

    async def _finish(self, req: int, serve: Callable[[], Awaitable[Any]], reply: Callable[[int, Any], object]) -> None:
        try:
            result = await serve()
        except pyfuse3.FUSEError as exc:
            self._lib.fuse_reply_err(req, exc.errno)
        except Exception:
            self._handler.telemetry.internal_errors_total += 1
            log.exception("internal error in a FUSE request")
            self._lib.fuse_reply_err(req, errno.EIO)
        except BaseException:  # trio.Cancelled: the worker is stopping
            self._lib.fuse_reply_err(req, errno.EINTR)
            raise
        else:
            reply(req, result)

    @staticmethod
    def _fh(fi: int) -> int:
        return ctypes.c_uint64.from_address(fi + FILE_INFO_FH_OFFSET).value

    def _fallocate(self, req: int, ino: int, mode: int, offset: int, length: int, fi: int) -> None:
        fh, caller = self._fh(fi), self._caller(req)
        self._start(req, lambda: self._handler.fallocate(fh, mode, offset, length, caller),
                    lambda r, _: self._lib.fuse_reply_err(r, 0))

    def _copy_file_range(self, req: int, ino_in: int, off_in: int, fi_in: int, ino_out: int, off_out: int,
                         fi_out: int, length: int, flags: int) -> None:
        fh_in, fh_out, caller = self._fh(fi_in), self._fh(fi_out), self._caller(req)
        self._start(req, lambda: self._handler.copy_file_range(fh_in, off_in, fh_out, off_out, length, flags, caller),
                    self._lib.fuse_reply_write)

    def _read(self, req: int, ino: int, size: int, off: int, fi: int) -> None:
        if not self._serves_here(req):
            self._pyfuse3_read(req, ino, size, off, fi)
            return
        fh, replier = self._fh(fi), self._read_replier
        assert replier is not None
        # read_replying answers the request itself; what it raises, it raised before answering.
        self._start(req, lambda: self._handler.read_replying(req, fh, off, size, replier), lambda r, _: None)

    def _lseek(self, req: int, ino: int, offset: int, whence: int, fi: int) -> None:
        fh, caller = self._fh(fi), self._caller(req)
        self._start(req, lambda: self._handler.lseek(fh, offset, whence, caller), self._lib.fuse_reply_lseek)
