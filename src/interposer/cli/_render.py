"""Human-readable rendering of the demo report (rich table)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ._demo import DemoReport

MIB = 1024 * 1024
#: The table needs this many columns; narrower consoles (pipes default to 80) get it anyway.
TABLE_WIDTH = 124


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def demo_table(report: DemoReport) -> Table:
    """One row per phase: fio's view (left) next to the collector's (right)."""
    table = Table(title="interposer demo — fio randrw 70/30, 64 KiB, 4 jobs, O_DIRECT", title_justify="left")
    columns = (
        ("phase", "left"), ("MiB/s r+w", "right"), ("IOPS", "right"), ("read ms mean/p99", "right"),
        ("write ms mean/p99", "right"), ("errors", "right"), ("coll. ops", "right"),
        ("coll. MiB", "right"), ("injected", "right"),
    )
    for header, justify in columns:
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for phase in report.phases:
        fio, col = phase.fio, phase.collector
        table.add_row(
            phase.name,
            f"{fio.read_bw_bytes_per_s / MIB:.1f}+{fio.write_bw_bytes_per_s / MIB:.1f}",
            f"{fio.read_iops + fio.write_iops:.0f}",
            f"{_ms(fio.read_lat_mean_s)} / {_ms(fio.read_lat_p99_s)}",
            f"{_ms(fio.write_lat_mean_s)} / {_ms(fio.write_lat_p99_s)}",
            str(fio.errors), str(col.ops), f"{col.bytes / MIB:.1f}", str(col.injected_faults),
        )
    return table


def print_demo(report: DemoReport, console: Console | None = None) -> None:
    """Print the demo table, then what each phase's policy was."""
    if console is None:
        console = Console()
        console.width = max(console.width, TABLE_WIDTH)
    console.print(demo_table(report))
    for phase in report.phases:
        console.print(f"  [bold]{phase.name}[/bold]: {phase.policy.description}", highlight=False)
    console.print("  MiB/s … errors: what fio (the application) saw; coll. …: what the collector counted",
                  highlight=False)
    console.print("  from the worker's events for the same phase; injected: faults the fault layer injected.",
                  highlight=False)
