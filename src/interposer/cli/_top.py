"""``interposer top``: live per-volume/pod I/O rates from two scrapes of the collector's /metrics.

Rates are differences of the collector's counters between two scrapes divided by the
time between them; the p99 latency is estimated from the difference of the op-duration
histogram buckets with linear interpolation inside the bucket, as Prometheus's
``histogram_quantile`` does (prometheus/promql/quantile.go, ``bucketQuantile``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator

import msgspec
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ._metrics import Samples, scrape

#: Time between the two scrapes of one frame (and between frames), seconds.
DEFAULT_INTERVAL_S = 2.0
#: Columns of the table when stdout is no terminal (rich would take 80).
TOP_WIDTH_WHEN_PIPED = 200
#: The quantile shown in the latency column.
LATENCY_QUANTILE = 0.99
#: Bytes per megabyte in the MB/s column (SI, as fio and dd print MB/s).
BYTES_PER_MB = 1_000_000
#: Bytes per MiB in the worker memory column (as the pod's memory limit, e.g. 1Gi).
BYTES_PER_MIB = 1 << 20
#: Bytes per KiB in the request size column (requests are multiples of 4 KiB pages).
BYTES_PER_KIB = 1 << 10

_Key = tuple[str, str, str]  # (volume, namespace, pod)


class TopRow(msgspec.Struct, frozen=True, kw_only=True):
    """The rates of one (volume, namespace, pod) over one interval.

    Attributes:
        volume: volume id.
        namespace: pod namespace (``""`` if unknown).
        pod: pod name (``""`` if unknown).
        iops: FUSE ops per second, every op and result.
        read_mb_per_s: bytes read per second / 10⁶.
        write_mb_per_s: bytes written per second / 10⁶.
        p99_latency_s: 99th percentile op duration over the interval, seconds; NaN
            when no op finished in it.
        errors_per_s: failed ops per second (any errno, injected or not).
        faults_per_s: ops failed on purpose by fault layers per second.
        p99_delay_lateness_s: 99th percentile over the interval of how much later
            than their delays asked the worker resumed delayed ops, seconds
            (``interposer_delay_lateness_seconds``; what the application gets on top
            of the emulated latency); NaN when no op was delayed in it.
        sequential_share: of the read and write requests in the interval, the share
            that continued their file's previous one (``interposer_sequential_ops_total``
            over the requests counted in ``interposer_io_size_bytes``), 0..1; NaN when
            there were none.
        mean_request_bytes: mean size of those requests, bytes; NaN when none.
        worker_up: ``interposer_worker_up`` in the second scrape: 1 up, 0 down (went
            silent without unmounting), None absent (unmounted, or not reported).
        resident_memory_bytes: the worker's RSS, bytes; None when not reported.
        memory_limit_bytes: its cgroup's memory limit, bytes; None when none.
    """

    volume: str
    namespace: str
    pod: str
    iops: float
    read_mb_per_s: float
    write_mb_per_s: float
    p99_latency_s: float
    errors_per_s: float
    faults_per_s: float
    p99_delay_lateness_s: float = math.nan
    sequential_share: float = math.nan
    mean_request_bytes: float = math.nan
    worker_up: int | None = None
    resident_memory_bytes: float | None = None
    memory_limit_bytes: float | None = None


def _by_key(samples: Samples, name: str) -> Iterator[tuple[_Key, dict[str, str], float]]:
    for (sample, labels), value in samples.items():
        if sample == name:
            labels_dict = dict(labels)
            key = (labels_dict.get("volume", ""), labels_dict.get("namespace", ""), labels_dict.get("pod", ""))
            yield key, labels_dict, value


def _deltas(before: Samples, after: Samples, name: str) -> Iterator[tuple[_Key, dict[str, str], float]]:
    """``after − before`` per series of ``name`` (a series new in ``after`` counts from 0)."""
    for (sample, labels), value in after.items():
        if sample == name:
            labels_dict = dict(labels)
            key = (labels_dict.get("volume", ""), labels_dict.get("namespace", ""), labels_dict.get("pod", ""))
            yield key, labels_dict, max(0.0, value - before.get((sample, labels), 0.0))


def bucket_quantile(quantile: float, buckets: list[tuple[float, float]]) -> float:
    """Estimate a quantile from cumulative histogram buckets, as PromQL's ``histogram_quantile``.

    Args:
        quantile: 0..1.
        buckets: ``(upper bound in seconds, cumulative count)``, any order; must include
            the ``+Inf`` bucket.

    Returns:
        The estimate, seconds; NaN when the histogram is empty. Inside a bucket the
        value is interpolated linearly (the first bucket starts at 0); a quantile in
        the ``+Inf`` bucket returns the highest finite bound.
    """
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return math.nan
    rank = quantile * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _bucket_deltas(before: Samples, after: Samples, name: str) -> dict[_Key, dict[float, float]]:
    """Per (volume, namespace, pod): upper bound (s) → growth of the cumulative bucket ``name``, summed over ops."""
    buckets: dict[_Key, dict[float, float]] = {}
    for key, labels, delta in _deltas(before, after, name):
        per_bound = buckets.setdefault(key, {})
        bound = float(labels["le"])
        per_bound[bound] = per_bound.get(bound, 0.0) + delta
    return buckets


def _sums(before: Samples, after: Samples, name: str) -> dict[_Key, float]:
    """Per (volume, namespace, pod): growth of ``name`` between the scrapes, summed over its other labels."""
    sums: dict[_Key, float] = {}
    for key, _, delta in _deltas(before, after, name):
        sums[key] = sums.get(key, 0.0) + delta
    return sums


def _ratio(part: float, whole: float) -> float:
    """``part / whole``; NaN when ``whole`` is 0 (nothing to divide)."""
    return part / whole if whole else math.nan


def compute_rows(before: Samples, after: Samples, interval_s: float) -> list[TopRow]:
    """Rates per (volume, namespace, pod) between two scrapes of the collector.

    Args:
        before: the first scrape.
        after: the second scrape.
        interval_s: time between them, seconds (> 0).

    Returns:
        One row per (volume, namespace, pod) present in ``after``, sorted by IOPS,
        busiest first.

    Raises:
        ValueError: ``interval_s`` is not positive.
    """
    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s}")
    keys: set[_Key] = {key for key, _, _ in _by_key(after, "interposer_ops_total")}
    ops: dict[_Key, float] = {}
    errors: dict[_Key, float] = {}
    for key, labels, delta in _deltas(before, after, "interposer_ops_total"):
        ops[key] = ops.get(key, 0.0) + delta
        if labels.get("result") != "ok":
            errors[key] = errors.get(key, 0.0) + delta
    moved: dict[tuple[_Key, str], float] = {}
    for key, labels, delta in _deltas(before, after, "interposer_bytes_total"):
        moved[(key, labels.get("direction", ""))] = moved.get((key, labels.get("direction", "")), 0.0) + delta
    faults: dict[_Key, float] = {}
    for key, _, delta in _deltas(before, after, "interposer_injected_faults_total"):
        faults[key] = faults.get(key, 0.0) + delta
    requests = _sums(before, after, "interposer_io_size_bytes_count")
    request_bytes = _sums(before, after, "interposer_io_size_bytes_sum")
    sequential = _sums(before, after, "interposer_sequential_ops_total")
    durations = _bucket_deltas(before, after, "interposer_op_duration_seconds_bucket")
    lateness = _bucket_deltas(before, after, "interposer_delay_lateness_seconds_bucket")
    gauges = {name: {key: value for key, _, value in _by_key(after, name)}
              for name in ("interposer_worker_up", "interposer_worker_resident_memory_bytes",
                           "interposer_worker_memory_limit_bytes")}
    up = gauges["interposer_worker_up"]
    rows = [
        TopRow(
            volume=key[0], namespace=key[1], pod=key[2],
            iops=ops.get(key, 0.0) / interval_s,
            read_mb_per_s=moved.get((key, "read"), 0.0) / interval_s / BYTES_PER_MB,
            write_mb_per_s=moved.get((key, "write"), 0.0) / interval_s / BYTES_PER_MB,
            p99_latency_s=bucket_quantile(LATENCY_QUANTILE, list(durations.get(key, {}).items())),
            errors_per_s=errors.get(key, 0.0) / interval_s,
            faults_per_s=faults.get(key, 0.0) / interval_s,
            p99_delay_lateness_s=bucket_quantile(LATENCY_QUANTILE, list(lateness.get(key, {}).items())),
            sequential_share=_ratio(sequential.get(key, 0.0), requests.get(key, 0.0)),
            mean_request_bytes=_ratio(request_bytes.get(key, 0.0), requests.get(key, 0.0)),
            worker_up=int(up[key]) if key in up else None,
            resident_memory_bytes=gauges["interposer_worker_resident_memory_bytes"].get(key),
            memory_limit_bytes=gauges["interposer_worker_memory_limit_bytes"].get(key),
        )
        for key in keys
    ]
    rows.sort(key=lambda row: (-row.iops, row.volume, row.namespace, row.pod))
    return rows


def top_table(rows: list[TopRow], source: str, interval_s: float) -> Table:
    """Render rows as a rich table."""
    table = Table(title=f"interposer top — {source}, rates over {interval_s:g} s", title_justify="left")
    for header, justify in (("volume", "left"), ("namespace", "left"), ("pod", "left"), ("IOPS", "right"),
                            ("read MB/s", "right"), ("write MB/s", "right"), ("p99 ms", "right"),
                            ("errors/s", "right"), ("faults/s", "right"), ("delay late p99 ms", "right"),
                            ("seq %", "right"), ("I/O KiB", "right"), ("worker", "left"), ("worker MiB", "right")):
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(
            row.volume, row.namespace or "-", row.pod or "-", f"{row.iops:.0f}", f"{row.read_mb_per_s:.2f}",
            f"{row.write_mb_per_s:.2f}", _ms(row.p99_latency_s),
            f"{row.errors_per_s:.1f}", f"{row.faults_per_s:.1f}", _ms(row.p99_delay_lateness_s),
            "-" if math.isnan(row.sequential_share) else f"{row.sequential_share:.0%}",
            "-" if math.isnan(row.mean_request_bytes) else f"{row.mean_request_bytes / BYTES_PER_KIB:.0f}",
            _worker_state(row.worker_up), _memory(row.resident_memory_bytes, row.memory_limit_bytes),
        )
    if not rows:
        table.caption = "no volume has reported yet"
    return table


def _worker_state(up: int | None) -> str:
    """The worker column: "up", "DOWN" (silent without unmounting: its mount answers ENOTCONN), or "-"."""
    return "-" if up is None else ("up" if up else "[bold red]DOWN[/]")


def _memory(rss_bytes: float | None, limit_bytes: float | None) -> str:
    """The worker memory column: RSS in MiB, with its share of the cgroup limit when there is one."""
    if rss_bytes is None:
        return "-"
    if not limit_bytes:
        return f"{rss_bytes / BYTES_PER_MIB:.0f}"
    return f"{rss_bytes / BYTES_PER_MIB:.0f} ({rss_bytes / limit_bytes:.0%})"


def _ms(seconds: float) -> str:
    """A duration column: milliseconds, 2 decimals; "-" for NaN (nothing measured)."""
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.2f}"


def run_top(url: str, interval_s: float, once: bool, console: Console | None = None) -> None:
    """Show the table: one frame (``once``) or live until Ctrl-C.

    Args:
        url: the collector's ``/metrics`` URL.
        interval_s: time between scrapes, seconds.
        once: print one frame (after two scrapes ``interval_s`` apart) and return.
        console: where to print; a new stdout console if None.

    Raises:
        OSError: the collector did not answer.
    """
    # Piped (`top --once | less`, a CI log): rich would draw 80 columns and cut every cell.
    console = console or Console(width=None if sys.stdout.isatty() else TOP_WIDTH_WHEN_PIPED)
    before, before_t = scrape(url), time.monotonic()
    if once:
        time.sleep(interval_s)
        after, after_t = scrape(url), time.monotonic()
        console.print(top_table(compute_rows(before, after, after_t - before_t), url, interval_s))
        return
    with Live(top_table([], url, interval_s), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval_s)
            after, after_t = scrape(url), time.monotonic()
            live.update(top_table(compute_rows(before, after, after_t - before_t), url, interval_s), refresh=True)
            before, before_t = after, after_t
