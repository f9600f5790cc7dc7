"""Recording files: event batches as the collector received them, for offline analysis and replay.

A recording is a sequence of frames. Each frame is a 4-byte big-endian unsigned
length followed by that many bytes: one msgpack :class:`~interposer.proto.EventBatch`
exactly as a worker published it on ``interposer.events.<volume>`` (the collector
writes the message bytes it received; nothing is re-encoded, so a recording decodes
with whatever ``EventBatch`` the reader has, old or new fields alike)::

    ┌──────────┬──────────────────────┬──────────┬──────────────────────┬─ …
    │ len (4 B)│ EventBatch (len B)   │ len (4 B)│ EventBatch (len B)   │
    └──────────┴──────────────────────┴──────────┴──────────────────────┴─ …

There is no file header: an empty file is an empty recording. A collector killed
mid-write leaves a truncated last frame, which a reader takes as the end of the
file; anything else that does not decode is an error naming the file and offset.

Files are named ``events-<UTC start, %Y%m%dT%H%M%SZ>-<collector instance id>.msgpack``
(:func:`recording_name`), so sorting names sorts by start time and collector
replicas writing into one directory never collide.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterator
from typing import BinaryIO

import msgspec

from .events import EventBatch

#: Bytes of a frame's length prefix.
FRAME_HEADER_BYTES = 4
#: Largest frame a reader accepts, bytes: NATS's own ceiling for ``max_payload``
#: (64 MiB), so any message a server delivered fits. A larger length means the
#: file is not a recording (or the length is corrupt).
MAX_FRAME_BYTES = 64 * 1024 * 1024
#: ``strftime`` format of the start time in a recording's name (UTC).
NAME_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
#: What a collector instance id may contain (one file-name token).
INSTANCE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
#: A recording's file name: group 1 the UTC start time, group 2 the collector instance id.
RECORDING_NAME_PATTERN = re.compile(r"^events-(\d{8}T\d{6}Z)-([A-Za-z0-9._-]{1,128})\.msgpack$")


class RecordingError(ValueError):
    """A file is not a recording, or one of its frames is corrupt (the message names the file and byte offset)."""


def frame_header(size_bytes: int) -> bytes:
    """The 4-byte length prefix of a frame holding ``size_bytes`` bytes.

    Raises:
        ValueError: ``size_bytes`` is negative or above :data:`MAX_FRAME_BYTES`.
    """
    if not 0 <= size_bytes <= MAX_FRAME_BYTES:
        raise ValueError(f"a frame holds 0..{MAX_FRAME_BYTES} bytes, not {size_bytes}")
    return size_bytes.to_bytes(FRAME_HEADER_BYTES, "big")


def write_frame(out: BinaryIO, message: bytes) -> int:
    """Append one frame holding ``message`` (an ``EventBatch`` as received) to ``out``.

    Two writes, prefix then message, so a large message is not copied; with a
    buffered ``out`` both usually land in one ``write(2)``.

    Args:
        out: a binary file open for writing (appending).
        message: the msgpack bytes of one ``EventBatch``, unchanged.

    Returns:
        Bytes written: ``len(message) + 4``.

    Raises:
        ValueError: ``message`` is larger than :data:`MAX_FRAME_BYTES`.
        OSError: the write failed (``ENOSPC``, ``EIO``, …); part of the frame may
            have been written, which a reader takes as the end of the file.
    """
    out.write(frame_header(len(message)))
    out.write(message)
    return FRAME_HEADER_BYTES + len(message)


def recording_name(start: dt.datetime, instance_id: str) -> str:
    """File name of a recording started at ``start`` by collector ``instance_id``.

    Args:
        start: when the file was started; an aware datetime (converted to UTC).
        instance_id: the collector replica's id (:data:`INSTANCE_ID_PATTERN`).

    Returns:
        ``events-20261207T155219Z-<instance_id>.msgpack``.

    Raises:
        ValueError: ``start`` is naive, or ``instance_id`` does not match the pattern.
    """
    if start.tzinfo is None:
        raise ValueError("a recording's start time must be timezone-aware")
    if not INSTANCE_ID_PATTERN.fullmatch(instance_id):
        raise ValueError(f"collector instance id {instance_id!r} must match {INSTANCE_ID_PATTERN.pattern}")
    return f"events-{start.astimezone(dt.UTC).strftime(NAME_TIME_FORMAT)}-{instance_id}.msgpack"


def parse_recording_name(name: str) -> tuple[dt.datetime, str] | None:
    """``(UTC start, instance id)`` of a recording's file name, None for any other name."""
    match = RECORDING_NAME_PATTERN.fullmatch(name)
    if match is None:
        return None
    try:
        start = dt.datetime.strptime(match[1], NAME_TIME_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:  # digits that are no date (month 13)
        return None
    return start, match[2]


def read_frames(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """Yield ``(byte offset, message bytes)`` of each frame of a recording, streaming.

    A truncated last frame (a collector killed mid-write) ends the file quietly.

    Raises:
        OSError: the file cannot be opened or read.
        RecordingError: a frame's length is above :data:`MAX_FRAME_BYTES` (not a
            recording, or a corrupt length).
    """
    with open(path, "rb") as src:
        offset = 0
        while True:
            header = src.read(FRAME_HEADER_BYTES)
            if len(header) < FRAME_HEADER_BYTES:
                return
            size = int.from_bytes(header, "big")
            if size > MAX_FRAME_BYTES:
                what = "not a recording" if offset == 0 else "corrupt frame"
                raise RecordingError(f"{os.fspath(path)}: {what} at byte {offset}: length {size} is above "
                                     f"the {MAX_FRAME_BYTES}-byte limit of a frame")
            message = src.read(size)
            if len(message) < size:
                return
            yield offset, message
            offset += FRAME_HEADER_BYTES + size


def read_batches(path: str | os.PathLike[str]) -> Iterator[EventBatch]:
    """Yield the ``EventBatch`` of each frame of a recording, in file order, streaming.

    One frame is in memory at a time. A truncated last frame ends the file quietly.

    Args:
        path: a recording file.

    Yields:
        The batches, as the collector received them.

    Raises:
        OSError: the file cannot be opened or read.
        RecordingError: the file is not a recording (its first frame is no
            ``EventBatch``), or a frame in it is corrupt; the message names the file
            and the frame's byte offset.
    """
    decoder = msgspec.msgpack.Decoder(EventBatch)
    for offset, message in read_frames(path):
        try:
            yield decoder.decode(message)
        except msgspec.DecodeError as exc:
            what = "not a recording" if offset == 0 else "corrupt frame"
            raise RecordingError(f"{os.fspath(path)}: {what} at byte {offset}: {exc}") from None
