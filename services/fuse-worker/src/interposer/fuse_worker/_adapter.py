"""The only ``pyfuse3.Operations`` subclass: each FUSE callback → ``Op`` → layer chain → backend."""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pyfuse3
import trio

from interposer.proto import Policy
from interposer.proto.events import FATTR_ATIME, FATTR_CTIME, FATTR_GID, FATTR_MODE, FATTR_MTIME, FATTR_SIZE, FATTR_UID

from ._extra_ops import Caller
from ._held_reads import ReadReplier
from ._kernel_passthrough import IoMode, KernelPassthrough
from ._op import BackendCall, Op, opened_for_writing
from ._setid import setid_bits_to_clear
from ._stack import QuotaUnavailable, Stack
from .layers import QuotaContext
from ._telemetry import Telemetry
from .backends import Backend

log = logging.getLogger(__name__)

#: The set-ID bits of a mode.
_SETID = stat.S_ISUID | stat.S_ISGID


def _errno_of(exc: Exception, op: Op, telemetry: Telemetry) -> int:
    """The errno the application gets for ``exc`` raised serving ``op``.

    An ``OSError``'s own; EIO for anything else (a bug: logged and counted in
    ``telemetry.internal_errors_total``).
    """
    if isinstance(exc, OSError):
        return exc.errno or errno.EIO
    telemetry.internal_errors_total += 1
    log.error("internal error serving %s %s", op.name, op.path, exc_info=exc)
    return errno.EIO


def _changed_attributes(fields: pyfuse3.SetattrFields) -> int:
    """What a setattr changes, as FUSE_SETATTR ``valid`` bits (``FATTR_*``; ``OpEvent.flags``)."""
    return ((FATTR_MODE if fields.update_mode else 0) | (FATTR_UID if fields.update_uid else 0)
            | (FATTR_GID if fields.update_gid else 0) | (FATTR_SIZE if fields.update_size else 0)
            | (FATTR_ATIME if fields.update_atime else 0) | (FATTR_MTIME if fields.update_mtime else 0)
            | (FATTR_CTIME if fields.update_ctime else 0))


def _clears_setid(flags: int, ctx: pyfuse3.RequestContext | Caller) -> bool:
    """Whether writes through a file opened with ``flags`` by ``ctx`` clear set-ID bits (``_setid``).

    Opened for writing by a caller other than root: uid 0 stands for CAP_FSETID,
    since the worker sees uids, not capabilities.
    """
    return ctx.uid != 0 and opened_for_writing(flags)


#: The handlers pyfuse3 calls and answers (``forget`` has no answer and guards itself;
#: the ops ``_extra_ops`` serves are guarded there).
PYFUSE3_HANDLERS = (
    "lookup", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link",
    "open", "create", "read", "write", "flush", "release", "fsync", "opendir", "readdir", "releasedir",
    "fsyncdir", "statfs", "getxattr", "setxattr", "listxattr", "removexattr",
)


def _answering_eio_on_internal_errors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """``handler``, turning any exception but ``FUSEError`` (and trio's cancellation) into ``FUSEError(EIO)``.

    pyfuse3 answers a ``FUSEError``; any other exception leaves its session loop,
    which stops serving the mount: every process using it then gets ENOTCONN. A bug
    hit while building an op (outside ``_serve``, which maps errors itself) must
    fail that one request, logged with its traceback and counted
    (``Telemetry.internal_errors_total``), and nothing else.
    """
    name = handler.__name__

    @functools.wraps(handler)
    async def answering(self: InterposerOperations, *args: Any) -> Any:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            self.telemetry.internal_errors_total += 1
            log.exception("internal error in the %s handler: answered EIO", name)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return answering


#: ``SetattrFields`` of a mode-only change made by the worker itself (pyfuse3's own
#: class cannot be built from Python; backends only read its ``update_*`` flags).
_MODE_ONLY = SimpleNamespace(update_size=False, update_mode=True, update_uid=False, update_gid=False,
                             update_atime=False, update_mtime=False)


class InterposerOperations(pyfuse3.Operations):
    """Serves FUSE requests through the current policy's layer chains.

    Every callback builds an :class:`Op`, runs it through ``stack.chains[op]`` (or
    straight to the backend when no layer targets the op), turns ``OSError`` into
    ``FUSEError`` and records one event. ``apply`` swaps the stack between requests
    (a plain attribute assignment on the trio thread), so a new policy never needs
    a remount and requests already inside a chain finish under the old one.

    Args:
        backend: the backend to serve.
        telemetry: event recorder.
        policy: initial policy (revision 0).
        quota: worker-lifetime quota state, for policies with a quota layer.
        negative_timeout_s: how long the kernel may cache a lookup that found no
            such name, seconds (0 = not at all); see :meth:`lookup`.

    Raises:
        QuotaUnavailable: ``policy`` has a quota layer and ``quota`` is None.
    """

    enable_writeback_cache = False  # every write must reach the layers

    def __init__(
        self, backend: Backend, telemetry: Telemetry, policy: Policy | None = None,
        quota: QuotaContext | None = None, negative_timeout_s: float = 0.0,
    ) -> None:
        super().__init__()
        self._negative_entry: pyfuse3.EntryAttributes | None = None
        if negative_timeout_s > 0:
            self._negative_entry = pyfuse3.EntryAttributes()
            self._negative_entry.st_ino = 0  # FUSE's negative entry (fuse_entry_param.ino)
            self._negative_entry.entry_timeout = negative_timeout_s
        self.backend = backend
        self.telemetry = telemetry
        self.quota = quota
        self.stack = Stack(policy or Policy(), 0, quota=quota)
        #: Guards replacing ``stack``: the bus thread may swap it (apply_off_trio).
        self._swap_lock = threading.Lock()
        #: Set (and replaced) whenever a new stack is installed; the expiry task waits on it.
        self.stack_changed = trio.Event()
        #: Set once the kernel's FUSE_INIT has been answered (mount settings are final).
        self.initialized = trio.Event()
        #: fh → context of the non-root opener, for files opened for writing, whose
        #: writes must clear set-ID bits here (``_setid``).
        self._setid_writers: dict[int, pyfuse3.RequestContext] = {}
        #: Inodes whose writes by those openers must check for set-ID bits: seen
        #: with S_ISUID/S_ISGID when opened or created, or given them by a setattr
        #: since. Other files' writes skip the check, which costs a getattr per
        #: write (measured: 100-byte appends as uid 65534 ran ~25 % slower than as
        #: root). A chmod made directly in the backing dir while such a file is
        #: open is not seen.
        self._setid_inodes: set[int] = set()
        #: Kernel passthrough of this session, set by ``_extra_ops`` when it serves
        #: opens (``--kernel-passthrough``); None = every read and write comes here.
        self.passthrough: KernelPassthrough | None = None
        #: Set by ``_extra_ops`` when it answers opens and may send FOPEN_NOFLUSH
        #: (``--skip-needless-flush``); False = every close sends FLUSH.
        self.noflush_opens = False
        #: Set by ``ExtraOps.install``: chooses who serves READ (True: the worker's own
        #: slot, so delay layers leave their holds to the reply, ``_held_reads``).
        self.route_reads: Callable[[bool], None] | None = None
        #: fh → (path it was opened at, opened for writing), for files opened with FOPEN_NOFLUSH.
        self._flushless: dict[int, tuple[str, bool]] = {}
        #: fh → the flags the application opened it with (``Op.open_flags``).
        self._open_flags: dict[int, int] = {}

    def init(self) -> None:
        # pyfuse3 calls this on FUSE_INIT, just before it replies; the kernel applies the
        # reply's limits (and resets the mount's readahead) when the reply arrives.
        self.initialized.set()

    @property
    def revision(self) -> int:
        """KV revision of the policy in force (0 = initial/local)."""
        return self.stack.revision

    def apply(self, policy: Policy, revision: int) -> None:
        """Make ``policy`` the one in force for requests that start from now on (trio thread).

        A policy equal to the one in force is not recompiled: the stack is only
        relabelled with ``revision`` (its layers keep their state).
        """
        current = self.stack
        self.install(current.relabel(revision) if policy == current.policy else Stack(policy, revision,
                                                                                       quota=self.quota))
        log.info("applied policy revision %d (%d layers)", revision, len(policy.layers))

    def apply_off_trio(self, policy: Policy, revision: int) -> bool:
        """Compile ``policy`` and put it in force from another thread, if that is safe.

        Safe when no quota layer is in force or coming (quota usage is trio-side
        state) and no layer of the new stack expires (the expiry task on the trio
        thread must be woken for that). The swap is one attribute assignment under
        ``_swap_lock``: a request reads ``self.stack`` once when it starts, so it
        runs wholly under the old or the new stack, as with :meth:`apply`.

        Returns:
            True if ``policy`` is in force; False if nothing was changed and
            :meth:`apply` must run on the trio thread instead.
        """
        current = self.stack
        if current.has_quota:
            return False
        try:  # an equal policy keeps the compiled stack; a quota layer raises (no QuotaContext)
            stack = current.relabel(revision) if policy == current.policy else Stack(policy, revision)
        except QuotaUnavailable:
            return False
        if stack.next_expiry_s is not None:
            return False
        with self._swap_lock:
            if self.stack is not current:  # the trio thread installed one meanwhile
                return False
            self.stack = stack
            if self.route_reads is not None:
                self.route_reads(stack.holds_reads)
        self._warn_of_bypassed_files(stack)
        log.info("applied policy revision %d (%d layers)", revision, len(policy.layers))
        return True

    @property
    def kernel_passthrough_files(self) -> int:
        """Open file handles the kernel serves by passthrough now (read from the bus thread too)."""
        return len(self.passthrough.passthrough_handles()) if self.passthrough is not None else 0

    @property
    def files_bypassing_layers(self) -> int:
        """Open files the policy in force would act on but cannot reach until they are reopened (read from the bus thread too).

        Those opened before it with kernel passthrough whose reads or writes it acts
        on, and those opened without FLUSH (FOPEN_NOFLUSH) whose ``flush`` it acts on.
        """
        return self._bypassing(self.stack)

    def _bypassing(self, stack: Stack) -> int:
        handles = {fh for fh, (path, writable) in list(self._flushless.items())
                   if stack.acts_on_flush_at(path, writable)}
        if self.passthrough is not None:
            handles.update(self.passthrough.passthrough_handles(stack.acts_on_data_at))
        return len(handles)

    def _warn_of_bypassed_files(self, stack: Stack) -> None:
        # Neither passthrough nor FOPEN_NOFLUSH can be taken back from an open file:
        # the layers see its data, or its closes, only once it is reopened.
        handles = self._bypassing(stack)
        if handles:
            log.warning("policy revision %d acts on %d open files it cannot reach until they are reopened (served "
                        "by kernel passthrough, or opened without FLUSH)", stack.revision, handles)

    def install(self, stack: Stack, replacing: Stack | None = None) -> bool:
        """Put ``stack`` in force (on the trio thread) and wake whoever waits for a change.

        Args:
            stack: the new stack.
            replacing: install only if this is still the stack in force (the
                expiry task's compare-and-swap); None = unconditionally.

        Returns:
            False if ``replacing`` was no longer in force (nothing changed).
        """
        with self._swap_lock:
            if replacing is not None and self.stack is not replacing:
                return False
            self.stack = stack
            if self.route_reads is not None:
                self.route_reads(stack.holds_reads)
        self._warn_of_bypassed_files(stack)
        self.stack_changed.set()
        self.stack_changed = trio.Event()
        return True

    async def _serve(self, op: Op, call: BackendCall) -> Any:
        stack = self.stack
        chain = stack.chains.get(op.name)
        start_wall_ns = time.time_ns()
        start_ns = time.perf_counter_ns()
        err = 0
        result: Any = None
        try:
            result = await (call() if chain is None else chain(op, call))
            return result
        except pyfuse3.FUSEError as exc:
            err = exc.errno
            raise
        except Exception as exc:
            err = _errno_of(exc, op, self.telemetry)
            raise pyfuse3.FUSEError(err) from None
        finally:
            if err or result is None:
                nbytes = 0
            elif op.name == "read":
                nbytes = len(result)
            elif op.name in ("write", "copy_file_range"):
                nbytes = result
            else:
                nbytes = 0
            self.telemetry.record(op, err, nbytes, start_wall_ns, time.perf_counter_ns() - start_ns, stack.revision)

    async def read_replying(self, req: int, fh: int, off: int, size: int, replier: ReadReplier) -> None:
        """Serve READ request ``req`` (``size`` bytes at ``off`` of handle ``fh``) and answer it through ``replier``.

        For the worker's own READ slot (``_extra_ops``, while a delay layer acts on
        reads): delay layers leave their holds to the reply (``Op.defer_holds``),
        which ``replier`` sends when they end, from the timer task (``_held_reads``);
        the op is recorded then. Errors of the op are answered as :meth:`read`'s;
        what propagates — ``FUSEError`` for an unknown ``fh``, before the op starts,
        and ``trio.Cancelled`` (the worker stopping) — leaves ``req`` unanswered
        for the caller to answer.
        """
        backend, stack = self.backend, self.stack
        ino = backend.ino_of_fh(fh)
        telemetry = self.telemetry
        op = Op("read", ino, backend.path_of(ino), offset=off, size=size, session=telemetry.session_of(fh),
                open_flags=self._open_flags.get(fh, 0), defer_holds=replier.can_hold(),
                sequential=telemetry.continues(ino, off, size))
        chain = stack.chains.get("read")
        start_wall_ns = time.time_ns()
        start_ns = time.perf_counter_ns()
        payload: Any
        err = 0
        try:
            payload = await (backend.read(fh, off, size) if chain is None
                             else chain(op, lambda: backend.read(fh, off, size)))
        except pyfuse3.FUSEError as exc:
            payload = err = exc.errno
        except Exception as exc:
            payload = err = _errno_of(exc, op, self.telemetry)
        nbytes = 0 if err else len(payload)

        def sent(sent_ns: int, late_ns: int) -> None:
            op.delay_late_ns += late_ns
            self.telemetry.record(op, err, nbytes, start_wall_ns, sent_ns - start_ns, stack.revision)

        replier.send(req, op, payload, sent)

    def _op(self, name: str, ino: int, ctx: pyfuse3.RequestContext | Caller | None, **fields: Any) -> Op:
        pid, uid = (ctx.pid, ctx.uid) if ctx is not None else (0, 0)
        return Op(name, ino, self.backend.path_of(ino), pid=pid, uid=uid, **fields)

    def _entry_op(self, name: str, parent_ino: int, entry: bytes, ctx: pyfuse3.RequestContext | Caller,
                  **fields: Any) -> Op:
        return Op(name, parent_ino, self.backend.entry_path(parent_ino, entry), pid=ctx.pid, uid=ctx.uid, **fields)

    # ---- entries -------------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx):
        """Look ``name`` up; a name the backend does not have may be answered cacheably.

        A backend's ENOENT becomes a negative entry (inode 0 with an entry timeout:
        libfuse's ``fuse_entry_param.ino``), so repeated lookups of a missing name
        (``$PATH``, library and include paths, polling for a file) are answered by
        the kernel's dentry cache. The kernel drops it when the name is created
        through the mount; a name created directly in the backing dir shows once it
        expires. Not while a layer acts on lookups (the cache would hide its delays
        and faults), and never for an ENOENT a fault layer injected.
        """
        op = self._entry_op("lookup", parent_inode, name, ctx)
        stack = self.stack
        try:
            return await self._serve(op, lambda: self.backend.lookup(parent_inode, name, ctx))
        except pyfuse3.FUSEError as exc:
            negative = self._negative_entry
            if negative is None or exc.errno != errno.ENOENT or op.fault or "lookup" in stack.chains:
                raise
            return negative

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Bookkeeping, not an op of the application: never delayed or failed. It has
        # no reply to carry an error, and one raised here would stop the worker.
        try:
            await self.backend.forget(inode_list)
        except Exception:
            log.exception("internal error forgetting %d inodes", len(inode_list))

    async def getattr(self, inode, ctx):
        return await self._serve(self._op("getattr", inode, ctx), lambda: self.backend.getattr(inode, ctx))

    async def setattr(self, inode, attr, fields, fh, ctx):
        op = self._op("setattr", inode, ctx, size=attr.st_size if fields.update_size else 0,
                      mode=_changed_attributes(fields))
        if fields.update_mode and attr.st_mode & _SETID:
            self._setid_inodes.add(inode)  # writes must clear them from now on

        async def setattr() -> pyfuse3.EntryAttributes:
            chown_by_user = (fields.update_uid or fields.update_gid) and ctx.uid != 0
            before = await self.backend.getattr(inode, ctx) if chown_by_user else None
            attrs = await self.backend.setattr(inode, attr, fields, fh, ctx)
            if fields.update_size and not fields.update_mode and attrs.st_mode & _SETID:
                # A truncation by a caller without CAP_FSETID clears them; without
                # FUSE_HANDLE_KILLPRIV_V2 the kernel sends the new mode along instead.
                attrs = await self._clear_setid_bits(inode, ctx, attrs)
            if before is not None:
                # chown(2) clears them by a write's rule, judged on the file as it was
                # (chown_common → setattr_should_drop_sgid): the backing fs, changed
                # by root, drops S_ISUID and a group-executable S_ISGID but keeps the
                # S_ISGID of a file the caller was not in the group of.
                bits = setid_bits_to_clear(before.st_mode, before.st_gid, ctx.uid, ctx.gid) & attrs.st_mode
                if bits:
                    attrs.st_mode &= ~bits
                    attrs = await self.backend.setattr(inode, attrs, _MODE_ONLY, None, ctx)
            return attrs

        return await self._serve(op, setattr)

    async def readlink(self, inode, ctx):
        return await self._serve(self._op("readlink", inode, ctx), lambda: self.backend.readlink(inode, ctx))

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        op = self._entry_op("mknod", parent_inode, name, ctx, mode=mode)
        return await self._serve(op, lambda: self.backend.mknod(parent_inode, name, mode, rdev, ctx))

    async def mkdir(self, parent_inode, name, mode, ctx):
        op = self._entry_op("mkdir", parent_inode, name, ctx)
        return await self._serve(op, lambda: self.backend.mkdir(parent_inode, name, mode, ctx))

    async def unlink(self, parent_inode, name, ctx):
        op = self._entry_op("unlink", parent_inode, name, ctx)
        return await self._serve(op, lambda: self.backend.unlink(parent_inode, name, ctx))

    async def rmdir(self, parent_inode, name, ctx):
        op = self._entry_op("rmdir", parent_inode, name, ctx)
        return await self._serve(op, lambda: self.backend.rmdir(parent_inode, name, ctx))

    async def symlink(self, parent_inode, name, target, ctx):
        op = self._entry_op("symlink", parent_inode, name, ctx, target=os.fsdecode(target))
        return await self._serve(op, lambda: self.backend.symlink(parent_inode, name, target, ctx))

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        op = self._entry_op("rename", parent_inode_old, name_old, ctx, mode=flags,
                            target=self.backend.entry_path(parent_inode_new, name_new))
        return await self._serve(
            op, lambda: self.backend.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx)
        )

    async def link(self, inode, new_parent_inode, new_name, ctx):
        op = self._entry_op("link", new_parent_inode, new_name, ctx, target=self.backend.path_of(inode))
        return await self._serve(op, lambda: self.backend.link(inode, new_parent_inode, new_name, ctx))

    # ---- files ---------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        op = self._op("open", inode, ctx, session=self.telemetry.new_session(), open_flags=flags)
        if self.stack.sizes_opened_files:
            async def open_sized() -> pyfuse3.FileInfo:
                op.file_size = (await self.backend.getattr(inode, ctx)).st_size  # before O_TRUNC empties it
                return await self.backend.open(inode, flags, ctx)

            info = await self._serve(op, open_sized)
        else:
            info = await self._serve(op, lambda: self.backend.open(inode, flags, ctx))
        writer = _clears_setid(flags, ctx)
        # O_TRUNC truncates whatever the access mode (Linux: O_RDONLY | O_TRUNC too),
        # and the truncation clears set-ID bits, as a truncate(2) would.
        truncates = bool(flags & os.O_TRUNC) and ctx.uid != 0
        if writer or truncates:
            attrs = await self.backend.getattr(inode, ctx)
            if attrs.st_mode & _SETID:
                if writer:
                    self._setid_inodes.add(inode)
                if truncates:
                    await self._clear_setid_bits(inode, ctx, attrs)
        self._opened(info, inode, flags, op, ctx)
        return info

    async def create(self, parent_inode, name, mode, flags, ctx):
        op = self._entry_op("create", parent_inode, name, ctx, session=self.telemetry.new_session(), open_flags=flags)
        info, attrs = await self._serve(op, lambda: self.backend.create(parent_inode, name, mode, flags, ctx))
        if _clears_setid(flags, ctx) and mode & _SETID:
            self._setid_inodes.add(attrs.st_ino)
        self._opened(info, attrs.st_ino, flags, op, ctx)
        return info, attrs

    def _opened(self, info: pyfuse3.FileInfo, ino: int, flags: int, op: Op,
                ctx: pyfuse3.RequestContext | Caller) -> None:
        """Choose the caching (or kernel passthrough) of file ``ino`` just opened, and note what its writes must do."""
        if _clears_setid(flags, ctx):
            self._setid_writers[info.fh] = ctx
        self._open_flags[info.fh] = flags
        direct_io = self._direct_io(flags, op.path)
        if self.passthrough is not None:
            backing_fd = self._passthrough_fd(info.fh, ino, op.path)
            mode = self.passthrough.opened(info.fh, ino, op.path, direct_io, backing_fd)
            direct_io = mode is IoMode.DIRECT
        info.direct_io = direct_io
        writable = opened_for_writing(flags)
        if (self.noflush_opens and not self.stack.acts_on_flush_at(op.path, writable)
                and not self.backend.flush_needed(info.fh)):
            self._flushless[info.fh] = (op.path, writable)
        self.telemetry.bind_session(info.fh, op.session)

    def flushless(self, fh: int) -> bool:
        """Whether file ``fh`` just opened is answered with FOPEN_NOFLUSH (for ``_extra_ops``).

        Yes when opens are answered by ``_extra_ops`` (``noflush_opens``), no layer
        in force acts on ``flush`` at its path, and the backend's flush of it does
        nothing (``Backend.flush_needed``). Its ``close(2)`` then sends no FLUSH:
        one round trip fewer per file opened (docs/benchmarks.md, "Closes without FLUSH").
        """
        return fh in self._flushless

    def _passthrough_fd(self, fh: int, ino: int, path: str) -> int | None:
        """The backing fd of file ``fh`` (inode ``ino``) just opened at ``path``, if the kernel may serve its reads and writes itself.

        Only while kernel passthrough is on (``--kernel-passthrough``), no layer acts
        on reads or writes of ``path`` (it would never see them), the backend has a
        backing file, and the file is not a set-ID file opened for writing by a
        non-root caller: the kernel writes a passthrough file as the worker, so
        with FUSE_HANDLE_KILLPRIV_V2 nobody would clear its set-ID bits.
        """
        assert self.passthrough is not None
        if not self.passthrough.enabled or self.stack.acts_on_data_at(path):
            return None
        if fh in self._setid_writers and ino in self._setid_inodes:
            return None
        backing_fd = getattr(self.backend, "backing_fd", None)
        if backing_fd is None:
            return None
        return backing_fd(fh)

    def _direct_io(self, flags: int, path: str) -> bool:
        """Whether a file opened with ``flags`` at ``path`` bypasses the page cache (FOPEN_DIRECT_IO).

        Yes when a layer of the current policy can act on its reads, or shorten its
        writes (``Stack.needs_direct_io``: a cached read would hide the fault or
        delay, and only FOPEN_DIRECT_IO hands a short count to the application);
        for O_DIRECT opens, which bypass the cache anyway: FOPEN_DIRECT_IO takes
        the kernel's plain direct path instead of its O_DIRECT emulation, so the cost
        of a file does not depend on whether a layer happens to be active; and for
        write-only opens (``cp``, ``dd``, loggers, checkpoint writers). Such a file
        descriptor can neither read nor be mapped, so the cache would only hold a
        second copy of data the backing file's page cache holds anyway, and filling
        it costs a copy per byte, plus a GETXATTR round trip per write (the kernel's
        check for ``security.capability`` before it clears set-ID bits, which it
        makes only for cached writes). Measured (docs/benchmarks.md, "Write-only
        opens"): ``dd`` 1 MiB writes 2.9×, appends 2.3-2.5× as fast. The kernel
        drops the written range from the page cache before a direct write (tested on
        6.18), so other file descriptors' cached reads and shared maps see the data.
        """
        return (bool(flags & os.O_DIRECT) or (flags & os.O_ACCMODE) == os.O_WRONLY
                or self.stack.needs_direct_io(path))

    async def read(self, fh, off, size):
        backend = self.backend
        ino = backend.ino_of_fh(fh)
        telemetry = self.telemetry
        op = Op("read", ino, backend.path_of(ino), offset=off, size=size, session=telemetry.session_of(fh),
                open_flags=self._open_flags.get(fh, 0), sequential=telemetry.continues(ino, off, size))
        return await self._serve(op, lambda: backend.read(fh, off, size))

    async def write(self, fh, off, buf):
        backend = self.backend
        ino = backend.ino_of_fh(fh)
        telemetry = self.telemetry
        op = Op("write", ino, backend.path_of(ino), offset=off, size=len(buf), session=telemetry.session_of(fh),
                open_flags=self._open_flags.get(fh, 0), sequential=telemetry.continues(ino, off, len(buf)))
        writer = self._setid_writers.get(fh) if ino in self._setid_inodes else None

        async def write() -> int:
            if writer is not None:
                await self._clear_setid_bits(ino, writer)
            # A short-write fault sets op.short_size: only that many bytes reach the backend.
            return await backend.write(fh, off, buf if op.short_size < 0 else buf[: op.short_size])

        return await self._serve(op, write)

    async def _clear_setid_bits(self, ino: int, writer: pyfuse3.RequestContext | Caller,
                                attrs: pyfuse3.EntryAttributes | None = None) -> pyfuse3.EntryAttributes:
        """Clear the set-ID bits a write or truncation by ``writer`` clears (``_setid``); return the attributes after.

        The kernel leaves this to the worker for direct I/O, and for every write
        and truncation with FUSE_HANDLE_KILLPRIV_V2. ``attrs``: the inode's
        current attributes, if the caller has them.
        """
        if attrs is None:
            attrs = await self.backend.getattr(ino, writer)
        bits = setid_bits_to_clear(attrs.st_mode, attrs.st_gid, writer.uid, writer.gid)
        if bits:
            attrs.st_mode &= ~bits
            attrs = await self.backend.setattr(ino, attrs, _MODE_ONLY, None, writer)
        if not attrs.st_mode & _SETID:
            self._setid_inodes.discard(ino)
        return attrs

    async def flush(self, fh):
        ino = self.backend.ino_of_fh(fh)
        op = self._op("flush", ino, None, session=self.telemetry.session_of(fh),
                      open_flags=self._open_flags.get(fh, 0))
        return await self._serve(op, lambda: self.backend.flush(fh))

    async def release(self, fh):
        ino = self.backend.ino_of_fh(fh)
        # release cannot fail towards the application (close already returned), so it
        # bypasses the layers: a fault here would only leak the backing fd.
        op = self._op("release", ino, None, session=self.telemetry.end_session(fh))
        self._setid_writers.pop(fh, None)
        self._flushless.pop(fh, None)
        self._open_flags.pop(fh, None)
        # close(2) has returned already: an error here is logged, and must neither
        # stop the worker nor keep the backend from closing its fd.
        try:
            self.stack.released(op.session, ino)
        except Exception:
            log.exception("internal error telling the layers %s was released", op.path)
        if self.passthrough is not None:
            try:
                self.passthrough.released(fh)
            except Exception:
                log.exception("internal error releasing %s from kernel passthrough", op.path)
        start_wall_ns, start_ns = time.time_ns(), time.perf_counter_ns()
        err = 0
        try:
            await self.backend.release(fh)
        except Exception:
            log.exception("internal error releasing %s", op.path)
            err = errno.EIO
        self.telemetry.record(op, err, 0, start_wall_ns, time.perf_counter_ns() - start_ns)

    async def fsync(self, fh, datasync):
        ino = self.backend.ino_of_fh(fh)
        op = self._op("fsync", ino, None, session=self.telemetry.session_of(fh),
                      open_flags=self._open_flags.get(fh, 0))
        return await self._serve(op, lambda: self.backend.fsync(fh, datasync))

    # ---- ops pyfuse3 does not dispatch: called by ``_extra_ops`` ------------------------

    async def fallocate(self, fh: int, mode: int, offset: int, length: int, caller: Caller) -> None:
        """``fallocate(2)`` on open file ``fh``: ``mode`` is ``FALLOC_FL_*``, ``offset``/``length`` in bytes.

        Raises:
            pyfuse3.FUSEError: the backend's errno (EOPNOTSUPP for a mode it lacks,
                ENOSPC), or a layer's.
        """
        op = self._op("fallocate", self.backend.ino_of_fh(fh), caller, offset=offset, size=length, mode=mode,
                      session=self.telemetry.session_of(fh))
        await self._serve(op, lambda: self.backend.fallocate(fh, mode, offset, length))

    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int, flags: int,
                              caller: Caller) -> int:
        """Copy up to ``length`` bytes from ``fh_in`` at ``off_in`` to ``fh_out`` at ``off_out`` in the backend.

        The op is the destination's (path, offset, size). While a layer acts on reads
        of the source's path or writes of the destination's, the copy is declined with
        EOPNOTSUPP, which makes the kernel copy through read and write requests
        (``vfs_copy_file_range``'s splice fallback), so that layer sees, delays,
        throttles, fails and counts every byte as it would without copy offload. A
        declined copy is not recorded: the application never sees it.

        Returns:
            bytes copied (0 at the source's end of file).

        Raises:
            pyfuse3.FUSEError: EOPNOTSUPP (declined), the backend's errno, or a layer's.
        """
        op = self._op("copy_file_range", self.backend.ino_of_fh(fh_out), caller, offset=off_out, size=length,
                      mode=flags, session=self.telemetry.session_of(fh_out),
                      target=self.backend.path_of(self.backend.ino_of_fh(fh_in)))
        stack = self.stack
        if stack.acts_on_data and (stack.acts_on_data_at(op.path) or stack.acts_on_data_at(op.target)):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        return await self._serve(
            op, lambda: self.backend.copy_file_range(fh_in, off_in, fh_out, off_out, length, flags))

    async def lseek(self, fh: int, offset: int, whence: int, caller: Caller) -> int:
        """``lseek(2)`` with ``SEEK_DATA`` or ``SEEK_HOLE`` (the kernel answers the others itself).

        Returns:
            the offset found, bytes.

        Raises:
            pyfuse3.FUSEError: ENXIO past the end of file, or the backend's errno.
        """
        op = self._op("lseek", self.backend.ino_of_fh(fh), caller, offset=offset, mode=whence,
                      session=self.telemetry.session_of(fh))
        return await self._serve(op, lambda: self.backend.lseek(fh, offset, whence))

    # ---- directories ---------------------------------------------------------------

    async def opendir(self, inode, ctx):
        op = self._op("opendir", inode, ctx)
        fh = await self._serve(op, lambda: self.backend.opendir(inode, ctx))
        if op.dir_order is not None:
            # A metadata layer's readdir_order: fixed once per handle, before any readdir.
            self.backend.order_dir(fh, op.dir_order)
        return fh

    async def readdir(self, fh, start_id, token):
        ino = self.backend.ino_of_fh(fh)
        op = self._op("readdir", ino, None, offset=start_id)
        return await self._serve(op, lambda: self.backend.readdir(fh, start_id, token))

    async def releasedir(self, fh):
        ino = self.backend.ino_of_fh(fh)
        return await self._serve(self._op("releasedir", ino, None), lambda: self.backend.releasedir(fh))

    async def fsyncdir(self, fh, datasync):
        ino = self.backend.ino_of_fh(fh)
        return await self._serve(self._op("fsyncdir", ino, None), lambda: self.backend.fsyncdir(fh, datasync))

    async def statfs(self, ctx):
        return await self._serve(self._op("statfs", pyfuse3.ROOT_INODE, ctx), lambda: self.backend.statfs(ctx))

    # ---- extended attributes ---------------------------------------------------------

    async def getxattr(self, inode, name, ctx):
        return await self._serve(self._op("getxattr", inode, ctx), lambda: self.backend.getxattr(inode, name, ctx))

    async def setxattr(self, inode, name, value, ctx):
        op = self._op("setxattr", inode, ctx)
        return await self._serve(op, lambda: self.backend.setxattr(inode, name, value, ctx))

    async def listxattr(self, inode, ctx):
        return await self._serve(self._op("listxattr", inode, ctx), lambda: self.backend.listxattr(inode, ctx))

    async def removexattr(self, inode, name, ctx):
        op = self._op("removexattr", inode, ctx)
        return await self._serve(op, lambda: self.backend.removexattr(inode, name, ctx))


for _name in PYFUSE3_HANDLERS:
    setattr(InterposerOperations, _name, _answering_eio_on_internal_errors(getattr(InterposerOperations, _name)))
