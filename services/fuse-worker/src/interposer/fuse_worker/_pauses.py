"""Keep the worker from stopping every request at once: the fd table's growth, full garbage collections.

Both were found as stalls of all 16 callers of a ``stat`` run together (the
fidelity benchmark's ``efs`` stat cell; docs/benchmarks.md, "Worker-wide
pauses"), at the same numbers of names looked up in every run:

* **The fd table.** The passthrough backend holds an ``O_PATH`` fd per inode the
  kernel knows, so the worker's fd count climbs with every new name. Linux grows a
  process's fd table by doubling (``expand_fdtable`` in fs/file.c), and when the
  table is shared by several threads — the worker has the bus's and trio's — it
  waits for an RCU grace period (``synchronize_rcu()``) before freeing the old one,
  with the table's lock dropped but the caller, trio's only thread, blocked:
  10–19 ms measured here at 256, 512, 1,024, 2,048 and 4,096 fds. A table grown
  once at start, before the first request, never grows again below that size.
* **Full collections.** CPython's cyclic collector scans every tracked object in a
  full (generation 2) collection; the worker's ~47k objects after its imports
  (pyfuse3, trio, nats-py, OpenTelemetry, msgspec) took 12–18 ms per full
  collection here, run whenever the long-lived objects grew by a quarter.
  ``gc.freeze()`` once set up (as Instagram's servers do, the reason it exists:
  CPython issue 31558) moves them to a permanent generation no collection scans.
  The inode table grows with the tree the kernel knows (a walk of 160,000 names:
  full collections of 46k, 91k and 137k objects took 5, 13 and 18 ms), so the
  survivors of every full collection are frozen too, and a full collection is
  considered after every :data:`FULL_COLLECTION_THRESHOLD` young ones instead of
  CPython's 10: each then scans only the ~13k objects made since the last one,
  1.3–1.9 ms on the same walk (with CPython's 10: ~46k objects, 5–6 ms each; the
  total time collecting is the same).
  Frozen objects are never collected as cycles; objects that die alone are
  freed by their reference count as before. Cyclic garbage dies young, in the
  generations still collected; what may leak is a cycle among objects alive at a
  full collection that dies later (a request task, say): at most what was in
  flight at each full collection (measured: RSS flat over 100,000 rounds of
  create, write, read, stat and unlink with faults and held reads).
"""

from __future__ import annotations

import fcntl
import gc
import os

#: Fds the table is grown to hold at start (or the open-file limit, if lower): the
#: backend's default budget at a 20,000 limit (10,000 files + 5,000 directories)
#: fits. 128 KiB of kernel memory (8 bytes per slot); past it the table doubles as
#: before.
FD_TABLE_SLOTS = 16384


#: Generation-1 collections between two looks at a full one (``gc.set_threshold``'s
#: third value; CPython's default is 10): with the survivors of each full
#: collection frozen, smaller batches make shorter pauses.
FULL_COLLECTION_THRESHOLD = 2


def grow_fd_table(fd_limit: int, slots: int = FD_TABLE_SLOTS) -> int:
    """Grow this process's fd table to ``min(slots, fd_limit)`` slots now; return the slots asked for.

    Duplicates fd 0 onto the highest slot (``F_DUPFD``: the first free fd at or
    above it, never one in use) and closes it again; the table keeps its size. If
    that slot is in use, the table is that big already. Returns 0 (nothing done)
    if fd 0 is not open.
    """
    top = min(slots, fd_limit) - 1
    if top <= 0:
        return 0
    try:
        fcntl.fcntl(top, fcntl.F_GETFD)
        return top + 1  # in use
    except OSError:
        pass
    try:
        os.close(fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, top))
    except OSError:
        return 0
    return top + 1


def freeze_long_lived_objects() -> int:
    """Exempt every object alive now from the cyclic collector's scans (``gc.freeze``), and the survivors of every
    later full collection; call once set up.

    Collects first, so that no garbage is frozen. Returns the objects frozen now.
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_THRESHOLD)
    if _freeze_survivors not in gc.callbacks:
        gc.callbacks.append(_freeze_survivors)
    return gc.get_freeze_count()


def _freeze_survivors(phase: str, info: dict[str, int]) -> None:
    """``gc.callbacks`` hook: after a full collection, freeze what survived it."""
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()
