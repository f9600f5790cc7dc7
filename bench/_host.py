"""What the benchmarks say about the machine they ran on: its description and the host's noise.

On a virtual machine the host may take the vCPUs away (steal time); a run during
which it did is not a measurement of the code. Seen on the 2-vCPU benchmark VM:
steal grew by ~36,000 ticks during one run, which then showed the do-nothing layer
stack at 0.44× bare instead of ~1.0. Every benchmark prints the steal share of its
run so that such a run is recognised and repeated, not recorded.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: Steal share above which a run is flagged as disturbed (the quiet full runs recorded in docs/benchmarks.md: < 0.1 %).
NOISY_STEAL_SHARE = 0.01


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


class StealMeter:
    """The share of CPU time the hypervisor stole since the meter was made.

    Shape: :meth:`share` is a fraction in [0, 1] of all CPUs' time; 0 on bare metal
    and wherever /proc/stat has no steal column.
    """

    def __init__(self) -> None:
        self._start = _cpu_ticks()

    def share(self) -> float:
        """Stolen ticks / all ticks since the meter was made."""
        steal, total = _cpu_ticks()
        elapsed = total - self._start[1]
        return (steal - self._start[0]) / elapsed if elapsed > 0 else 0.0

    def report(self) -> str:
        """One line for the end of a benchmark's output, flagging a disturbed run."""
        share = self.share()
        verdict = (f"DISTURBED (> {NOISY_STEAL_SHARE:.0%}): the host took the CPUs away; repeat on a quiet machine"
                   if share > NOISY_STEAL_SHARE else "quiet")
        return f"host steal time during the run: {share:.2%} of CPU time, {verdict}"
