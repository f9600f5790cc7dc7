"""Human-readable rendering of the demo report (rich table)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ._demo import DemoReport

MIB = 1024 * 1024


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def demo_table(report: DemoReport) -> Table:
    """One row per phase: fio's view next to the collector's."""
    table = Table(title="interposer demo: fio randrw 70/30, 64 KiB, 4 jobs, O_DIRECT", show_lines=False)
    for header, justify in (
        ("phase", "left"), ("policy", "left"), ("read MiB/s", "right"), ("write MiB/s", "right"),
        ("IOPS", "right"), ("read lat mean/p99 ms", "right"), ("write lat mean/p99 ms", "right"),
        ("fio errors", "right"), ("collector ops", "right"), ("collector MiB", "right"),
        ("injected faults", "right"),
    ):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for phase in report.phases:
        fio, col = phase.fio, phase.collector
        table.add_row(
            phase.name, phase.policy.description,
            f"{fio.read_bw_bytes_per_s / MIB:.1f}", f"{fio.write_bw_bytes_per_s / MIB:.1f}",
            f"{fio.read_iops + fio.write_iops:.0f}",
            f"{_ms(fio.read_lat_mean_s)} / {_ms(fio.read_lat_p99_s)}",
            f"{_ms(fio.write_lat_mean_s)} / {_ms(fio.write_lat_p99_s)}",
            str(fio.errors), str(col.ops), f"{col.bytes / MIB:.1f}", str(col.injected_faults),
        )
    return table


def print_demo(report: DemoReport, console: Console | None = None) -> None:
    """Print the demo table."""
    (console or Console()).print(demo_table(report))
