"""Fidelity of staged writes: what whole-object clients cost the application (``gcs``, ``azure-blob``).

Cloud Storage FUSE downloads an existing object whole at the first write (or
truncation) that changes it and uploads it whole at close, except appends to an
object of at least 2 MiB, which upload only what was appended; new files are
streamed (docs/semantics.md, "Staged Writes"). It stats the object before the
download and before the upload, and an append's upload is a temporary object, a
compose and a deletion (internal/fs/inode/file.go, internal/gcsx). blobfuse2 in caching mode downloads
every file whole at its open, readers included, and uploads a changed or new file
whole at close ("Configure BlobFuse for caching mode"). For each case this mounts a
worker with the profile at a link of ``--rate-mib-s`` over fresh objects laid out in
the backing directory beforehand, and times, per object, the ``open``, one 4 KiB
``pwrite`` (or ``pread``), for a read-back case a 4 KiB ``pread`` elsewhere in the
changed file, and the ``close``. Targets: the requests one after the other (each
the profiles' log-normal, median 20 ms, sigma 0.5) plus, where one is due, the
transfer at the rate:

* ``gcs``: the write, a stat and the download of the object; the close, a stat and
  the upload of the whole file (for an append to an object of 2 MiB or more, four
  requests and what was appended); a read
  back, nothing: gcsfuse serves it from the staged file (printed in ms, no target);
  a new file streamed in order (untimed) and then written at offset 0, the
  finalization of what was streamed and its download at that write, the whole file
  at the close ("Streaming Writes": out-of-order writes fall back to staging); a new
  file streamed and then renamed while open, at the rename the finalization and the
  rename's copy and delete (three requests), nothing at the close; a new file created
  while four others stream (gcsfuse's default ``write-global-max-blocks``), nothing at
  its write (it is staged), one request (nothing stored to stat) and the whole file at
  its close; an existing object opened with ``O_TRUNC`` (an overwrite), at the open
  the lookup, a stat and the download (gcsfuse truncates its local copy), at the close
  a stat and the new file;
* ``azure-blob``: the open, the lookup and the download in 4 MiB ranged requests, 32 at a
  time, each block's bytes after its request on the shared link (the target's quantiles
  from simulated transfers); the close after a change, one request and the whole file
  (up to 256 MiB); an fsync after the change, nothing (printed in ms, no target).

So each target is a constant plus the request's log-normal quantile; the printed
ratio is achieved / target for the p50 and p90, with the range an exact emulation
would show 95 % of the time from that many objects (``fidelity.sampling_range``).

Usage (as root, from the repo's venv; a quiet machine)::

    .venv/bin/python bench/fidelity/staged_writes.py              # 40 objects a case, ~1 min
    .venv/bin/python bench/fidelity/staged_writes.py --objects 100
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ (shared helpers)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _host import HostMeter, machine  # noqa: E402
from fidelity import Mount, sum_quantile_fn, sampling_range  # noqa: E402

from interposer.proto.policy import DelayLayer, LognormalDistribution  # noqa: E402

MIB = 1 << 20
WRITE_BYTES = 4096
#: The gcs profile's request latency (proto/profiles.py) and gcsfuse's append exception.
REQUEST = LognormalDistribution(median_s=0.020, sigma=0.5)
APPEND_UPLOAD_MIN_BYTES = 2 * MIB
#: gcsfuse's default write-global-max-blocks: new files streamed at once.
GCSFUSE_STREAMED_FILES = 4
#: Requests gcsfuse makes for a transfer of a stored object: a stat, then the read or the upload; an
#: append's upload: a stat, the temporary object, the compose, the temporary object's deletion.
TRANSFER_REQUESTS, APPEND_UPLOAD_REQUESTS = 2, 4
#: blobfuse2's transfers through the Azure SDK: 4 MiB blocks, 32 in flight; uploads up to 256 MiB in one request.
AZURE_BLOCK_BYTES, AZURE_PARALLEL = 4 * MIB, 32
#: Simulated transfers behind the quantiles of a transfer in blocks.
BLOCK_SAMPLES = 20_000


@dataclass
class Case:
    """Objects of ``object_bytes`` (0 = new files) opened through ``profile``, then one 4 KiB access: a write at
    ``offset`` (``None`` = appended) or, with ``read``, a read; with ``read_back``, a 4 KiB read at offset 0 after
    the write; then closed."""

    profile: str
    name: str
    object_bytes: int
    offset: int | None
    read: bool = False
    read_back: bool = False
    streamed_bytes: int = 0  # a new file: bytes written in order from its start before the access, untimed
    rename: bool = False  # the access is a rename of the file (to a new name) instead of a write
    truncate: bool = False  # opened with O_TRUNC (an overwrite: Python's open(path, "w"))
    others_streaming: int = 0  # new files kept open and streamed while the case runs
    fsync: bool = False  # fsync after the access, before the close

    def targets(self, rate: float) -> tuple[Hold | None, Hold | None, Hold | None]:
        """What the open, the access and the close should wait for; None = not held (a read back never is).

        Every object is a name the mount has not looked up, so each open pays the
        lookup's request first (both profiles hold lookups; a missing name's too).
        """
        size_after = self.object_bytes + WRITE_BYTES if self.offset is None else max(
            self.object_bytes, self.offset + WRITE_BYTES)
        if self.profile == "azure-blob":  # blobfuse2 caching mode: whole files at open (in blocks) and close
            download = Blocks(self.object_bytes, AZURE_BLOCK_BYTES, AZURE_PARALLEL, rate)
            open_hold = Hold(1, 0.0, download) if self.object_bytes else Hold(1, 0.0)
            return open_hold, None, (None if self.read else Hold(1, size_after / rate))
        if self.truncate:  # gcsfuse truncates its local copy: the object comes down first; the new file goes up
            return (Hold(1 + TRANSFER_REQUESTS, self.object_bytes / rate), None,
                    Hold(TRANSFER_REQUESTS, WRITE_BYTES / rate))
        if self.rename:  # finalized (a request), then copied and the source deleted; nothing left to send
            return Hold(1, 0.0), Hold(3, 0.0), None
        if self.streamed_bytes:  # finalized (a request), downloaded, staged: stored, so a stat before the upload
            streamed_s = self.streamed_bytes / rate
            return Hold(1, 0.0), Hold(1 + TRANSFER_REQUESTS, streamed_s), Hold(TRANSFER_REQUESTS, streamed_s)
        if self.object_bytes == 0 and self.others_streaming >= GCSFUSE_STREAMED_FILES:
            return Hold(1, 0.0), None, Hold(1, size_after / rate)  # no block left: staged, up whole at close
        if self.object_bytes == 0:
            return Hold(1, 0.0), None, Hold(1, 0.0)  # streamed: nothing to fetch, nothing to send again
        download = Hold(TRANSFER_REQUESTS, self.object_bytes / rate)  # appends too: the temporary file is whole
        if self.offset is None and self.object_bytes >= APPEND_UPLOAD_MIN_BYTES:
            return Hold(1, 0.0), download, Hold(APPEND_UPLOAD_REQUESTS, WRITE_BYTES / rate)  # a compose
        return Hold(1, 0.0), download, Hold(TRANSFER_REQUESTS, size_after / rate)


@dataclass
class Blocks:
    """A transfer of ``size`` bytes as ranged requests of ``block`` bytes, ``parallel`` in flight, on a link of
    ``rate`` bytes/s shared in the order the blocks' requests are answered (the Azure SDK's ``DoBatchTransfer``
    as blobfuse2 calls it: each free worker takes the next block, waits for its request, then for its bytes)."""

    size: int
    block: int
    parallel: int
    rate: float

    def sample_s(self, rng: random.Random) -> float:
        """One draw of the transfer's duration, seconds."""
        count = -(-self.size // self.block)
        free = [0.0] * min(count, self.parallel)
        link_free = end = 0.0
        for index in range(count):
            answered = heapq.heappop(free) + rng.lognormvariate(math.log(REQUEST.median_s), REQUEST.sigma)
            link_free = max(link_free, answered) + min(self.block, self.size - index * self.block) / self.rate
            heapq.heappush(free, link_free)
            end = max(end, link_free)
        return end


@dataclass
class Hold:
    """A wait of ``requests`` independent request latencies plus ``fixed_s`` seconds of transfer, or with
    ``blocks``, plus a transfer in blocks (its quantiles from :data:`BLOCK_SAMPLES` simulated transfers)."""

    requests: int
    fixed_s: float
    blocks: Blocks | None = None

    def quantile_fn(self):  # noqa: ANN201 - level in (0, 1) → seconds
        draws = sum_quantile_fn([DelayLayer(distribution=REQUEST)] * self.requests)
        if self.blocks is None:
            return lambda q: self.fixed_s + draws(q)
        rng = random.Random(7)
        samples = sorted(self.fixed_s + draws(rng.random()) + self.blocks.sample_s(rng) for _ in range(BLOCK_SAMPLES))
        return lambda q: samples[min(int(q * len(samples)), len(samples) - 1)]


CASES = [
    Case("gcs", "new file, 4 KiB", 0, 0),
    Case("gcs", "append 4 KiB to a 1 MiB object", MIB, None),
    Case("gcs", "append 4 KiB to a 16 MiB object", 16 * MIB, None),
    Case("gcs", "change 4 KiB inside a 16 MiB object", 16 * MIB, 8 * MIB),
    Case("gcs", "change 4 KiB inside a 64 MiB object", 64 * MIB, 32 * MIB),
    Case("gcs", "change 4 KiB inside a 16 MiB object, read 4 KiB back", 16 * MIB, 8 * MIB, read_back=True),
    Case("gcs", "overwrite a 16 MiB object with 4 KiB (O_TRUNC)", 16 * MIB, 0, truncate=True),
    Case("gcs", "new file: 16 MiB streamed, then 4 KiB at offset 0", 0, 0, streamed_bytes=16 * MIB),
    Case("gcs", "new file: 16 MiB streamed, then renamed while open", 0, 0, streamed_bytes=16 * MIB, rename=True),
    Case("gcs", "new file, 4 KiB, while 4 others stream", 0, 0, others_streaming=4),
    Case("azure-blob", "read 4 KiB of a 16 MiB blob", 16 * MIB, 8 * MIB, read=True),
    Case("azure-blob", "read 4 KiB of a 64 MiB blob", 64 * MIB, 32 * MIB, read=True),
    Case("azure-blob", "change 4 KiB inside a 16 MiB blob", 16 * MIB, 8 * MIB),
    Case("azure-blob", "new file, 4 KiB", 0, 0),
    Case("azure-blob", "change 4 KiB inside a 16 MiB blob, fsync", 16 * MIB, 8 * MIB, fsync=True),
]


_BLOCK = os.urandom(MIB)


def _lay_out(backing: Path, case: Case, count: int) -> list[str]:
    """Lay out ``count`` objects of the case (none for new files); their names, unseen by any other case."""
    tag = f"{case.profile}-{CASES.index(case)}"
    names = [f"{tag}-{i}" for i in range(count)]
    block = os.urandom(MIB)
    for name in names:
        if case.object_bytes:
            with open(backing / name, "wb") as out:
                for _ in range(case.object_bytes // MIB):
                    out.write(block)
    return names


def _access(path: Path, case: Case) -> tuple[float, float, float, float, float]:
    """Open one object, access it as the case says, close it; seconds the open, the access, the read back
    (0 if none), the fsync (0 if none) and the close took."""
    writes = os.O_RDWR if case.read_back else os.O_WRONLY
    flags = (os.O_RDONLY if case.read else writes) | (os.O_CREAT if case.object_bytes == 0 else 0) | (
        os.O_APPEND if case.offset is None else 0) | (os.O_TRUNC if case.truncate else 0)
    data = b"w" * WRITE_BYTES
    started = time.monotonic()
    fd = os.open(path, flags, 0o644)
    open_s = time.monotonic() - started
    try:
        for offset in range(0, case.streamed_bytes, MIB):
            os.pwrite(fd, _BLOCK, offset)
        renamed = path.with_name(path.name + ".renamed")
        if case.rename:
            os.path.lexists(renamed)  # the kernel looks the new name up first: that request is not the rename's
        started = time.monotonic()
        if case.rename:
            os.rename(path, renamed)
        elif case.read:
            os.pread(fd, WRITE_BYTES, case.offset or 0)
        elif case.offset is None:
            os.write(fd, data)
        else:
            os.pwrite(fd, data, case.offset)
        access_s = time.monotonic() - started
        read_back_s = 0.0
        if case.read_back:
            started = time.monotonic()
            os.pread(fd, WRITE_BYTES, 0)
            read_back_s = time.monotonic() - started
        fsync_s = 0.0
        if case.fsync:
            started = time.monotonic()
            os.fsync(fd)
            fsync_s = time.monotonic() - started
    finally:
        started = time.monotonic()
        os.close(fd)
    return open_s, access_s, read_back_s, fsync_s, time.monotonic() - started


@contextlib.contextmanager
def _streaming(mountpoint: Path, case: Case) -> Iterator[None]:
    """Keep ``case.others_streaming`` new files open, each streamed (one write at its start), while the case runs."""
    fds = [os.open(mountpoint / f"holder-{CASES.index(case)}-{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
           for i in range(case.others_streaming)]
    try:
        for fd in fds:
            os.pwrite(fd, b"h" * WRITE_BYTES, 0)
        yield
    finally:
        for fd in fds:
            os.close(fd)


def row(what: str, achieved: list[float], hold: Hold | None, why_none: str = "not held") -> str:
    """One printed line: the p50 and p90 of ``achieved`` (seconds) against ``hold``'s, or alone (``why_none``)."""
    got50, got90 = statistics.quantiles(achieved, n=10, method="inclusive")[4::4]
    if hold is None:
        return f"  {what:<9} p50 {got50 * 1e3:8.2f} ms, p90 {got90 * 1e3:8.2f} ms  ({why_none}: no target)"
    target_fn = hold.quantile_fn()
    cells = []
    for level, metric, got in ((0.5, "p50", got50), (0.9, "p90", got90)):
        target = target_fn(level)
        spread = sampling_range(target_fn, metric, len(achieved))
        span = f" [{spread[0]:.2f}-{spread[1]:.2f}]" if spread else ""
        cells.append(f"{metric} {got * 1e3:8.2f} / {target * 1e3:8.2f} ms = {got / target:4.2f}{span}")
    return f"  {what:<9} " + ";  ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=40, help="objects changed per case (default 40)")
    parser.add_argument("--rate-mib-s", type=float, default=256, help="the link's rate, MiB/s (default 256)")
    args = parser.parse_args()
    rate = args.rate_mib_s * MIB
    host = HostMeter()
    print(machine())
    print(f"gcs and azure-blob profiles at {args.rate_mib_s:g} MiB/s; request log-normal median 20 ms, sigma 0.5; "
          f"{args.objects} objects a case; achieved / target (95 % range of an exact emulation)")
    with tempfile.TemporaryDirectory(prefix="staged-writes-") as tmp:
        for profile in dict.fromkeys(case.profile for case in CASES):
            backing, mountpoint = Path(tmp, profile, "backing"), Path(tmp, profile, "mnt")
            backing.mkdir(parents=True)
            layouts = [(case, _lay_out(backing, case, args.objects)) for case in CASES if case.profile == profile]
            os.sync()
            layers = [{"type": "profile", "name": profile, "rate_bytes_per_s": int(rate)}]
            with Mount(backing, mountpoint, layers):
                for case, names in layouts:
                    names = names if case.object_bytes else [f"new-{name}" for name in names]
                    with _streaming(mountpoint, case):
                        times = [_access(mountpoint / name, case) for name in names]
                    open_hold, access_hold, close_hold = case.targets(rate)
                    opened, accessed, read_back, synced, closed = zip(*times)
                    print(f"{profile}: {case.name}")
                    print(row("open", list(opened), open_hold))
                    print(row("rename" if case.rename else "read" if case.read else "write", list(accessed),
                               access_hold))
                    if case.read_back:
                        print(row("read back", list(read_back), None))
                    if case.fsync:
                        print(row("fsync", list(synced), None))  # blobfuse2 sends nothing at fsync
                    print(row("close", list(closed), close_hold))
    print(host.report())


if __name__ == "__main__":
    main()
