"""Human-readable rendering of ``interposer replay`` (a summary and a table per op)."""

from __future__ import annotations

import sys

from rich import box
from rich.console import Console
from rich.table import Table

from ._analyze_render import WIDTH_WHEN_PIPED, human_bytes
from ._replay_report import ReplayReport
from ._replay_target import Prepared


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def describe_prepared(prepared: Prepared) -> str:
    """What preparing did, in one line."""
    return (f"{prepared.directories} directories, {prepared.files} files ({human_bytes(prepared.bytes_written)} "
            f"written), {prepared.symlinks} symlinks, {prepared.removed} names removed, {prepared.kept} already "
            "in place")


def print_report(report: ReplayReport, console: Console | None = None) -> None:
    """Print ``report`` to stdout (or ``console``)."""
    console = console or Console(width=None if sys.stdout.isatty() else WIDTH_WHEN_PIPED)
    prepared = report.prepared
    scale = f", think time × {report.think_scale:g}" if report.timing == "closed" and report.think_scale != 1 else ""
    console.print(f"[bold]replay of volume {report.volume}[/bold] into {report.target} "
                  f"(timing {report.timing}{scale}): {report.ops:,} ops of {report.threads} thread(s)")
    if prepared is not None:
        console.print(f"prepared: {describe_prepared(prepared)}")
    console.print(f"wall time: recorded {report.recorded_wall_s:.3f} s, replayed {report.replayed_wall_s:.3f} s "
                  f"([bold]{_ratio(report.wall_ratio)}[/bold]); time in ops: recorded "
                  f"{report.recorded_busy_s:.3f} s (worker), replayed {report.replayed_busy_s:.3f} s (system calls)")
    console.print(f"data: read {human_bytes(report.read_bytes)}, written {human_bytes(report.written_bytes)}; "
                  f"file handles direct {report.direct_handles:,}, buffered {report.buffered_handles:,}; "
                  f"replayer lag p99 {_latency(report.late_p99_s)}")
    table = Table(box=box.SIMPLE_HEAD, title="per op: recorded (worker service time) · replayed (system call)")
    for header in ("op", "recorded", "errors", "p50", "p99", "replayed", "errors", "outcome ≠", "p50", "p99",
                   "mean"):
        table.add_column(header, justify="left" if header == "op" else "right")
    for row in report.per_op:
        table.add_row(row.op, f"{row.recorded:,}", f"{row.recorded_errors:,}", _latency(row.recorded_p50_s),
                      _latency(row.recorded_p99_s), f"{row.replayed:,}", f"{row.replayed_errors:,}",
                      f"{row.errno_differs:,}", _latency(row.replayed_p50_s), _latency(row.replayed_p99_s),
                      _latency(row.replayed_mean_s))
    console.print(table)
    left = [f"{name} {info['count']:,} ({info['why']})" for name, info in report.not_replayed.items()]
    left += [f"{count:,} × {reason}" for reason, count in sorted(report.skipped.items())]
    if report.unknown_paths:
        left.append(f"{report.unknown_paths:,} ops whose path the worker did not know")
    if left:
        console.print("not replayed: " + "; ".join(left))
    if report.events_missing:
        console.print(f"[yellow]the recording lacks {report.events_missing:,} events (dropped or sampled out by "
                      "the workers): the replay misses them too[/yellow]")
