"""OpenTelemetry export: unit tests of the span/log mapping, and a real worker → collector → OTLP receiver run.

Spans come from op events (``interposer.events.*``), fault log records from the
workers' fault records (``interposer.faults.*``); both streams are queue-grouped, so
a fault's log record may be exported by another replica than its op's span.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Callable, Sequence

import msgspec
import pytest
from otlp_receiver import OtlpReceiver
from telemetry_helpers import Collector, wait_for

from interposer.collector import CollectorConfig, OtlpExporter, op_span_ids, session_ids
from interposer.proto import EventBatch, FaultRecord, OpEvent
from interposer_testing import MountedVolume
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

T0_NS = 1_700_000_000_000_000_000


def _event(op: str, path: str = "/f", *, session: int = 0, start_ms: int = 0, duration_us: int = 100,
           err: int = 0, fault: str = "") -> OpEvent:
    return OpEvent(op=op, ino=5, path=path, offset=0, size=4096 if op in ("read", "write") else 0,
                   result=0 if err else (4096 if op in ("read", "write") else 0), errno=err,
                   start_ns=T0_NS + start_ms * 1_000_000, duration_ns=duration_us * 1000, fault=fault,
                   pid=42, uid=1000, session=session)


def _fault(op: str, path: str = "/f", *, session: int = 0, start_ms: int = 0, duration_us: int = 100,
           kind: str = "errno", err: str = "EIO", worker_id: str = "w1", result: int = 0) -> FaultRecord:
    """The worker's record of the fault injected into the op ``_event`` with the same arguments describes."""
    return FaultRecord(time_ns=T0_NS + start_ms * 1_000_000, op=op, path=path, kind=kind, errno=err, pid=42,
                       uid=1000, volume="vol", layer=1, offset=0, size=4096 if op in ("read", "write") else 0,
                       result=result, policy_revision=7, worker_id=worker_id, session=session,
                       duration_ns=duration_us * 1000, namespace="ns", pod="app-0")


def _batch(events: list[OpEvent], worker_id: str = "w1") -> EventBatch:
    return EventBatch(volume="vol", worker_id=worker_id, seq=1, events=events, namespace="ns", pod="app-0",
                      pod_uid="uid-0")


class _Export:
    """An OtlpExporter writing to in-memory exporters."""

    def __init__(self, **config: object) -> None:
        self.spans = InMemorySpanExporter()
        self.logs = InMemoryLogRecordExporter()
        self.exporter = OtlpExporter(msgspec.convert(config, CollectorConfig), self.spans, self.logs)

    def run(self, *batches: EventBatch, faults: Sequence[FaultRecord] = ()) -> tuple[list, list]:
        for batch in batches:
            self.exporter.add_batch(batch)
        self.exporter.add_faults(faults)
        self.exporter.shutdown()
        return list(self.spans.get_finished_spans()), list(self.logs.get_finished_logs())


SESSION = [
    _event("open", session=1, start_ms=0),
    _event("read", session=1, start_ms=1),
    _event("read", session=1, start_ms=2, err=errno.EIO, fault="EIO"),
    _event("flush", session=1, start_ms=3),
    _event("release", session=1, start_ms=4),
]
#: The worker's fault record of SESSION's failed read.
SESSION_FAULT = _fault("read", session=1, start_ms=2)


def test_session_ops_are_children_of_one_session_span_with_event_times() -> None:
    spans, logs = _Export().run(_batch([_event("lookup", start_ms=0), *SESSION]), faults=[SESSION_FAULT])
    by_name = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    [root] = by_name["file session"]
    trace_id, span_id = session_ids("vol", "w1", 1)
    assert (root.context.trace_id, root.context.span_id, root.parent) == (trace_id, span_id, None)
    assert root.start_time == T0_NS and root.end_time == T0_NS + 4_000_000 + 100_000
    assert root.attributes["interposer.session.ops"] == 5 and root.attributes["interposer.session.faults"] == 1
    children = [s for s in spans if s.parent is not None]
    assert sorted(s.name for s in children) == ["flush", "open", "read", "read", "release"]
    assert all(s.context.trace_id == trace_id and s.parent.span_id == span_id for s in children)
    [lookup] = by_name["lookup"]
    assert lookup.parent is None and lookup.context.trace_id != trace_id
    failed = [s for s in children if s.attributes.get("error.type")]
    assert [(s.name, s.attributes["error.type"], s.status.status_code.name) for s in failed] == [
        ("read", "EIO", "ERROR")]
    assert failed[0].start_time == T0_NS + 2_000_000 and failed[0].end_time == failed[0].start_time + 100_000
    assert failed[0].attributes["file.path"] == "/f" and failed[0].attributes["process.pid"] == 42
    assert failed[0].resource.attributes["k8s.volume.name"] == "vol"
    assert failed[0].resource.attributes["k8s.pod.name"] == "app-0"
    assert failed[0].resource.attributes["k8s.pod.uid"] == "uid-0"
    [log] = logs
    assert (log.log_record.trace_id, log.log_record.span_id) == (trace_id, failed[0].context.span_id)
    assert log.log_record.attributes["error.type"] == "EIO" and log.log_record.event_name == "interposer.fault.injected"
    assert (log.log_record.attributes["interposer.fault.layer"], log.log_record.attributes["interposer.policy.revision"],
            log.log_record.attributes["interposer.fault.kind"]) == (1, 7, "errno")
    assert log.log_record.timestamp == T0_NS + 2_000_000 + 100_000
    assert log.log_record.body == "injected EIO into read /f"
    assert log.resource.attributes["k8s.pod.name"] == "app-0" and log.resource.attributes["service.instance.id"] == "w1"


def test_a_fault_record_links_to_the_op_span_another_replica_exported() -> None:
    mkdir = _event("mkdir", "/d", start_ms=9, err=errno.EACCES, fault="EACCES")
    spans, _ = _Export().run(_batch([*SESSION, mkdir]))
    _, logs = _Export().run(faults=[SESSION_FAULT, _fault("mkdir", "/d", start_ms=9, err="EACCES")])
    span_ids = {(s.name, s.attributes.get("error.type")): (s.context.trace_id, s.context.span_id) for s in spans}
    linked = {log.log_record.attributes["interposer.op"]: (log.log_record.trace_id, log.log_record.span_id)
              for log in logs}
    assert linked == {"read": span_ids[("read", "EIO")], "mkdir": span_ids[("mkdir", "EACCES")]}
    assert linked["mkdir"] == op_span_ids("vol", "w1", 0, "mkdir", T0_NS + 9_000_000)


def test_short_reads_and_records_of_older_workers() -> None:
    short = _fault("read", session=1, start_ms=2, kind="short_read", err="", result=1024)
    old = FaultRecord(time_ns=T0_NS, op="read", path="/f", kind="errno", errno="EIO", volume="vol")
    _, logs = _Export().run(faults=[short, old])
    [short_log, old_log] = sorted(logs, key=lambda log: log.log_record.attributes["interposer.fault"] != "short_read")
    attributes = short_log.log_record.attributes
    assert "error.type" not in attributes and attributes["interposer.result_bytes"] == 1024
    assert short_log.log_record.body == "injected short_read into read /f"
    assert short_log.log_record.span_id == op_span_ids("vol", "w1", 1, "read", T0_NS + 2_000_000)[1]
    assert old_log.log_record.span_id == 0, "no worker id: nothing to link to"


def test_filters_ops_min_duration_and_path_glob() -> None:
    events = [*SESSION, _event("read", "/other", start_ms=5, duration_us=5000),
              _event("read", "/f", start_ms=6, duration_us=5000)]
    spans, logs = _Export(otlp_ops=["read"], otlp_min_duration_s=0.001, otlp_path_glob="/f").run(
        _batch(events), faults=[SESSION_FAULT, _fault("read", "/other", start_ms=5, duration_us=5000)])
    assert sorted(s.name for s in spans) == ["file session", "read"]
    [read] = [s for s in spans if s.name == "read"]
    assert read.attributes["file.path"] == "/f" and read.parent is None
    # The fault's span was filtered out (too short): its log record hangs off the session span.
    [log] = logs
    assert (log.log_record.trace_id, log.log_record.span_id) == session_ids("vol", "w1", 1)


def test_sampling_keeps_or_drops_whole_sessions_the_same_way_on_every_replica() -> None:
    batches = [_batch([_event(op, session=s) for op in ("open", "read", "release")]) for s in range(1, 201)]
    first, _ = _Export(otlp_sample_ratio=0.5).run(*batches)
    again, _ = _Export(otlp_sample_ratio=0.5).run(*batches)
    traces = {s.context.trace_id for s in first}
    assert traces == {s.context.trace_id for s in again}
    assert 60 < len(traces) < 140
    assert len(first) == 4 * len(traces), "each kept session has its root and all three ops"
    assert _Export(otlp_sample_ratio=0.0).run(*batches)[0] == []


def test_a_session_split_across_replicas_shares_its_parent() -> None:
    one, two = _Export(), _Export()
    spans_one, _ = one.run(_batch(SESSION[:2]))
    spans_two, _ = two.run(_batch(SESSION[2:]))
    roots = [s for s in spans_one + spans_two if s.name == "file session"]
    children = [s for s in spans_one + spans_two if s.parent is not None]
    assert {(s.context.trace_id, s.context.span_id) for s in roots} == {session_ids("vol", "w1", 1)}
    assert {s.parent.span_id for s in children} == {session_ids("vol", "w1", 1)[1]}
    # replica one never saw the release: its root is ended at shutdown and says so
    assert sorted(s.attributes["interposer.session.complete"] for s in roots) == [False, True]


def test_open_sessions_are_bounded() -> None:
    export = _Export(otlp_max_open_sessions=3)
    for session in range(1, 11):
        export.exporter.add_batch(_batch([_event("open", session=session)]))
        assert export.exporter.open_sessions() <= 3
    spans, _ = export.run()
    assert len([s for s in spans if s.name == "file session"]) == 10


# ---- real worker → collector → OTLP receiver -------------------------------------------------


@pytest.mark.nats
@pytest.mark.fuse
def test_worker_ops_arrive_as_spans_and_fault_logs_at_a_real_otlp_receiver(
        nats_url: str, mount_worker: Callable[..., MountedVolume], start_collector: Callable[..., Collector]) -> None:
    volume = f"otlp-{uuid.uuid4().hex[:8]}"
    policy = {"layers": [{"type": "fault", "errno": "EIO", "probability": 1.0, "ops": ["read"],
                          "path_glob": "/bad*"}]}
    with OtlpReceiver() as receiver:
        start_collector("--otlp-endpoint", receiver.endpoint)
        vol = mount_worker(volume, nats_url=nats_url, policy=json.dumps(policy))
        (vol.mountpoint / "good").write_bytes(b"g" * 8192)
        (vol.mountpoint / "bad").write_bytes(b"b" * 100)
        fd = os.open(vol.mountpoint / "bad", os.O_RDONLY | os.O_DIRECT)
        with pytest.raises(OSError) as info:
            os.read(fd, 4096)
        assert info.value.errno == errno.EIO
        os.close(fd)

        def arrived() -> bool:
            sessions = [s for s in receiver.spans if s["name"] == "file session"
                        and s["resource"].get("k8s.volume.name") == volume]
            return len(sessions) >= 3 and len(receiver.logs) >= 1

        wait_for(arrived, what="3 file sessions and a fault log at the OTLP receiver", interval_s=0.2)
    spans = [s for s in receiver.spans if s["resource"]["k8s.volume.name"] == volume]
    roots = {s["span_id"]: s for s in spans if s["name"] == "file session"}
    by_root: dict[str, list[dict]] = {}
    for span in spans:
        if span["parent_span_id"]:
            by_root.setdefault(span["parent_span_id"], []).append(span)
    good = [r for r in roots.values() if r["attributes"]["file.path"] == "/good"]
    [good_root] = good
    ops = sorted(s["name"] for s in by_root[good_root["span_id"]])
    assert ops[0] == "create" and "write" in ops and "release" in ops, ops
    for child in by_root[good_root["span_id"]]:
        assert child["trace_id"] == good_root["trace_id"]
        assert good_root["start_ns"] <= child["start_ns"] <= child["end_ns"] <= good_root["end_ns"]
    writes = [s for s in by_root[good_root["span_id"]] if s["name"] == "write"]
    assert sum(s["attributes"]["interposer.result_bytes"] for s in writes) == 8192
    [failed] = [s for s in spans if s["name"] == "read" and s["attributes"].get("error.type") == "EIO"]
    assert failed["parent_span_id"] in roots and failed["attributes"]["interposer.fault"] == "EIO"
    assert failed["status_code"] == 2  # STATUS_CODE_ERROR
    [fault_log] = [log for log in receiver.logs if log["resource"]["k8s.volume.name"] == volume]
    assert (fault_log["trace_id"], fault_log["span_id"]) == (failed["trace_id"], failed["span_id"])
    assert fault_log["attributes"]["error.type"] == "EIO" and fault_log["attributes"]["file.path"] == "/bad"
    assert fault_log["event_name"] == "interposer.fault.injected"
    assert fault_log["attributes"]["interposer.fault.kind"] == "errno"
    assert fault_log["attributes"]["interposer.fault.layer"] == 0
