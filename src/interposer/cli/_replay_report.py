"""``interposer replay``, the report: the recording against its replay, per op and in all.

Recorded latencies are the worker's service times (``OpEvent.duration_ns``: from the
request's arrival to its reply); replayed ones are the system calls' times as the
replayer saw them, which add the kernel's round trip (tens of µs through FUSE). The
comparison that needs no such care is the wall time: how long the same ops, with the
same dependencies and think time, took in all.
"""

from __future__ import annotations

import math

import msgspec

from ._replay_plan import Plan
from ._replay_run import RunResult
from ._replay_target import Prepared

_NS_PER_S = 1_000_000_000


class OpComparison(msgspec.Struct, frozen=True, kw_only=True):
    """One op name, recorded and replayed.

    Attributes:
        op: FUSE op name.
        recorded: ops recorded (of those replayed).
        recorded_errors: of them, failed in the recording.
        recorded_p50_s, recorded_p99_s: the worker's service time, seconds.
        replayed: ops issued.
        replayed_errors: of them, failed in the replay.
        errno_differs: ops whose replayed outcome (errno, or success) differs from the recorded one.
        replayed_p50_s, replayed_p99_s, replayed_mean_s: system call time, seconds.
        bytes: bytes the replay read or wrote.
    """

    op: str
    recorded: int
    recorded_errors: int
    recorded_p50_s: float | None
    recorded_p99_s: float | None
    replayed: int
    replayed_errors: int
    errno_differs: int
    replayed_p50_s: float | None
    replayed_p99_s: float | None
    replayed_mean_s: float | None
    bytes: int


class ReplayReport(msgspec.Struct, frozen=True, kw_only=True):
    """A replay's whole report (``interposer replay --json``).

    Attributes:
        volume: the recorded volume.
        target: the directory replayed into.
        timing: ``closed``, ``asap`` or ``open`` (docs/telemetry.md, "interposer replay").
        think_scale: what ``closed`` timing multiplied the recorded think time by.
        threads: application threads (streams) replayed.
        ops: ops replayed.
        recorded_wall_s: from the first replayed op's start to the last one's end in the recording, seconds.
        replayed_wall_s: the same in the replay, seconds.
        wall_ratio: replayed / recorded wall time (> 1: the target is slower for this work).
        recorded_busy_s: sum of the recorded ops' service times, seconds.
        replayed_busy_s: sum of the replayed ops' system call times, seconds.
        read_bytes, written_bytes: bytes the replay moved.
        late_p99_s: the replayer's own lag issuing ops (p99 of how much later than due), seconds.
        direct_handles, buffered_handles: file handles replayed with and without ``O_DIRECT``.
        per_op: per op name, by recorded count.
        not_replayed: ops left out: name → {count, why}.
        skipped: ops the run could not issue, by reason.
        unknown_paths: ops left out because their path was unknown to the worker.
        events_missing: events the recording lacks (dropped or sampled out by the workers).
        prepared: what preparing changed, None if the target was not prepared.
    """

    volume: str
    target: str
    timing: str
    think_scale: float
    threads: int
    ops: int
    recorded_wall_s: float
    replayed_wall_s: float
    wall_ratio: float | None
    recorded_busy_s: float
    replayed_busy_s: float
    read_bytes: int
    written_bytes: int
    late_p99_s: float | None
    direct_handles: int
    buffered_handles: int
    per_op: list[OpComparison]
    not_replayed: dict[str, dict[str, object]]
    skipped: dict[str, int]
    unknown_paths: int
    events_missing: int
    prepared: Prepared | None


def quantile(sorted_values: list[int], q: float) -> int | None:
    """Nearest-rank quantile ``q`` (0 < q ≤ 1) of ``sorted_values``; None if empty (Hyndman & Fan 1996, definition 1)."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else ns / _NS_PER_S


def build_report(plan: Plan, run: RunResult, *, target: str, timing: str, prepared: Prepared | None,
                 think_scale: float = 1.0) -> ReplayReport:
    """Compare ``plan`` (the recording) with ``run`` (its replay)."""
    recorded: dict[str, list[int]] = {}
    recorded_errors: dict[str, int] = {}
    recorded_errno: dict[int, int] = {}
    names: dict[int, str] = {}
    for stream in plan.streams:
        for op in stream.ops:
            recorded.setdefault(op.op, []).append(op.end_ns - op.start_ns)
            recorded_errors[op.op] = recorded_errors.get(op.op, 0) + (op.errno != 0)
            recorded_errno[op.index] = op.errno
            names[op.index] = op.op
    replayed: dict[str, list[int]] = {}
    errors: dict[str, int] = {}
    differs: dict[str, int] = {}
    moved: dict[str, int] = {}
    for outcome in run.outcomes:
        name = names[outcome.index]
        replayed.setdefault(name, []).append(outcome.latency_ns)
        errors[name] = errors.get(name, 0) + (outcome.errno != 0)
        differs[name] = differs.get(name, 0) + (outcome.errno != recorded_errno[outcome.index])
        moved[name] = moved.get(name, 0) + outcome.bytes
    per_op = []
    for name, durations in sorted(recorded.items(), key=lambda item: (-len(item[1]), item[0])):
        durations.sort()
        latencies = sorted(replayed.get(name, []))
        per_op.append(OpComparison(
            op=name, recorded=len(durations), recorded_errors=recorded_errors[name],
            recorded_p50_s=_seconds(quantile(durations, 0.5)), recorded_p99_s=_seconds(quantile(durations, 0.99)),
            replayed=len(latencies), replayed_errors=errors.get(name, 0), errno_differs=differs.get(name, 0),
            replayed_p50_s=_seconds(quantile(latencies, 0.5)), replayed_p99_s=_seconds(quantile(latencies, 0.99)),
            replayed_mean_s=_seconds(round(sum(latencies) / len(latencies))) if latencies else None,
            bytes=moved.get(name, 0)))
    recorded_wall = (plan.last_end_ns - plan.first_ns) / _NS_PER_S
    replayed_wall = run.wall_ns / _NS_PER_S
    late = sorted(outcome.late_ns for outcome in run.outcomes)
    return ReplayReport(
        volume=plan.volume, target=target, timing=timing, think_scale=think_scale, threads=len(plan.streams), ops=len(run.outcomes),
        recorded_wall_s=recorded_wall, replayed_wall_s=replayed_wall,
        wall_ratio=replayed_wall / recorded_wall if recorded_wall > 0 else None,
        recorded_busy_s=sum(sum(d) for d in recorded.values()) / _NS_PER_S,
        replayed_busy_s=sum(outcome.latency_ns for outcome in run.outcomes) / _NS_PER_S,
        read_bytes=moved.get("read", 0), written_bytes=moved.get("write", 0),
        late_p99_s=_seconds(quantile(late, 0.99)), direct_handles=run.direct_handles,
        buffered_handles=run.buffered_handles, per_op=per_op,
        not_replayed={name: {"count": count, "why": why} for name, (count, why) in sorted(plan.not_replayed.items())},
        skipped=run.skipped, unknown_paths=plan.unknown_paths, events_missing=plan.events_missing,
        prepared=prepared)


def encode_report(report: ReplayReport) -> bytes:
    """The report as indented JSON."""
    return msgspec.json.format(msgspec.json.encode(report), indent=2)
