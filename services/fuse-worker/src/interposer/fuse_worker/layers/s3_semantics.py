"""S3 semantics layer: refuse what Mountpoint for Amazon S3 refuses, with the errno it gives.

Mountpoint for Amazon S3 (github.com/awslabs/mountpoint-s3; behaviour from
doc/SEMANTICS.md, errnos from ``mountpoint-s3-fs/src/fs.rs`` and
``fs/error.rs``) writes a file once, front to back, as one upload that
completes when the file is closed or synced; what does not fit that model fails
early. The rules kept here, each with Mountpoint's errno:

* ``open`` with ``O_SYNC``/``O_DSYNC``: EINVAL.
* Writing: a file is written through one handle, from offset 0 on, each write
  where the last one ended (EINVAL otherwise: ``OutOfOrderWrite``); writes after
  an ``fsync`` (which completes the upload): EIO. A new file (``create``,
  ``mknod``) may be written; an uploaded one only with ``allow_overwrite`` and
  ``O_TRUNC`` (EPERM otherwise: ``InodeNotWritable``). ``O_RDWR`` on an uploaded
  file without both gives a read-only handle: its writes fail with EBADF.
* While a file is being written it cannot be opened again (EPERM:
  ``InodeAlreadyWriting``, ``InodeNotReadableWhileWriting``), unlinked (EPERM)
  or renamed; while it is open for reading it cannot be opened for writing
  (EPERM: ``InodeNotWritableWhileReading``).
* The upload completes at the first ``flush`` (``close(2)``) after bytes were
  written, at ``fsync``, or when the last handle is released; the file is then
  an ordinary uploaded object.
* ``unlink``: EPERM unless ``allow_delete``. ``rmdir``: EPERM for a directory
  that exists in the bucket (any directory but one made through this mount
  that nothing was uploaded into). ``setattr`` (``chmod``, ``chown``,
  ``truncate``, ``utimes``) of an uploaded file or a directory of the
  bucket: EPERM.
* ``rename``: ENOSYS (general purpose buckets); with flags (``renameat2``),
  EINVAL, which is what the kernel makes of Mountpoint's ENOSYS to RENAME2.
* ``link``, ``symlink``: ENOSYS (for ``link`` the kernel gives the application
  EPERM, as POSIX asks of a file system without hard links); ``mknod`` of
  anything but a regular file: EINVAL.
* Setting or removing extended attributes, and ``fallocate``: EOPNOTSUPP, what
  the application sees after the kernel got ENOSYS once (it stops asking:
  ``no_setxattr`` and the like), without making the kernel stop asking this
  worker for good. Reading them is left alone: the kernel itself asks for
  ``security.capability`` before some writes, which no application did.

Not modelled: directory buckets' renames (S3 Express One Zone), incremental
uploads (appends), Mountpoint's caches, and whether a ``flush`` comes from the
process that opened the file (FUSE gives no caller for FLUSH here).
"""

from __future__ import annotations

import errno as _errno
import os
import stat
from typing import Any, NoReturn

import msgspec
import pyfuse3

from interposer.proto.policy import S3SemanticsLayer

from .._op import BackendCall, Handler, Op, transferred_bytes
from ._match import compile_glob

#: Open flags Mountpoint refuses: it cannot make data stable at ``write`` time (O_SYNC includes O_DSYNC).
_SYNC_FLAGS = os.O_DSYNC | os.O_SYNC


class S3SemanticsStatistics(msgspec.Struct, frozen=True):
    """Counters of an s3_semantics layer: ops refused, uploads completed (files written and closed or synced)."""

    refused: int
    uploads: int


class _Upload:
    """A file being written through one handle: where the next write must start, whether it was synced."""

    __slots__ = ("ino", "path", "next_offset", "synced")

    def __init__(self, ino: int, path: str) -> None:
        self.ino = ino
        self.path = path
        self.next_offset = 0
        self.synced = False


def _parents(path: str) -> list[str]:
    """The directories above ``path`` inside the volume, nearest first (``/`` excluded)."""
    parents = []
    head = path.rpartition("/")[0]
    while head:
        parents.append(head)
        head = head.rpartition("/")[0]
    return parents


class S3Semantics:
    """Runtime of a :class:`~interposer.proto.S3SemanticsLayer` (see the module docstring for the rules).

    State, per worker: handles opened under the layer (keyed by ``Op.session``;
    read or write), files being written, files and directories made through the
    mount and not uploaded yet. A handle opened before the layer came into force
    is unknown to it and left alone.

    Args:
        spec: the validated layer from the policy.
        index: index of the layer in the policy (for fault records).
    """

    acts = True

    def __init__(self, spec: S3SemanticsLayer, index: int = 0) -> None:
        self.spec = spec
        self.index = index
        self._match = compile_glob(spec.path_glob)
        #: session → its upload (a write handle), or None (a read handle).
        self._handles: dict[int, _Upload | None] = {}
        #: ino → the upload writing it; path → the same (unlink and rename ask by name).
        self._writing: dict[int, _Upload] = {}
        self._writing_at: dict[str, _Upload] = {}
        #: ino → read handles open on it.
        self._reading: dict[int, int] = {}
        #: Files made through the mount and not uploaded yet (ino), directories (path).
        self._local_files: set[int] = set()
        self._local_dirs: set[str] = set()
        self._refused = 0
        self._uploads = 0

    def _refuse(self, op: Op, name: str) -> NoReturn:
        self._refused += 1
        op.inject(self.index, "errno", name)
        raise pyfuse3.FUSEError(getattr(_errno, name))

    def bind(self, inner: Handler) -> Handler:
        """Return a handler that applies this layer, then calls ``inner``."""
        match = self._match

        async def s3_semantics(op: Op, call: BackendCall) -> Any:
            if match is not None and not match(op.path):
                return await inner(op, call)
            rule = self._RULES.get(op.name)
            return await inner(op, call) if rule is None else await rule(self, op, lambda: inner(op, call))

        return s3_semantics

    # ---- files ---------------------------------------------------------------------

    async def _open(self, op: Op, serve: BackendCall) -> Any:
        flags = op.open_flags
        if flags & _SYNC_FLAGS:
            self._refuse(op, "EINVAL")
        access = flags & os.O_ACCMODE
        local = op.ino in self._local_files
        truncating = self.spec.allow_overwrite and bool(flags & os.O_TRUNC)
        writes = access == os.O_WRONLY or (access == os.O_RDWR and (local or truncating))
        if op.ino in self._writing:
            self._refuse(op, "EPERM")  # already being written: neither a second writer nor a reader
        if writes and (not (local or truncating) or self._reading.get(op.ino)):
            self._refuse(op, "EPERM")  # an uploaded object, or one open for reading
        # Noted before the backend's open, so that a concurrent open sees this one.
        if writes:
            self._start_upload(op.session, op.ino, op.path)
        else:
            self._start_reading(op.session, op.ino)
        try:
            return await serve()
        except BaseException:
            self._drop_handle(op.session, op.ino)  # the open failed: no handle, no upload
            raise

    async def _create(self, op: Op, serve: BackendCall) -> Any:
        if op.open_flags & _SYNC_FLAGS:
            self._refuse(op, "EINVAL")
        result = await serve()
        ino = result[1].st_ino  # (FileInfo, EntryAttributes)
        self._local_files.add(ino)
        if op.open_flags & os.O_ACCMODE == os.O_RDONLY:
            self._start_reading(op.session, ino)
        else:
            self._start_upload(op.session, ino, op.path)
        return result

    async def _mknod(self, op: Op, serve: BackendCall) -> Any:
        if not stat.S_ISREG(op.mode):
            self._refuse(op, "EINVAL")  # only regular files
        attrs = await serve()
        self._local_files.add(attrs.st_ino)
        return attrs

    def _start_reading(self, session: int, ino: int) -> None:
        self._handles[session] = None
        self._reading[ino] = self._reading.get(ino, 0) + 1

    def _start_upload(self, session: int, ino: int, path: str) -> None:
        upload = _Upload(ino, path)
        self._handles[session] = upload
        self._writing[ino] = upload
        self._writing_at[path] = upload

    def _complete(self, upload: _Upload) -> None:
        """The upload is done: the file is an object in the bucket, and so are the directories above it."""
        if self._writing.get(upload.ino) is upload:
            del self._writing[upload.ino]
            self._writing_at.pop(upload.path, None)
            self._local_files.discard(upload.ino)
            self._local_dirs.difference_update(_parents(upload.path))
            self._uploads += 1

    async def _write(self, op: Op, serve: BackendCall) -> Any:
        if op.session not in self._handles:
            return await serve()  # opened before the layer came into force
        upload = self._handles[op.session]
        if upload is None:
            self._refuse(op, "EBADF")  # a read handle
        if upload.synced or self._writing.get(upload.ino) is not upload:
            self._refuse(op, "EIO")  # the upload was completed
        if op.offset != upload.next_offset:
            self._refuse(op, "EINVAL")  # out of order
        result = await serve()
        upload.next_offset += transferred_bytes(result, op.size)
        return result

    async def _flush(self, op: Op, serve: BackendCall) -> Any:
        upload = self._handles.get(op.session)
        if upload is not None and upload.next_offset:  # a close after writes (not dd's or touch's first close)
            self._complete(upload)
        return await serve()

    async def _fsync(self, op: Op, serve: BackendCall) -> Any:
        upload = self._handles.get(op.session)
        if upload is not None:
            upload.synced = True
            self._complete(upload)
        return await serve()

    def released(self, session: int, ino: int) -> None:
        """Handle ``session`` (of file ``ino``) was released: an upload still open completes."""
        if session not in self._handles:
            return
        upload = self._handles.pop(session)
        if upload is not None:
            self._complete(upload)
        else:
            self._stop_reading(ino)

    def _drop_handle(self, session: int, ino: int) -> None:
        """Forget a handle whose open failed (an upload it started never began)."""
        upload = self._handles.pop(session, None)
        if upload is None:
            self._stop_reading(ino)
        elif self._writing.get(upload.ino) is upload:
            del self._writing[upload.ino]
            self._writing_at.pop(upload.path, None)

    def _stop_reading(self, ino: int) -> None:
        if self._reading.get(ino, 0) > 1:
            self._reading[ino] -= 1
        else:
            self._reading.pop(ino, None)

    async def _setattr(self, op: Op, serve: BackendCall) -> Any:
        if op.ino not in self._local_files and op.path not in self._local_dirs:
            self._refuse(op, "EPERM")  # an uploaded object's (or the bucket's directory's) attributes cannot change
        return await serve()

    # ---- names ---------------------------------------------------------------------

    async def _unlink(self, op: Op, serve: BackendCall) -> Any:
        if not self.spec.allow_delete or op.path in self._writing_at:
            self._refuse(op, "EPERM")
        return await serve()

    async def _mkdir(self, op: Op, serve: BackendCall) -> Any:
        attrs = await serve()
        self._local_dirs.add(op.path)
        return attrs

    async def _rmdir(self, op: Op, serve: BackendCall) -> Any:
        if op.path not in self._local_dirs:
            self._refuse(op, "EPERM")  # a directory of the bucket
        result = await serve()
        self._local_dirs.discard(op.path)
        return result

    async def _rename(self, op: Op, serve: BackendCall) -> Any:
        self._refuse(op, "EINVAL" if op.mode else "ENOSYS")

    async def _unsupported(self, op: Op, serve: BackendCall) -> Any:
        self._refuse(op, "ENOSYS")

    async def _not_supported_by_fs(self, op: Op, serve: BackendCall) -> Any:
        self._refuse(op, "EOPNOTSUPP")

    _RULES = {
        "open": _open, "create": _create, "mknod": _mknod, "write": _write, "flush": _flush, "fsync": _fsync,
        "setattr": _setattr, "unlink": _unlink, "mkdir": _mkdir, "rmdir": _rmdir, "rename": _rename,
        "link": _unsupported, "symlink": _unsupported,
        "setxattr": _not_supported_by_fs, "removexattr": _not_supported_by_fs, "fallocate": _not_supported_by_fs,
    }

    def statistics(self) -> S3SemanticsStatistics:
        """Snapshot of this layer's counters."""
        return S3SemanticsStatistics(refused=self._refused, uploads=self._uploads)
