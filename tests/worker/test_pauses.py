"""Worker-wide pauses avoided at start (``_pauses``): the fd table grown once, startup objects frozen.

Whether a pause still happens is timing, measured by ``bench/datapath/pauses.py``;
here: that a real worker did both before serving, and that growing the table
never closes an fd in use.
"""

from __future__ import annotations

import gc
import re
import subprocess
import sys
from pathlib import Path

from interposer.fuse_worker._pauses import (
    FD_TABLE_SLOTS,
    FULL_COLLECTION_THRESHOLD,
    _freeze_survivors,
    freeze_long_lived_objects,
)


def _fd_table_slots(pid: int) -> int:
    """``FDSize`` of ``/proc/<pid>/status``: slots of the process's fd table."""
    found = re.search(r"^FDSize:\s+(\d+)$", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert found is not None
    return int(found.group(1))


def test_a_worker_serves_with_its_fd_table_grown_and_startup_objects_frozen(mount_worker) -> None:
    vol = mount_worker()
    assert _fd_table_slots(vol.proc.pid) >= FD_TABLE_SLOTS
    (vol.mountpoint / "f").write_bytes(b"x")  # served
    assert vol.unmount() == 0
    found = re.search(r"fd table grown to (\d+) slots, (\d+) objects frozen", vol.log())
    assert found is not None, vol.log()[-2000:]
    assert int(found.group(1)) == FD_TABLE_SLOTS
    assert int(found.group(2)) > 1000  # the imports alone leave tens of thousands


def test_growing_the_fd_table_keeps_every_open_fd_and_stays_under_the_limit() -> None:
    # In a child: the open-file limit is lowered there, and an fd already sits at the top slot.
    script = """
import os, resource, sys
from interposer.fuse_worker._pauses import grow_fd_table
resource.setrlimit(resource.RLIMIT_NOFILE, (1000, 1000))
assert grow_fd_table(1000) == 1000  # the top slot free: grown through it
r, w = os.pipe()
top = os.dup2(w, 999)
assert grow_fd_table(1000) == 1000  # the top slot in use: left alone
assert grow_fd_table(1000, slots=500) == 500  # never more than asked
os.write(top, b"still open")
print(os.read(r, 100).decode(), open("/proc/self/status").read().split("FDSize:")[1].split()[0])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["still", "open", "1024"]  # the kernel rounds a table up to a power of two


def test_freezing_moves_what_is_alive_and_what_survives_full_collections_out_of_the_scans() -> None:
    thresholds = gc.get_threshold()
    try:
        frozen = freeze_long_lived_objects()
        assert frozen == gc.get_freeze_count() > 0
        assert gc.get_count()[0] < 10  # collected first: generation 0 starts empty
        kept = [[index] for index in range(1000)]  # 1,001 new container objects, alive
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle  # garbage only a collection can free
        assert gc.collect() >= 1  # a full collection still finds the young cycle
        assert gc.get_freeze_count() >= frozen + len(kept)  # and its survivors are frozen after it
        assert not gc.get_objects(generation=2)
        assert gc.get_threshold()[2] == FULL_COLLECTION_THRESHOLD
    finally:
        gc.callbacks.remove(_freeze_survivors)
        gc.unfreeze()
        gc.set_threshold(*thresholds)
