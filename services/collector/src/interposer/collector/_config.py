"""The collector's configuration: one frozen Struct, every field defaulted and documented."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from interposer.proto.connection import DEFAULT_NATS_URL  # the NATS server subscribed to by default
from interposer.proto.policy import MAX_GLOB_LENGTH, OpName

from ._aggregate import DEFAULT_FORGET_SILENT_AFTER_S, DEFAULT_FORGET_STOPPED_AFTER_S

#: Address the /metrics HTTP server binds to by default (loopback: expose it on
#: purpose, e.g. ``--listen 0.0.0.0:9464`` in a pod).
DEFAULT_LISTEN_HOST = "127.0.0.1"
#: Default /metrics TCP port (9464 is the port OpenTelemetry's Prometheus
#: exporter uses too); 0 = let the kernel pick one.
DEFAULT_LISTEN_PORT = 9464
#: Client name shown by ``nats server report connections``.
DEFAULT_CLIENT_NAME = "interposer-collector"
#: Most event batches buffered per subscription before NATS drops them (slow consumer),
#: messages. One batch holds up to a few thousand events.
DEFAULT_PENDING_MSGS_LIMIT = 4096
#: Most bytes buffered per subscription before NATS drops messages, bytes.
DEFAULT_PENDING_BYTES_LIMIT = 64 * 1024 * 1024
#: Wait between reconnect attempts, seconds.
DEFAULT_RECONNECT_TIME_WAIT_S = 2.0
#: Timeout of one connect attempt, seconds.
DEFAULT_CONNECT_TIMEOUT_S = 2.0
#: How long a drain on shutdown may take before the connection is closed anyway, seconds.
DEFAULT_DRAIN_TIMEOUT_S = 10.0
#: Shortest gap between two log lines about malformed messages, seconds (the count is
#: always exact in ``interposer_collector_decode_errors_total``).
DEFAULT_DECODE_ERROR_LOG_INTERVAL_S = 10.0

#: OTLP export (traces and fault logs) is off unless an endpoint is given.
DEFAULT_OTLP_ENDPOINT = ""
#: Shortest op exported as a span, seconds (0 = every op).
DEFAULT_OTLP_MIN_DURATION_S = 0.0
#: Share of traces exported, 0..1 (decided per trace, so a file session is whole or absent).
DEFAULT_OTLP_SAMPLE_RATIO = 1.0
#: Most file sessions (open → release) tracked at once for their parent spans; when
#: more are open the oldest is ended early (its span says so).
DEFAULT_OTLP_MAX_OPEN_SESSIONS = 10_000
#: Most spans (and, separately, log records) queued for export before the SDK drops
#: new ones.
DEFAULT_OTLP_MAX_QUEUE = 65_536

#: Event recording is off unless a directory is given.
DEFAULT_RECORD_DIR = ""
#: Most bytes the recordings of ``--record-dir`` may total after a rotation (1 GiB).
DEFAULT_RECORD_MAX_BYTES = 1024 * 1024 * 1024
#: Longest time one recording file is written before the next is started, seconds.
DEFAULT_RECORD_ROTATE_S = 3600.0
#: Size at which a recording file is rotated, bytes (64 MiB).
DEFAULT_RECORD_ROTATE_BYTES = 64 * 1024 * 1024

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0.0)]


class CollectorConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the collector service needs to run.

    Attributes:
        listen_host: address of the /metrics HTTP server.
        listen_port: TCP port of the /metrics HTTP server; 0 = any free port (it is
            logged and written to ``port_file``).
        port_file: if not empty, the bound /metrics port is written to this file (as
            decimal text, replaced atomically) once the HTTP server listens.
        nats_url: NATS server URL; several may be given separated by commas.
        nats_creds: ``--nats-creds`` file of the ``collector`` role
            (``interposer.proto.connection``); ``""`` = anonymous.
        client_name: NATS client name.
        pending_msgs_limit: per-subscription buffer, messages; more are dropped and
            counted in ``interposer_collector_slow_consumer_drops_total``.
        pending_bytes_limit: per-subscription buffer, bytes.
        reconnect_time_wait_s: wait between reconnect attempts, seconds. The collector
            reconnects forever.
        connect_timeout_s: timeout of one connect attempt, seconds.
        drain_timeout_s: longest shutdown drain, seconds.
        decode_error_log_interval_s: shortest gap between two log lines about
            malformed messages, seconds.
        log_level: ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``.
        forget_stopped_after_s: the series of a volume whose workers all stopped on
            request (unmounted) leave /metrics this long after the last message about
            it, seconds.
        forget_silent_after_s: the same for a volume whose workers went silent
            without stopping (crashed, killed, cut off from NATS), seconds; until
            then its ``interposer_worker_up`` reads 0.
        otlp_endpoint: OTLP/gRPC endpoint (``http://host:4317``; ``https://`` uses TLS)
            that receives a span per op and a log record per injected fault; ``""``
            disables OpenTelemetry export.
        otlp_ops: FUSE op names exported as spans; empty = every op.
        otlp_path_glob: ``fnmatch`` glob on the op path (``*`` and ``?`` match ``/``);
            ops and file sessions whose path does not match are not exported.
        otlp_min_duration_s: ops shorter than this are not exported as spans, seconds.
        otlp_sample_ratio: share of traces exported, 0..1, decided from the trace id
            (as OpenTelemetry's ``TraceIdRatioBased`` sampler), so every replica makes
            the same choice for one file session.
        otlp_max_open_sessions: most file sessions tracked at once.
        otlp_max_queue: most spans (and log records) queued for export.
        record_dir: directory the received event batches are recorded to
            (``interposer.proto.recording`` format; created if missing); ``""``
            disables recording.
        record_max_bytes: after each rotation the oldest recordings of ``record_dir``
            are deleted until they total at most this, bytes.
        record_rotate_s: a new recording file is started this often, seconds.
        record_rotate_bytes: ... or as soon as the current one reaches this size, bytes.
        record_instance_id: this replica's id in recording file names; ``""`` =
            ``<hostname>-<pid>``.
    """

    listen_host: str = DEFAULT_LISTEN_HOST
    listen_port: Port = DEFAULT_LISTEN_PORT
    port_file: str = ""
    nats_url: str = DEFAULT_NATS_URL
    nats_creds: str = ""
    client_name: str = DEFAULT_CLIENT_NAME
    pending_msgs_limit: PositiveInt = DEFAULT_PENDING_MSGS_LIMIT
    pending_bytes_limit: PositiveInt = DEFAULT_PENDING_BYTES_LIMIT
    reconnect_time_wait_s: PositiveFloat = DEFAULT_RECONNECT_TIME_WAIT_S
    connect_timeout_s: PositiveFloat = DEFAULT_CONNECT_TIMEOUT_S
    drain_timeout_s: PositiveFloat = DEFAULT_DRAIN_TIMEOUT_S
    decode_error_log_interval_s: Annotated[float, msgspec.Meta(ge=0.0)] = DEFAULT_DECODE_ERROR_LOG_INTERVAL_S
    log_level: LogLevel = "INFO"
    forget_stopped_after_s: PositiveFloat = DEFAULT_FORGET_STOPPED_AFTER_S
    forget_silent_after_s: PositiveFloat = DEFAULT_FORGET_SILENT_AFTER_S
    otlp_endpoint: str = DEFAULT_OTLP_ENDPOINT
    otlp_ops: frozenset[OpName] = frozenset()
    otlp_path_glob: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_GLOB_LENGTH)] = "*"
    otlp_min_duration_s: Annotated[float, msgspec.Meta(ge=0.0)] = DEFAULT_OTLP_MIN_DURATION_S
    otlp_sample_ratio: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = DEFAULT_OTLP_SAMPLE_RATIO
    otlp_max_open_sessions: PositiveInt = DEFAULT_OTLP_MAX_OPEN_SESSIONS
    otlp_max_queue: PositiveInt = DEFAULT_OTLP_MAX_QUEUE
    record_dir: str = DEFAULT_RECORD_DIR
    record_max_bytes: PositiveInt = DEFAULT_RECORD_MAX_BYTES
    record_rotate_s: PositiveFloat = DEFAULT_RECORD_ROTATE_S
    record_rotate_bytes: PositiveInt = DEFAULT_RECORD_ROTATE_BYTES
    record_instance_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{0,128}$")] = ""

    @property
    def nats_servers(self) -> list[str]:
        """``nats_url`` split at commas, blanks removed."""
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]


def parse_listen(text: str) -> tuple[str, int]:
    """Split a ``--listen`` value into host and port.

    Accepts ``HOST:PORT``, ``[IPV6]:PORT`` and ``:PORT`` (all addresses, ``0.0.0.0``).

    Args:
        text: the flag value, e.g. ``127.0.0.1:9464``.

    Returns:
        ``(host, port)``; port 0 means any free port.

    Raises:
        ValueError: no ``:PORT`` part, or the port is not an integer in 0..65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"--listen {text!r}: port {port_text!r} is not an integer") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"--listen {text!r}: port {port} is outside 0..65535")
    return host or "0.0.0.0", port


def make_config(**fields: object) -> CollectorConfig:
    """Build a validated config from keyword fields (as flags or a file give them).

    Args:
        **fields: any ``CollectorConfig`` attribute.

    Returns:
        The frozen config.

    Raises:
        msgspec.ValidationError: an unknown field, a wrong type or an out-of-range value;
            the message names the field.
    """
    return msgspec.convert(fields, CollectorConfig)
