"""`interposer analyze`: the numbers on hand-built batches, reading recordings, and what bad input looks like."""

from __future__ import annotations

import datetime as dt
import errno
import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest
from interposer.proto import EventBatch, OpEvent
from interposer.proto.recording import recording_name, write_frame

from interposer.cli._analyze import (
    AnalysisError,
    AnalysisReport,
    TimeBound,
    VolumeReport,
    analyze,
    parse_time_bound,
    read_recordings,
    recording_files,
    size_bucket,
)

NS = 1_000_000_000
#: 2026-12-07 00:00:00 UTC, seconds since the epoch.
DAY_S = 1_796_601_600
KIB = 1024

CLI = [sys.executable, "-m", "interposer.cli"]


def ev(op: str, path: str = "/f", *, t_s: float = 0.0, offset: int = 0, size: int = 0, result: int = 0,
       err: int = 0, session: int = 0, sequential: bool = False, fault: str = "", delay_ns: int = 0,
       duration_ns: int = 10_000, flags: int = 0) -> OpEvent:
    """An event starting ``t_s`` seconds after :data:`DAY_S`."""
    return OpEvent(op=op, ino=7, path=path, offset=offset, size=size, result=result, errno=err,
                   start_ns=round((DAY_S + t_s) * NS), duration_ns=duration_ns, fault=fault, delay_ns=delay_ns,
                   session=session, sequential=sequential, flags=flags)


def batch(events: list[OpEvent], *, volume: str = "vol", worker: str = "w1", seq: int = 1,
          dropped: int = 0) -> EventBatch:
    return EventBatch(volume=volume, worker_id=worker, seq=seq, events=events, dropped_total=dropped,
                      namespace="ns", pod="pod-0")


def only_volume(batches: Sequence[EventBatch], **options: object) -> VolumeReport:
    [volume] = analyze(batches, **options).volumes  # type: ignore[arg-type]
    return volume


# ---- what a volume did ----------------------------------------------------------------


def test_ops_errors_faults_and_bytes_are_counted_per_volume() -> None:
    events = [
        ev("lookup", "/a", err=errno.ENOENT), ev("lookup", "/b"), ev("getattr", "/b"),
        ev("read", "/b", size=4096, result=4096), ev("read", "/b", size=4096, err=errno.EIO, fault="EIO"),
        ev("write", "/b", size=100, result=100, delay_ns=2_000_000),
        ev("copy_file_range", "/c", result=50),
    ]
    other = [ev("read", "/x", size=10, result=10)]
    report = analyze([batch(events), batch(other, volume="other")])
    assert [v.volume for v in report.volumes] == ["other", "vol"]
    vol = report.volumes[1]
    assert vol.events == 7 and vol.pods == ["ns/pod-0"] and vol.workers == 1
    assert vol.ops == {"lookup": 2, "read": 2, "copy_file_range": 1, "getattr": 1, "write": 1}
    assert vol.errors == {"EIO": 1, "ENOENT": 1}
    assert vol.injected_faults == {"EIO": 1}
    assert (vol.delayed_ops, vol.delay_s) == (1, 0.002)
    # As interposer_bytes_total counts them: a copy inside the volume is read and written.
    assert (vol.read_bytes, vol.written_bytes) == (4096 + 50, 100 + 50)
    assert vol.metadata_share == pytest.approx(4 / 7)


def test_sequential_share_by_ops_and_by_bytes_of_successful_requests() -> None:
    reads = [(0, 64 * KIB, True), (64 * KIB, 64 * KIB, True), (1 << 20, 4 * KIB, False),
             (0, 4 * KIB, False), (4 * KIB, 8 * KIB, True)]
    writes = [(0, 512, True), (4096, 512, False)]
    events = [ev("read", offset=o, size=n, result=n, sequential=s) for o, n, s in reads]
    events += [ev("write", "/w", offset=o, size=n, result=n, sequential=s) for o, n, s in writes]
    events.append(ev("read", offset=0, size=4096, err=errno.EIO, sequential=True))  # failed: not a request served
    vol = only_volume([batch(events)])

    assert vol.sequential_reads.by_ops == pytest.approx(sum(s for _o, _n, s in reads) / len(reads))
    assert vol.sequential_reads.by_bytes == pytest.approx(
        sum(n for _o, n, s in reads if s) / sum(n for _o, n, _s in reads))
    assert vol.sequential_writes.by_ops == 0.5 and vol.sequential_writes.by_bytes == 0.5


def test_demand_is_per_second_with_idle_seconds_as_zero() -> None:
    # 100 s of span: second 0 has 300 reads of 4 KiB, second 50 has 10 writes of 1 MiB,
    # seconds 1..9 have 1 read each; failed and metadata ops do not count.
    events = [ev("read", t_s=0.001 * k, size=4 * KIB, result=4 * KIB) for k in range(300)]
    events += [ev("write", t_s=50 + 0.01 * k, size=1 << 20, result=1 << 20) for k in range(10)]
    events += [ev("read", t_s=float(k), size=4 * KIB, result=4 * KIB) for k in range(1, 10)]
    events += [ev("read", t_s=60, size=4 * KIB, err=errno.EIO), ev("getattr", t_s=99.5)]
    vol = only_volume([batch(events)])
    demand = vol.demand
    per_second = [0] * 100
    moved = [0] * 100
    for e in events:
        if e.op in ("read", "write") and not e.errno:
            per_second[e.start_ns // NS - DAY_S] += 1
            moved[e.start_ns // NS - DAY_S] += e.result
    assert demand.seconds == 100
    assert (demand.iops_p50, demand.iops_p99, demand.iops_max) == (
        sorted(per_second)[49], sorted(per_second)[98], 300)
    assert (demand.bytes_per_s_p50, demand.bytes_per_s_p99, demand.bytes_per_s_max) == (
        sorted(moved)[49], sorted(moved)[98], 10 << 20)
    # p99 of 100 seconds is the second busiest: by ops second 50's writes, by bytes second 0's reads.
    assert (demand.iops_p99, demand.bytes_per_s_p99, demand.iops_p50) == (10, 300 * 4 * KIB, 0)


def test_request_sizes_give_nearest_rank_median_p90_and_power_of_two_buckets() -> None:
    sizes = [4096] * 5 + [65536] * 4 + [131072] + [1000, 1]
    vol = only_volume([batch([ev("read", size=n, result=n) for n in sizes])])
    ordered = sorted(sizes)
    assert vol.read_sizes.count == len(sizes)
    assert vol.read_sizes.median_bytes == ordered[math.ceil(0.5 * len(sizes)) - 1] == 4096
    assert vol.read_sizes.p90_bytes == ordered[math.ceil(0.9 * len(sizes)) - 1] == 65536
    assert [(b.le_bytes, b.count) for b in vol.read_sizes.buckets] == [(1, 1), (1024, 1), (4096, 5), (65536, 4),
                                                                      (131072, 1)]
    assert vol.write_sizes.count == 0 and vol.write_sizes.median_bytes is None
    assert [size_bucket(n) for n in (0, 1, 2, 3, 4096, 4097)] == [0, 1, 2, 4, 4096, 8192]


def test_top_files_by_bytes_and_ops_leave_directories_out() -> None:
    events = [ev("read", "/data/big", size=1 << 20, result=1 << 20) for _ in range(3)]
    events += [ev("write", "/data/mid", size=1000, result=1000) for _ in range(5)]
    events += [ev("getattr", "/data/hot") for _ in range(20)]
    events += [ev("lookup", "/data/big"), ev("readdir", "/data"), ev("getattr", "/data"), ev("getattr", "/")]
    vol = only_volume([batch(events)], top=2)

    assert [(f.path, f.read_bytes, f.read_ops, f.ops) for f in vol.top_files_by_bytes] == [
        ("/data/big", 3 << 20, 3, 4), ("/data/mid", 0, 0, 5)]
    assert vol.top_files_by_bytes[1].write_bytes == 5000 and vol.top_files_by_bytes[1].write_ops == 5
    # /data and / are directories (a readdir on one, the parent of others): not files.
    assert [(f.path, f.ops) for f in vol.top_files_by_ops] == [("/data/hot", 20), ("/data/mid", 5)]


def test_directories_rank_by_the_metadata_ops_on_their_entries_and_on_themselves() -> None:
    events = [ev("lookup", f"/imgs/{i}.jpg") for i in range(6)]
    events += [ev("opendir", "/imgs"), ev("readdir", "/imgs"), ev("releasedir", "/imgs")]
    events += [ev("getattr", "/etc/conf"), ev("mkdir", "/etc/d")]
    events += [ev("read", "/imgs/0.jpg", size=10, result=10)]  # data ops are not metadata
    vol = only_volume([batch(events)])
    assert [(d.path, d.metadata_ops) for d in vol.top_directories] == [("/imgs", 9), ("/etc", 2)]


# ---- file sessions ------------------------------------------------------------------


def _session(session: int, reads: list[tuple[int, int, int]], *, path: str = "/f", t_s: float = 0.0,
             release: bool = True) -> list[OpEvent]:
    """open, reads of ``(offset, size asked, bytes returned)``, release."""
    events = [ev("open", path, t_s=t_s, session=session)]
    events += [ev("read", path, t_s=t_s, offset=o, size=n, result=r, session=session) for o, n, r in reads]
    if release:
        events.append(ev("release", path, t_s=t_s + 0.001, session=session))
    return events


def test_whole_file_reads_cover_zero_to_end_of_file_without_gaps_in_any_order() -> None:
    size = 300 * KIB
    chunk = 128 * KIB
    whole_in_order = [(0, chunk, chunk), (chunk, chunk, chunk), (2 * chunk, chunk, size - 2 * chunk)]
    events = _session(1, whole_in_order)
    events += _session(2, list(reversed(whole_in_order)))  # readahead may finish out of order
    events += _session(3, [(0, 4 * chunk, size)])  # one read past the end: whole
    events += _session(4, [(0, chunk, chunk), (chunk, chunk, chunk)])  # never reached the end
    events += _session(5, [(0, chunk, chunk), (2 * chunk, chunk, size - 2 * chunk)])  # a gap
    events += _session(6, [(chunk, chunk, chunk), (2 * chunk, chunk, size - 2 * chunk)])  # not from 0
    events += _session(7, [(0, chunk, chunk), (chunk, chunk, chunk), (2 * chunk, chunk, size - 2 * chunk),
                           (size, chunk, 0)])  # and a read at the end finding nothing: still whole
    events += _session(8, [(0, 4096, 0)])  # an empty file: nothing to read whole
    events += _session(9, [])  # opened and closed
    vol = only_volume([batch(events)])

    assert vol.sessions.count == 9
    assert vol.sessions.whole_file_reads == 4  # sessions 1, 2, 3 and 7
    moved = sorted([size, size, size, 2 * chunk, chunk + size - 2 * chunk, chunk + size - 2 * chunk, size, 0, 0])
    assert vol.sessions.median_bytes == moved[math.ceil(len(moved) / 2) - 1]


def test_whole_file_reads_agree_with_counting_every_byte_on_random_sessions() -> None:
    rng = random.Random(7)
    events: list[OpEvent] = []
    expected_whole = 0
    for session in range(1, 400):
        size = rng.randrange(1, 64)
        reads = []
        for _ in range(rng.randrange(1, 6)):
            offset, asked = rng.randrange(0, size + 2), rng.randrange(1, 24)
            reads.append((offset, asked, max(0, min(asked, size - offset))))
        covered = {b for offset, _asked, got in reads for b in range(offset, offset + got)}
        saw_end = any(offset + got == size and got < asked for offset, asked, got in reads)
        expected_whole += covered == set(range(size)) and saw_end
        events += _session(session, reads)
    vol = only_volume([batch(events)])
    assert vol.sessions.count == 399
    assert vol.sessions.whole_file_reads == expected_whole > 0


def test_a_session_split_across_replicas_and_merged_out_of_order_is_one_session() -> None:
    # The worker published the open and first read in batch 1 and the rest in batch
    # 2; another replica recorded batch 2, and the reader got it first.
    first = [ev("open", "/f", session=1), ev("read", "/f", offset=0, size=100, result=100, session=1)]
    rest = [ev("read", "/f", offset=100, size=100, result=50, session=1), ev("release", "/f", session=1)]
    vol = only_volume([batch(rest, seq=2), batch(first, seq=1)])
    assert (vol.sessions.count, vol.sessions.whole_file_reads, vol.sessions.median_bytes) == (1, 1, 150)
    assert vol.batches_missing == 0


def test_sessions_of_different_workers_with_the_same_id_are_apart() -> None:
    a = _session(1, [(0, 100, 100)])  # never reaches the end
    b = _session(1, [(0, 100, 40)])  # whole
    vol = only_volume([batch(a, worker="w1"), batch(b, worker="w2")])
    assert (vol.sessions.count, vol.sessions.whole_file_reads, vol.workers) == (2, 1, 2)


# ---- time -----------------------------------------------------------------------------


def _ops_at(seconds: list[float]) -> list[OpEvent]:
    return [ev("getattr", "/x", t_s=t) for t in seconds]


def test_quietest_window_has_the_fewest_ops_and_ties_go_to_the_earliest() -> None:
    # Ops per 10-minute slot over 2 h (a slot's ops in its first seconds): 30-minute
    # windows with 1 op exist in both hours, none with 0.
    per_slot = [5, 4, 0, 1, 0, 6, 3, 0, 1, 0, 5, 2]
    times = [slot * 600 + k for slot, count in enumerate(per_slot) for k in range(count)]
    vol = only_volume([batch(_ops_at(times))], window_s=1800)
    window = vol.timeline.quietest_window
    assert window is not None and vol.timeline.window_s == 1800

    def ops_in(start_s: int) -> int:
        return sum(1 for t in times if start_s <= t < start_s + 1800)

    starts = range(times[0], times[-1] - 1800 + 2)  # every window inside the span, by the second
    quietest = min(starts, key=lambda s: (ops_in(s), s))
    assert [s for s in starts if ops_in(s) == 1][-1] > 3600, "a tie in the second hour"
    assert window.ops == ops_in(quietest) == 1
    assert window.start == dt.datetime.fromtimestamp(DAY_S + quietest, dt.UTC)  # 00:10:04, after slot 1's ops
    assert window.end - window.start == dt.timedelta(seconds=1800)


def test_a_span_shorter_than_the_window_has_no_quietest_window() -> None:
    vol = only_volume([batch(_ops_at([0, 100, 200]))], window_s=3600)
    assert vol.timeline.quietest_window is None


def test_timeline_buckets_include_the_empty_ones_and_align_to_the_clock() -> None:
    times = [30, 40, 3600 * 2 + 5, 3600 * 2 + 7]  # nothing in the second hour
    vol = only_volume([batch(_ops_at(times))], bucket_s=3600)
    assert [(b.start.hour, b.ops) for b in vol.timeline.buckets] == [(0, 2), (1, 0), (2, 2)]
    assert vol.timeline.bucket_s == 3600 and vol.timeline.resolution_s == 1


def test_ops_by_hour_of_day_only_when_the_span_covers_a_day() -> None:
    times = [h * 3600 + 1 for h in range(25)] + [5 * 3600 + 2, 30 * 3600]  # 00:00 day 1 to 06:00 day 2
    vol = only_volume([batch(_ops_at(times))])
    hours = vol.timeline.ops_by_hour_utc
    assert hours is not None
    expected = [0] * 24
    for t in times:
        expected[int(t // 3600) % 24] += 1
    assert hours == expected
    assert vol.timeline.resolution_s == 10  # 30 h: 1 s and 2 s buckets would be too many
    assert only_volume([batch(_ops_at([0, 23 * 3600]))]).timeline.ops_by_hour_utc is None


def test_since_and_until_keep_events_that_started_in_between() -> None:
    events = _ops_at([0, 10, 20, 30])
    vol = only_volume([batch(events)], since_ns=(DAY_S + 10) * NS, until_ns=(DAY_S + 30) * NS)
    assert vol.events == 2 and vol.first_event == dt.datetime(2026, 12, 7, 0, 0, 10, tzinfo=dt.UTC)
    with pytest.raises(AnalysisError, match="no events in 1 recorded batches in the time range"):
        analyze([batch(events)], since_ns=(DAY_S + 31) * NS)


@pytest.mark.parametrize(("text", "bound"), [
    ("2026-12-07T01:00:00Z", TimeBound(at_ns=(DAY_S + 3600) * NS)),
    ("2026-12-07T01:00:00", TimeBound(at_ns=(DAY_S + 3600) * NS)),  # naive = UTC
    ("2026-12-07T02:00:00+01:00", TimeBound(at_ns=(DAY_S + 3600) * NS)),
    ("2h", TimeBound(before_newest_ns=7200 * NS)),
    ("1h30m", TimeBound(before_newest_ns=5400 * NS)),
    ("90s", TimeBound(before_newest_ns=90 * NS)),
    ("1.5d", TimeBound(before_newest_ns=129600 * NS)),
])
def test_time_bounds_are_iso_8601_or_durations_before_the_newest_event(text: str, bound: TimeBound) -> None:
    assert parse_time_bound(text) == bound


@pytest.mark.parametrize("text", ["yesterday", "2h ago", "", "12:00:00x", "-2h"])
def test_an_unparsable_time_bound_says_what_is_accepted(text: str) -> None:
    with pytest.raises(AnalysisError, match="neither an ISO 8601 time .* nor a duration"):
        parse_time_bound(text)


# ---- what the recordings lack ------------------------------------------------------------


def test_missing_batches_and_dropped_events_are_reported() -> None:
    batches = [batch(_ops_at([0]), seq=1), batch(_ops_at([1]), seq=4, dropped=7),
               batch(_ops_at([2]), seq=5, dropped=3), batch(_ops_at([3]), worker="w2", seq=9)]
    vol = only_volume(batches)
    assert vol.batches_missing == 2  # seq 2 and 3 of w1
    assert vol.events_dropped == 7  # a total so far per worker: the largest seen


# ---- reading recordings --------------------------------------------------------------


def _write_recording(directory: Path, instance: str, start_s: int, batches: list[EventBatch]) -> Path:
    path = directory / recording_name(dt.datetime.fromtimestamp(start_s, dt.UTC), instance)
    with open(path, "ab") as out:
        for b in batches:
            write_frame(out, msgspec.msgpack.encode(b))
    return path


def test_replicas_files_are_merged_by_time_and_each_replica_read_in_name_order(tmp_path: Path) -> None:
    b = [batch(_ops_at([t]), seq=t + 1) for t in range(6)]
    _write_recording(tmp_path, "a", DAY_S + 3, [b[3], b[5]])  # replica a's second file
    _write_recording(tmp_path, "a", DAY_S, [b[0], b[2]])
    _write_recording(tmp_path, "b", DAY_S, [b[1], b[4]])
    (tmp_path / "notes.txt").write_text("not read: not named as a recording")
    files = recording_files([tmp_path])
    assert len(files) == 3
    assert [x.seq for x in read_recordings(files)] == [1, 2, 3, 4, 5, 6]


def test_json_report_decodes_as_the_report_struct(tmp_path: Path) -> None:
    _write_recording(tmp_path, "a", DAY_S, [batch(_session(1, [(0, 100, 10)]))])
    result = subprocess.run([*CLI, "analyze", "--json", str(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    report = msgspec.json.decode(result.stdout, type=AnalysisReport)
    assert report.recordings == 1 and report.volumes[0].sessions.whole_file_reads == 1
    assert json.loads(result.stdout)["volumes"][0]["first_event"] == "2026-12-07T00:00:00Z"


def test_the_human_report_says_the_numbers_with_units(tmp_path: Path) -> None:
    events = _session(1, [(0, 128 * KIB, 128 * KIB), (128 * KIB, 128 * KIB, 1000)], path="/data/x.bin")
    _write_recording(tmp_path, "a", DAY_S, [batch(events)])
    result = subprocess.run([*CLI, "analyze", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "volume vol" in out and "ns/pod-0" in out
    assert "1 file sessions · 1 read their file whole" in out
    assert "129.0 KiB" in out and "128 KiB" in out and "/data/x.bin" in out
    assert "the span is shorter than the 1 h window" in out


def _written(session: int, path: str, flags: int, offsets: list[int], *, fsync_after: int | None = None,
             t_s: float = 0.0) -> list[OpEvent]:
    """A file session writing 100 bytes at each of ``offsets`` through a handle opened with ``flags``."""
    created = bool(flags & os.O_CREAT)
    events = [ev("create" if created else "open", path, t_s=t_s, session=session, flags=flags)]
    for i, offset in enumerate(offsets):
        events.append(ev("write", path, t_s=t_s + 0.1 + i * 0.01, offset=offset, size=100, result=100,
                         session=session, flags=flags))
        if fsync_after == i:
            events.append(ev("fsync", path, t_s=t_s + 0.105 + i * 0.01, session=session, flags=flags))
    return [*events, ev("release", path, t_s=t_s + 0.5, session=session)]


def test_what_object_store_clients_would_refuse_or_move_whole_is_counted_per_session() -> None:
    w = os.O_WRONLY
    events = [
        *_written(1, "/logs/train.log", w | os.O_APPEND, [5000, 5100], t_s=0),  # an append to a log that existed
        *_written(2, "/db/index", os.O_RDWR, [4096, 0], t_s=1),  # a change inside an existing file
        *_written(3, "/ckpt/a", w | os.O_CREAT | os.O_TRUNC, [0, 100, 200], t_s=2),  # new, front to back: fine
        *_written(4, "/ckpt/b", w | os.O_CREAT, [0, 8192], t_s=3),  # new, with a hole: out of order
        *_written(5, "/data/c", w | os.O_TRUNC, [0, 100], t_s=4),  # an existing file emptied and rewritten
        *_written(6, "/wal", w | os.O_CREAT, [0, 100], fsync_after=0, t_s=5),  # written after its fsync
        *_written(7, "/old", 0, [0], t_s=6),  # a recording from before OpEvent.flags
        ev("rename", "/ckpt/a", t_s=7), ev("rename", "/ckpt/x", t_s=7.1, err=errno.ENOENT),
        ev("link", "/ckpt/hard", t_s=8), ev("read", "/data/c", t_s=9, size=100, result=100, session=8),
    ]
    fit = only_volume([batch(events)]).object_store
    assert (fit.changed_in_place, fit.appended, fit.overwritten, fit.out_of_order, fit.written_after_fsync,
            fit.renamed, fit.linked, fit.unknown_flags) == (2, 1, 1, 1, 1, 1, 1, 1)
    assert fit.examples["changed_in_place"] == ["/logs/train.log", "/db/index"]
    assert fit.examples["appended"] == ["/logs/train.log"] and fit.examples["out_of_order"] == ["/ckpt/b"]
    assert fit.examples["renamed"] == ["/ckpt/a"]  # the failed rename is none


def test_the_human_report_says_what_each_client_does_with_what_the_volume_did(tmp_path: Path) -> None:
    events = _written(1, "/logs/train.log", os.O_WRONLY | os.O_APPEND, [5000])
    _write_recording(tmp_path, "a", DAY_S, [batch(events)])
    result = subprocess.run([*CLI, "analyze", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    [row] = [line.split() for line in result.stdout.splitlines() if "changed existing files" in line]
    assert row[3:] == ["1", "EPERM", "down", "+", "up", "whole", "up", "whole", "/logs/train.log"], row
    [row] = [line.split() for line in result.stdout.splitlines() if line.lstrip().startswith("renames")]
    assert row == ["renames", "0", "-", "-", "-", "-"]  # nothing to say where nothing happened


# ---- bad input: one line, exit 2 -------------------------------------------------------


def _analyze(*args: str, state_dir: str = "/nonexistent") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "analyze", *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "INTERPOSER_STATE_DIR": state_dir})


def _usage_error(result: subprocess.CompletedProcess[str], says: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_path_that_does_not_exist_is_a_usage_error(tmp_path: Path) -> None:
    _usage_error(_analyze(str(tmp_path / "nope")), f"Path '{tmp_path / 'nope'}' does not exist")


def test_a_file_that_is_not_a_recording_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    bogus = tmp_path / "report.json"
    bogus.write_text('{"volumes": []}')
    _usage_error(_analyze(str(bogus)), f"{bogus}: not a recording at byte 0")


def test_a_corrupt_frame_is_a_usage_error_naming_file_and_offset(tmp_path: Path) -> None:
    good = msgspec.msgpack.encode(batch(_ops_at([0])))
    path = _write_recording(tmp_path, "a", DAY_S, [batch(_ops_at([0]))])
    with open(path, "ab") as out:
        write_frame(out, b"\xc1\xc1\xc1")
        write_frame(out, good)
    _usage_error(_analyze(str(path)), f"{path}: corrupt frame at byte {4 + len(good)}")


def test_an_unparsable_since_is_a_usage_error(tmp_path: Path) -> None:
    _write_recording(tmp_path, "a", DAY_S, [batch(_ops_at([0]))])
    _usage_error(_analyze(str(tmp_path), "--since", "last tuesday"), "'last tuesday' is neither an ISO 8601 time")


def test_no_events_in_range_or_volume_is_a_usage_error(tmp_path: Path) -> None:
    _write_recording(tmp_path, "a", DAY_S, [batch(_ops_at([0, 60]))])
    _usage_error(_analyze(str(tmp_path), "--volume", "data"), "no events of volume data in 1 recorded batches "
                                                               "(they hold vol)")
    _usage_error(_analyze(str(tmp_path), "--since", "2027-01-01"), "no events in 1 recorded batches in the time range")
    result = _analyze(str(tmp_path), "--since", "30s", "--json")  # 30 s before the newest event
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["volumes"][0]["events"] == 1


def test_a_directory_without_recordings_and_a_missing_default_are_usage_errors(tmp_path: Path) -> None:
    _usage_error(_analyze(str(tmp_path)), f"no recordings (events-*.msgpack) in {tmp_path}")
    _usage_error(_analyze(), "no recordings at /nonexistent/recordings: `interposer up` records there")


def test_the_default_is_the_stacks_recordings_dir(tmp_path: Path) -> None:
    (tmp_path / "recordings").mkdir()
    _write_recording(tmp_path / "recordings", "a", DAY_S, [batch(_ops_at([0]))])
    result = _analyze("--json", state_dir=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["recordings"] == 1


def test_a_bucket_too_small_for_the_span_is_a_usage_error(tmp_path: Path) -> None:
    _write_recording(tmp_path, "a", DAY_S, [batch(_ops_at([0, 20_000]))])
    result = _analyze(str(tmp_path), "--bucket", "1")
    _usage_error(result, "--bucket 1 makes ")
    assert "timeline buckets of this span; at most 10000" in result.stderr
