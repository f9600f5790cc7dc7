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

import os
import platform
from pathlib import Path

#: Steal share above which a run is flagged as disturbed (the quiet full runs recorded in docs/benchmarks.md: < 0.1 %).
NOISY_STEAL_SHARE = 0.01
#: Total KiB the guest has reported free to the host, where the kernel's page_reporting
#: module exposes it (a counter of some VM kernels; absent elsewhere).
REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")


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
