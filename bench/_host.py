"""What the benchmarks say about the machine they ran on: its description and the host's noise.

On a virtual machine the host may take the vCPUs away (steal time); a run during
which it did is not a measurement of the code. Seen on the 2-vCPU benchmark VM:
steal grew by ~36,000 ticks during one run, which then showed the do-nothing layer
stack at 0.44× bare instead of ~1.0. Every benchmark prints the steal share of its
run so that such a run is recognised and repeated, not recorded.

The host may also take back guest memory the guest has freed (virtio-balloon
*free page reporting*, VIRTIO_BALLOON_F_REPORTING): the benchmark VM reports freed
blocks of 2 MiB and more at once, so memory freed by dropping the page cache or
deleting a file is handed back, and the next use of it faults on the host. Measured
there: touching fresh anonymous memory costs 1.5-2.1 ms per MiB against ~0.85 ms
for memory freed a moment earlier. Writes through FUSE fill two page caches (the
mount's and the backing file's), so they pay it twice per byte where a native write
pays it once. It is a property of that VM, not a disturbance, so it is reported
(how much the host took back during the run), not flagged.
"""

from __future__ import annotations

import mmap
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Steal share above which a run is flagged as disturbed (the quiet full runs recorded in docs/benchmarks.md: < 0.1 %).
NOISY_STEAL_SHARE = 0.01
#: Total KiB the guest has reported free to the host, where the kernel's page_reporting
#: module exposes it (a counter of some VM kernels; absent elsewhere).
REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")
#: The smallest free block, as a page order, that the guest reports to the host
#: (mm/page_reporting.c, ``page_reporting_order``; 9 = 2 MiB blocks on x86-64).
REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
#: One above the buddy allocator's largest order (``MAX_PAGE_ORDER``, 10 on x86-64):
#: no free block is that large, so nothing more is reported.
NO_REPORTING_ORDER = 11


def machine() -> str:
    """One line: CPUs and model, RAM, kernel and Python versions."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs ({cpu}), {mem_gib:.0f} GiB RAM, Linux {platform.release()}, Python {platform.python_version()}"


def _cpu_ticks() -> tuple[int, int]:
    """(steal, total) clock ticks of all CPUs since boot, from the ``cpu`` line of /proc/stat (proc(5))."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is
    # already counted in user/nice, so it is left out of the total.
    return fields[7], sum(fields[:8])


def _reported_kib() -> int | None:
    """KiB of freed guest memory reported to the host since boot, or None where not exposed."""
    try:
        return int(REPORTED_KIB.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def page_reporting_paused(warm_mib: int) -> Iterator[bool]:
    """Stop free page reporting for the block, after warming ``warm_mib`` MiB of guest memory.

    Measures the code as on a host that does not take back freed guest memory: with
    reporting on, memory freed by ``drop_caches`` or a deleted file is handed to the
    host, and its next use faults there (module docstring). Memory already handed
    back stays so, so ``warm_mib`` MiB are touched and freed first: freed while
    reporting is off, they stay backed, and the page allocator hands out those
    recently freed pages first. The order is restored on exit, whatever happens.

    Yields:
        True if reporting was paused; False where the kernel has no
        ``page_reporting_order`` to set (no free page reporting) or it cannot be
        written (not root), and nothing was changed.
    """
    try:
        before = REPORTING_ORDER.read_text().strip()
        REPORTING_ORDER.write_text(f"{NO_REPORTING_ORDER}\n")
    except OSError:
        yield False
        return
    try:
        page = mmap.PAGESIZE
        warm = mmap.mmap(-1, warm_mib << 20)
        try:
            for offset in range(0, len(warm), page):
                warm[offset] = 1
        finally:
            warm.close()
        yield True
    finally:
        REPORTING_ORDER.write_text(f"{before}\n")


class HostMeter:
    """What the hypervisor took since the meter was made: CPU time (steal) and freed memory.

    Shape: :meth:`share` is a fraction in [0, 1] of all CPUs' time; 0 on bare metal
    and wherever /proc/stat has no steal column. :meth:`reclaimed_mib` is MiB, or
    None where the kernel does not expose free page reporting.
    """

    def __init__(self) -> None:
        self._start = _cpu_ticks()
        self._start_reported_kib = _reported_kib()

    def share(self) -> float:
        """Stolen ticks / all ticks since the meter was made."""
        steal, total = _cpu_ticks()
        elapsed = total - self._start[1]
        return (steal - self._start[0]) / elapsed if elapsed > 0 else 0.0

    def reclaimed_mib(self) -> float | None:
        """MiB of freed guest memory the host took back since the meter was made (free page reporting)."""
        now = _reported_kib()
        if now is None or self._start_reported_kib is None:
            return None
        return (now - self._start_reported_kib) / 1024

    def report(self) -> str:
        """One line for the end of a benchmark's output, flagging a disturbed run."""
        share = self.share()
        verdict = (f"DISTURBED (> {NOISY_STEAL_SHARE:.0%}): the host took the CPUs away; repeat on a quiet machine"
                   if share > NOISY_STEAL_SHARE else "quiet")
        line = f"host steal time during the run: {share:.2%} of CPU time, {verdict}"
        reclaimed = self.reclaimed_mib()
        if reclaimed is not None:
            line += (f"; the host took back {reclaimed:,.0f} MiB of freed guest memory (free page reporting:"
                     " first use of it costs more)")
        return line
