"""``python -m interposer.collector``: flags → config → logging → run.

Example::

    python -m interposer.collector --nats-url nats://127.0.0.1:4222 --listen 127.0.0.1:0 \\
        --port-file /run/interposer/collector.port
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import msgspec
from interposer.proto.connection import CredentialsError, connect_options

from ._aggregate import DEFAULT_FORGET_SILENT_AFTER_S, DEFAULT_FORGET_STOPPED_AFTER_S
from ._config import (
    DEFAULT_LISTEN_HOST,
    DEFAULT_LISTEN_PORT,
    DEFAULT_NATS_URL,
    DEFAULT_OTLP_ENDPOINT,
    DEFAULT_OTLP_MIN_DURATION_S,
    DEFAULT_OTLP_SAMPLE_RATIO,
    DEFAULT_PENDING_BYTES_LIMIT,
    DEFAULT_PENDING_MSGS_LIMIT,
    DEFAULT_RECONNECT_TIME_WAIT_S,
    DEFAULT_RECORD_DIR,
    DEFAULT_RECORD_MAX_BYTES,
    DEFAULT_RECORD_ROTATE_S,
    CollectorConfig,
    make_config,
    parse_listen,
)
from ._recorder import check_record_dir
from ._service import serve

#: Format of every log line of the service.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Environment variable read when ``--nats-url`` is not given.
NATS_URL_ENV = "NATS_URL"

log = logging.getLogger("interposer.collector")


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of the collector."""
    parser = argparse.ArgumentParser(
        prog="python -m interposer.collector",
        description="Aggregate interposer op events from NATS into Prometheus metrics on /metrics.",
    )
    parser.add_argument("--listen", default=f"{DEFAULT_LISTEN_HOST}:{DEFAULT_LISTEN_PORT}",
                        metavar="HOST:PORT",
                        help="address of the /metrics HTTP server; port 0 picks a free port "
                             "(default: %(default)s)")
    parser.add_argument("--port-file", default="", metavar="PATH",
                        help="write the bound /metrics port to PATH once listening (atomically replaced)")
    parser.add_argument("--nats-url", default=os.environ.get(NATS_URL_ENV, DEFAULT_NATS_URL), metavar="URL",
                        help=f"NATS server URL(s), comma-separated (default: ${NATS_URL_ENV} or %(default)s)")
    parser.add_argument("--nats-creds", default="", metavar="FILE",
                        help="NATS credentials file of the collector role (JSON: user, password, ca, cert, "
                             "key); empty = anonymous")
    parser.add_argument("--pending-msgs-limit", type=int, default=DEFAULT_PENDING_MSGS_LIMIT, metavar="N",
                        help="per-subscription buffer in messages before NATS drops (default: %(default)s)")
    parser.add_argument("--pending-bytes-limit", type=int, default=DEFAULT_PENDING_BYTES_LIMIT,
                        metavar="BYTES",
                        help="per-subscription buffer in bytes before NATS drops (default: %(default)s)")
    parser.add_argument("--reconnect-time-wait", type=float, default=DEFAULT_RECONNECT_TIME_WAIT_S,
                        metavar="SECONDS", help="wait between NATS reconnect attempts (default: %(default)s)")
    parser.add_argument("--forget-stopped-after", type=float, default=DEFAULT_FORGET_STOPPED_AFTER_S,
                        metavar="SECONDS",
                        help="drop a volume's series this long after its workers stopped on request "
                             "(unmounted) (default: %(default)s)")
    parser.add_argument("--forget-silent-after", type=float, default=DEFAULT_FORGET_SILENT_AFTER_S,
                        metavar="SECONDS",
                        help="drop a volume's series this long after its workers went silent without "
                             "stopping; until then interposer_worker_up reads 0 (default: %(default)s)")
    otlp = parser.add_argument_group("OpenTelemetry (a span per op, a log record per injected fault)")
    otlp.add_argument("--otlp-endpoint", default=DEFAULT_OTLP_ENDPOINT, metavar="URL",
                      help="OTLP/gRPC endpoint, e.g. http://127.0.0.1:4317 (https:// uses TLS); "
                           "export is off unless given")
    otlp.add_argument("--otlp-ops", default="", metavar="OP[,OP…]",
                      help="FUSE ops exported as spans, comma-separated (default: every op)")
    otlp.add_argument("--otlp-path-glob", default="*", metavar="GLOB",
                      help="export only ops and file sessions whose path matches (default: %(default)s)")
    otlp.add_argument("--otlp-min-duration", type=float, default=DEFAULT_OTLP_MIN_DURATION_S, metavar="SECONDS",
                      help="export only ops at least this long (default: %(default)s)")
    otlp.add_argument("--otlp-sample-ratio", type=float, default=DEFAULT_OTLP_SAMPLE_RATIO, metavar="RATIO",
                      help="share of traces exported, 0..1, per file session (default: %(default)s)")
    record = parser.add_argument_group("Recording (the event batches received, for `interposer analyze`)")
    record.add_argument("--record-dir", default=DEFAULT_RECORD_DIR, metavar="DIR",
                        help="record every event batch received into files in DIR (created if missing); "
                             "off unless given")
    record.add_argument("--record-max-bytes", type=int, default=DEFAULT_RECORD_MAX_BYTES, metavar="BYTES",
                        help="after each rotation, delete the oldest recordings in DIR until they total at "
                             "most BYTES (default: %(default)s)")
    record.add_argument("--record-rotate-seconds", type=float, default=DEFAULT_RECORD_ROTATE_S,
                        metavar="SECONDS",
                        help="start a new recording file this often, or when the current one reaches "
                             "64 MiB (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="(default: %(default)s)")
    return parser


def config_from_args(argv: list[str] | None = None) -> CollectorConfig:
    """Parse command-line flags into a validated config.

    Args:
        argv: flags without the program name; None = ``sys.argv[1:]``.

    Returns:
        The frozen config.

    Raises:
        SystemExit: bad flags (status 2, with a usage message on stderr).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        host, port = parse_listen(args.listen)
        connect_options(args.nats_creds)  # a bad file is a usage error, before anything starts
        config = make_config(
            listen_host=host, listen_port=port, port_file=args.port_file, nats_url=args.nats_url,
            nats_creds=args.nats_creds,
            pending_msgs_limit=args.pending_msgs_limit, pending_bytes_limit=args.pending_bytes_limit,
            reconnect_time_wait_s=args.reconnect_time_wait, log_level=args.log_level,
            forget_stopped_after_s=args.forget_stopped_after, forget_silent_after_s=args.forget_silent_after,
            otlp_endpoint=args.otlp_endpoint,
            otlp_ops=[op.strip() for op in args.otlp_ops.split(",") if op.strip()],
            otlp_path_glob=args.otlp_path_glob, otlp_min_duration_s=args.otlp_min_duration,
            otlp_sample_ratio=args.otlp_sample_ratio,
            record_dir=args.record_dir, record_max_bytes=args.record_max_bytes,
            record_rotate_s=args.record_rotate_seconds,
        )
        if config.record_dir:  # made and checked only once the rest is valid
            config = msgspec.structs.replace(config, record_dir=str(check_record_dir(config.record_dir)))
        return config
    except (ValueError, CredentialsError, msgspec.ValidationError) as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    """Run the collector until SIGTERM/SIGINT.

    Returns:
        The process exit status: 0 after a clean shutdown, 1 if it could not start.
    """
    config = config_from_args(argv)
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
