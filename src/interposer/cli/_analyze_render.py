"""Human-readable rendering of ``interposer analyze`` (rich tables, numbers with units)."""

from __future__ import annotations

import datetime as dt
import sys

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ._analyze import AnalysisReport, FileStats, SizeStats, Timeline, VolumeReport
from ._analyze_objects import FINDINGS, ObjectStoreFit

#: Width of the timeline's bar column, characters.
BAR_WIDTH = 30
#: Columns when stdout is no terminal (rich would take 80 and cut paths).
WIDTH_WHEN_PIPED = 120
#: Ops listed by name in the summary line; the rest are summed as "other".
OPS_LISTED = 8


def human_bytes(count: float) -> str:
    """``1536`` → ``1.5 KiB`` (binary units, as ``ls -h``)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # unreachable


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    if count and count % 1024 == 0:  # request sizes are mostly whole KiB: say 64 KiB, not 64.0 KiB
        for unit, factor in (("MiB", 1 << 20), ("KiB", 1 << 10)):
            if count % factor == 0:
                return f"{count // factor} {unit}"
    return human_bytes(count)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _count(value: int) -> str:
    return f"{value:,}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _period(seconds: int) -> str:
    """A bucket or window length: ``1 h``, ``15 min``, ``30 s``, ``1 d`` (whole units when they fit)."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return _duration(seconds) if seconds >= 120 else f"{seconds} s"


def _when(moment: dt.datetime, with_date: bool = True) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S")


def _listing(counts: dict[str, int], limit: int = OPS_LISTED) -> str:
    if not counts:
        return "none"
    items = list(counts.items())
    shown = " · ".join(f"{name} {_count(count)}" for name, count in items[:limit])
    rest = sum(count for _name, count in items[limit:])
    return shown + (f" · other {_count(rest)}" if rest else "")


def _size_buckets(stats: SizeStats) -> str:
    return " ".join(f"≤{_size(bucket.le_bytes).replace(' ', '')}:{_count(bucket.count)}" for bucket in stats.buckets)


def _table(title: str) -> Table:
    # min_width: rich wraps a title to the table's width, and narrow tables are common here.
    return Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False, min_width=len(title))


def _requests_table(volume: VolumeReport) -> Table:
    table = _table("requests (successful)")
    for header, justify in (("", "left"), ("count", "right"), ("bytes", "right"), ("median", "right"),
                            ("p90", "right"), ("seq. ops", "right"), ("seq. bytes", "right"),
                            ("sizes (power-of-two buckets)", "left")):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for name, sizes, moved, sequential in (
            ("read", volume.read_sizes, volume.read_bytes, volume.sequential_reads),
            ("write", volume.write_sizes, volume.written_bytes, volume.sequential_writes)):
        table.add_row(name, _count(sizes.count), human_bytes(moved), _size(sizes.median_bytes),
                      _size(sizes.p90_bytes), _share(sequential.by_ops), _share(sequential.by_bytes),
                      _size_buckets(sizes))
    return table


def _files_table(title: str, files: list[FileStats]) -> Table:
    table = _table(title)
    for header, justify in (("path", "left"), ("read", "right"), ("written", "right"), ("reads", "right"),
                            ("writes", "right"), ("ops", "right")):
        table.add_column(header, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for f in files:
        table.add_row(f.path, human_bytes(f.read_bytes), human_bytes(f.write_bytes), _count(f.read_ops),
                      _count(f.write_ops), _count(f.ops))
    return table


def _object_store_table(fit: ObjectStoreFit) -> Table:
    table = _table("on object-store FUSE clients (profiles s3, gcs, azure-blob; docs/layers.md)")
    for header in ("what the volume did", "count", "Mountpoint", "gcsfuse", "blobfuse2", "e.g."):
        table.add_column(header, justify="right" if header == "count" else "left",
                         overflow="fold" if header == "e.g." else "ellipsis", no_wrap=header != "e.g.")
    for key, (what, mountpoint, gcsfuse, blobfuse2) in FINDINGS.items():
        count = getattr(fit, key)
        table.add_row(what, _count(count), mountpoint if count else "-", gcsfuse if count else "-",
                      blobfuse2 if count else "-", ", ".join(fit.examples.get(key, [])) or "-")
    caption = "counts: file sessions; renames and links: ops"
    if fit.unknown_flags:
        caption += (f"; {_count(fit.unknown_flags)} sessions wrote through handles whose open flags the "
                    "recording lacks (made before OpEvent.flags): not classified")
    table.caption, table.caption_justify = caption, "left"
    return table


def _timeline_table(timeline: Timeline) -> Table:
    table = _table(f"timeline (UTC), {_period(timeline.bucket_s)} buckets")
    for header, justify in (("start", "left"), ("ops", "right"), ("bytes", "right"), ("", "left")):
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    peak = max((bucket.ops for bucket in timeline.buckets), default=0) or 1
    with_date = timeline.buckets[0].start.date() != timeline.buckets[-1].start.date()
    for bucket in timeline.buckets:
        table.add_row(_when(bucket.start, with_date), _count(bucket.ops), human_bytes(bucket.bytes),
                      "█" * round(BAR_WIDTH * bucket.ops / peak))
    return table


def _hours_table(hours: list[int]) -> Table:
    table = _table("ops by hour of day (UTC), all days")
    for header, justify in (("hour", "left"), ("ops", "right"), ("", "left")):
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    peak = max(hours) or 1
    for hour, ops in enumerate(hours):
        table.add_row(f"{hour:02d}:00", _count(ops), "█" * round(BAR_WIDTH * ops / peak))
    return table


def volume_view(volume: VolumeReport) -> Group:
    """Everything about one volume: summary lines, then the tables."""
    parts: list[Table | Text] = []
    facts: Table | None = None

    def line(label: str, text: str) -> None:
        # Consecutive lines share a grid, so a long one wraps under its text, not its label.
        nonlocal facts
        if facts is None or parts[-1] is not facts:
            facts = Table.grid(padding=(0, 1))
            facts.add_column(style="bold", no_wrap=True, min_width=10)
            facts.add_column(overflow="fold")
            parts.append(facts)
        facts.add_row(f" {label}", text)

    same_day = volume.first_event.date() == volume.last_event.date()
    parts.append(Text.assemble((f"volume {volume.volume}", "bold cyan"),
                               f"  {', '.join(volume.pods) or 'pod unknown'} · {volume.workers} worker process(es)"))
    line("span", f"{_when(volume.first_event)} → {_when(volume.last_event, not same_day)} UTC "
                 f"({_duration(volume.span_s)}) · {_count(volume.events)} events · "
                 f"metadata {_share(volume.metadata_share)} of ops")
    line("ops", _listing(volume.ops))
    line("errors", f"{_listing(volume.errors)} · injected: {_listing(volume.injected_faults)} · delayed: "
                   f"{_count(volume.delayed_ops)} ops, {volume.delay_s:.3f} s")
    line("moved", f"read {human_bytes(volume.read_bytes)} · written {human_bytes(volume.written_bytes)}")
    demand = volume.demand
    line("demand", f"reads+writes per second over {_count(demand.seconds)} s: IOPS p50 {_count(demand.iops_p50)} · "
                   f"p99 {_count(demand.iops_p99)} · max {_count(demand.iops_max)}; "
                   f"p50 {human_bytes(demand.bytes_per_s_p50)}/s · p99 {human_bytes(demand.bytes_per_s_p99)}/s · "
                   f"max {human_bytes(demand.bytes_per_s_max)}/s (a profile's limits: interposer profiles)")
    sessions = volume.sessions
    line("sessions", f"{_count(sessions.count)} file sessions · {_count(sessions.whole_file_reads)} read their "
                     f"file whole · median {_size(sessions.median_bytes)} moved per session")
    if volume.batches_missing or volume.events_dropped or volume.events_sampled_out:
        line("missing", f"{_count(volume.batches_missing)} batches not in the recordings · "
                        f"{_count(volume.events_dropped)} events dropped and {_count(volume.events_sampled_out)} "
                        "sampled out by the workers: counts above are short by those")
    parts.append(_requests_table(volume))
    if volume.top_files_by_bytes:
        parts.append(_files_table("top files by bytes", volume.top_files_by_bytes))
    parts.append(_files_table("top files by ops", volume.top_files_by_ops))
    if volume.top_directories:
        table = _table("top directories by metadata ops")
        table.add_column("path", overflow="fold")
        table.add_column("metadata ops", justify="right")
        for directory in volume.top_directories:
            table.add_row(directory.path, _count(directory.metadata_ops))
        parts.append(table)
    parts.append(_object_store_table(volume.object_store))
    timeline = volume.timeline
    parts.append(_timeline_table(timeline))
    window = timeline.quietest_window
    if window is None:
        line("quietest", f"the span is shorter than the {_period(timeline.window_s)} window (--window)")
    else:
        line("quietest", f"{_period(timeline.window_s)} window: {_when(window.start)} → "
                         f"{_when(window.end, window.start.date() != window.end.date())} UTC, "
                         f"{_count(window.ops)} ops, {human_bytes(window.bytes)}: the suggested maintenance window")
    if timeline.ops_by_hour_utc is not None:
        parts.append(_hours_table(timeline.ops_by_hour_utc))
    return Group(*parts)


def print_report(report: AnalysisReport, console: Console | None = None) -> None:
    """Print the report: a header line, then each volume."""
    console = console or Console(width=None if sys.stdout.isatty() else WIDTH_WHEN_PIPED)
    bounds = ""
    if report.since or report.until:
        since = _when(report.since) if report.since else "the start"
        until = _when(report.until) if report.until else "the end"
        bounds = f", events from {since} until {until} UTC"
    console.print(f"{_count(report.batches)} batches in {_count(report.recordings)} recording(s){bounds}",
                  highlight=False)
    for volume in report.volumes:
        console.print()
        console.print(volume_view(volume), highlight=False)
