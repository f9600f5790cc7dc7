"""The collector service: NATS subscriptions in, Prometheus /metrics out.

Threads: the asyncio event loop (nats-py) decodes messages and updates the
:class:`~interposer.collector.Aggregator`; prometheus_client's HTTP server thread
renders a snapshot of it on each scrape. The aggregator's lock is the only shared
state between them. With ``record_dir`` the event loop also appends each batch it
received, as received, to a recording file (:mod:`._recorder`).

Falling behind: core NATS has two buffers per collector, and only one of them loses
messages visibly. The client's (``pending_msgs_limit``/``pending_bytes_limit`` per
subscription) drops the newest message when full and says so
(``interposer_collector_slow_consumer_drops_total``). The server's (``max_pending``,
64 MiB by default) cuts the whole connection off as a slow consumer when full, and
what it held is gone. nats-py reads the socket from one task that only runs between
callbacks, so a collector busy aggregating would leave its backlog in the server's
buffer; after each batch the collector therefore hands the loop to the reader until
the socket is drained (:meth:`CollectorService._read_ahead`), which moves the backlog
into the client's buffer, where overflow is counted. A disconnect is counted too
(``interposer_collector_nats_disconnects_total``) and logged.

Subscriptions:

* ``interposer.events.*`` in queue group ``interposer-collector``: each batch goes to
  exactly one collector replica, so N replicas share the load and every event is
  counted once across replicas (``sum`` over replicas in PromQL).
* ``interposer.faults.*`` in the same queue group: each message (an array of
  ``FaultRecord``) goes to one replica, which counts it in
  ``interposer_fault_records_total`` and turns each record into an OTel log record
  linked to the op's span (the span ids are derived from the op's identity, so the
  link holds whichever replica got the op's event).
* ``interposer.status.*`` *without* a queue group: every replica gets every worker
  heartbeat. Heartbeats are small and rare (one per worker every few seconds), and
  they carry absolute values (policy revision, worker counters, dropped events), not
  increments, so fanning them out costs little and gives every replica a complete,
  current view: each replica exports the heartbeat gauges of every volume, and
  ``interposer_events_dropped_total`` converges to the same value on all replicas even
  though each sees only some batches. Aggregate these worker-reported series across
  replicas with ``max by (volume, …)``, not ``sum``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import msgspec
import nats
from interposer.proto import EventBatch, FaultRecord, WorkerStatus
from interposer.proto.connection import NatsErrorLog, connect_options
from interposer.proto.subjects import COLLECTOR_QUEUE, EVENTS_PREFIX, FAULTS_PREFIX, STATUS_PREFIX, volume_of
from nats.aio.client import Client as NATSClient
from nats.aio.msg import Msg
from nats.errors import SlowConsumerError
from prometheus_client import CollectorRegistry, start_http_server

from ._aggregate import Aggregator
from ._config import CollectorConfig
from ._metrics import make_registry
from ._otlp import OtlpExporter
from ._ratelimit import RateLimitedLog
from ._recorder import FLUSH_INTERVAL_S, Recorder, RecorderMetrics, default_instance_id

log = logging.getLogger(__name__)

#: Subject pattern of the event batches of every volume.
EVENTS_SUBJECT = f"{EVENTS_PREFIX}.*"
#: Subject pattern of the heartbeats of every volume.
STATUS_SUBJECT = f"{STATUS_PREFIX}.*"
#: Subject pattern of the fault records of every volume.
FAULTS_SUBJECT = f"{FAULTS_PREFIX}.*"

#: Bytes one event-loop turn moves from the socket to nats-py's reader at most:
#: asyncio's selector transports ``recv`` 256 KiB per readiness event.
READ_TURN_BYTES = 256 * 1024
#: Most event-loop turns given to the reader after one batch, so that a flood the
#: reader can never drain still leaves the aggregation its share of the CPU
#: (64 turns read up to 16 MiB, far more than one batch takes to aggregate).
READ_AHEAD_MAX_TURNS = 64


def write_port_file(path: str | os.PathLike[str], port: int) -> None:
    """Write ``port`` as decimal text to ``path`` atomically (temp file, fsync, rename).

    Args:
        path: destination file; its directory must exist.
        port: the TCP port.

    Raises:
        OSError: the directory is missing or not writable.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(f"{port}\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class CollectorService:
    """One collector replica: HTTP /metrics server plus NATS subscriptions.

    Args:
        config: the service configuration.
        aggregator: where to aggregate; a new one if None.

    Attributes:
        config: the configuration it runs with.
        aggregator: the running totals.
        registry: the Prometheus registry served on /metrics.
        port: the bound /metrics port once :meth:`start_http` returned, else None.
    """

    def __init__(self, config: CollectorConfig, aggregator: Aggregator | None = None) -> None:
        self.config = config
        self.aggregator = aggregator if aggregator is not None else Aggregator(
            forget_stopped_after_s=config.forget_stopped_after_s, forget_silent_after_s=config.forget_silent_after_s)
        self.registry: CollectorRegistry = make_registry(self.aggregator)
        self.port: int | None = None
        self._batch_decoder = msgspec.msgpack.Decoder(EventBatch)
        self._status_decoder = msgspec.msgpack.Decoder(WorkerStatus)
        self._faults_decoder = msgspec.msgpack.Decoder(list[FaultRecord])
        self._httpd: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None
        self._nc: NATSClient | None = None
        self._closing = False
        #: Span and fault-log export, when ``config.otlp_endpoint`` is set.
        self.otlp: OtlpExporter | None = OtlpExporter(config) if config.otlp_endpoint else None
        #: Recording of the received event batches, when ``config.record_dir`` is set.
        self.recorder: Recorder | None = None
        if config.record_dir:
            self.recorder = Recorder(
                Path(config.record_dir), config.record_instance_id or default_instance_id(),
                max_bytes=config.record_max_bytes, rotate_s=config.record_rotate_s,
                rotate_bytes=config.record_rotate_bytes, log_interval_s=config.decode_error_log_interval_s)
            self.registry.register(RecorderMetrics(self.recorder))
        self._decode_log = RateLimitedLog(log, config.decode_error_log_interval_s)
        self._slow_log = RateLimitedLog(log, config.decode_error_log_interval_s)
        self._error_log = NatsErrorLog(log, ",".join(config.nats_servers))

    # -- HTTP ---------------------------------------------------------------------------

    def start_http(self) -> int:
        """Start serving /metrics and write the port file if one is configured.

        Returns:
            The bound TCP port (the kernel's choice when ``listen_port`` is 0).

        Raises:
            OSError: the address cannot be bound (e.g. ``EADDRINUSE``) or the port file
                cannot be written.
        """
        self._httpd, self._http_thread = start_http_server(
            self.config.listen_port, self.config.listen_host, registry=self.registry,
        )
        self.port = int(self._httpd.server_port)
        log.info("serving metrics on http://%s:%d/metrics", self.config.listen_host, self.port)
        if self.config.port_file:
            write_port_file(self.config.port_file, self.port)
        return self.port

    def stop_http(self) -> None:
        """Stop the /metrics server. Safe to repeat."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._http_thread is not None:
            self._http_thread.join()
            self._http_thread = None

    # -- NATS ---------------------------------------------------------------------------

    async def _on_batch(self, msg: Msg) -> None:
        try:
            batch = self._batch_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            self._decode_error(msg, f"not an EventBatch: {exc}")
            return
        if batch.volume != volume_of(msg.subject):
            self._decode_error(msg, f"volume {batch.volume!r} does not match the subject")
            return
        if self.recorder is not None:
            self.recorder.write(msg.data)  # the bytes received, not a re-encoding
        self.aggregator.add_batch(batch)
        if self.otlp is not None:
            self.otlp.add_batch(batch)
        await self._read_ahead(len(msg.data))

    async def _on_status(self, msg: Msg) -> None:
        try:
            status = self._status_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            self._decode_error(msg, f"not a WorkerStatus: {exc}")
            return
        if status.volume != volume_of(msg.subject):
            self._decode_error(msg, f"volume {status.volume!r} does not match the subject")
            return
        self.aggregator.add_status(status)

    async def _on_faults(self, msg: Msg) -> None:
        try:
            records = self._faults_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            self._decode_error(msg, f"not an array of FaultRecord: {exc}")
            return
        volume = volume_of(msg.subject)
        if any(record.volume != volume for record in records):
            self._decode_error(msg, "a fault record's volume does not match the subject")
            return
        self.aggregator.add_faults(records)
        if self.otlp is not None:
            self.otlp.add_faults(records)
        await self._read_ahead(len(msg.data))

    async def _read_ahead(self, message_bytes: int) -> None:
        """Give nats-py's socket reader the event loop until nothing more arrives.

        nats-py's subscription task does not yield between queued messages, and its
        read task runs only when the loop gets a turn: without this, a busy collector
        reads about one message per message aggregated, and a backlog stays in the
        server until it cuts the collector off. Each ``sleep(0)`` is one loop turn (one
        ``recv`` of up to :data:`READ_TURN_BYTES`, parsed into the subscriptions'
        bounded buffers, where overflow is counted); the reader is done when
        ``nc.stats["in_bytes"]`` (bytes of complete messages) stops growing for as
        many turns as one message of this size takes to arrive (a ``recv`` turn and a
        parse turn per :data:`READ_TURN_BYTES`). With nothing to read this costs a few
        turns of some microseconds each.

        Args:
            message_bytes: size of the message just handled, bytes (the next one is
                likely about as large).
        """
        nc = self._nc
        if nc is None:
            return
        stats = nc.stats
        patience = 2 + 2 * (message_bytes // READ_TURN_BYTES)
        quiet = 0
        seen = stats["in_bytes"]
        for _ in range(READ_AHEAD_MAX_TURNS):
            await asyncio.sleep(0)
            now = stats["in_bytes"]
            if now != seen:
                seen, quiet = now, 0
            else:
                quiet += 1
                if quiet >= patience:
                    return

    def _decode_error(self, msg: Msg, reason: str) -> None:
        self.aggregator.add_decode_error()
        self._decode_log.warning("dropped malformed message on %s (%d bytes): %s",
                                 msg.subject, len(msg.data), reason)

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            self.aggregator.add_slow_consumer_drop()
            self._slow_log.warning("falling behind: NATS dropped a message on %s (subscription buffer full)",
                                   exc.subject)
        else:
            await self._error_log.log(exc)

    async def _on_disconnected(self) -> None:
        if self._closing:
            self.aggregator.set_nats_connected(False)
            return
        self.aggregator.add_nats_disconnect()
        log.warning("disconnected from NATS; reconnecting every %.1f s. Messages the server held for this "
                    "collector are lost (counted in interposer_collector_nats_disconnects_total; a server "
                    "also disconnects a collector that falls too far behind: see its log for "
                    "'Slow Consumer Detected')", self.config.reconnect_time_wait_s)

    async def _on_reconnected(self) -> None:
        # nats-py re-sends the subscriptions before calling this.
        self.aggregator.set_nats_connected(True)
        log.info("reconnected to NATS at %s", self._nc.connected_url.netloc if self._nc else "?")

    async def connect(self) -> None:
        """Connect to NATS (retrying forever) and subscribe.

        Returns once the server has processed the subscriptions, so messages published
        afterwards reach this collector (or its queue group).

        Raises:
            nats.errors.Error: a non-retryable NATS error (e.g. authorization).
        """
        cfg = self.config
        self._nc = await nats.connect(
            servers=cfg.nats_servers,
            name=cfg.client_name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=cfg.reconnect_time_wait_s,  # type: ignore[arg-type]
            connect_timeout=cfg.connect_timeout_s,  # type: ignore[arg-type]
            drain_timeout=cfg.drain_timeout_s,  # type: ignore[arg-type]
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            **connect_options(cfg.nats_creds),
        )
        await self._nc.subscribe(
            EVENTS_SUBJECT, queue=COLLECTOR_QUEUE, cb=self._on_batch,
            pending_msgs_limit=cfg.pending_msgs_limit, pending_bytes_limit=cfg.pending_bytes_limit,
        )
        await self._nc.subscribe(
            FAULTS_SUBJECT, queue=COLLECTOR_QUEUE, cb=self._on_faults,
            pending_msgs_limit=cfg.pending_msgs_limit, pending_bytes_limit=cfg.pending_bytes_limit,
        )
        await self._nc.subscribe(
            STATUS_SUBJECT, cb=self._on_status,
            pending_msgs_limit=cfg.pending_msgs_limit, pending_bytes_limit=cfg.pending_bytes_limit,
        )
        await self._nc.flush()
        self.aggregator.set_nats_connected(True)
        log.info("connected to NATS at %s; subscribed to %s and %s (queue %s) and %s",
                 self._nc.connected_url.netloc if self._nc.connected_url else "?",
                 EVENTS_SUBJECT, FAULTS_SUBJECT, COLLECTOR_QUEUE, STATUS_SUBJECT)

    async def drain(self) -> None:
        """Stop taking messages, finish the buffered ones, close the connection.

        Never raises: a drain that fails or times out falls back to a plain close.
        """
        nc, self._nc = self._nc, None
        if nc is None or nc.is_closed:
            return
        self._closing = True
        try:
            await nc.drain()
            log.info("drained NATS subscriptions")
        except Exception as exc:  # noqa: BLE001 - shutting down either way
            log.warning("drain failed (%s: %s); closing", type(exc).__name__, exc)
            await nc.close()
        finally:
            self.aggregator.set_nats_connected(False)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain and stop the HTTP server.

        Args:
            stop: set it to shut down (the signal handlers of :func:`serve` do).

        Raises:
            OSError: the first recording file cannot be created, the /metrics address
                cannot be bound or the port file written.
            nats.errors.Error: a non-retryable NATS error.
        """
        if self.recorder is not None:
            self.recorder.start()
        flushing = asyncio.create_task(self._flush_recordings()) if self.recorder is not None else None
        try:
            self.start_http()
        except BaseException:
            await self._stop_recording(flushing)
            raise
        try:
            connecting = asyncio.create_task(self.connect())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not connecting.done():
                log.info("stopping before NATS was reached")
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
            else:
                connecting.result()
                await stopping
            stopping.cancel()
            await self.drain()
        finally:
            if self._nc is not None:
                await self._nc.close()
            await self._stop_recording(flushing)  # after the drain: it recorded the last batches
            self.stop_http()
            if self.otlp is not None:
                await asyncio.to_thread(self.otlp.shutdown)

    async def _flush_recordings(self) -> None:
        """Hand the recorder's buffer to the kernel every :data:`FLUSH_INTERVAL_S`, until cancelled.

        So a recording read while the collector runs lacks at most the last interval,
        however little traffic there is.
        """
        assert self.recorder is not None
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            self.recorder.flush()

    async def _stop_recording(self, flushing: asyncio.Task[None] | None) -> None:
        if flushing is not None:
            flushing.cancel()
            await asyncio.gather(flushing, return_exceptions=True)
        if self.recorder is not None:
            self.recorder.close()


async def serve(config: CollectorConfig) -> None:
    """Run one collector until SIGTERM or SIGINT, then drain and return.

    Args:
        config: the service configuration.

    Raises:
        OSError: the /metrics address cannot be bound or the port file written.
        nats.errors.Error: a non-retryable NATS error.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)

    def on_signal(signum: signal.Signals) -> None:
        log.info("received %s; draining", signum.name)
        stop.set()

    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await CollectorService(config).run(stop)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    log.info("collector stopped")
