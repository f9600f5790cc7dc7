"""A real OTLP/gRPC receiver for tests: the trace and logs services of ``opentelemetry-proto``."""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def attributes(pairs: list[KeyValue]) -> dict[str, Any]:
    """OTLP ``KeyValue`` list → plain dict (string, int, bool and double values)."""

    def plain(value: AnyValue) -> Any:
        return getattr(value, value.WhichOneof("value"))

    return {pair.key: plain(pair.value) for pair in pairs}


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer, logs_service_pb2_grpc.LogsServiceServicer):
    """Records every span and log record exported to it, flattened with their resource attributes.

    ``spans``: dicts with ``name``, ``trace_id``, ``span_id``, ``parent_span_id`` (hex,
    ``""`` for a root), ``start_ns``, ``end_ns``, ``status_code``, ``attributes``,
    ``resource``. ``logs``: dicts with ``body``, ``trace_id``, ``span_id``, ``time_ns``,
    ``severity``, ``event_name``, ``attributes``, ``resource``.
    """

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC method name
        # Both services name their method Export; the request type tells them apart.
        with self._lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                for resource_spans in request.resource_spans:
                    resource = attributes(resource_spans.resource.attributes)
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            self.spans.append({
                                "name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "start_ns": span.start_time_unix_nano, "end_ns": span.end_time_unix_nano,
                                "status_code": span.status.code, "attributes": attributes(span.attributes),
                                "resource": resource,
                            })
                return trace_service_pb2.ExportTraceServiceResponse()
            for resource_logs in request.resource_logs:
                resource = attributes(resource_logs.resource.attributes)
                for scope_logs in resource_logs.scope_logs:
                    for record in scope_logs.log_records:
                        self.logs.append({
                            "body": record.body.string_value, "trace_id": record.trace_id.hex(),
                            "span_id": record.span_id.hex(), "time_ns": record.time_unix_nano,
                            "severity": record.severity_text, "event_name": record.event_name,
                            "attributes": attributes(record.attributes), "resource": resource,
                        })
            return logs_service_pb2.ExportLogsServiceResponse()

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop(grace=None)
