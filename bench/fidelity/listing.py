"""Fidelity of directory listings: one request per page of entries (``s3``, ``gcs``, ``azure-blob``, ``efs``).

An object-store client lists a prefix in pages: Mountpoint for Amazon S3 one
ListObjectsV2 request per 1,000 keys, Cloud Storage FUSE one objects.list request per
5,000 (``MaxResultsForListObjectsCall``), blobfuse2 one List Blobs request per 5,000.
The kernel asks a FUSE file system for a listing in READDIRPLUS requests of ~200
entries and once more to find the end; the profiles hold only the requests that
need a new page (``list_page_entries``), and no profile holds the last one. For each
profile and directory size this lays out a directory of empty files in the backing
directory, then lists it ``--listings`` times through a bare mount and through a
mount with the profile, mounted at once, in turns (each listing an ``os.listdir`` right after an untimed
``os.stat`` of the directory, so that the kernel's entry and attributes are fresh
and only OPENDIR, READDIRPLUS and RELEASEDIR are timed).

Target: what the bare mount took (its median) plus the pages' requests one after the
other (each the profiles' log-normal, median 20 ms, sigma 0.5). ``efs`` holds every
READDIRPLUS with entries (an NFS client's READDIRPLUS fills a buffer much like
FUSE's): the number of such requests depends on the kernel's buffer, so it is
printed without a target. The ratio is achieved / target for the p50 and p90, with
the range an exact emulation would show 95 % of the time from that many listings.

Usage (as root, from the repo's venv; a quiet machine)::

    .venv/bin/python bench/fidelity/listing.py                # 40 listings a case, ~2 min
    .venv/bin/python bench/fidelity/listing.py --listings 100
    .venv/bin/python bench/fidelity/listing.py --profile azure-blob --entries 12000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ (shared helpers)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _host import HostMeter, machine  # noqa: E402
from fidelity import Mount  # noqa: E402
from staged_writes import Hold, row  # noqa: E402

#: Entries per listing request of each profile's client (None: every READDIRPLUS with entries is held).
PAGE_ENTRIES: dict[str, int | None] = {"s3": 1000, "gcs": 5000, "azure-blob": 5000, "efs": None}
SIZES = (10, 2500, 12_000)


def _lay_out(backing: Path) -> None:
    for size in SIZES:
        directory = backing / f"d{size}"
        directory.mkdir()
        for i in range(size):
            (directory / f"shard-{i:06d}.tfrecord").touch()


def _listing_s(directory: Path, size: int) -> float:
    """List ``directory`` (``size`` entries) once; seconds the listing took."""
    os.stat(directory)  # the kernel's entry and attributes fresh: the listing alone is timed
    started = time.monotonic()
    names = os.listdir(directory)
    took = time.monotonic() - started
    assert len(names) == size, (directory, len(names))
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listings", type=int, default=40, help="listings per case (default 40)")
    parser.add_argument("--profile", action="append", choices=list(PAGE_ENTRIES),
                        help="only this profile (repeatable; default: all)")
    parser.add_argument("--entries", action="append", type=int, choices=SIZES,
                        help="only directories of this many entries (repeatable; default: all)")
    args = parser.parse_args()
    host = HostMeter()
    print(machine())
    print(f"request log-normal median 20 ms, sigma 0.5; {args.listings} listings a case; target = the bare mount's "
          "median + the pages' requests; achieved / target (95 % range of an exact emulation)")
    with tempfile.TemporaryDirectory(prefix="listing-") as tmp:
        backing = Path(tmp, "backing")
        backing.mkdir()
        _lay_out(backing)
        os.sync()
        for profile in args.profile or PAGE_ENTRIES:
            page = PAGE_ENTRIES[profile]
            for size in args.entries or SIZES:
                bare, emulated = [], []
                bare_mnt, emulated_mnt = Path(tmp, "bare", "mnt"), Path(tmp, profile, "mnt")  # a policy file each
                bare_mnt.parent.mkdir(exist_ok=True)
                emulated_mnt.parent.mkdir(exist_ok=True)
                # both mounted at once and listed in turns, so that the VM's drift hits both alike
                with Mount(backing, bare_mnt, []), Mount(backing, emulated_mnt, [{"type": "profile", "name": profile}]):
                    for _ in range(args.listings):
                        bare.append(_listing_s(bare_mnt / f"d{size}", size))
                        emulated.append(_listing_s(emulated_mnt / f"d{size}", size))
                bare_s = statistics.median(bare)
                requests = None if page is None else -(-size // page)
                what = f"{requests} request(s)" if requests else "a request per READDIRPLUS"
                print(f"{profile}: {size:,} entries ({what}); bare mount p50 {bare_s * 1e3:.2f} ms")
                print(row("listing", emulated, Hold(requests, bare_s) if requests else None,
                          why_none="requests the kernel's buffer decides"))
    print(host.report())


if __name__ == "__main__":
    main()
