"""Rendering of an ``interposer windows`` report (rich)."""

from __future__ import annotations

import math

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ._windows import WindowsReport

#: SI prefixes for rates (ops/s, B/s), as fio and dd print them.
_PREFIXES = ((1e9, "G"), (1e6, "M"), (1e3, "k"))


def _rate(value: float, unit: str) -> str:
    """``1.2 k ops/s``, ``350 B/s``."""
    for scale, prefix in _PREFIXES:
        if value >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.1f} {unit}"


def _hours(seconds: int) -> str:
    return f"{seconds / 3600:g} h" if seconds % 3600 == 0 else f"{seconds / 60:g} min"


def windows_table(report: WindowsReport) -> Group:
    """The report as a header line and one table per group (quietest window first)."""
    header = Text(
        f"Quietest {_hours(report.window_s)} windows per {report.period} ({report.timezone}), "
        f"from {report.start} to {report.end} at {report.step_s} s resolution: {report.query}")
    parts: list[Text | Table] = [header]
    for group in report.groups:
        table = Table(title=f"{group.group}: mean {_rate(group.mean_rate, report.unit)} over "
                            f"{group.periods_seen} {report.period}(s) seen", title_justify="left")
        for column, justify in (("#", "right"), ("window", "left"), ("mean", "right"), ("peak", "right"),
                                ("of the usual load", "right")):
            table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        for rank, window in enumerate(group.windows, 1):
            share = "-" if math.isnan(window.share_of_mean) else f"{window.share_of_mean:.1%}"
            table.add_row(str(rank), f"{window.start} – {window.end}", _rate(window.mean_rate, report.unit),
                          _rate(window.peak_rate, report.unit), share)
        if not group.windows:
            table.caption = "no fully measured window of that length"
        parts.append(table)
    return Group(*parts)
