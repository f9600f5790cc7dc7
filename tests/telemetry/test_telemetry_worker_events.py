"""Worker-side telemetry: file sessions, sampling rules, events off — on real mounts and in units."""

from __future__ import annotations

import errno
import mmap
import os
import uuid
from collections.abc import Callable

import pytest
from telemetry_helpers import BusTap, wait_for

from interposer.fuse_worker._config import EventSampleRule, WorkerConfig, parse_sample_rule
from interposer.fuse_worker._lateness import WINDOW_OPS, LatenessWatch
from interposer.fuse_worker._op import Op
from interposer.fuse_worker._stack import Stack
from interposer.fuse_worker._telemetry import QuotaUsage, Telemetry, quota_usage
from interposer.fuse_worker.layers.quota import QuotaContext, Usage
from interposer.proto import DelayLayer, OpEvent, Policy, QuotaLayer
from interposer.proto.events import FATTR_SIZE
from interposer_testing import MountedVolume

pytestmark = [pytest.mark.nats]


# ---- units -----------------------------------------------------------------------------


def test_parse_sample_rule() -> None:
    assert parse_sample_rule("getattr,lookup:*:0.01") == EventSampleRule(
        ops=frozenset({"getattr", "lookup"}), path_glob="*", ratio=0.01)
    assert parse_sample_rule(":/a:b/*.log:0") == EventSampleRule(path_glob="/a:b/*.log", ratio=0.0)
    assert parse_sample_rule("read::1") == EventSampleRule(ops=frozenset({"read"}))


@pytest.mark.parametrize(("text", "needle"), [
    ("read", "OPS:GLOB:RATIO"),
    ("read:*:x", "ratio 'x'"),
    ("reed:*:1", "$.ops[0]"),
    ("read:*:1.5", "$.ratio"),
])
def test_parse_sample_rule_rejects_bad_input_naming_the_part(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_sample_rule(text)
    assert needle in str(info.value) and text in str(info.value)


def test_worker_config_limits_sampling_rules() -> None:
    import msgspec

    with pytest.raises(msgspec.ValidationError, match="event_sampling"):
        msgspec.convert({"backing_dir": "/b", "mountpoint": "/m", "event_sampling": [{}] * 65}, WorkerConfig)


def _record(telemetry: Telemetry, name: str, path: str = "/f") -> None:
    telemetry.record(Op(name, 2, path), 0, 0, 0, 1)


def test_sampling_first_matching_rule_decides_and_every_op_is_counted() -> None:
    draws = iter([0.3, 0.7] * 50)
    telemetry = Telemetry(sampling=[
        EventSampleRule(ops=frozenset({"read"}), path_glob="/keep/*", ratio=1.0),
        EventSampleRule(ops=frozenset({"read"}), ratio=0.5),
        EventSampleRule(ops=frozenset({"getattr"}), ratio=0.0),
    ], rng=lambda: next(draws))
    for _ in range(10):
        _record(telemetry, "read", "/keep/a")   # rule 1: all kept
        _record(telemetry, "read", "/other")    # rule 2: draws 0.3 (kept), 0.7 (not) alternate
        _record(telemetry, "getattr")           # rule 3: none
        _record(telemetry, "write")             # no rule: all kept
    kept = telemetry.take(1000)
    assert telemetry.ops_total == 40
    assert [e.path for e in kept if e.op == "read"].count("/keep/a") == 10
    assert [e.path for e in kept if e.op == "read"].count("/other") == 5
    assert not [e for e in kept if e.op == "getattr"]
    assert len([e for e in kept if e.op == "write"]) == 10
    assert telemetry.sampled_out_total == 15
    assert telemetry.events_total == len(kept) == 25


def test_full_buffer_drops_and_disabled_events_only_count() -> None:
    telemetry = Telemetry(capacity=3)
    for _ in range(5):
        _record(telemetry, "read")
    assert (telemetry.ops_total, telemetry.events_total, telemetry.events_dropped_total) == (5, 5, 2)
    off = Telemetry(enabled=False)
    for _ in range(5):
        _record(off, "read")
    assert (off.ops_total, off.events_total, len(off.buffer)) == (5, 0, 0)


def test_delayed_ops_and_their_lateness_are_counted_with_events_off_too() -> None:
    telemetry = Telemetry(enabled=False)
    for late_ns in (0, 30_000, 90_000):
        telemetry.record(Op("read", 2, "/f", delay_ns=1_000_000, delay_late_ns=late_ns), 0, 4096, 0, 1_100_000)
    telemetry.record(Op("read", 2, "/f", delay_late_ns=5), 0, 4096, 0, 50_000)  # no delay asked: not counted
    assert (telemetry.delayed_ops_total, telemetry.delay_late_ns_total) == (3, 120_000)
    events = Telemetry()
    events.record(Op("read", 2, "/f", delay_ns=1_000_000, delay_late_ns=7_000), 0, 4096, 0, 1_100_000)
    assert events.buffer[0].delay_late_ns == 7_000


def test_session_ids_are_unique_per_process_even_when_fh_numbers_are_reused() -> None:
    telemetry = Telemetry()
    first = telemetry.new_session()
    telemetry.bind_session(7, first)
    assert telemetry.session_of(7) == first
    assert telemetry.end_session(7) == first
    assert telemetry.session_of(7) == 0 and telemetry.end_session(7) == 0
    second = telemetry.new_session()
    telemetry.bind_session(7, second)
    assert second != first and telemetry.session_of(7) == second


def test_open_files_count_the_open_file_sessions() -> None:
    telemetry = Telemetry()
    for fh in (3, 4):
        telemetry.bind_session(fh, telemetry.new_session())
    assert telemetry.open_files == 2
    telemetry.end_session(3)
    assert telemetry.open_files == 1


def test_fault_records_name_their_op_for_linking_to_its_span() -> None:
    telemetry = Telemetry(volume="vol", worker_id="w-7", namespace="ns", pod="app-0")
    op = Op("read", 2, "/f", offset=8192, size=4096, pid=42, session=5)
    op.inject(1, "errno", "EIO")
    telemetry.record(op, errno.EIO, 0, 1_000, 250, revision=3)
    [record] = telemetry.take_faults(10)
    assert (record.volume, record.worker_id, record.session, record.op, record.time_ns, record.duration_ns) == (
        "vol", "w-7", 5, "read", 1_000, 250)
    assert (record.namespace, record.pod, record.layer, record.policy_revision) == ("ns", "app-0", 1, 3)
    assert Telemetry().worker_id != Telemetry().worker_id, "a fresh id per worker process"


class _NoBackend:
    """Quota layers here never reach the backend (no write or create is served)."""


def test_a_request_continuing_its_files_previous_one_is_sequential() -> None:
    telemetry = Telemetry()
    assert telemetry.continues(2, 0, 4096), "a file read from its start"
    assert telemetry.continues(2, 4096, 4096)
    assert not telemetry.continues(2, 65536, 4096), "a jump is random"
    assert telemetry.continues(2, 69632, 100), "and starts the next run"
    assert not telemetry.continues(3, 8192, 4096), "a file's first request elsewhere than 0 is random"
    assert telemetry.continues(2, 69732, 10), "files are tracked apart"
    assert telemetry.continues(2, 0, 10), "reading a file again from its start is a new stream"
    assert not Telemetry(enabled=False).continues(2, 0, 4096), "nothing to carry it with events off"
    events = Telemetry()
    events.record(Op("read", 2, "/f", size=4096, sequential=True), 0, 4096, 0, 1000)
    assert events.buffer[0].sequential


def test_quota_usage_reports_the_tightest_limits_of_the_quota_layers_in_force() -> None:
    context = QuotaContext(_NoBackend(), lambda: Usage(5000, 12))  # type: ignore[arg-type]
    assert quota_usage(Stack(Policy(), 1, quota=context).layers) is None
    stack = Stack(Policy(layers=[QuotaLayer(bytes=1 << 20), DelayLayer(delay_s=0),
                                 QuotaLayer(bytes=1 << 16, inodes=100)]), 2, quota=context)
    assert quota_usage(stack.layers) == QuotaUsage(bytes_used=5000, inodes_used=12, bytes_limit=1 << 16,
                                                   inodes_limit=100)
    stack.layers[0].usage.bytes_used += 1  # the layers keep the shared usage up to date
    assert quota_usage(stack.layers).bytes_used == 5001
    only_inodes = Stack(Policy(layers=[QuotaLayer(inodes=9)]), 3, quota=context)
    assert quota_usage(only_inodes.layers) == QuotaUsage(bytes_used=5001, inodes_used=12, inodes_limit=9)


# ---- real mounts -------------------------------------------------------------------------


@pytest.fixture
def volume() -> str:
    return f"tel-{uuid.uuid4().hex[:8]}"


def _settle(tap: BusTap) -> None:
    """Wait until every event the worker produced so far has arrived and its ops stopped."""
    seen: list[int] = []

    def quiet() -> bool:
        status = tap.settled()
        if status is None:
            return False
        seen.append(status.ops_total)
        return len(seen) >= 2 and seen[-1] == seen[-2] and tap.statuses[-1] is status

    wait_for(quiet, what="the worker's events to settle", interval_s=1.1)


def test_file_sessions_group_open_to_release(nats_url: str, mount_worker: Callable[..., MountedVolume],
                                            volume: str) -> None:
    with BusTap(nats_url, volume) as tap:
        vol = mount_worker(volume, nats_url=nats_url)
        path = vol.mountpoint / "s.bin"
        with open(path, "wb") as out:  # create → write → release (no FLUSH: nothing to flush on ext4)
            out.write(b"a" * 4096)
        fd = os.open(path, os.O_RDONLY)  # open → read → release
        os.pread(fd, 4096, 0)
        os.close(fd)
        _settle(tap)
    events = [e for e in tap.events if e.path == "/s.bin"]
    sessions: dict[int, list[str]] = {}
    for event in events:
        if event.session:
            sessions.setdefault(event.session, []).append(event.op)
    assert len(sessions) == 2, events
    first, second = (sessions[s] for s in sorted(sessions))
    assert first[0] == "create" and first[-1] == "release" and "write" in first and "flush" not in first
    assert second[0] == "open" and second[-1] == "release" and "read" in second
    assert all(e.session == 0 for e in events if e.op in {"lookup", "getattr"})
    written = [e for e in events if e.op == "write"]
    assert sum(e.size for e in written) == sum(e.result for e in written) == 4096


def test_events_say_which_requests_were_sequential(nats_url: str, mount_worker: Callable[..., MountedVolume],
                                                   volume: str) -> None:
    """Direct I/O, so each request is the application's own (no readahead, no write-behind)."""
    block = 4096
    with BusTap(nats_url, volume) as tap:
        vol = mount_worker(volume, nats_url=nats_url)
        fd = os.open(vol.mountpoint / "p.bin", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
        view = memoryview(mmap.mmap(-1, block))  # page-aligned, as O_DIRECT needs
        try:
            for index in range(8):
                os.pwrite(fd, view, index * block)  # 8 sequential writes
            for index in (5, 1, 7, 0, 1, 2):  # three jumps, then from the start three in a row
                os.preadv(fd, [view], index * block)
        finally:
            os.close(fd)
        _settle(tap)
    writes = [e.sequential for e in tap.events if e.op == "write" and e.path == "/p.bin"]
    reads = [e.sequential for e in tap.events if e.op == "read" and e.path == "/p.bin"]
    assert writes == [True] * 8
    assert reads == [False, False, False, True, True, True]
    assert not any(e.sequential for e in tap.events if e.op not in {"read", "write"})


def test_events_carry_open_flags_and_the_second_path(nats_url: str,
                                                     mount_worker: Callable[..., MountedVolume],
                                                     volume: str) -> None:
    """What a replay needs: how each file was opened, and where a rename, link or symlink points."""
    with BusTap(nats_url, volume) as tap:
        vol = mount_worker(volume, nats_url=nats_url)
        root = vol.mountpoint
        (root / "d").mkdir()
        fd = os.open(root / "d" / "tmp", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        os.write(fd, b"x" * 100)
        os.close(fd)
        os.rename(root / "d" / "tmp", root / "final")
        fd = os.open(root / "final", os.O_RDWR | os.O_DIRECT)
        os.close(fd)
        os.truncate(root / "final", 0)
        os.link(root / "final", root / "d" / "hard")
        os.symlink("../final", root / "d" / "soft")
        _settle(tap)
    events = tap.events

    def only(op: str, path: str) -> OpEvent:
        found = [e for e in events if e.op == op and e.path == path]
        assert len(found) == 1, (op, path, found)
        return found[0]

    created = only("create", "/d/tmp")
    assert created.flags & os.O_ACCMODE == os.O_WRONLY and created.flags & os.O_APPEND
    assert only("write", "/d/tmp").flags == created.flags, "a handle's I/O carries its open flags"
    assert only("rename", "/d/tmp").target == "/final"
    assert only("link", "/d/hard").target == "/final"
    assert only("symlink", "/d/soft").target == "../final"
    assert only("setattr", "/final").flags == FATTR_SIZE, "truncate(2)"
    opened = only("open", "/final")
    assert opened.flags & os.O_ACCMODE == os.O_RDWR and opened.flags & os.O_DIRECT
    assert all(e.target == "" for e in events if e.op not in {"rename", "link", "symlink"})


def test_sampling_flags_keep_counts_exact(nats_url: str, mount_worker: Callable[..., MountedVolume],
                                          volume: str) -> None:
    with BusTap(nats_url, volume) as tap:
        vol = mount_worker(volume, nats_url=nats_url,
                           extra=["--event-sample", "getattr,lookup:*:0", "--event-sample", "read:/skip/*:0"])
        (vol.mountpoint / "skip").mkdir()
        for name in ("skip/a", "keep"):
            (vol.mountpoint / name).write_bytes(b"x" * 1000)
            fd = os.open(vol.mountpoint / name, os.O_RDONLY | os.O_DIRECT)
            os.read(fd, 4096)
            os.close(fd)
        _settle(tap)
    events = tap.events
    status = tap.last_status()
    assert not [e for e in events if e.op in {"getattr", "lookup"}]
    reads = [e for e in events if e.op == "read"]
    assert reads and all(e.path == "/keep" for e in reads)
    assert [e for e in events if e.op == "write" and e.path == "/skip/a"], "only reads of /skip/* are sampled"
    sampled_out = tap.batches[-1].sampled_out_total
    assert sampled_out > 0
    assert status.ops_total == status.events_total + sampled_out == len(events) + sampled_out


def test_no_events_flag_publishes_only_heartbeats(nats_url: str, mount_worker: Callable[..., MountedVolume],
                                                  volume: str) -> None:
    with BusTap(nats_url, volume) as tap:
        vol = mount_worker(volume, nats_url=nats_url, extra=["--no-events"])
        (vol.mountpoint / "f").write_bytes(b"x" * 100)
        wait_for(lambda: (s := tap.last_status()) is not None and s.ops_total > 0, what="a heartbeat with ops")
    assert tap.batches == []
    assert tap.last_status().events_total == 0


def test_delays_running_late_are_logged_at_most_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    watch = LatenessWatch(monotonic=lambda: now[0])
    with caplog.at_level("WARNING", logger="interposer.fuse_worker._lateness"):
        for _ in range(WINDOW_OPS):
            watch.observe(1_000_000, 50_000)  # 5 % and 50 µs late: on time for a VM
        assert watch.warnings == 0
        for _ in range(WINDOW_OPS):
            watch.observe(1_000_000, 300_000)  # 30 %: the application sees 1.3 ms
        assert watch.warnings == 1
        assert "mean 300 µs after their 1000 µs delays" in caplog.text
        now[0] += 30
        for _ in range(WINDOW_OPS):
            watch.observe(1_000_000, 300_000)
        assert watch.warnings == 1  # not again within a minute
        now[0] += 31
        for _ in range(WINDOW_OPS):
            watch.observe(1_000_000, 300_000)
        assert watch.warnings == 2
        for _ in range(WINDOW_OPS):
            watch.observe(40_000_000, 2_000_000)  # 2 ms late on 40 ms: 5 %, on time
        assert watch.warnings == 2
