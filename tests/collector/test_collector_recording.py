"""Recording event batches: the file format, rotation, retention, write errors, and the real collector doing it."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from collector_helpers import CollectorProcess, batch_message, event, publish, wait_for
from interposer.collector._recorder import Recorder, RecorderMetrics
from interposer.proto import EventBatch, RecordingError, read_batches
from interposer.proto.recording import (
    parse_recording_name,
    read_frames,
    recording_name,
    write_frame,
)
from prometheus_client import CollectorRegistry, generate_latest

#: Wall-clock time the fake clocks start at (2026-12-07 15:52:19 UTC).
T0_S = 1_796_658_739.0
MIB = 1024 * 1024


class FakeClocks:
    """A monotonic and a wall clock that move together, only when told."""

    def __init__(self) -> None:
        self.elapsed_s = 0.0

    def monotonic(self) -> float:
        return self.elapsed_s

    def wall(self) -> float:
        return T0_S + self.elapsed_s


def message(volume: str = "vol", seq: int = 1, events: int = 3) -> bytes:
    return batch_message(volume, [event("read", result=4096) for _ in range(events)], seq=seq)[1]


def recorder(directory: Path, clocks: FakeClocks, *, max_bytes: int = 1 << 30, rotate_s: float = 3600.0,
             rotate_bytes: int = 64 * MIB, instance: str = "c1") -> Recorder:
    return Recorder(directory, instance, max_bytes=max_bytes, rotate_s=rotate_s, rotate_bytes=rotate_bytes,
                    clock=clocks.monotonic, wall_clock=clocks.wall)


def recordings(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if parse_recording_name(name))


# ---- the format -------------------------------------------------------------------


def test_a_recording_holds_the_received_bytes_unchanged_and_reads_back_as_batches(tmp_path: Path) -> None:
    clocks = FakeClocks()
    rec = recorder(tmp_path, clocks)
    rec.start()
    sent = [message(seq=seq) for seq in (1, 2, 3)]
    for data in sent:
        rec.write(data)
    rec.close()

    [name] = recordings(tmp_path)
    assert name == "events-20261207T155219Z-c1.msgpack"
    assert parse_recording_name(name) == (dt.datetime(2026, 12, 7, 15, 52, 19, tzinfo=dt.UTC), "c1")
    assert [data for _offset, data in read_frames(tmp_path / name)] == sent
    batches = list(read_batches(tmp_path / name))
    assert [batch.seq for batch in batches] == [1, 2, 3]
    assert batches[0] == msgspec.msgpack.decode(sent[0], type=EventBatch)
    stats = rec.statistics()
    assert (stats.batches_total, stats.bytes_total, stats.errors_total) == (3, sum(len(d) + 4 for d in sent), 0)
    assert (tmp_path / name).stat().st_size == stats.bytes_total


def test_names_sort_by_start_time_and_carry_the_instance() -> None:
    early = recording_name(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC), "collector-a-1")
    late = recording_name(dt.datetime(2026, 1, 2, 13, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2))), "b")
    assert early == "events-20260102T030405Z-collector-a-1.msgpack"
    assert late == "events-20260102T110405Z-b.msgpack"  # converted to UTC
    assert sorted([late, early]) == [early, late]
    with pytest.raises(ValueError, match="instance id"):
        recording_name(dt.datetime.now(dt.UTC), "a/b")
    assert parse_recording_name("events-20261307T000000Z-x.msgpack") is None  # month 13
    assert parse_recording_name("notes.txt") is None


def test_a_truncated_last_frame_ends_the_file_quietly(tmp_path: Path) -> None:
    path = tmp_path / "killed.msgpack"
    with open(path, "wb") as out:
        write_frame(out, message(seq=1))
        write_frame(out, message(seq=2))
    whole = path.read_bytes()
    third = message(seq=3)
    for cut in (1, 4, 4 + len(third) - 1):  # inside the length, right after it, one byte short
        path.write_bytes(whole + (len(third).to_bytes(4, "big") + third)[:cut])
        assert [batch.seq for batch in read_batches(path)] == [1, 2], cut


def test_a_corrupt_frame_in_the_middle_names_the_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.msgpack"
    first, second = message(seq=1), message(seq=2)
    with open(path, "wb") as out:
        write_frame(out, first)
        write_frame(out, b"\xc1" * 10)  # 0xc1 is never valid msgpack
        write_frame(out, second)
    batches = read_batches(path)
    assert next(batches).seq == 1
    with pytest.raises(RecordingError, match=rf"corrupt\.msgpack: corrupt frame at byte {4 + len(first)}: "):
        next(batches)


def test_a_file_that_is_no_recording_is_refused_at_byte_0(tmp_path: Path) -> None:
    text = tmp_path / "notes.json"
    text.write_text('{"not": "a recording"}\n')
    with pytest.raises(RecordingError, match=r"notes\.json: not a recording at byte 0: length \d+ is above"):
        list(read_batches(text))
    small = tmp_path / "small.bin"
    with open(small, "wb") as out:
        write_frame(out, msgspec.msgpack.encode({"volume": 1}))
    with pytest.raises(RecordingError, match=r"small\.bin: not a recording at byte 0: Expected `str`"):
        list(read_batches(small))
    empty = tmp_path / "empty.msgpack"
    empty.write_bytes(b"")
    assert list(read_batches(empty)) == []  # a file just started


# ---- rotation and retention -------------------------------------------------------


def test_files_rotate_by_age_and_by_size_and_every_batch_is_in_one_of_them(tmp_path: Path) -> None:
    clocks = FakeClocks()
    data = message(events=10)
    rec = recorder(tmp_path, clocks, rotate_s=60, rotate_bytes=3 * (len(data) + 4))
    rec.start()
    for seq in range(1, 5):  # the fourth starts a second file: the first holds three frames
        rec.write(message(seq=seq, events=10))
    clocks.elapsed_s = 30
    rec.write(message(seq=5, events=10))  # neither old nor full: same file
    clocks.elapsed_s = 91
    rec.write(message(seq=6, events=10))  # the second file is 61 s old
    rec.close()

    names = recordings(tmp_path)
    # The second file started in the first one's second: it is named one second later.
    assert names == ["events-20261207T155219Z-c1.msgpack", "events-20261207T155220Z-c1.msgpack",
                     "events-20261207T155350Z-c1.msgpack"]
    seqs = [[batch.seq for batch in read_batches(tmp_path / name)] for name in names]
    assert seqs == [[1, 2, 3], [4, 5], [6]]


def test_retention_deletes_the_oldest_recordings_only_down_to_the_cap(tmp_path: Path) -> None:
    clocks = FakeClocks()
    foreign = ["notes.txt", "events-latest.msgpack", "events-20200101T000000Z-x.msgpack.tmp"]
    for name in foreign:
        (tmp_path / name).write_bytes(b"x" * MIB)  # not recordings: never touched
    other_replica = tmp_path / "events-20200101T000000Z-c2.msgpack"  # the oldest of all
    other_replica.write_bytes(b"\0" * 1000)
    data = message(events=50)
    frame_bytes = len(data) + 4
    # Room for two files of two frames each.
    rec = recorder(tmp_path, clocks, rotate_s=10, max_bytes=4 * frame_bytes, rotate_bytes=2 * frame_bytes)
    rec.start()
    for seq in range(1, 8):
        clocks.elapsed_s = seq  # one rotation per two frames (by size), one name per second
        rec.write(data)
    rec.close()

    assert sorted(foreign) == sorted(set(os.listdir(tmp_path)) - set(recordings(tmp_path)))
    names = recordings(tmp_path)
    assert not other_replica.exists()
    # Files of 2, 2, 2 and 1 frames were written. The rotation before the fifth
    # frame found the other replica's file and two of ours (4 frames and 1000 bytes):
    # the other replica's, oldest, went. The one before the seventh found three of
    # ours (6 frames): the oldest went. The current file then gained one frame.
    assert [len(list(read_batches(tmp_path / name))) for name in names] == [2, 2, 1]
    on_disk = sum((tmp_path / name).stat().st_size for name in names)
    assert on_disk == 5 * frame_bytes <= 4 * frame_bytes + (tmp_path / names[-1]).stat().st_size
    assert rec.statistics().files_deleted_total == 2


def test_the_file_being_written_is_never_deleted_even_when_alone_above_the_cap(tmp_path: Path) -> None:
    clocks = FakeClocks()
    data = message(events=50)
    rec = recorder(tmp_path, clocks, max_bytes=10, rotate_bytes=len(data) + 4)
    rec.start()
    rec.write(data)
    clocks.elapsed_s = 1
    rec.write(data)  # rotates (full): the first file goes, the new one stays
    rec.close()
    [name] = recordings(tmp_path)
    assert name == "events-20261207T155220Z-c1.msgpack"
    assert len(list(read_batches(tmp_path / name))) == 1


# ---- write errors -----------------------------------------------------------------


def test_a_full_disk_is_counted_and_recording_resumes_with_a_new_file_soon_after(tmp_path: Path) -> None:
    clocks = FakeClocks()
    # The first file is /dev/full: every write(2) to it fails with ENOSPC.
    (tmp_path / "events-20261207T155219Z-c1.msgpack").symlink_to("/dev/full")
    rec = recorder(tmp_path, clocks, rotate_s=60)
    registry = CollectorRegistry()
    registry.register(RecorderMetrics(rec))
    rec.start()
    rec.write(message(seq=1))
    rec.flush()  # ENOSPC here: the frame was only buffered
    assert rec.statistics().errors_total == 1 and rec.statistics().current_path == ""
    clocks.elapsed_s = 5
    rec.write(message(seq=2))  # not recorded: the retry is 10 s after the error, not at the hour's rotation
    clocks.elapsed_s = 10
    rec.write(message(seq=3))  # a new file
    rec.write(message(seq=4))
    rec.close()

    assert [batch.seq for batch in read_batches(tmp_path / "events-20261207T155229Z-c1.msgpack")] == [3, 4]
    exposition = generate_latest(registry).decode()
    assert "interposer_collector_record_errors_total 1.0" in exposition
    # The first frame reached the buffer before the flush failed: what counts as
    # recorded is what was handed to a file without an error.
    assert "interposer_collector_recorded_batches_total 3.0" in exposition


def test_a_disk_that_stays_full_is_retried_without_leaving_empty_files(tmp_path: Path) -> None:
    """A real full file system (a 64 KiB tmpfs, filled): each retry creates a file, fails at the flush."""
    directory = tmp_path / "small"
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory)], check=True)
    try:
        (directory / "filler").write_bytes(b"\0" * (64 << 10))
        clocks = FakeClocks()
        rec = recorder(directory, clocks, rotate_s=3600)
        rec.start()
        for second in range(0, 35, 5):  # errors at 0 s, then retries at 10, 20 and 30 s
            clocks.elapsed_s = second
            rec.write(message(seq=second + 1, events=200))
            rec.flush()
        rec.close()
        assert rec.statistics().errors_total == 4
        assert recordings(directory) == [], "an empty file per retry would pile up"
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_a_directory_removed_underneath_is_made_again_at_the_next_rotation(tmp_path: Path) -> None:
    clocks = FakeClocks()
    directory = tmp_path / "recordings"
    directory.mkdir()
    rec = recorder(directory, clocks, rotate_s=60)
    rec.start()
    rec.write(message(seq=1))
    shutil.rmtree(directory)  # an admin cleaning up
    rec.write(message(seq=2))  # into the open, deleted file: gone with it
    clocks.elapsed_s = 60
    rec.write(message(seq=3))
    rec.close()
    [name] = recordings(directory)
    assert [batch.seq for batch in read_batches(directory / name)] == [3]
    assert rec.statistics().errors_total == 0


def test_an_unwritable_record_dir_is_a_usage_error_and_a_missing_one_is_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, "-m", "interposer.collector", "--record-dir", str(blocker / "rec"),
                           "--nats-url", "nats://127.0.0.1:1"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert f"--record-dir '{blocker / 'rec'}': cannot write recordings there: Not a directory" in done.stderr

    from interposer.collector.__main__ import config_from_args

    config = config_from_args(["--record-dir", str(tmp_path / "new" / "rec"), "--record-max-bytes", "1000"])
    assert (tmp_path / "new" / "rec").is_dir() and config.record_max_bytes == 1000
    with pytest.raises(SystemExit):
        config_from_args(["--record-dir", str(tmp_path / "other"), "--record-max-bytes", "0"])
    assert not (tmp_path / "other").exists(), "a bad flag must not leave a directory behind"


# ---- the real collector -----------------------------------------------------------


@pytest.mark.nats
def test_collectors_of_a_queue_group_record_every_batch_once_and_a_clean_stop_loses_nothing(
        nats_url: str, start_collector: Callable[..., CollectorProcess], tmp_path: Path) -> None:
    record_dir = tmp_path / "recordings"
    replicas = [start_collector("--record-dir", str(record_dir)) for _ in range(2)]
    volume = f"rec-{uuid.uuid4().hex[:8]}"
    sent = [batch_message(volume, [event("write", result=seq)], seq=seq) for seq in range(1, 201)]
    publish(nats_url, sent)
    wait_for(lambda: sum(r.value("interposer_collector_recorded_batches_total") for r in replicas) == 200,
             what="both replicas to record the 200 batches")
    assert sum(r.value("interposer_collector_record_errors_total") for r in replicas) == 0
    recorded_bytes = sum(r.value("interposer_collector_recorded_bytes_total") for r in replicas)
    for replica in replicas:
        replica.child.stop()  # SIGTERM: drain, flush, close
        assert replica.child.proc is not None and replica.child.proc.returncode == 0

    names = recordings(record_dir)
    instances = {parse_recording_name(name)[1] for name in names}  # type: ignore[index]
    assert len(instances) == 2, names  # one file per replica, named apart
    frames = [data for name in names for _offset, data in read_frames(record_dir / name)]
    assert sorted(frames) == sorted(payload for _subject, payload in sent)
    assert sum((record_dir / name).stat().st_size for name in names) == recorded_bytes


@pytest.mark.nats
def test_a_running_collector_flushes_its_recording_within_a_second(
        nats_url: str, start_collector: Callable[..., CollectorProcess], tmp_path: Path) -> None:
    record_dir = tmp_path / "recordings"
    start_collector("--record-dir", str(record_dir))
    volume = f"rec-{uuid.uuid4().hex[:8]}"
    publish(nats_url, [batch_message(volume, [event("read", result=1)])])

    def recorded() -> list[EventBatch]:
        return [batch for name in recordings(record_dir) for batch in read_batches(record_dir / name)]

    [batch] = wait_for(recorded, timeout_s=5, what="the batch in the file while the collector runs")
    assert batch.volume == volume

