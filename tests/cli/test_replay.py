"""`interposer replay` on hand-built recordings, into plain directories: the plan, the tree, timing, bad input.

The replayed ops run for real on this machine's file system (a tmp directory); the
end-to-end test through FUSE mounts is test_replay_recorded_mount.py.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from interposer.proto import EventBatch, OpEvent
from interposer.proto.events import FATTR_MODE, FATTR_SIZE
from interposer.proto.recording import recording_name, write_frame

from interposer.cli._replay_plan import ReplayError, check_path, plan_replay

NS = 1_000_000_000
T0_S = 1_800_000_000
INTERPOSER = Path(sys.executable).parent / "interposer"
BLOCK = 4096


def ev(op: str, path: str = "/f", *, t_ms: float = 0.0, offset: int = 0, size: int = 0, result: int = 0,
       err: int = 0, session: int = 0, pid: int = 100, flags: int = 0, target: str = "",
       duration_us: float = 20.0) -> OpEvent:
    """An event starting ``t_ms`` milliseconds after :data:`T0_S`."""
    return OpEvent(op=op, ino=7, path=path, offset=offset, size=size, result=result, errno=err,
                   start_ns=round(T0_S * NS + t_ms * 1e6), duration_ns=round(duration_us * 1e3), pid=pid,
                   session=session, flags=flags, target=target)


def record(directory: Path, events: list[OpEvent], *, volume: str = "vol") -> Path:
    """Write ``events`` as one batch into a recording file in ``directory``."""
    import datetime as dt

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / recording_name(dt.datetime(2027, 1, 15, tzinfo=dt.UTC), "c1")
    with open(path, "ab") as out:
        write_frame(out, msgspec.msgpack.encode(EventBatch(volume=volume, worker_id="w1", seq=1, events=events)))
    return directory


def replay(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(INTERPOSER), "replay", *map(str, args)], capture_output=True, text=True, timeout=120)


def replay_json(*args: str | Path) -> dict:
    result = replay(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# A training-like job's thread 100: reads its input, writes a checkpoint through a
# temporary name, links and symlinks it, removes an old one, lists the data directory.
WORKLOAD = [
    ev("lookup", "/data", t_ms=0),
    ev("lookup", "/data/in.bin", t_ms=1),
    ev("open", "/data/in.bin", t_ms=2, session=1, flags=os.O_RDONLY),
    *[ev("read", "/data/in.bin", t_ms=3 + i, offset=i * BLOCK, size=BLOCK, result=BLOCK, session=1, pid=0)
      for i in range(3)],
    ev("release", "/data/in.bin", t_ms=7, session=1, pid=0),
    ev("opendir", "/data", t_ms=8),
    ev("readdir", "/data", t_ms=9, pid=0),
    ev("readdir", "/data", t_ms=9.5, offset=3, pid=0),
    ev("releasedir", "/data", t_ms=10, pid=0),
    ev("lookup", "/ckpt/tmp", t_ms=11, err=errno.ENOENT),
    ev("create", "/ckpt/tmp", t_ms=12, session=2, flags=os.O_WRONLY | os.O_CREAT | os.O_EXCL),
    ev("write", "/ckpt/tmp", t_ms=13, size=BLOCK, result=BLOCK, session=2, pid=0, flags=os.O_WRONLY),
    ev("write", "/ckpt/tmp", t_ms=14, offset=BLOCK, size=BLOCK, result=BLOCK, session=2, pid=0,
       flags=os.O_WRONLY),
    ev("fsync", "/ckpt/tmp", t_ms=15, session=2, pid=0, flags=os.O_WRONLY),
    ev("flush", "/ckpt/tmp", t_ms=16, session=2),
    ev("release", "/ckpt/tmp", t_ms=17, session=2, pid=0),
    ev("rename", "/ckpt/tmp", t_ms=18, target="/ckpt/final"),
    ev("link", "/ckpt/hard", t_ms=19, target="/ckpt/final"),
    ev("symlink", "/ckpt/latest", t_ms=20, target="final"),
    ev("readlink", "/ckpt/latest", t_ms=21),
    ev("setattr", "/ckpt/hard", t_ms=22, flags=FATTR_MODE),
    ev("unlink", "/ckpt/old", t_ms=23),
    ev("mkdir", "/logs", t_ms=24),
    ev("getattr", "/logs", t_ms=25),
    ev("setattr", "/data/in.bin", t_ms=26, size=2 * BLOCK, flags=FATTR_SIZE),
    ev("statfs", "/", t_ms=27),
    ev("getxattr", "/data/in.bin", t_ms=28, err=errno.ENODATA),
    ev("forget", "/data", t_ms=29, pid=0),
]


def test_the_start_state_is_read_off_the_first_op_naming_each_path() -> None:
    plan = plan_replay([EventBatch(volume="vol", worker_id="w1", seq=1, events=WORKLOAD)])
    start = plan.start
    assert start.directories == {"/data", "/ckpt"}, "listed, or on the way to a file that existed"
    assert start.files == {"/data/in.bin": 3 * BLOCK, "/ckpt/old": 0}, "as long as the reads got"
    assert start.absent == {"/ckpt/tmp", "/ckpt/final", "/ckpt/hard", "/ckpt/latest", "/logs"}
    assert plan.not_replayed["flush"][0] == 1 and plan.not_replayed["forget"][0] == 1
    assert plan.not_replayed["readdir (continued)"][0] == 1, "one listing, replayed at its first readdir"


def test_a_log_appended_to_starts_as_long_as_its_first_append_says() -> None:
    # A job appending a line to a log it found: the kernel sends O_APPEND writes at the file's end,
    # so the log held 5,000 bytes; on gcs (staged writes) that size is what the append costs.
    events = [
        ev("lookup", "/metrics.jsonl", t_ms=0),
        ev("open", "/metrics.jsonl", t_ms=1, session=1, flags=os.O_WRONLY | os.O_APPEND),
        ev("write", "/metrics.jsonl", t_ms=2, offset=5000, size=100, result=100, session=1, pid=0,
           flags=os.O_WRONLY | os.O_APPEND),
        ev("write", "/metrics.jsonl", t_ms=3, offset=5100, size=100, result=100, session=1, pid=0,
           flags=os.O_WRONLY | os.O_APPEND),
        ev("release", "/metrics.jsonl", t_ms=4, session=1, pid=0),
        ev("lookup", "/scratch", t_ms=5),  # written at an offset without O_APPEND: says nothing of its size
        ev("open", "/scratch", t_ms=6, session=2, flags=os.O_WRONLY),
        ev("write", "/scratch", t_ms=7, offset=8192, size=100, result=100, session=2, pid=0, flags=os.O_WRONLY),
    ]
    start = plan_replay([EventBatch(volume="vol", worker_id="w1", seq=1, events=events)]).start
    assert start.files == {"/metrics.jsonl": 5000, "/scratch": 0}


def test_a_handles_ops_belong_to_the_thread_that_opened_it() -> None:
    events = [
        ev("open", "/a", t_ms=0, session=1, pid=11), ev("open", "/b", t_ms=0.5, session=2, pid=22),
        ev("read", "/a", t_ms=1, size=BLOCK, session=1, pid=0), ev("read", "/b", t_ms=2, size=BLOCK, session=2, pid=0),
        ev("release", "/a", t_ms=3, session=1, pid=0), ev("opendir", "/d", t_ms=4, pid=22),
        ev("readdir", "/d", t_ms=5, pid=0),
    ]
    plan = plan_replay([EventBatch(volume="vol", worker_id="w1", seq=1, events=events)])
    by_thread = {stream.thread: [(op.op, op.path) for op in stream.ops] for stream in plan.streams}
    assert by_thread == {11: [("open", "/a"), ("read", "/a"), ("release", "/a")],
                         22: [("open", "/b"), ("read", "/b"), ("readdir", "/d")]}


# Thread 1, after some work of its own, writes /out/f in a directory it makes; thread 2 then reads it.
HANDOVER = [
    *[ev("getattr", "/", t_ms=i / 1000, pid=1) for i in range(300)],
    ev("mkdir", "/out", t_ms=0.5, pid=1),
    ev("create", "/out/f", t_ms=1, session=1, pid=1, flags=os.O_WRONLY | os.O_CREAT),
    ev("write", "/out/f", t_ms=2, size=BLOCK, result=BLOCK, session=1, pid=0, flags=os.O_WRONLY),
    ev("release", "/out/f", t_ms=3, session=1, pid=0),
    ev("lookup", "/out/f", t_ms=5, pid=2),
    ev("open", "/out/f", t_ms=6, session=2, pid=2, flags=os.O_RDONLY),
    ev("read", "/out/f", t_ms=7, size=BLOCK, result=BLOCK, session=2, pid=0),
    ev("release", "/out/f", t_ms=8, session=2, pid=0),
]


def test_a_thread_waits_for_what_another_did_to_the_same_path_before_it() -> None:
    plan = plan_replay([EventBatch(volume="vol", worker_id="w1", seq=1, events=HANDOVER)])
    ops = {(stream.thread, op.op): op for stream in plan.streams for op in stream.ops}
    assert ops[(1, "create")].after == (ops[(1, "mkdir")].index,) or ops[(1, "create")].after == (), "same thread"
    assert ops[(2, "lookup")].after == (ops[(1, "release")].index,), "the writer's last op on /out/f"
    assert ops[(2, "open")].after == (), "after the lookup, in its own thread"


def test_asap_timing_keeps_the_order_between_threads_on_a_shared_file(tmp_path: Path) -> None:
    """Every thread starts at once, but the reader still finds the writer's file."""
    report = replay_json(record(tmp_path / "rec", HANDOVER), "--target", tmp_path / "t", "--timing", "asap")
    assert all(row["errno_differs"] == 0 for row in report["per_op"]), report["per_op"]
    assert report["read_bytes"] == BLOCK


def test_a_recording_from_before_the_second_path_leaves_out_what_needs_it() -> None:
    """Workers older than ``OpEvent.target`` recorded renames, links and symlinks without it."""
    events = [ev("create", "/a", t_ms=0, session=1), ev("rename", "/a", t_ms=1), ev("link", "/b", t_ms=2),
              ev("symlink", "/c", t_ms=3), ev("getattr", "?", t_ms=4)]
    plan = plan_replay([EventBatch(volume="vol", worker_id="w1", seq=1, events=events)])
    assert [op.op for stream in plan.streams for op in stream.ops] == ["create"]
    assert plan.unknown_paths == 4


@pytest.mark.parametrize("path", ["a/b", "/a/../b", "/..", "/a//b", "/a/./b", "/a/"])
def test_a_recorded_path_that_could_leave_the_target_is_refused(path: str) -> None:
    with pytest.raises(ReplayError, match="not a path inside a volume"):
        check_path(path)
    with pytest.raises(ReplayError):
        plan_replay([EventBatch(volume="vol", worker_id="w1", seq=1, events=[ev("getattr", path)])])


def _tree(root: Path) -> dict[str, object]:
    tree: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = "/" + str(path.relative_to(root))
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                tree[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                tree[rel] = "dir"
            else:
                tree[rel] = ("file", info.st_size, info.st_ino)
    return tree


def test_a_replay_does_what_the_recording_did_and_can_run_again(tmp_path: Path) -> None:
    recordings = record(tmp_path / "rec", WORKLOAD)
    target = tmp_path / "target"
    first = replay_json(recordings, "--target", target)
    tree = _tree(target)
    assert tree.pop("/.interposer-replay")[:2] == ("file", 0)
    final, hard = tree.pop("/ckpt/final"), tree.pop("/ckpt/hard")
    assert final[:2] == ("file", 2 * BLOCK) and final == hard, "renamed into place, hard-linked: one inode"
    assert tree == {"/data": "dir", "/ckpt": "dir", "/logs": "dir", "/ckpt/latest": ("symlink", "final"),
                    "/data/in.bin": ("file", 2 * BLOCK, tree["/data/in.bin"][2])}, "truncated to 2 blocks"
    rows = {row["op"]: row for row in first["per_op"]}
    assert {op: row["replayed"] for op, row in rows.items()} == {op: row["recorded"] for op, row in rows.items()}
    assert all(row["errno_differs"] == 0 for row in first["per_op"]), first["per_op"]
    assert rows["lookup"]["replayed_errors"] == 1, "the checkpoint's name, looked for before it was created"
    assert first["read_bytes"] == 3 * BLOCK and first["written_bytes"] == 2 * BLOCK
    assert first["direct_handles"] + first["buffered_handles"] == 2
    assert first["prepared"]["files"] == 2 and first["prepared"]["directories"] == 2

    second = replay_json(recordings, "--target", target)
    assert all(row["errno_differs"] == 0 for row in second["per_op"]), "the target was reset to the start state"
    assert second["prepared"]["removed"] == 4, "tmp is gone by itself; final, hard, latest and /logs are removed"
    assert _tree(target).keys() == set(tree) | {"/.interposer-replay", "/ckpt/final", "/ckpt/hard"}


def test_a_recorded_symlink_cannot_lead_the_replay_outside_its_target(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    events = [
        ev("symlink", "/link", t_ms=0, target=str(precious)),
        ev("setattr", "/link", t_ms=0.1, size=0, flags=FATTR_SIZE | FATTR_MODE),
        ev("getxattr", "/link", t_ms=0.2, err=errno.ENODATA),
        ev("symlink", "/esc", t_ms=0.3, target=str(outside)),
        ev("create", "/esc/pwned", t_ms=1, session=1, flags=os.O_WRONLY | os.O_CREAT),
        ev("write", "/esc/pwned", t_ms=2, size=BLOCK, result=BLOCK, session=1, pid=0),
        ev("mkdir", "/esc/dir", t_ms=3),
        ev("rename", "/esc2", t_ms=4, target="/esc/moved"),
    ]
    report = replay_json(record(tmp_path / "rec", events), "--target", tmp_path / "target")
    assert list(outside.iterdir()) == []
    assert precious.read_text() == "keep me" and oct(precious.stat().st_mode) == oct(0o100644)
    rows = {row["op"]: row for row in report["per_op"]}
    assert rows["create"]["replayed_errors"] == rows["mkdir"]["replayed_errors"] == 1
    assert rows["write"]["replayed_errors"] == 1, "no handle: its create failed"


def test_closed_timing_keeps_think_time_scaled_and_asap_drops_it(tmp_path: Path) -> None:
    think_ms = 300
    events = [ev("getattr", "/", t_ms=0), ev("getattr", "/", t_ms=think_ms), ev("getattr", "/", t_ms=2 * think_ms)]
    recordings = record(tmp_path / "rec", events)
    closed = replay_json(recordings, "--target", tmp_path / "t1")
    assert closed["replayed_wall_s"] >= 2 * think_ms / 1000, "each op waits its think time after the one before"
    assert closed["recorded_wall_s"] == pytest.approx(2 * think_ms / 1000, abs=1e-3)
    asap = replay_json(recordings, "--target", tmp_path / "t2", "--timing", "asap")
    assert asap["replayed_wall_s"] < think_ms / 1000, "no think time"
    slower = replay_json(recordings, "--target", tmp_path / "t3", "--think-scale", "2")
    assert slower["replayed_wall_s"] >= 4 * think_ms / 1000 and slower["think_scale"] == 2
    faster = replay_json(recordings, "--target", tmp_path / "t4", "--think-scale", "0.5")
    assert think_ms / 1000 <= faster["replayed_wall_s"] < 2 * think_ms / 1000, "compute twice as fast"


def test_open_timing_keeps_the_recorded_clock_and_closed_timing_the_gaps(tmp_path: Path) -> None:
    """The first op took 290 ms in the recording and is fast here; the second began 10 ms after it ended."""
    events = [ev("getattr", "/", t_ms=0, duration_us=290_000), ev("getattr", "/", t_ms=300)]
    recordings = record(tmp_path / "rec", events)
    opened = replay_json(recordings, "--target", tmp_path / "t1", "--timing", "open")
    assert opened["replayed_wall_s"] >= 0.29, "issued at its recorded time, whatever the first op took"
    closed = replay_json(recordings, "--target", tmp_path / "t2")
    assert closed["replayed_wall_s"] < 0.2, "issued 10 ms after the first op ended here"


def test_bad_input_gets_a_clear_error_and_changes_nothing(tmp_path: Path) -> None:
    recordings = record(tmp_path / "rec", WORKLOAD)
    record(tmp_path / "rec", [ev("getattr", "/", t_ms=1)], volume="other")
    target = tmp_path / "target"
    result = replay(recordings, "--target", target)
    assert result.returncode == 2 and "several volumes: other (1 events), vol" in result.stderr
    result = replay(recordings, "--target", target, "--volume", "nope")
    assert result.returncode == 2 and "no events of volume 'nope'" in result.stderr
    assert not target.exists(), "refused before anything was made"
    target.mkdir()
    (target / "mine.txt").write_text("precious")
    result = replay(recordings, "--target", target, "--volume", "vol")
    assert result.returncode == 2 and "is not empty and was not prepared" in result.stderr
    assert [p.name for p in target.iterdir()] == ["mine.txt"] and (target / "mine.txt").read_text() == "precious"
    result = replay(recordings, "--target", target, "--volume", "vol", "--since", "yesterday-ish")
    assert result.returncode == 2 and "neither an ISO 8601 time" in result.stderr
