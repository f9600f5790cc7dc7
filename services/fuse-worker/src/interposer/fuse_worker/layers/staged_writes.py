"""Staged-writes layer: an object-store client downloads an object whole before changing it, and uploads it whole.

Cloud Storage FUSE (gcsfuse, docs/semantics.md, "Staged Writes" — the path of every
modification of an existing object, streaming writes being for new files only),
s3fs-fuse and blobfuse2 keep no partial objects: the first write or truncation of an
existing object fetches all of it into a local file, and the close or fsync after it
writes the whole file back as a new object. A 4 KiB append to a 1 GiB log costs two
1 GiB transfers. gcsfuse's one exception: appends to an object of at least 2 MiB
upload only what was appended (a compose) and download nothing.

Per file (by inode) the layer keeps the object's size as of the last open for writing
(``Op.file_size``, read by the adapter only while such a layer is in force), whether a
local copy exists, and the bytes written since the last upload. The download is
charged to the write (or truncation) that needs it; writes arriving while it runs wait
for it to end. The upload of the bytes the application did not write is charged to
the next ``flush`` of a descriptor opened for writing, or ``fsync``; the bytes it
wrote are charged as written by the throttle that meters the link, and the request
completing the upload by a ``write_behind`` delay (both in the ``gcs`` profile).
"""

from __future__ import annotations

import random
from typing import Any

import msgspec
import trio

from interposer.proto.events import FATTR_SIZE
from interposer.proto.policy import MAX_DELAY_S, StagedWritesLayer

from .._op import BackendCall, Handler, Op, opened_for_writing, transferred_bytes
from ._match import compile_glob
from ._streams import FileStreams
from ._timer import sleep
from .delay import sampler


class StagedWritesStatistics(msgspec.Struct, frozen=True):
    """Counters of a staged_writes layer: downloads and re-uploads charged, their bytes, and the time held, seconds."""

    downloads: int
    downloaded_bytes: int
    uploads: int
    reuploaded_bytes: int
    held_s_total: float


class _Object:
    """What the client holds of one file: the object's size, a local copy or not, what was written since the upload."""

    __slots__ = ("object_size", "size", "local", "appending", "written", "ready_s")

    def __init__(self, object_size: int) -> None:
        self.object_size = object_size  # bytes, as stored (the last open for writing, or upload)
        self.size = object_size  # bytes, with the writes and truncations since
        self.local = False  # downloaded: the upload rewrites the whole object
        self.appending = False  # changed only by appends past an object of append_upload_min_bytes
        self.written = 0  # bytes written since the last upload
        self.ready_s = 0.0  # when the download in progress ends, trio's clock

    @property
    def modified(self) -> bool:
        return self.local or self.appending or self.written > 0


class StagedWrites:
    """Runtime of a :class:`~interposer.proto.StagedWritesLayer` (see the module docstring).

    Args:
        spec: the validated layer from the policy.
        rng: shared random source, used unless the layer has its own ``seed``.
    """

    acts = True
    #: The adapter reads the size of each file opened for writing while this layer is in force.
    wants_file_size = True

    def __init__(self, spec: StagedWritesLayer, rng: random.Random | None = None) -> None:
        self.spec = spec
        self._match = compile_glob(spec.path_glob)
        rng = random.Random(spec.seed) if spec.seed is not None else (rng or random.Random())
        self._request = sampler(spec.distribution, rng, MAX_DELAY_S) if spec.distribution is not None else None
        self._objects: FileStreams[_Object] = FileStreams()
        self._downloads = self._downloaded_bytes = self._uploads = self._reuploaded_bytes = 0
        self._held_s_total = 0.0

    def bind(self, inner: Handler) -> Handler:
        """Return a handler that applies this layer, then calls ``inner``."""
        match = self._match

        async def staged_writes(op: Op, call: BackendCall) -> Any:
            if match is not None and not match(op.path):
                return await inner(op, call)
            if op.name == "open":
                result = await inner(op, call)
                self._opened(op)
                return result
            state = self._objects.take(op.ino)
            if state is None:
                return await inner(op, call)
            self._objects.put(op.ino, state)  # still there for requests arriving while this one waits
            if op.name == "write":
                await self._before_write(op, state)
                result = await inner(op, call)
                moved = transferred_bytes(result, op.size)
                state.written += moved
                state.size = max(state.size, op.offset + moved)
                return result
            if op.name == "setattr":
                if op.mode & FATTR_SIZE and op.size != state.size:
                    await self._before_truncate(op, state)
                    state.size = op.size
                return await inner(op, call)
            # flush of a descriptor that could write, or fsync: the upload
            if (op.name == "fsync" or opened_for_writing(op.open_flags)) and state.modified:
                await self._upload(op, state)
            return await inner(op, call)

        return staged_writes

    def _opened(self, op: Op) -> None:
        """Note the object's size at an open for writing (a modified file keeps what it has)."""
        if not opened_for_writing(op.open_flags) or op.file_size < 0:
            return
        state = self._objects.take(op.ino)
        if state is not None and state.modified:
            self._objects.put(op.ino, state)
        elif op.file_size > 0:  # an empty object has nothing to download
            self._objects.put(op.ino, _Object(op.file_size))

    async def _before_write(self, op: Op, state: _Object) -> None:
        """Wait for the local copy a write needs: none for appends past a large enough object."""
        if not state.local:
            minimum = self.spec.append_upload_min_bytes
            if minimum is not None and state.object_size >= minimum and op.offset >= state.object_size:
                state.appending = True
                return
            await self._download(op, state)
        elif state.ready_s > trio.current_time():  # another request started the download
            await self._hold(op, state.ready_s - trio.current_time())

    async def _before_truncate(self, op: Op, state: _Object) -> None:
        """A truncation to 0 needs nothing of the object; to any other size, all of it."""
        if op.size == 0:
            state.local, state.appending = True, False
        elif not state.local:
            await self._download(op, state)

    async def _download(self, op: Op, state: _Object) -> None:
        state.local, state.appending = True, False
        seconds = (self._request() if self._request is not None else 0.0) + state.object_size / self.spec.rate_bytes_per_s
        state.ready_s = trio.current_time() + seconds
        self._downloads += 1
        self._downloaded_bytes += state.object_size
        await self._hold(op, seconds)

    async def _upload(self, op: Op, state: _Object) -> None:
        """Charge the re-upload of what the application did not write; the object is then as stored."""
        if state.local:
            rest = max(0, state.size - state.written)
            self._uploads += 1
            self._reuploaded_bytes += rest
            await self._hold(op, rest / self.spec.rate_bytes_per_s)
        state.object_size, state.local, state.appending, state.written = state.size, False, False, 0

    async def _hold(self, op: Op, seconds: float) -> None:
        if seconds <= 0.0:
            return
        self._held_s_total += seconds
        op.delay_ns += int(seconds * 1e9)
        op.delay_late_ns += await sleep(seconds, compensate=True)

    def statistics(self) -> StagedWritesStatistics:
        """Snapshot of this layer's counters."""
        return StagedWritesStatistics(self._downloads, self._downloaded_bytes, self._uploads,
                                      self._reuploaded_bytes, self._held_s_total)
