"""Fidelity of the ``gcs`` profile's staged writes: what changing an existing object costs the application.

Cloud Storage FUSE downloads an existing object whole at the first write (or
truncation) that changes it and uploads it whole at close, except appends to an
object of at least 2 MiB, which upload only what was appended; new files are
streamed (docs/semantics.md, "Staged Writes"; the ``staged_writes`` layer). For each
case this mounts a worker with the ``gcs`` profile at a link of ``--rate-mib-s``
over fresh objects laid out in the backing directory beforehand, and times, per
object, the first ``pwrite`` of 4 KiB after ``open`` and the ``close``:

* the write: one request (the profile's log-normal, median 20 ms, sigma 0.5) plus
  the object's size at the rate, where a download is due; else nothing;
* the close: one request (the upload's completion) plus the bytes the
  application did not write at the rate, where the object is rewritten.

So each target is a constant plus the request's log-normal quantile; the printed
ratio is achieved / target for the p50 and p90, with the range an exact emulation
would show 95 % of the time from that many objects (``fidelity.sampling_range``).

Usage (as root, from the repo's venv; a quiet machine)::

    .venv/bin/python bench/fidelity/staged_writes.py              # 40 objects a case, ~1 min
    .venv/bin/python bench/fidelity/staged_writes.py --objects 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ (shared helpers)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _host import HostMeter, machine  # noqa: E402
from fidelity import Mount, sampling_range  # noqa: E402

from interposer.fuse_worker.layers import quantile  # noqa: E402
from interposer.proto.policy import LognormalDistribution  # noqa: E402

MIB = 1 << 20
WRITE_BYTES = 4096
#: The gcs profile's request latency (proto/profiles.py) and gcsfuse's append exception.
REQUEST = LognormalDistribution(median_s=0.020, sigma=0.5)
APPEND_UPLOAD_MIN_BYTES = 2 * MIB


@dataclass
class Case:
    """Objects of ``object_bytes`` changed by one 4 KiB write at ``offset`` (``None`` = appended); 0 = new files."""

    name: str
    object_bytes: int
    offset: int | None

    def fixed_s(self, rate: float) -> tuple[float | None, float]:
        """The constant parts of the write's and the close's latency, seconds; None = the write is not held."""
        if self.object_bytes == 0:
            return None, 0.0  # streamed: nothing to fetch, nothing to send again
        if self.offset is None and self.object_bytes >= APPEND_UPLOAD_MIN_BYTES:
            return None, 0.0  # a compose of what was appended
        return self.object_bytes / rate, (self.object_bytes - WRITE_BYTES) / rate


CASES = [
    Case("new file, 4 KiB", 0, 0),
    Case("append 4 KiB to a 1 MiB object", MIB, None),
    Case("append 4 KiB to a 16 MiB object", 16 * MIB, None),
    Case("change 4 KiB inside a 16 MiB object", 16 * MIB, 8 * MIB),
    Case("change 4 KiB inside a 64 MiB object", 64 * MIB, 32 * MIB),
]


def _lay_out(backing: Path, case: Case, count: int) -> list[str]:
    names = [f"{case.object_bytes}-{case.offset}-{i}" for i in range(count)]
    block = os.urandom(MIB)
    for name in names:
        if case.object_bytes:
            with open(backing / name, "wb") as out:
                for _ in range(case.object_bytes // MIB):
                    out.write(block)
    return names


def _change(path: Path, case: Case) -> tuple[float, float]:
    """Change one object as the case says; seconds the first write and the close took."""
    flags = os.O_WRONLY | (os.O_CREAT if case.object_bytes == 0 else 0) | (os.O_APPEND if case.offset is None else 0)
    fd = os.open(path, flags, 0o644)
    data = b"w" * WRITE_BYTES
    try:
        started = time.monotonic()
        if case.offset is None:
            os.write(fd, data)
        else:
            os.pwrite(fd, data, case.offset)
        write_s = time.monotonic() - started
    finally:
        started = time.monotonic()
        os.close(fd)
    return write_s, time.monotonic() - started


def _row(what: str, achieved: list[float], fixed_s: float | None) -> str:
    got50, got90 = statistics.quantiles(achieved, n=10, method="inclusive")[4::4]
    if fixed_s is None:
        return f"  {what:<6} p50 {got50 * 1e3:8.2f} ms, p90 {got90 * 1e3:8.2f} ms  (no hold: target none)"
    cells = []
    for level, got in ((0.5, got50), (0.9, got90)):
        target = fixed_s + quantile(REQUEST, level)
        spread = sampling_range(lambda q: fixed_s + quantile(REQUEST, q), "p50" if level == 0.5 else "p90",
                                len(achieved))
        span = f" [{spread[0]:.2f}-{spread[1]:.2f}]" if spread else ""
        cells.append(f"p{round(level * 100)} {got * 1e3:8.2f} / {target * 1e3:8.2f} ms = {got / target:4.2f}{span}")
    return f"  {what:<6} " + ";  ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=40, help="objects changed per case (default 40)")
    parser.add_argument("--rate-mib-s", type=float, default=256, help="the link's rate, MiB/s (default 256)")
    args = parser.parse_args()
    rate = args.rate_mib_s * MIB
    host = HostMeter()
    print(machine())
    print(f"gcs profile at {args.rate_mib_s:g} MiB/s; request log-normal median 20 ms, sigma 0.5; "
          f"{args.objects} objects a case; achieved / target (95 % range of an exact emulation)")
    with tempfile.TemporaryDirectory(prefix="staged-writes-") as tmp:
        backing, mountpoint = Path(tmp, "backing"), Path(tmp, "mnt")
        backing.mkdir()
        layouts = [(case, _lay_out(backing, case, args.objects)) for case in CASES]
        os.sync()
        layers = [{"type": "profile", "name": "gcs", "rate_bytes_per_s": int(rate)}]
        with Mount(backing, mountpoint, layers):
            for case, names in layouts:
                names = names if case.object_bytes else [f"new-{i}" for i in range(args.objects)]
                times = [_change(mountpoint / name, case) for name in names]
                write_fixed, close_fixed = case.fixed_s(rate)
                print(case.name)
                print(_row("write", [w for w, _ in times], write_fixed))
                print(_row("close", [c for _, c in times], close_fixed))
    print(host.report())


if __name__ == "__main__":
    main()
