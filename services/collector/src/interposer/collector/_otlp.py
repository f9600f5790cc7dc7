"""OpenTelemetry export: a span per op, a parent span per file session, a log record per fault.

Op events are finished records, not live calls, so spans are built directly as
``ReadableSpan`` objects (start and end from the event's ``start_ns`` and
``duration_ns``) and handed to the SDK's ``BatchSpanProcessor``, which exports them
over OTLP/gRPC from its own thread; fault log records go the same way through a
``BatchLogRecordProcessor``. Fault log records come from the workers'
``FaultRecord`` stream (``interposer.faults.<volume>``), not from the op events.

Trace shape:

* ops of a file session (``OpEvent.session`` ≠ 0: ``open``/``create`` … ``release``)
  share one trace; its root is a ``file session`` span. The trace id and the root's
  span id are derived from ``(volume, worker_id, session)`` with BLAKE2b, so every
  collector replica of the queue group puts its share of a session's ops under the
  same parent, and the sampling decision (taken from the trace id, as OpenTelemetry's
  ``TraceIdRatioBased`` sampler does) is the same on every replica. The root span is
  emitted by the replica that sees the ``release``, starting at the earliest op of
  the session that replica saw (the ``open`` itself when it saw it);
* an op outside a session (``lookup``, ``getattr``…) is a trace of its own;
* an op's span id (and, outside a session, its trace id) is BLAKE2b of the op's
  identity ``(volume, worker_id, session, op, start_ns)``, which its ``FaultRecord``
  carries too: the replica that gets a fault record links its log record to the op's
  span without having seen the op's event.

Resource attributes identify the worker (``service.name`` ``interposer-fuse-worker``,
``service.instance.id`` = worker id, ``k8s.volume.name``, ``k8s.namespace.name``,
``k8s.pod.name``); span attributes use semantic-convention names where they exist
(``file.path``, ``process.pid``, ``process.user.id``, ``error.type``) and
``interposer.*`` for the rest.
"""

from __future__ import annotations

import collections
import errno as _errno
import fnmatch
import hashlib
import logging
import re
from collections.abc import Iterable

from interposer.proto import EventBatch, FaultRecord, OpEvent
from opentelemetry import trace
from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.sdk._logs import ReadWriteLogRecord
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv._incubating.attributes.file_attributes import FILE_PATH
from opentelemetry.semconv._incubating.attributes.k8s_attributes import (
    K8S_NAMESPACE_NAME,
    K8S_POD_NAME,
    K8S_POD_UID,
    K8S_VOLUME_NAME,
)
from opentelemetry.semconv._incubating.attributes.process_attributes import PROCESS_PID, PROCESS_USER_ID
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.service_attributes import SERVICE_INSTANCE_ID, SERVICE_NAME
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from ._config import CollectorConfig

log = logging.getLogger(__name__)

#: ``service.name`` of the spans: they describe what the fuse-worker served.
SERVICE = "interposer-fuse-worker"
#: Name of the root span of a file session.
SESSION_SPAN_NAME = "file session"
#: ``event_name`` of a fault log record.
FAULT_EVENT_NAME = "interposer.fault.injected"
#: Instrumentation scope of everything exported here.
SCOPE = InstrumentationScope("interposer.collector", "0.1.0")

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_TRACE_ID_LOW_MASK = (1 << 64) - 1


def session_ids(volume: str, worker_id: str, session: int) -> tuple[int, int]:
    """Return ``(trace_id, span_id)`` of a file session's root span.

    Derived with BLAKE2b from the session's identity, so every collector replica
    computes the same ids without talking to the others.

    Args:
        volume: volume id.
        worker_id: the worker process id (``EventBatch.worker_id``).
        session: ``OpEvent.session`` (≠ 0).

    Returns:
        A 128-bit trace id and a 64-bit span id, both non-zero.
    """
    digest = hashlib.blake2b(f"{volume}\0{worker_id}\0{session}".encode(), digest_size=24).digest()
    return int.from_bytes(digest[:16], "big") or 1, int.from_bytes(digest[16:], "big") or 1


def op_span_ids(volume: str, worker_id: str, session: int, op: str, start_ns: int) -> tuple[int, int]:
    """Return ``(trace_id, span_id)`` of one op's span.

    The span id is BLAKE2b of the op's identity, which both its ``OpEvent`` (with its
    batch) and its ``FaultRecord`` carry, so a fault's log record links to the op's
    span on any replica. The trace id is the file session's (:func:`session_ids`), or,
    for an op outside a session, from the same digest. Two ops collide only if they
    have the same name and session and start in the same nanosecond on one worker.

    Args:
        volume: volume id.
        worker_id: the worker process id.
        session: file session id, 0 outside one.
        op: FUSE op name.
        start_ns: the op's wall-clock start, ns since the Unix epoch.

    Returns:
        A 128-bit trace id and a 64-bit span id, both non-zero.
    """
    digest = hashlib.blake2b(f"{volume}\0{worker_id}\0{session}\0{op}\0{start_ns}".encode(),
                             digest_size=24).digest()
    span_id = int.from_bytes(digest[16:], "big") or 1
    if session:
        return session_ids(volume, worker_id, session)[0], span_id
    return int.from_bytes(digest[:16], "big") or 1, span_id


def trace_sampled(trace_id: int, ratio: float) -> bool:
    """Whether a trace is kept at ``ratio`` (rule of ``TraceIdRatioBased``: low 64 bits < ratio·2⁶⁴)."""
    return (trace_id & _TRACE_ID_LOW_MASK) < round(ratio * (1 << 64))


class _Session:
    """What one replica saw of one file session."""

    __slots__ = ("trace_id", "span_id", "start_ns", "end_ns", "path", "resource", "ops", "errors", "faults",
                 "opened_by")

    def __init__(self, trace_id: int, span_id: int, event: OpEvent, resource: Resource) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.start_ns = event.start_ns
        self.end_ns = event.start_ns + event.duration_ns
        self.path = event.path
        self.resource = resource
        self.ops = 0
        self.errors = 0
        self.faults = 0
        self.opened_by = ""  # "open" / "create" when this replica saw it


class OtlpExporter:
    """Turns event batches into OTLP spans, and fault records into OTLP log records.

    Not thread-safe: call :meth:`add_batch` and :meth:`add_faults` from one thread
    (the collector's asyncio loop). Export itself runs in the SDK processors'
    threads and never blocks the caller; when their queues are full the SDK drops
    new items.

    Args:
        config: the collector config (``otlp_*`` fields).
        span_exporter: where spans go; default an ``OTLPSpanExporter`` to
            ``config.otlp_endpoint``.
        log_exporter: where log records go; default an ``OTLPLogExporter`` to the same
            endpoint.

    Attributes:
        spans_total: spans handed to the span processor.
        logs_total: log records handed to the log processor.
    """

    def __init__(self, config: CollectorConfig, span_exporter: SpanExporter | None = None,
                 log_exporter: LogRecordExporter | None = None) -> None:
        if span_exporter is None or log_exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            insecure = not config.otlp_endpoint.startswith("https://")
            span_exporter = span_exporter or OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=insecure)
            log_exporter = log_exporter or OTLPLogExporter(endpoint=config.otlp_endpoint, insecure=insecure)
        self.spans = BatchSpanProcessor(span_exporter, max_queue_size=config.otlp_max_queue)
        self.logs = BatchLogRecordProcessor(log_exporter, max_queue_size=config.otlp_max_queue)
        self._ops = config.otlp_ops
        self._path_match = (None if config.otlp_path_glob == "*"
                            else re.compile(fnmatch.translate(config.otlp_path_glob)).match)
        self._min_duration_ns = round(config.otlp_min_duration_s * 1e9)
        self._ratio = config.otlp_sample_ratio
        self._max_sessions = config.otlp_max_open_sessions
        self._resources: dict[tuple[str, str, str, str, str], Resource] = {}
        # (volume, worker_id, session) → session, oldest first.
        self._sessions: collections.OrderedDict[tuple[str, str, int], _Session] = collections.OrderedDict()
        self.spans_total = 0
        self.logs_total = 0

    def _resource(self, volume: str, worker_id: str, namespace: str, pod: str, pod_uid: str = "") -> Resource:
        key = (volume, worker_id, namespace, pod, pod_uid)
        resource = self._resources.get(key)
        if resource is None:
            attributes: dict[str, str] = {SERVICE_NAME: SERVICE, K8S_VOLUME_NAME: volume}
            if worker_id:
                attributes[SERVICE_INSTANCE_ID] = worker_id
            if namespace:
                attributes[K8S_NAMESPACE_NAME] = namespace
            if pod:
                attributes[K8S_POD_NAME] = pod
            if pod_uid:
                attributes[K8S_POD_UID] = pod_uid
            resource = self._resources[key] = Resource.create(attributes)
        return resource

    def _op_exported(self, op: str, duration_ns: int) -> bool:
        """Whether the op filters let an op's span through (path and sampling aside)."""
        return (not self._ops or op in self._ops) and duration_ns >= self._min_duration_ns

    def add_batch(self, batch: EventBatch) -> None:
        """Export the spans of one batch (subject to the filters).

        Args:
            batch: a decoded ``EventBatch``.
        """
        resource = self._resource(batch.volume, batch.worker_id, batch.namespace, batch.pod, batch.pod_uid)
        for event in batch.events:
            if self._path_match is not None and not self._path_match(event.path):
                if event.session and event.op == "release":  # renamed out of the glob: still close it
                    ended = self._sessions.pop((batch.volume, batch.worker_id, event.session), None)
                    if ended is not None and trace_sampled(ended.trace_id, self._ratio):
                        self._end_session(ended, complete=True)
                continue
            parent = self._session(batch, event, resource) if event.session else None
            trace_id, span_id = op_span_ids(batch.volume, batch.worker_id, event.session, event.op, event.start_ns)
            if not trace_sampled(trace_id, self._ratio):
                if parent is not None and event.op == "release":
                    self._sessions.pop((batch.volume, batch.worker_id, event.session), None)
                continue
            if self._op_exported(event.op, event.duration_ns):
                self._op_span(event, SpanContext(trace_id, span_id, False, _SAMPLED), parent, resource)
            if parent is not None and event.op == "release":
                self._end_session(self._sessions.pop((batch.volume, batch.worker_id, event.session)),
                                  complete=True)

    def _session(self, batch: EventBatch, event: OpEvent, resource: Resource) -> _Session:
        key = (batch.volume, batch.worker_id, event.session)
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = _Session(*session_ids(*key), event, resource)
            if len(self._sessions) > self._max_sessions:
                _, oldest = self._sessions.popitem(last=False)
                if trace_sampled(oldest.trace_id, self._ratio):
                    self._end_session(oldest, complete=False)
        end_ns = event.start_ns + event.duration_ns
        session.start_ns = min(session.start_ns, event.start_ns)
        session.end_ns = max(session.end_ns, end_ns)
        session.ops += 1
        if event.errno:
            session.errors += 1
        if event.fault:
            session.faults += 1
        if event.op in ("open", "create"):
            session.opened_by = event.op
            session.path = event.path
        return session

    def _op_span(self, event: OpEvent, context: SpanContext, parent: _Session | None, resource: Resource) -> None:
        trace_id = context.trace_id
        attributes: dict[str, str | int] = {
            FILE_PATH: event.path, "interposer.op": event.op, "interposer.ino": event.ino,
            PROCESS_USER_ID: event.uid,
        }
        if event.pid:
            attributes[PROCESS_PID] = event.pid
        if event.op in ("read", "write") or event.size:
            attributes["interposer.offset"] = event.offset
            attributes["interposer.size_bytes"] = event.size
            attributes["interposer.result_bytes"] = event.result
        if event.session:
            attributes["interposer.session"] = event.session
        if event.fault:
            attributes["interposer.fault"] = event.fault
        if event.delay_ns:
            attributes["interposer.delay_ns"] = event.delay_ns
            if event.delay_late_ns:
                attributes["interposer.delay_late_ns"] = event.delay_late_ns
        if event.throttle_ns:
            attributes["interposer.throttle_ns"] = event.throttle_ns
        status = Status(StatusCode.UNSET)
        if event.errno:
            name = _errno.errorcode.get(event.errno, str(event.errno))
            attributes[ERROR_TYPE] = name
            status = Status(StatusCode.ERROR, name)
        self.spans.on_end(ReadableSpan(
            name=event.op, context=context,
            parent=SpanContext(trace_id, parent.span_id, False, _SAMPLED) if parent else None,
            resource=resource, attributes=attributes, kind=SpanKind.INTERNAL, status=status,
            start_time=event.start_ns, end_time=event.start_ns + event.duration_ns, instrumentation_scope=SCOPE,
        ))
        self.spans_total += 1

    def _end_session(self, session: _Session, complete: bool) -> None:
        attributes: dict[str, str | int | bool] = {
            FILE_PATH: session.path, "interposer.session.ops": session.ops,
            "interposer.session.errors": session.errors, "interposer.session.faults": session.faults,
            "interposer.session.complete": complete,
        }
        if session.opened_by:
            attributes["interposer.session.opened_by"] = session.opened_by
        self.spans.on_end(ReadableSpan(
            name=SESSION_SPAN_NAME, context=SpanContext(session.trace_id, session.span_id, False, _SAMPLED),
            parent=None, resource=session.resource, attributes=attributes, kind=SpanKind.INTERNAL,
            status=Status(StatusCode.ERROR, "errors") if session.errors else Status(StatusCode.UNSET),
            start_time=session.start_ns, end_time=session.end_ns, instrumentation_scope=SCOPE,
        ))
        self.spans_total += 1

    def add_faults(self, records: Iterable[FaultRecord]) -> None:
        """Export one log record per fault record, linked to the faulted op's span.

        The link is the op's span when the filters let it through (computed with
        :func:`op_span_ids`, whichever replica exports that span), else the file
        session's root span, else none. Records whose path the path glob excludes, or
        whose trace the sampling ratio leaves out, are not exported; records of
        workers that send no ``worker_id`` are exported without a link. A worker
        running with events off (or sampling an op out) still sends the record; its
        log record then names a span that is never exported.

        Args:
            records: decoded ``FaultRecord`` s.
        """
        for record in records:
            if self._path_match is not None and not self._path_match(record.path):
                continue
            context: SpanContext | None = None
            if record.worker_id:
                trace_id, span_id = op_span_ids(record.volume, record.worker_id, record.session, record.op,
                                                record.time_ns)
                if not trace_sampled(trace_id, self._ratio):
                    continue
                if self._op_exported(record.op, record.duration_ns):
                    context = SpanContext(trace_id, span_id, False, _SAMPLED)
                elif record.session:
                    context = SpanContext(*session_ids(record.volume, record.worker_id, record.session), False,
                                          _SAMPLED)
            self._fault_log(record, context)

    def _fault_log(self, record: FaultRecord, context: SpanContext | None) -> None:
        injected = record.errno or record.kind
        attributes: dict[str, str | int] = {
            FILE_PATH: record.path, "interposer.op": record.op, "interposer.fault": injected,
            "interposer.fault.kind": record.kind, "interposer.fault.layer": record.layer,
            "interposer.policy.revision": record.policy_revision, PROCESS_USER_ID: record.uid,
        }
        if record.errno:
            attributes[ERROR_TYPE] = record.errno
        if record.pid:
            attributes[PROCESS_PID] = record.pid
        if record.session:
            attributes["interposer.session"] = record.session
        if record.op in ("read", "write") or record.size:
            attributes["interposer.offset"] = record.offset
            attributes["interposer.size_bytes"] = record.size
        if record.kind in ("short_read", "short_write"):
            attributes["interposer.result_bytes"] = record.result
        log_record = LogRecord(
            timestamp=record.time_ns + record.duration_ns,
            context=trace.set_span_in_context(trace.NonRecordingSpan(context)) if context else None,
            severity_number=SeverityNumber.WARN, severity_text="WARN",
            body=f"injected {injected} into {record.op} {record.path}",
            attributes=attributes, event_name=FAULT_EVENT_NAME,
        )
        resource = self._resource(record.volume, record.worker_id, record.namespace, record.pod)
        self.logs.on_emit(ReadWriteLogRecord(log_record, resource=resource, instrumentation_scope=SCOPE))
        self.logs_total += 1

    def open_sessions(self) -> int:
        """File sessions seen open and not yet released."""
        return len(self._sessions)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """End the still-open sessions (marked incomplete), export everything queued, stop.

        Args:
            timeout_s: longest wait for the final exports, seconds.
        """
        while self._sessions:
            _, session = self._sessions.popitem(last=False)
            if trace_sampled(session.trace_id, self._ratio):
                self._end_session(session, complete=False)
        timeout_ms = int(timeout_s * 1000)
        if not self.spans.force_flush(timeout_ms) or not self.logs.force_flush(timeout_ms):
            log.warning("OTLP export did not finish within %.0f s", timeout_s)
        self.spans.shutdown()
        self.logs.shutdown()
