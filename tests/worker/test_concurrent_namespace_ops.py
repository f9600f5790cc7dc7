"""Concurrent opens, writes, renames, exchanges, links and unlinks in shared directories.

Eight threads race on 24 names across two directories through one mount, as the
processes of a pod would. On a local file system such races give only ENOENT and
EEXIST (a name gone or present by the time the call runs); an open that raced an
unlink still reaches the file. Through the mount the errnos must be the same kinds
— never EIO, which is how an internal error of the worker reaches the caller — and
the worker must log no internal error. Found so: the memory backend freed a
file's contents at its unlink while such a racing open was on its way (the write
through it failed with EIO), and with kernel passthrough the close of the second
of two direct-I/O opens of one file crashed the worker.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import threading
from collections import Counter
from pathlib import Path

import pytest

THREADS = 8
OPS_PER_THREAD = 1500
#: renameat2(2) flag (<linux/fs.h>).
RENAME_EXCHANGE = 1 << 1
AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def _exchange(a: str, b: str) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _append(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def race(root: Path) -> Counter[str]:
    """Run the threads in ``root``; return the errno names they met, counted."""
    names = [str(root / sub / f"n{i}") for sub in ("a", "b") for i in range(12)]
    for sub in ("a", "b"):
        (root / sub).mkdir()
    errors: Counter[str] = Counter()
    lock = threading.Lock()

    def run(seed: int) -> None:
        rng = random.Random(seed)
        ops = {
            "create": lambda a, b: os.close(os.open(a, os.O_CREAT | os.O_WRONLY, 0o644)),
            "append": lambda a, b: _append(a, b"x" * rng.randint(1, 100)),
            "read": lambda a, b: Path(a).read_bytes(),
            "stat": lambda a, b: os.stat(a),
            "rename": os.rename,
            "exchange": _exchange,
            "link": os.link,
            "unlink": lambda a, b: os.unlink(a),
        }
        for _ in range(OPS_PER_THREAD):
            op = rng.choice(list(ops))
            try:
                ops[op](rng.choice(names), rng.choice(names))
            except OSError as exc:
                with lock:
                    errors[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every name left: (size, link count); a name listed but not stat-able fails the test."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_nlink)
            for sub in ("a", "b") for p in sorted((root / sub).iterdir())}


#: A delay on data ops: its files are opened with FOPEN_DIRECT_IO (and, with kernel
#: passthrough on, not passed through), so opens of one file race in that mode.
DATA_DELAY = '{"layers": [{"type": "delay", "delay_s": 0.00001, "ops": ["read", "write"]}]}'


@pytest.mark.fuse
@pytest.mark.parametrize(("extra", "policy"), [
    ([], None), (["--max-file-fds", "1", "--max-dir-fds", "1"], None), (["--backend", "memory"], None),
    (["--kernel-passthrough"], None), (["--kernel-passthrough"], DATA_DELAY),
], ids=["passthrough", "passthrough-reopening", "memory", "kernel-passthrough", "kernel-passthrough-under-a-layer"])
def test_racing_namespace_ops_meet_only_the_errors_a_local_fs_gives(mount_worker, tmp_path: Path,
                                                                      extra: list[str], policy: str | None) -> None:
    native = tmp_path / "native"
    native.mkdir()
    native_errors = race(native)
    assert set(native_errors) == {"ENOENT", "EEXIST"}, native_errors  # the races did happen

    vol = mount_worker(extra=extra, policy=policy)
    errors = race(vol.mountpoint)
    assert set(errors) <= {"ENOENT", "EEXIST"}, errors
    tree(vol.mountpoint)
    assert vol.proc.poll() is None
    assert "internal error" not in vol.log(), vol.log()
