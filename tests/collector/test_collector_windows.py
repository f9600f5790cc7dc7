"""``interposer windows``: quiet maintenance windows from I/O history — in units, and against a real
Prometheus holding eight days of backfilled history (``promtool tsdb create-blocks-from openmetrics``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from collector_helpers import PrometheusServer

from interposer.cli._duration import parse_duration
from interposer.cli._windows import build_query, fold, quietest, slot_label

HOUR = 3600
DAY = 86_400


def _at(weekday: int, hour: int, minute: int = 0) -> float:
    """A UTC time in the week of Monday 2026-11-02 (weekday 0 = Monday)."""
    return datetime(2026, 11, 2 + weekday, hour, minute, tzinfo=timezone.utc).timestamp()


def test_quietest_windows_wrap_around_the_week_and_never_overlap() -> None:
    utc = ZoneInfo("UTC")
    # Hourly slots of a week: 10 everywhere, 1 from Sunday 23:00 to Monday 01:00, 2 on Wednesday 12:00.
    points = [(_at(day, hour), 10.0) for day in range(7) for hour in range(24)]
    points = [(t, 1.0 if t in (_at(6, 23), _at(0, 0)) else 2.0 if t == _at(2, 12) else v) for t, v in points]
    slots, seen = fold(points, "week", HOUR, utc)
    assert seen == 1 and len(slots) == 168
    first, second, third = quietest(slots, 2, 3)
    assert (slot_label(first[0], HOUR, "week"), first[1], first[2]) == ("Sun 23:00", 1.0, 1.0)
    assert slot_label(first[0] + 2, HOUR, "week") == "Mon 01:00"
    # Next: the hour before or after Wednesday noon (mean 6), the earlier start first; then a plain 10.
    assert (slot_label(second[0], HOUR, "week"), second[1]) == ("Wed 11:00", 6.0)
    assert third[1] == 10.0 and slot_label(third[0], HOUR, "week") not in ("Wed 12:00", "Sun 22:00")


def test_a_slot_without_samples_is_never_part_of_a_quiet_window() -> None:
    utc = ZoneInfo("UTC")
    points = [(_at(0, hour), 5.0) for hour in range(24) if hour not in (3, 4)]  # no data 03:00–05:00
    slots, _ = fold(points, "day", HOUR, utc)
    windows = quietest(slots, 2, 50)
    starts = {slot_label(first, HOUR, "day") for first, _, _ in windows}
    assert not starts & {"02:00", "03:00", "04:00"}
    assert len(windows) == 10  # 22 measured hours, 2 around the gap lost: 10 disjoint pairs fit


def test_folding_averages_over_the_periods_seen_in_local_time() -> None:
    tokyo = ZoneInfo("Asia/Tokyo")  # UTC+9, no DST
    points = [(_at(0, 0) + day * DAY, float(day)) for day in range(3)]  # 00:00 UTC = 09:00 JST, values 0, 1, 2
    slots, seen = fold(points, "day", HOUR, tokyo)
    assert slots[9] == 1.0 and seen == 3 and slots.count(None) == 23


def test_the_query_selects_escaped_volumes_and_namespaces() -> None:
    assert build_query("ops", False, [], [], 300) == (
        "sum (rate(interposer_ops_total[300s])) or on() (0 * max(interposer_collector_nats_connected))")
    assert build_query("bytes", True, ["a.b", 'q"x'], ["ml"], 60) == (
        'sum by (volume) (rate(interposer_bytes_total{volume=~"a\\\\.b|q\\"x", namespace=~"ml"}[60s]))')


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200),
                                               ("1h30m", 5400), ("1d", 86_400), ("1.5h", 5400)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2x", "h", "1h 30m", "0", "-5m", "inf", "30m2"])
def test_bad_durations_are_refused_with_the_text(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


# ---- a real Prometheus with eight days of history ---------------------------------------

#: Ops/s of the two volumes: `train` runs at 100 except 10 every day 02:00–03:00 UTC (a nightly
#: checkpoint pause) and 1 on Sunday 03:00–05:00 UTC; `logs` runs at 50 except 5 on Wednesday 12:00–13:00,
#: and is gone on Thursday 20:00–21:00 (no series: its pod ended and the collector forgot it) while the
#: collector is scraped all along.
def _train_rate(moment: datetime) -> float:
    if moment.weekday() == 6 and 3 <= moment.hour < 5:
        return 1.0
    return 10.0 if moment.hour == 2 else 100.0


def _logs_rate(moment: datetime) -> float | None:
    if moment.weekday() == 3 and moment.hour == 20:
        return None
    return 5.0 if moment.weekday() == 2 and moment.hour == 12 else 50.0


def _history(path: Path, end_s: float, days: int) -> None:
    """OpenMetrics counters, one sample a minute, ``days`` days up to ``end_s``."""
    start_s = (int(end_s) // 60) * 60 - days * DAY
    times = range(start_s, start_s + days * DAY + 1, 60)
    lines = ["# TYPE interposer_ops counter"]
    for volume, rate in (("train", _train_rate), ("logs", _logs_rate)):
        total = 0.0
        for t in times:
            now_rate = rate(datetime.fromtimestamp(t, timezone.utc))
            if now_rate is None:
                total = 0.0  # forgotten: a new series starts from 0
                continue
            lines.append(f'interposer_ops_total{{volume="{volume}",namespace="ml",pod="{volume}-0",'
                         f'op="read",result="ok"}} {total} {t}')
            total += 60 * now_rate  # the rate of the minute after t
    lines.append("# TYPE interposer_collector_nats_connected gauge")
    lines.extend(f"interposer_collector_nats_connected 1 {t}" for t in times)
    lines.append("# EOF")
    path.write_text("\n".join(lines) + "\n")


def _windows(prometheus: PrometheusServer, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "interposer.cli", "windows", "--prometheus", prometheus.base_url,
                           "--days", "8", "--json", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.prometheus
def test_windows_finds_the_quiet_hours_in_real_prometheus_history(
        tmp_path: Path, start_prometheus: Callable[..., PrometheusServer]) -> None:
    history = tmp_path / "history.om"
    # a day more than the 8 asked for, up to now: rate() has a full window at both ends of the query (a
    # history starting with the query, or ending before it, makes its first or last minutes look quieter)
    _history(history, time.time(), days=9)
    prometheus = start_prometheus([], job={"job_name": "none", "static_configs": []}, history=history)

    everything = _windows(prometheus)
    [group] = everything["groups"]
    assert group["group"] == "all" and group["periods_seen"] >= 1
    first, second = group["windows"][:2]
    # Sunday 03:00–05:00: train at 1 and logs at 50.
    assert (first["start"], first["end"]) == ("Sun 03:00", "Sun 05:00")
    assert first["mean_rate"] == pytest.approx(51, rel=0.02) and first["peak_rate"] == pytest.approx(51, rel=0.02)
    assert first["share_of_mean"] < 0.5
    # Then two hours holding a nightly pause (60) and a full hour (150). Every day has two such windows,
    # tied up to the rounding of rate() (which wins moves with the hour the test runs at): any will do.
    assert second["start"][4:] in ("01:00", "02:00") and second["end"][:3] == second["start"][:3]
    assert int(second["end"][4:6]) - int(second["start"][4:6]) == 2
    assert second["mean_rate"] == pytest.approx(105, rel=0.02)

    assert everything["period"] == "week"
    short = _windows(prometheus, "--days", "3")  # the last --days wins: too little history to tell weekdays apart
    assert short["period"] == "day" and short["groups"][0]["windows"][0]["start"] in ("01:00", "02:00")

    tokyo = _windows(prometheus, "--tz", "Asia/Tokyo")
    assert tokyo["groups"][0]["windows"][0]["start"] == "Sun 12:00"

    # The hour `logs` did not exist is its quietest (no load, the collector watching); then its slow hour.
    logs = _windows(prometheus, "--volume", "logs", "--window", "1h", "--step", "15m")
    gone, slow = logs["groups"][0]["windows"][:2]
    assert (gone["start"], gone["mean_rate"]) == ("Thu 20:00", 0.0)
    assert slow["start"] == "Wed 12:00" and slow["mean_rate"] == pytest.approx(5, rel=0.05)

    by_volume = _windows(prometheus, "--by-volume", "--period", "day", "--window", "1h")
    assert [g["group"] for g in by_volume["groups"]] == ["train", "logs"]  # busiest first
    assert by_volume["groups"][0]["windows"][0]["start"] == "02:00"

    human = subprocess.run([sys.executable, "-m", "interposer.cli", "windows", "--prometheus", prometheus.base_url,
                            "--days", "8"], capture_output=True, text=True, timeout=120)
    assert human.returncode == 0 and "Sun 03:00 – Sun 05:00" in human.stdout, human.stdout


@pytest.mark.prometheus
def test_windows_explains_what_it_cannot_answer(tmp_path: Path,
                                                start_prometheus: Callable[..., PrometheusServer]) -> None:
    prometheus = start_prometheus([], job={"job_name": "none", "static_configs": []})
    cases = [
        (["--prometheus", prometheus.base_url], 1, "has no sample of"),
        (["--prometheus", prometheus.base_url, "--tz", "Mars/Olympus"], 2, "not a known IANA time zone"),
        (["--prometheus", prometheus.base_url, "--step", "7m"], 2, "must divide a day"),
        (["--prometheus", prometheus.base_url, "--window", "7d"], 2, "shorter than a week"),
        (["--prometheus", prometheus.base_url, "--window", "soon"], 2, "is not a duration"),
        (["--prometheus", "http://127.0.0.1:1"], 1, "cannot query Prometheus at http://127.0.0.1:1"),
    ]
    for args, code, message in cases:
        proc = subprocess.run([sys.executable, "-m", "interposer.cli", "windows", *args],
                              capture_output=True, text=True, timeout=60)
        assert (proc.returncode, message in proc.stderr) == (code, True), (args, proc.stderr)
