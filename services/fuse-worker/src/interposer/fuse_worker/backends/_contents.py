"""A regular file's contents in the memory backend: sparse, in chunks.

A file is a dict of :data:`CHUNK_BYTES` chunks, each holding a prefix of its range
(what lies past a chunk's prefix, and every chunk not in the dict, is a hole that
reads as zeros and takes no memory). So a file written at 1 GiB and nowhere else
holds one short chunk, as on tmpfs, where a flat buffer would hold a gigabyte of
zeros before it and fail with ENOSPC on a smaller volume. Holes are exact at the end
of each chunk; a gap *inside* a chunk before data written further in is stored as
zeros (so at most one chunk's worth per write), where tmpfs tracks 4 KiB pages: the
chunk is sized so that a 1 MiB request (FUSE's largest) touches 16-17 chunks, not
256 pages, and the dict stays small.

Callers count memory: every method that stores or frees bytes returns how many.
"""

from __future__ import annotations

#: Bytes per chunk (64 KiB): the granularity of holes inside a file.
CHUNK_BYTES = 64 * 1024


class SparseContents:
    """Bytes of a regular file, offset → byte, unset bytes reading as zero.

    Offsets and sizes are bytes; the file's size is the caller's (reads past what
    is stored return zeros for as many bytes as asked).

    Attributes:
        stored: bytes held in memory (chunk prefixes, zeros written into gaps included).
    """

    __slots__ = ("_chunks", "stored")

    def __init__(self) -> None:
        self._chunks: dict[int, bytearray] = {}
        self.stored = 0

    def growth(self, start: int, end: int) -> int:
        """Bytes :meth:`write` or :meth:`hold` over ``start:end`` would store anew."""
        grow = 0
        for index, lo, hi in _spans(start, end):
            chunk = self._chunks.get(index)
            held = len(chunk) if chunk is not None else 0
            if hi > held:
                grow += hi - held
        return grow

    def fitting(self, start: int, length: int, room: int) -> int:
        """Longest prefix of a ``length``-byte write at ``start`` that stores at most ``room`` new bytes."""
        for index, lo, hi in _spans(start, start + length):
            chunk = self._chunks.get(index)
            held = len(chunk) if chunk is not None else 0
            grow = hi - held  # the gap between held and lo is stored too
            if grow > room:
                reach = max(held + room, lo)  # how far into the chunk the write may go
                return index * CHUNK_BYTES + reach - start
            if grow > 0:
                room -= grow
        return length

    def write(self, start: int, data: bytes | bytearray | memoryview) -> int:
        """Store ``data`` at ``start``; return the bytes stored anew (see :meth:`growth`)."""
        index, lo = divmod(start, CHUNK_BYTES)
        if lo + len(data) <= CHUNK_BYTES:  # the common case: within one chunk, no spans list
            grow = self._store(index, lo, data)
        else:
            grow, pos = 0, 0
            with memoryview(data) as view:
                for index, lo, hi in _spans(start, start + len(view)):
                    grow += self._store(index, lo, view[pos:pos + hi - lo])
                    pos += hi - lo
        self.stored += grow
        return grow

    def _store(self, index: int, lo: int, piece: bytes | bytearray | memoryview) -> int:
        """Put ``piece`` at ``lo`` in chunk ``index`` (zeros before it if the chunk ends short of ``lo``); return its growth."""
        chunk = self._chunks.get(index)
        if chunk is None:
            chunk = self._chunks[index] = bytearray()
        held = len(chunk)
        if lo > held:
            chunk.extend(bytes(lo - held))
        hi = lo + len(piece)
        chunk[lo:hi] = piece
        return hi - held if hi > held else 0

    def hold(self, start: int, end: int) -> int:
        """Store zeros in the holes of ``start:end`` (``fallocate``); return the bytes stored anew."""
        grow = 0
        chunks = self._chunks
        for index, _lo, hi in _spans(start, end):
            chunk = chunks.setdefault(index, bytearray())
            if hi > len(chunk):
                grow += hi - len(chunk)
                chunk.extend(bytes(hi - len(chunk)))
        self.stored += grow
        return grow

    def read(self, start: int, size: int) -> bytes:
        """``size`` bytes from ``start``, zeros where nothing is stored (one copy of the stored bytes)."""
        chunks = self._chunks
        index, lo = divmod(start, CHUNK_BYTES)
        if lo + size <= CHUNK_BYTES:  # the common case: within one chunk
            chunk = chunks.get(index)
            if chunk is None or lo >= len(chunk):
                return bytes(size)
            with memoryview(chunk) as view:
                piece = bytes(view[lo:lo + size])
            return piece if len(piece) == size else piece + bytes(size - len(piece))
        pieces: list[bytes | memoryview] = []
        views = []
        try:
            for index, lo, hi in _spans(start, start + size):
                chunk = chunks.get(index)
                held = min(len(chunk), hi) if chunk is not None else lo
                if held > lo:
                    view = memoryview(chunk)
                    views.append(view)
                    pieces.append(view[lo:held])
                if hi > max(held, lo):
                    pieces.append(bytes(hi - max(held, lo)))
            return b"".join(pieces)
        finally:
            for view in views:
                view.release()

    def truncate(self, size: int) -> int:
        """Drop everything from byte ``size`` on; return the bytes freed."""
        freed = 0
        last, within = divmod(size, CHUNK_BYTES)
        for index in [i for i in self._chunks if i >= last]:
            chunk = self._chunks[index]
            if index == last and within:
                if len(chunk) > within:
                    freed += len(chunk) - within
                    del chunk[within:]
            else:
                freed += len(chunk)
                del self._chunks[index]
        self.stored -= freed
        return freed

    def punch(self, start: int, end: int) -> int:
        """Make ``start:end`` a hole (reads as zeros); return the bytes freed.

        Whole chunks and chunk ends are freed; a hole inside a chunk's stored prefix
        is zeroed in place.
        """
        freed = 0
        chunks = self._chunks
        for index, lo, hi in _spans(start, end):
            chunk = chunks.get(index)
            if chunk is None or lo >= len(chunk):
                continue
            if hi >= len(chunk):
                freed += len(chunk) - lo
                if lo == 0:
                    del chunks[index]
                else:
                    del chunk[lo:]
            else:
                chunk[lo:hi] = bytes(hi - lo)
        self.stored -= freed
        return freed

    def next_data(self, offset: int) -> int | None:
        """First offset ≥ ``offset`` that holds stored bytes (``SEEK_DATA``); None if none does."""
        index, within = divmod(offset, CHUNK_BYTES)
        chunk = self._chunks.get(index)
        if chunk is not None and within < len(chunk):
            return offset
        later = [i for i, c in self._chunks.items() if i > index and c]
        return min(later) * CHUNK_BYTES if later else None

    def next_hole(self, offset: int) -> int:
        """First offset ≥ ``offset`` where nothing is stored (``SEEK_HOLE``; the caller caps it at the size)."""
        index, within = divmod(offset, CHUNK_BYTES)
        while True:
            chunk = self._chunks.get(index)
            held = len(chunk) if chunk is not None else 0
            if within >= held:
                return index * CHUNK_BYTES + within
            if held < CHUNK_BYTES:
                return index * CHUNK_BYTES + held
            index, within = index + 1, 0


def _spans(start: int, end: int) -> list[tuple[int, int, int]]:
    """``(chunk index, start, end within the chunk)`` of each chunk ``start:end`` touches, in order."""
    spans = []
    while start < end:
        index, lo = divmod(start, CHUNK_BYTES)
        hi = min(CHUNK_BYTES, lo + end - start)
        spans.append((index, lo, hi))
        start += hi - lo
    return spans
