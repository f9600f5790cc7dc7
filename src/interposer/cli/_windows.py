"""``interposer windows``: the quietest maintenance windows, from the I/O history Prometheus keeps.

A cluster admin picks a time for node drains, storage migrations or backups where
the volumes' I/O is lowest. Prometheus already holds weeks of the collector's
counters, so this reads ``rate(interposer_ops_total[…])`` (or bytes) over the last
``--days`` days with ``/api/v1/query_range``, folds the samples onto one week (or
one day) of local time — slot by slot, averaged over the weeks seen — and slides a
window of the asked length around that period (it wraps: Sunday night runs into
Monday morning). A window is only offered where every slot of it has data: an
hour nobody measured is not a quiet hour. The collectors forget a volume a few
minutes after its pod is gone, so an hour in which no selected volume existed but
a collector was scraped counts as measured with no load (0).
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Literal
from zoneinfo import ZoneInfo

import msgspec

#: Prometheus answers at most 11,000 points per series and query (``query_range``'s
#: limit); longer ranges are fetched in pieces of this many steps.
MAX_POINTS_PER_QUERY = 11_000
#: Seconds in the two periods activity is folded onto.
PERIOD_S = {"week": 7 * 86_400, "day": 86_400}
#: What each ``--metric`` reads: the counter and the unit of its rate.
METRICS = {"ops": ("interposer_ops_total", "ops/s"), "bytes": ("interposer_bytes_total", "B/s")}
#: A series every scraped collector exports: where it has samples, the collectors were
#: watched, so the absence of volume series there means no load, not no data.
COLLECTOR_WATCHED = "max(interposer_collector_nats_connected)"
#: Timeout of one Prometheus API call, seconds.
HTTP_TIMEOUT_S = 30.0

Metric = Literal["ops", "bytes"]
Period = Literal["week", "day"]


class WindowsError(Exception):
    """Prometheus could not be asked, or answered an error; the message says which and why."""


class Window(msgspec.Struct, frozen=True, kw_only=True):
    """One candidate window, in the report's time zone.

    Attributes:
        start: where it starts in the period: ``"Sun 03:00"`` (week) or ``"03:00"`` (day).
        end: where it ends, the same way (exclusive).
        mean_rate: mean of the window's slots' averages, ops/s or bytes/s.
        peak_rate: the highest slot average inside it, same unit.
        share_of_mean: ``mean_rate`` over the whole period's mean rate (0.05 = a
            twentieth of the usual load); NaN when the period's mean is 0.
    """

    start: str
    end: str
    mean_rate: float
    peak_rate: float
    share_of_mean: float


class GroupWindows(msgspec.Struct, frozen=True, kw_only=True):
    """The quietest windows of one group of series (all of them, or one volume).

    Attributes:
        group: ``"all"``, or the volume id with ``--by volume``.
        mean_rate: mean rate over the whole period, ops/s or bytes/s.
        periods_seen: how many weeks (or days) of data the average rests on, at most
            (slots are averaged over the periods in which they have data).
        windows: quietest first, none overlapping another; fewer than asked when the
            period has not enough measured room.
    """

    group: str
    mean_rate: float
    periods_seen: int
    windows: list[Window]


class WindowsReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``interposer windows`` prints (``--json`` prints this).

    Attributes:
        query: the PromQL range query evaluated.
        start: first sample time asked, ISO 8601 UTC.
        end: last sample time asked, ISO 8601 UTC.
        step_s: the resolution, seconds (one slot of the period).
        period: ``"week"`` or ``"day"``.
        timezone: the IANA zone the windows are given in.
        window_s: the window length, seconds.
        unit: ``"ops/s"`` or ``"B/s"``.
        groups: one entry per group, busiest first.
    """

    query: str
    start: str
    end: str
    step_s: int
    period: Period
    timezone: str
    window_s: int
    unit: str
    groups: list[GroupWindows]


def build_query(metric: Metric, by_volume: bool, volumes: Iterable[str], namespaces: Iterable[str],
                rate_window_s: int) -> str:
    """The PromQL of the rate to fold.

    Args:
        metric: ``"ops"`` (every FUSE op) or ``"bytes"`` (read and written).
        by_volume: one series per volume, else one for everything selected (0
            while collectors were scraped but no selected volume had a series).
        volumes: volume ids to keep (empty = all).
        namespaces: pod namespaces to keep (empty = all).
        rate_window_s: the ``rate()`` range, seconds: the step, so that each counter
            increase counts in exactly one sample (it must hold two scrapes or more).
    """
    counter, _unit = METRICS[metric]
    matchers = [f'{label}=~"{"|".join(_regex_escape(v) for v in values)}"'
                for label, values in (("volume", list(volumes)), ("namespace", list(namespaces))) if values]
    selector = f"{counter}{{{', '.join(matchers)}}}" if matchers else counter
    if by_volume:
        return f"sum by (volume) (rate({selector}[{rate_window_s}s]))"
    return f"sum (rate({selector}[{rate_window_s}s])) or on() (0 * {COLLECTOR_WATCHED})"


def _regex_escape(text: str) -> str:
    """Escape ``text`` for a PromQL ``=~`` matcher (RE2 in a double-quoted string)."""
    special = set(r"\.+*?()|[]{}^$")
    escaped = "".join(f"\\{c}" if c in special else c for c in text)
    return escaped.replace("\\", "\\\\").replace('"', '\\"')


def fetch_range(prometheus_url: str, query: str, start_s: float, end_s: float,
                step_s: int) -> dict[str, list[tuple[float, float]]]:
    """Evaluate a range query, in pieces of :data:`MAX_POINTS_PER_QUERY` steps.

    Args:
        prometheus_url: base URL (``http://prometheus:9090``).
        query: PromQL.
        start_s: first evaluation time, seconds since the epoch.
        end_s: last evaluation time, seconds since the epoch.
        step_s: resolution, seconds.

    Returns:
        ``group → [(time_s, value), …]`` in time order; the group is the series'
        ``volume`` label, or ``"all"`` for a series without one. NaN values are
        left out.

    Raises:
        WindowsError: Prometheus unreachable, or the query rejected (its error).
    """
    series: dict[str, list[tuple[float, float]]] = {}
    piece_s = MAX_POINTS_PER_QUERY * step_s
    piece_start = start_s
    while piece_start <= end_s:
        piece_end = min(end_s, piece_start + piece_s - step_s)
        params = urllib.parse.urlencode({"query": query, "start": f"{piece_start:.3f}",
                                         "end": f"{piece_end:.3f}", "step": str(step_s)})
        url = f"{prometheus_url.rstrip('/')}/api/v1/query_range?{params}"
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422: Prometheus says why in the body
            raise WindowsError(f"Prometheus at {prometheus_url} refused the query: {_api_error(exc)}") from None
        except (OSError, ValueError) as exc:
            raise WindowsError(f"cannot query Prometheus at {prometheus_url}: {exc}") from None
        if body.get("status") != "success":
            raise WindowsError(f"Prometheus at {prometheus_url}: {body.get('error', body)}")
        for result in body["data"]["result"]:
            group = result["metric"].get("volume", "all")
            points = series.setdefault(group, [])
            points.extend((float(t), float(v)) for t, v in result["values"] if not math.isnan(float(v)))
        piece_start = piece_end + step_s
    return series


def _api_error(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.load(exc).get("error", exc))
    except (ValueError, OSError):
        return str(exc)


def fold(points: Iterable[tuple[float, float]], period: Period, step_s: int,
         zone: ZoneInfo) -> tuple[list[float | None], int]:
    """Average samples slot by slot over one period of local time.

    Args:
        points: ``(time_s, rate)`` samples.
        period: ``"week"`` (slot 0 = Monday 00:00) or ``"day"`` (slot 0 = 00:00).
        step_s: slot length, seconds; must divide the period.
        zone: the time zone whose wall clock defines the slots (a DST change moves
            the hour of the samples, as it moves people's working hours).

    Returns:
        ``(slots, periods_seen)``: each slot's mean rate (None = no sample fell in
        it), and the most samples any slot got (how many periods the history spans).
    """
    slot_count = PERIOD_S[period] // step_s
    sums = [0.0] * slot_count
    counts = [0] * slot_count
    for time_s, rate in points:
        local = datetime.fromtimestamp(time_s, zone)
        offset_s = local.hour * 3600 + local.minute * 60 + local.second
        if period == "week":
            offset_s += local.weekday() * 86_400
        slot = offset_s // step_s
        sums[slot] += rate
        counts[slot] += 1
    slots = [total / count if count else None for total, count in zip(sums, counts, strict=True)]
    return slots, max(counts, default=0)


def quietest(slots: list[float | None], window_slots: int, count: int) -> list[tuple[int, float, float]]:
    """The ``count`` lowest-mean windows of ``window_slots`` slots, none overlapping another.

    The period is circular (its last slot is followed by its first). Windows with a
    slot without data are never chosen. Ties go to the earliest start.

    Args:
        slots: per-slot mean rates, None = no data.
        window_slots: window length in slots (1 ≤ it ≤ ``len(slots)``).
        count: most windows wanted.

    Returns:
        ``[(first slot, mean rate, peak rate), …]``, quietest first.
    """
    size = len(slots)
    candidates: list[tuple[float, int, float]] = []
    for first in range(size):
        values = [slots[(first + i) % size] for i in range(window_slots)]
        if any(v is None for v in values):
            continue
        measured = [v for v in values if v is not None]
        candidates.append((sum(measured) / window_slots, first, max(measured)))
    candidates.sort()
    taken: list[tuple[int, float, float]] = []
    used = [False] * size
    for mean, first, peak in candidates:
        span = [(first + i) % size for i in range(window_slots)]
        if any(used[s] for s in span):
            continue
        for s in span:
            used[s] = True
        taken.append((first, mean, peak))
        if len(taken) == count:
            break
    return taken


def slot_label(slot: int, step_s: int, period: Period) -> str:
    """``"Mon 00:00"`` (week) or ``"00:00"`` (day) for the start of ``slot``; wraps past the period."""
    offset_s = (slot * step_s) % PERIOD_S[period]
    clock = f"{offset_s % 86_400 // 3600:02d}:{offset_s % 3600 // 60:02d}"
    if period == "day":
        return clock
    return f"{('Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun')[offset_s // 86_400]} {clock}"


def find_windows(prometheus_url: str, *, days: float, window_s: int, step_s: int, period: Period | None,
                 zone_name: str, metric: Metric = "ops", by_volume: bool = False,
                 volumes: Iterable[str] = (), namespaces: Iterable[str] = (), count: int = 3,
                 now_s: float | None = None) -> WindowsReport:
    """Fetch the history and find the quietest windows of each group.

    Args:
        prometheus_url: base URL of the Prometheus that scrapes the collectors.
        days: how much history to read, days (> 0).
        window_s: window length, seconds; a multiple of ``step_s`` shorter than the period.
        step_s: resolution and slot length, seconds; must divide a day, and hold two
            scrapes of the collectors or more (``rate()`` over one step).
        period: fold onto a ``"week"`` or a ``"day"``; None = a week when the samples
            found span 7 days or more, else a day (a Prometheus that keeps 2 days
            cannot say which weekday is quiet).
        zone_name: IANA time zone of the answer (``"UTC"``, ``"Europe/Berlin"``).
        metric: ``"ops"`` or ``"bytes"``.
        by_volume: one answer per volume instead of one for all selected.
        volumes: volume ids to keep (empty = all).
        namespaces: pod namespaces to keep (empty = all).
        count: windows per group.
        now_s: end of the history, seconds since the epoch (default: now).

    Returns:
        The report; a group is left out when the history has no sample of it.

    Raises:
        ValueError: a length that does not fit (the message names it), an unknown zone.
        WindowsError: Prometheus failed, or it has no sample of the selection.
    """
    if PERIOD_S["day"] % step_s:
        raise ValueError(f"--step {step_s}s must divide a day (86400 s), e.g. 60, 300, 900, 3600")
    longest: Period = period or "week"
    if window_s % step_s or not step_s <= window_s < PERIOD_S[longest]:
        raise ValueError(f"--window {window_s}s must be a multiple of --step {step_s}s and shorter than a {longest}")
    if days <= 0:
        raise ValueError(f"--days must be > 0, got {days}")
    try:
        zone = ZoneInfo(zone_name)
    except (KeyError, ValueError) as exc:  # ZoneInfoNotFoundError is a KeyError
        raise ValueError(f"--tz {zone_name!r} is not a known IANA time zone ({exc})") from None
    end_s = math.floor((now_s if now_s is not None else datetime.now().timestamp()) / step_s) * step_s
    start_s = end_s - math.ceil(days * 86_400 / step_s) * step_s  # on the step grid, as the slots are
    query = build_query(metric, by_volume, volumes, namespaces, rate_window_s=step_s)
    # The sample at t is the rate over the step before t: it belongs to the slot starting at t - step.
    series = {group: [(t - step_s, rate) for t, rate in points]
              for group, points in fetch_range(prometheus_url, query, start_s + step_s, end_s, step_s).items()}
    if not any(series.values()):
        raise WindowsError(f"Prometheus at {prometheus_url} has no sample of {query} in the last {days:g} days")
    if period is None:
        first_s = min(points[0][0] for points in series.values() if points)
        period = "week" if end_s - first_s >= PERIOD_S["week"] - step_s else "day"
    if window_s >= PERIOD_S[period]:
        raise ValueError(f"--window {window_s}s must be shorter than a {period}: the history found spans less "
                         "than a week, so it is folded onto a day")
    groups = []
    for group, points in series.items():
        if not points:
            continue
        slots, periods_seen = fold(points, period, step_s, zone)
        measured = [v for v in slots if v is not None]
        period_mean = sum(measured) / len(measured)
        windows = [
            Window(start=slot_label(first, step_s, period), end=slot_label(first + window_s // step_s, step_s, period),
                   mean_rate=mean, peak_rate=peak,
                   share_of_mean=mean / period_mean if period_mean else math.nan)
            for first, mean, peak in quietest(slots, window_s // step_s, count)
        ]
        groups.append(GroupWindows(group=group, mean_rate=period_mean, periods_seen=periods_seen, windows=windows))
    groups.sort(key=lambda g: (-g.mean_rate, g.group))
    return WindowsReport(
        query=query, start=_iso(start_s), end=_iso(end_s), step_s=step_s, period=period, timezone=zone_name,
        window_s=window_s, unit=METRICS[metric][1], groups=groups)


def _iso(time_s: float) -> str:
    return datetime.fromtimestamp(time_s, timezone.utc).isoformat()
