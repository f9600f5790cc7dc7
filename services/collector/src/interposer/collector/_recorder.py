"""Recording the event batches this collector receives to files, for offline analysis and replay.

Each batch's message bytes, as received from NATS, become one frame of the current
recording file (format and names: ``interposer.proto.recording``). The recorder runs
on the event loop, so a write is a copy into a 1 MiB buffer (:data:`WRITE_BUFFER_BYTES`);
the buffer reaches the file when it fills, every :data:`FLUSH_INTERVAL_S` (the
service's flush task: ``interposer analyze`` on a running stack sees all but the
last second), on rotation and on close. Nothing is fsynced: a machine crash loses
what the kernel had not written back, a killed collector what was in the buffer.

Files rotate every ``rotate_s`` or when the current one reaches ``rotate_bytes``,
whichever comes first; after each rotation (and at start) the oldest recordings of
the directory — files named as recordings, of any replica — are deleted until they
total at most ``max_bytes``, never the one being written. The directory can thus
hold ``max_bytes`` plus what the current file gained since the last rotation.

A write error (``ENOSPC``, ``EIO``) never stops the metrics: it is logged
(rate-limited), counted in ``record_errors_total``, the file is abandoned (and
removed if it holds nothing), and batches go unrecorded until a rotation retries
with a new file, :data:`RETRY_AFTER_ERROR_S` later or at the one already due if
sooner (old recordings are deleted first, which may be what frees the space). A
directory removed underneath is made again at that retry; what was written into the
file open in it until then is lost with it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import msgspec
from interposer.proto.recording import RECORDING_NAME_PATTERN, recording_name, write_frame
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ._ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

#: Size of the buffer in front of the current file, bytes (a batch of 5,000 events is
#: ~250 KiB, so a few batches per ``write(2)``).
WRITE_BUFFER_BYTES = 1024 * 1024
#: How often the service flushes the buffer to the file, seconds.
FLUSH_INTERVAL_S = 1.0
#: How soon after a failed open, write or flush a new file is tried, seconds: a
#: transient full disk costs seconds of recording, not the rest of the rotation
#: period (an hour by default), and a lasting one a log line per retry at most.
RETRY_AFTER_ERROR_S = 10.0


def default_instance_id() -> str:
    """``<hostname>-<pid>``, with characters a file name token cannot hold replaced by ``-``.

    In Kubernetes the hostname is the pod name, so replicas differ; two collectors
    on one host differ by pid.
    """
    raw = f"{socket.gethostname()}-{os.getpid()}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", raw)[-128:]


def check_record_dir(directory: str | os.PathLike[str]) -> Path:
    """Create ``directory`` if missing and check that files can be created in it.

    Args:
        directory: the ``--record-dir``.

    Returns:
        The directory as an absolute path.

    Raises:
        ValueError: it cannot be created or written (the message names it and why).
    """
    path = Path(directory).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"--record-dir {os.fspath(directory)!r}: cannot write recordings there: "
                         f"{exc.strerror or exc}") from None
    return path


class RecorderStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What a :class:`Recorder` did so far.

    Attributes:
        batches_total: batches written into a recording (into its buffer, without error).
        bytes_total: bytes of those frames (message plus 4-byte length each).
        errors_total: failed opens, writes and flushes of recording files.
        files_deleted_total: recordings deleted to keep the directory within ``max_bytes``.
        current_path: the file being written, ``""`` while none is open (before the
            start, after an error until the retry, after close).
    """

    batches_total: int
    bytes_total: int
    errors_total: int
    files_deleted_total: int
    current_path: str


class Recorder:
    """Writes received event batches into rotating recording files of one directory.

    Not thread-safe: call it from the event loop only (``statistics`` excepted, which
    reads plain integers).

    Args:
        directory: where recordings go (it must exist: :func:`check_record_dir`).
        instance_id: this collector replica's id, part of every file name.
        max_bytes: most bytes the directory's recordings may total after a rotation.
        rotate_s: longest time one file is written, seconds.
        rotate_bytes: size at which the current file is rotated, bytes.
        log_interval_s: shortest gap between two logged write errors, seconds.
        clock: monotonic clock for rotation deadlines, seconds.
        wall_clock: wall clock for file names, seconds since the Unix epoch.
    """

    def __init__(self, directory: Path, instance_id: str, *, max_bytes: int, rotate_s: float, rotate_bytes: int,
                 log_interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.instance_id = instance_id
        self.max_bytes = max_bytes
        self.rotate_s = rotate_s
        self.rotate_bytes = rotate_bytes
        self._clock = clock
        self._wall_clock = wall_clock
        self._errors_log = RateLimitedLog(log, log_interval_s)
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._file_bytes = 0
        self._rotate_at_s = 0.0
        self._last_start_s = 0
        self._batches_total = 0
        self._bytes_total = 0
        self._errors_total = 0
        self._files_deleted_total = 0

    def start(self) -> None:
        """Open the first file (deleting old recordings beyond ``max_bytes``).

        Raises:
            OSError: the file cannot be created (the message names it).
        """
        self._rotate_at_s = self._clock() + self.rotate_s
        self._open()
        self._apply_retention()

    def write(self, message: bytes) -> None:
        """Record one batch: its message bytes become one frame.

        Rotates first when the current file is due (age or size). Never raises: an
        error is logged and counted, and recording resumes with the retry rotation.

        Args:
            message: the ``EventBatch`` msgpack as received.
        """
        now_s = self._clock()
        if now_s >= self._rotate_at_s or (self._file is not None and self._file_bytes >= self.rotate_bytes):
            self._rotate(now_s)
        out = self._file
        if out is None:
            return  # broken until the retry
        try:
            written = write_frame(out, message)
        except OSError as exc:
            self._fail("write to", exc)
            return
        self._file_bytes += written
        self._batches_total += 1
        self._bytes_total += written

    def flush(self) -> None:
        """Hand what is buffered to the kernel. Never raises (errors are counted)."""
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                self._fail("flush", exc)

    def close(self) -> None:
        """Flush and close the current file. Safe to repeat; never raises."""
        out, self._file = self._file, None
        if out is not None:
            try:
                out.close()
            except OSError as exc:
                self._errors_total += 1
                log.warning("recording: cannot flush %s: %s; what was buffered is lost", self._path, exc)
        self._path = None

    def statistics(self) -> RecorderStatistics:
        """The counters so far, and the file being written."""
        return RecorderStatistics(batches_total=self._batches_total, bytes_total=self._bytes_total,
                                  errors_total=self._errors_total, files_deleted_total=self._files_deleted_total,
                                  current_path=str(self._path) if self._path is not None else "")

    # -- internals ------------------------------------------------------------------

    def _rotate(self, now_s: float) -> None:
        self.close()
        self._rotate_at_s = now_s + self.rotate_s
        try:
            self._open()
        except OSError as exc:
            self._errors_total += 1
            self._retry_soon(now_s)
            self._errors_log.warning("recording: %s; batches are not recorded until a new file is tried "
                                     "in %.0f s", exc, self._rotate_at_s - now_s)
        self._apply_retention()

    def _retry_soon(self, now_s: float) -> None:
        """Bring the next rotation, which opens a new file, to :data:`RETRY_AFTER_ERROR_S` from ``now_s``."""
        self._rotate_at_s = min(self._rotate_at_s, now_s + RETRY_AFTER_ERROR_S)

    def _open(self) -> None:
        # Names have whole seconds: a file started in the same second as the last
        # one (a size rotation above 64 MiB/s, a retry) takes the next second, so
        # this replica's names stay distinct and in order.
        start_s = max(int(self._wall_clock()), self._last_start_s + 1)
        self._last_start_s = start_s
        path = self.directory / recording_name(dt.datetime.fromtimestamp(start_s, dt.UTC), self.instance_id)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)  # removed while running: back at rotation
            # Append: a restarted replica with the same id in the same second
            # continues the file, and frames after frames are still one recording.
            out = open(path, "ab", buffering=WRITE_BUFFER_BYTES)  # noqa: SIM115 - kept open until rotation
        except OSError as exc:
            raise OSError(exc.errno, f"cannot create recording {path}: {exc.strerror}") from None
        self._file, self._path = out, path
        self._file_bytes = out.tell()
        log.info("recording event batches to %s", path)

    def _fail(self, what: str, exc: OSError) -> None:
        self._errors_total += 1
        path = self._path
        out, self._file, self._path = self._file, None, None
        if out is not None:
            try:
                out.close()
            except OSError:
                pass  # the same error again: the buffer is lost either way
        if path is not None:
            try:
                if path.stat().st_size == 0:  # nothing in it: retries on a full disk leave no trail of empty files
                    path.unlink()
            except OSError:
                pass
        now_s = self._clock()
        self._retry_soon(now_s)
        self._errors_log.warning("recording: cannot %s %s: %s; batches are not recorded until a new file is "
                                 "tried in %.0f s", what, path, exc.strerror or exc, self._rotate_at_s - now_s)

    def _recordings(self) -> Iterator[tuple[str, int]]:
        """``(name, size in bytes)`` of each recording in the directory, oldest first."""
        names = sorted(entry for entry in os.listdir(self.directory) if RECORDING_NAME_PATTERN.fullmatch(entry))
        for name in names:
            try:
                yield name, os.stat(self.directory / name).st_size
            except FileNotFoundError:
                continue  # another replica's retention got there first

    def _apply_retention(self) -> None:
        """Delete the oldest recordings until they total ``max_bytes`` (the current file stays)."""
        try:
            files = list(self._recordings())
        except OSError as exc:
            self._errors_total += 1
            self._errors_log.warning("recording: cannot list %s: %s", self.directory, exc.strerror or exc)
            return
        total = sum(size for _name, size in files)
        current = self._path.name if self._path is not None else None
        for name, size in files:
            if total <= self.max_bytes:
                break
            if name == current:
                continue
            try:
                os.unlink(self.directory / name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._errors_total += 1
                self._errors_log.warning("recording: cannot delete %s: %s", self.directory / name,
                                         exc.strerror or exc)
                continue
            else:
                self._files_deleted_total += 1
                log.info("recording: deleted %s (%d bytes) to keep %s within %d bytes", name, size,
                         self.directory, self.max_bytes)
            total -= size


#: The recorder's metric families: name (without ``_total``), help.
RECORDER_METRICS: tuple[tuple[str, str], ...] = (
    ("interposer_collector_recorded_batches",
     "Event batches this collector wrote into recording files (--record-dir)."),
    ("interposer_collector_recorded_bytes",
     "Bytes this collector wrote into recording files (each frame: the batch as received plus 4 bytes)."),
    ("interposer_collector_record_errors",
     "Failed opens, writes and flushes of recording files; after one, batches are not recorded until a new "
     "file is tried 10 s later."),
)


class RecorderMetrics(Collector):
    """prometheus_client collector exposing a :class:`Recorder`'s counters (registered only while recording).

    Args:
        recorder: the recorder to read at scrape time.
    """

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder

    def describe(self) -> Iterator[Metric]:
        """Yield the (empty) families, for registration checks."""
        for name, text in RECORDER_METRICS:
            yield CounterMetricFamily(name, text, labels=[])

    def collect(self) -> Iterator[Metric]:
        """Yield the three counters."""
        stats = self._recorder.statistics()
        values = (stats.batches_total, stats.bytes_total, stats.errors_total)
        for (name, text), value in zip(RECORDER_METRICS, values, strict=True):
            family = CounterMetricFamily(name, text, labels=[])
            family.add_metric([], value)
            yield family

