"""Staged-writes layer: an object-store client downloads an object whole before using it, and uploads it whole.

Cloud Storage FUSE (gcsfuse, docs/semantics.md, "Staged Writes" — the path of every
modification of an existing object, streaming writes being for new files only),
s3fs-fuse and blobfuse2 keep no partial objects: the first write or truncation of an
existing object fetches all of it into a local file, which serves every read and write
of the file until the close or fsync after it writes the whole file back as a new
object ("writes the contents of the local file back ... and deletes temp-file"). A 4
KiB append to a 1 GiB log costs a 1 GiB download and, but for gcsfuse's exception, a 1
GiB upload. gcsfuse's one exception: an object of at least 2 MiB changed only by
appends is still downloaded, but only what was appended goes up (a temporary object
composed onto it: gcsx's appendObjectCreator). Each transfer takes requests one after
the other before its bytes: gcsfuse 3 stats the object before the download (when it
checks whether the file could be streamed) and before the upload
(``download_requests``, ``upload_requests``, ``append_upload_requests``). gcsfuse 3
streams a new file (or an empty object opened for writing) written in order instead,
until a write out of order, a read, a truncation below its size or a rename makes it
finalize what it streamed and stage the file ("Streaming Writes"); it streams as many
files at once as it has blocks (``write-global-max-blocks``, ``max_streamed_files``) and
stages the others.
blobfuse2's caching mode downloads each object at its open, for readers too, keeps the
local copy for a while after the last close, stages new files from the start, sends
nothing at fsync, and moves a blob in 4 MiB blocks, 32 at a time (``download_on_open``,
``keep_local_s``, ``new_files``, ``upload_at_fsync``, ``transfer_block_bytes``).

Per file (by inode) the layer keeps the object's size as of the last open
(``Op.file_size``, read by the adapter only while such a layer is in force), whether a
local copy exists and until when it is kept, the handles open, and the lowest offset
changed since the last upload (gcsfuse's "dirty threshold"). A download is charged to
the op that needs it (the open, or the first change); requests arriving meanwhile wait
for it. Reads of a file with a local copy, and writes of a staged file, are marked
``Op.charged_by_client``: the throttle and delay layers after this one stand for the
remote store and pass them unheld. An upload is charged to the next ``flush`` of a
descriptor opened for writing, or ``fsync`` (not with ``upload_at_fsync`` false, as
blobfuse2, whose fsync sends nothing): its requests plus the whole file (or what was
appended, for gcsfuse's exception); that close is marked too. A new file being
streamed is only watched: its writes, in order, and the close that finalizes it are
charged by the layers after this one; the write, read, truncation or rename that ends
the stream is held for the finalizing request here (and the first change after it for
the download), and marked like the rest from then on. Transfers share one link (a
token bucket at the layer's rate, no burst), so transfers that overlap queue for it in
order.
"""

from __future__ import annotations

import heapq
import os
import random
import sys
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
from .throttle import TokenBucket


class StagedWritesStatistics(msgspec.Struct, frozen=True):
    """Counters of a staged_writes layer: downloads and uploads charged, their bytes, and the time held, seconds."""

    downloads: int
    downloaded_bytes: int
    uploads: int
    uploaded_bytes: int
    held_s_total: float


#: Most blocks of one upload (Azure Blob Storage: a block blob has at most 50,000 committed blocks, "Put Block
#: List"); a larger file takes larger blocks.
_MOST_BLOCKS = 50_000
#: Most blocks of one transfer simulated one by one (4,096 of 4 MiB: 16 GiB; ~10 ms of the worker's CPU).
_MOST_SIMULATED_BLOCKS = 4096

def _no_latency() -> float:
    return 0.0


#: ``_Object.changed_from`` of an object not changed since its last upload.
_UNCHANGED = sys.maxsize


class _Object:
    """What the client holds of one file: the object's size, a local copy or not, what changed since the upload."""

    __slots__ = ("object_size", "size", "local", "local_until_s", "handles", "changed_from", "dirty", "stored",
                 "ready_s", "streamed_to", "extended_to", "finalized", "synced")

    def __init__(self, object_size: int, local: bool = False) -> None:
        self.object_size = object_size  # bytes, as stored (the last open, or upload)
        self.size = object_size  # bytes, with the writes and truncations since
        self.local = local  # a local copy exists (downloaded, or made here)
        self.local_until_s = 0.0  # with no handle open, the local copy is kept until then, trio's clock
        self.handles = 0  # open through this layer and not released
        self.changed_from = _UNCHANGED  # lowest offset written or truncated to since the last upload, bytes
        self.dirty = False  # changed since the last upload
        self.stored = True  # the object exists in the store (a staged new file: not until its first upload)
        self.ready_s = 0.0  # when the download in progress ends, trio's clock
        self.streamed_to = -1  # a new file being streamed: where its next write must start, bytes; -1: not streamed
        self.extended_to = -1  # a streamed file extended by a truncation: the size, where a write may also start
        self.finalized = False  # its stream was finalized before its close (the close has nothing to send)
        self.synced = False  # fsync'd without an upload (``upload_at_fsync`` False): the last close drops the copy

    def has_local(self, now_s: float) -> bool:
        return self.local and (self.handles > 0 or now_s <= self.local_until_s)


class StagedWrites:
    """Runtime of a :class:`~interposer.proto.StagedWritesLayer` (see the module docstring).

    Args:
        spec: the validated layer from the policy.
        rng: shared random source, used unless the layer has its own ``seed``.
    """

    acts = True

    def __init__(self, spec: StagedWritesLayer, rng: random.Random | None = None) -> None:
        self.spec = spec
        self._match = compile_glob(spec.path_glob)
        rng = random.Random(spec.seed) if spec.seed is not None else (rng or random.Random())
        #: One request's latency, seconds (0 without a ``distribution``).
        self._draw = sampler(spec.distribution, rng, MAX_DELAY_S) if spec.distribution is not None else _no_latency
        self._link = TokenBucket(spec.rate_bytes_per_s, burst_bytes=1)  # no burst: each transfer takes its time
        self._objects: FileStreams[_Object] = FileStreams()
        self._streams: dict[int, str] = {}  # new files being streamed: inode → path (a rename finalizes them)
        self._downloads = self._downloaded_bytes = self._uploads = self._uploaded_bytes = 0
        self._held_s_total = 0.0

    def bind(self, inner: Handler) -> Handler:
        """Return a handler that applies this layer, then calls ``inner``."""
        match = self._match

        async def staged_writes(op: Op, call: BackendCall) -> Any:
            if match is not None and not match(op.path):
                return await inner(op, call)
            if op.name == "open":
                result = await inner(op, call)
                await self._opened(op)
                return result
            if op.name == "create":
                result = await inner(op, call)
                self._created(result[1].st_ino, op.path)
                return result
            if op.name == "rename":
                await self._renaming(op)
                return await inner(op, call)
            state = self._objects.take(op.ino)
            if state is None:
                return await inner(op, call)
            self._objects.put(op.ino, state)  # still there for requests arriving while this one waits
            if op.name == "read":
                if state.streamed_to >= 0:
                    await self._finalize(op, op.ino, state)  # a read of a file being streamed finalizes it
                elif state.has_local(trio.current_time()):
                    await self._download_done(op, state)
                    op.charged_by_client = True
                return await inner(op, call)
            if op.name == "write":
                if state.streamed_to >= 0 and op.offset in (state.streamed_to, state.extended_to):
                    # in order (by arrival: requests in flight together count), or at the size a truncation
                    # extended it to (gcsfuse fills the gap with zeros and streams on)
                    state.streamed_to = op.offset + op.size
                    if state.streamed_to >= state.extended_to:
                        state.extended_to = -1
                    result = await inner(op, call)  # streamed: the layers after this one charge it
                    state.size = max(state.size, op.offset + transferred_bytes(result, op.size))
                    return result
                if state.streamed_to >= 0:
                    await self._finalize(op, op.ino, state)  # out of order: what was streamed is an object now
                await self._before_write(op, state)
                op.charged_by_client = True  # into the local copy: sent at the upload
                result = await inner(op, call)
                state.size = max(state.size, op.offset + transferred_bytes(result, op.size))
                state.changed_from, state.dirty = min(state.changed_from, op.offset), True
                return result
            if op.name == "setattr":
                if op.mode & FATTR_SIZE and state.streamed_to >= 0 and op.size > state.size:
                    state.size = state.extended_to = op.size  # extending a file being streamed: still streamed
                elif op.mode & FATTR_SIZE and op.size != state.size:
                    if state.streamed_to >= 0:
                        await self._finalize(op, op.ino, state)  # truncating a file being streamed finalizes it
                    await self._truncate(op, state, op.size)
                return await inner(op, call)
            if not (op.name == "fsync" or opened_for_writing(op.open_flags)):
                return await inner(op, call)  # the close of a reader sends nothing
            if state.streamed_to >= 0:  # fsync does not finalize a stream; the close does, charged after this layer
                if op.name == "flush":
                    self._end_stream(op.ino, state)
                    state.object_size, state.stored = state.size, True
                return await inner(op, call)
            if op.name == "fsync" and not self.spec.upload_at_fsync:
                state.synced, op.charged_by_client = True, True  # blobfuse2 only marks the handle
                return await inner(op, call)
            # flush of a descriptor that could write, or fsync: the upload, or nothing left to send
            if state.dirty or state.finalized:
                if state.dirty:
                    await self._upload(op, state)
                op.charged_by_client, state.finalized = True, False
            return await inner(op, call)

        return staged_writes

    async def _opened(self, op: Op) -> None:
        """Note the object's size at an open; with ``download_on_open``, download it unless a local copy is kept.
        An ``O_TRUNC`` open truncates: with ``download_on_open`` the emptied file needs nothing of the object; else
        (gcsfuse, whose truncation comes as a setattr after the open) the object is downloaded first."""
        if op.file_size < 0:
            return  # the adapter did not read it (the policy arrived during the open)
        now_s = trio.current_time()
        writable = opened_for_writing(op.open_flags)
        truncating = writable and bool(op.open_flags & os.O_TRUNC)
        state = self._objects.take(op.ino)
        handles = state.handles if state is not None else 0  # open before this one
        if self.spec.download_on_open:
            if state is None or not state.has_local(now_s):
                state = _Object(op.file_size, local=op.file_size == 0 or truncating)
            state.handles = handles + 1
            self._objects.put(op.ino, state)
            if truncating:
                state.size, state.dirty, state.changed_from = 0, True, 0  # the emptied file goes up at the close
            if not state.local:
                await self._download(op, state)
            else:
                await self._download_done(op, state)
            return
        if state is not None and (state.dirty or state.streamed_to >= 0 or state.has_local(now_s) or not writable):
            state.handles += 1  # what is held stays (a stream too); a reader changes nothing
        elif writable and op.file_size > 0:
            state = _Object(op.file_size)
            state.handles = handles + 1
        elif writable and self.spec.new_files == "streamed":
            # an empty object: nothing to download, and gcsfuse streams it as a new file (areBufferedWritesSupported)
            self._created(op.ino, op.path, stored=True, handles=handles)
            return
        else:
            return
        self._objects.put(op.ino, state)
        if truncating and state.size > 0:
            await self._truncate(op, state, 0)

    def _created(self, ino: int, path: str, stored: bool = False, handles: int = 0) -> None:
        """A new file (or an empty object, ``stored``, opened for writing with ``handles`` others open): nothing to
        download; streamed as written while fewer than ``max_streamed_files`` are, or staged and uploaded whole at
        its close."""
        limit = self.spec.max_streamed_files
        streamed = self.spec.new_files == "streamed" and (limit is None or len(self._streams) < limit)
        state = _Object(0, local=not streamed)
        state.stored = stored
        if streamed:
            state.streamed_to = 0
            self._streams[ino] = path
        state.handles = handles + 1
        self._objects.put(ino, state)

    async def _renaming(self, op: Op) -> None:
        """A rename of a file being streamed finalizes it first (gcsfuse: "Rename Operation Syncs the File")."""
        ino = next((ino for ino, path in self._streams.items() if path == op.path), None)
        state = self._objects.take(ino) if ino is not None else None
        if state is None:
            self._streams.pop(ino, None)  # let go of (or never seen): nothing to finalize here
            return
        self._objects.put(ino, state)
        await self._finalize(op, ino, state)

    def _end_stream(self, ino: int, state: _Object) -> None:
        """The file no longer streams: its block is free for another new file."""
        state.streamed_to = -1
        self._streams.pop(ino, None)

    async def _finalize(self, op: Op, ino: int, state: _Object) -> None:
        """End the stream of new file ``ino`` (gcsfuse finalizes the object: one request, held by ``op``); it is then
        an existing object, not staged: the next change downloads it, and its close has nothing to send unless it
        changed."""
        self._end_stream(ino, state)
        state.object_size, state.finalized, state.local, state.stored = state.size, True, False, True
        await self._hold(op, self._transfer_s(0))

    def released(self, session: int, ino: int) -> None:
        """A handle of ``ino`` was released: the last one starts the local copy's ``keep_local_s``."""
        state = self._objects.take(ino)
        if state is None:
            self._streams.pop(ino, None)
            return
        self._objects.put(ino, state)
        state.handles = max(0, state.handles - 1)
        if state.handles == 0:
            state.local_until_s = trio.current_time() + self.spec.keep_local_s
            if state.synced:  # blobfuse2 purges the local copy of a file fsync'd through the handle closed
                state.local, state.synced = False, False
            if state.streamed_to >= 0:
                self._end_stream(ino, state)  # closed without a flush: gcsfuse frees the block with the last handle

    async def _before_write(self, op: Op, state: _Object) -> None:
        """Wait for the local copy a write needs (appends too: gcsfuse's temporary file starts as the object)."""
        if not state.local:
            await self._download(op, state)
        else:
            await self._download_done(op, state)

    async def _download_done(self, op: Op, state: _Object) -> None:
        """Wait for a download another request started to end."""
        remaining_s = state.ready_s - trio.current_time()
        if remaining_s > 0.0:
            await self._hold(op, remaining_s)

    async def _truncate(self, op: Op, state: _Object, size: int) -> None:
        """Truncate the file to ``size`` bytes: in its local copy, made first (gcsfuse downloads the object even
        for a truncation to 0: ``truncateUsingTempFile`` → ``ensureContent``)."""
        await self._before_write(op, state)
        state.size, state.dirty = size, True
        state.changed_from = min(state.changed_from, size)

    async def _download(self, op: Op, state: _Object) -> None:
        state.local = True
        seconds = self._transfer_s(state.object_size, self.spec.download_requests, in_blocks=True)
        state.ready_s = trio.current_time() + seconds
        self._downloads += 1
        self._downloaded_bytes += state.object_size
        await self._hold(op, seconds)

    async def _upload(self, op: Op, state: _Object) -> None:
        """Charge the upload: its requests, then the whole file, or only what was appended to an object of at least
        ``append_upload_min_bytes`` changed nowhere else (gcsx's syncer: the dirty threshold at or past the stored
        size); the object is then as stored, and its local copy kept ``keep_local_s``."""
        minimum = self.spec.append_upload_min_bytes
        appended = (minimum is not None and state.stored and state.object_size >= minimum
                    and state.changed_from >= state.object_size and state.size > state.object_size)
        if appended:
            sent, requests = state.size - state.object_size, self.spec.append_upload_requests
        else:
            sent, requests = state.size, self.spec.upload_requests if state.stored else 1
        single_max = self.spec.single_upload_max_bytes
        self._uploads += 1
        self._uploaded_bytes += sent
        in_blocks = single_max is not None and sent > single_max
        await self._hold(op, self._transfer_s(sent, requests, in_blocks=in_blocks, commit=in_blocks))
        state.object_size, state.changed_from, state.dirty, state.stored = state.size, _UNCHANGED, False, True
        state.local = self.spec.keep_local_s > 0 and state.local
        state.local_until_s = trio.current_time() + self.spec.keep_local_s

    def _transfer_s(self, size: int, requests: int = 1, in_blocks: bool = False, commit: bool = False) -> float:
        """Seconds to move ``size`` bytes from now: ``requests`` requests one after the other (one draw each), then
        the bytes on the shared link. ``in_blocks`` (with ``transfer_block_bytes``): the last of those requests is a
        transfer in blocks instead (:meth:`_blocks_s`), ``commit``-ted by one more request if an upload."""
        in_blocks = in_blocks and self.spec.transfer_block_bytes is not None
        request_s = sum(self._draw() for _ in range(requests - 1 if in_blocks else requests))
        start_s = trio.current_time() + request_s
        if not in_blocks:
            return request_s + self._link.reserve(size, start_s)
        return request_s + self._blocks_s(size, start_s, commit)

    def _blocks_s(self, size: int, start_s: float, commit: bool) -> float:
        """Seconds from ``start_s`` (trio's clock) to move ``size`` bytes in blocks of ``transfer_block_bytes``,
        ``transfer_parallelism`` in flight: each free worker takes the next block, waits for its request (one
        draw), then for its bytes on the shared link; an upload (``commit``) takes blocks large enough to be at
        most 50,000 and ends with one more request (Azure Put Block List). The Azure SDK's transfers
        (``DoBatchTransfer``) work so. Past :data:`_MOST_SIMULATED_BLOCKS` blocks the rest of the bytes follow at
        the link's rate (the loop runs on the worker's event loop; a transfer that large is bound by the link)."""
        spec = self.spec
        assert spec.transfer_block_bytes is not None
        block = max(spec.transfer_block_bytes, -(-size // _MOST_BLOCKS)) if commit else spec.transfer_block_bytes
        count = max(1, -(-size // block))
        simulated = min(count, _MOST_SIMULATED_BLOCKS)
        free_s = [start_s] * min(simulated, spec.transfer_parallelism)  # when each worker takes its next block
        end_s = start_s
        for index in range(simulated):
            asked_s = heapq.heappop(free_s) + self._draw()
            done_s = asked_s + self._link.reserve(min(block, size - index * block), asked_s)
            heapq.heappush(free_s, done_s)
            end_s = max(end_s, done_s)
        if simulated < count:
            end_s += self._link.reserve(size - simulated * block, end_s)
        return end_s - start_s + (self._draw() if commit else 0.0)

    async def _hold(self, op: Op, seconds: float) -> None:
        if seconds <= 0.0:
            return
        self._held_s_total += seconds
        op.delay_ns += int(seconds * 1e9)
        op.delay_late_ns += await sleep(seconds, compensate=True)

    def statistics(self) -> StagedWritesStatistics:
        """Snapshot of this layer's counters."""
        return StagedWritesStatistics(self._downloads, self._downloaded_bytes, self._uploads,
                                      self._uploaded_bytes, self._held_s_total)

