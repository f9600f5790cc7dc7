"""The ``interposer`` command."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
import msgspec

from interposer.proto import (
    PolicyChange,
    PolicyError,
    PolicyReply,
    RollbackRequest,
    decode_policy,
    decode_selector_request,
    encode_json,
    encode_policy,
    subjects,
)
from interposer.proto.connection import DEFAULT_NATS_URL, CredentialsError, connect_options

from ._auth import credentials_path
from ._duration import Duration
from ._policy_client import (
    DEFAULT_WAIT_TIMEOUT_S,
    PolicyClientError,
    default_author,
    get_policy,
    list_policies,
    policy_history,
    policy_status,
    request,
    set_and_wait,
)
from ._policy_render import render_history, render_list, render_status
from ._policy_watch import follow
from ._stack import DEFAULT_RECORD_MAX_BYTES, RECORDINGS_DIR, EmbeddedStack, describe, read_endpoints

#: Where ``interposer up`` keeps its state unless told otherwise.
DEFAULT_STATE_DIR = Path(os.environ.get("INTERPOSER_STATE_DIR", "/var/lib/interposer"))


def _default_nats_url() -> str:
    if url := os.environ.get("INTERPOSER_NATS_URL"):
        return url
    endpoints = read_endpoints(DEFAULT_STATE_DIR)
    return endpoints.nats_url if endpoints else DEFAULT_NATS_URL


def _default_nats_creds() -> str:
    if creds := os.environ.get("INTERPOSER_NATS_CREDS"):
        return creds
    endpoints = read_endpoints(DEFAULT_STATE_DIR)
    return endpoints.user_creds if endpoints else ""


def _sigterm_as_interrupt() -> None:
    # Clean up on SIGTERM exactly as on Ctrl-C: unwind through every finally block.
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="interposer")
@click.option("--log-level", default="WARNING", show_default=True, help="Log level of the CLI itself.",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False))
def main(log_level: str) -> None:
    """See, slow down, break and emulate the storage under your pods."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ---- demo --------------------------------------------------------------------------


@main.command()
@click.option("--phase-seconds", default=10.0, show_default=True, type=click.FloatRange(1, 3600),
              help="Length of each fio phase, seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--work-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Where the temporary backing dir, mount and state go (default: system temp).")
def demo(phase_seconds: float, as_json: bool, work_dir: Path | None) -> None:
    """Run fio on an interposed volume while its policy changes live.

    Phases: baseline → delay 2 ms on reads and writes → throttle 20 MiB/s →
    EIO on 1 % of reads → cleared. Prints fio's numbers next to the collector's.
    """
    from ._demo import report_json, run_demo
    from ._render import print_demo

    _sigterm_as_interrupt()

    def progress(message: str) -> None:
        click.echo(message, err=True)

    def on_phase(result) -> None:  # noqa: ANN001 - PhaseResult
        progress(f"  {result.name}: fio {result.fio.bw_bytes_per_s / 2**20:.1f} MiB/s, "
                 f"{result.fio.errors} errors; collector {result.collector.ops} ops")

    try:
        report = run_demo(phase_seconds, on_phase=on_phase, work_dir=work_dir, log=progress)
    except KeyboardInterrupt:
        progress("interrupted: everything was stopped and unmounted")
        sys.exit(130)
    if as_json:
        click.echo(report_json(report).decode())
    else:
        print_demo(report)


# ---- up ----------------------------------------------------------------------------


@main.command()
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_STATE_DIR,
              show_default=True)
@click.option("--nats-port", type=int, default=4222, show_default=True, help="0 picks a free port.")
@click.option("--metrics-port", type=int, default=9464, show_default=True, help="0 picks a free port.")
@click.option("--nats-tls-cert", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Serve NATS over TLS with this certificate (PEM); needs --nats-tls-key and --nats-tls-ca.")
@click.option("--nats-tls-key", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Private key (PEM) of --nats-tls-cert.")
@click.option("--nats-tls-ca", default=None, type=click.Path(dir_okay=False, exists=True),
              help="CA (PEM) that signed --nats-tls-cert; written into every credentials file.")
@click.option("--record-max-bytes", default=DEFAULT_RECORD_MAX_BYTES, show_default=True, type=click.IntRange(0),
              help="The collector records every op event into STATE_DIR/recordings (for `interposer analyze`), "
                   "deleting the oldest files beyond this many bytes; 0 = no recording.")
def up(state_dir: Path, nats_port: int, metrics_port: int, nats_tls_cert: str, nats_tls_key: str,
       nats_tls_ca: str, record_max_bytes: int) -> None:
    """Run the embedded stack (nats-server, policy, collector, csi-node) until Ctrl-C.

    NATS refuses anonymous connections: each role's credentials are in
    STATE_DIR/credentials/ (mode 0600); `interposer policy` uses the `user` file.
    The collector records op events into STATE_DIR/recordings: `interposer analyze`
    reports the access patterns in them.
    """
    nats_tls_cert, nats_tls_key, nats_tls_ca = nats_tls_cert or "", nats_tls_key or "", nats_tls_ca or ""
    if nats_tls_cert and not (nats_tls_key and nats_tls_ca):
        raise click.UsageError("--nats-tls-cert needs --nats-tls-key and --nats-tls-ca")
    _sigterm_as_interrupt()
    stack = EmbeddedStack(state_dir, nats_port=nats_port or None, metrics_port=metrics_port,
                          tls_cert=str(Path(nats_tls_cert).resolve()) if nats_tls_cert else "",
                          tls_key=str(Path(nats_tls_key).resolve()) if nats_tls_key else "",
                          tls_ca=str(Path(nats_tls_ca).resolve()) if nats_tls_ca else "",
                          record_max_bytes=record_max_bytes)
    try:
        try:
            endpoints = stack.start()
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(describe(endpoints))
        if state_dir.resolve() != DEFAULT_STATE_DIR.resolve():
            click.echo(f"other commands find this stack with: export INTERPOSER_STATE_DIR={state_dir.resolve()}",
                       err=True)
        click.echo("running; Ctrl-C stops everything", err=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C or SIGTERM (a supervisor escalating) must not cut the
        # clean-up short and leave the services running without their parent.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()


# ---- mount -------------------------------------------------------------------------


class _ExistingDirectory(click.Path):
    """``click.Path(exists=True, file_okay=False)`` that tells a dead FUSE mount from a missing directory.

    A mount whose server died answers every ``stat`` with ENOTCONN, which click
    reports as "does not exist" for a directory the user can see in ``mount``.
    """

    def __init__(self) -> None:
        super().__init__(exists=True, file_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            try:
                os.stat(value)
            except OSError as exc:
                if exc.errno == errno.ENOTCONN:
                    self.fail(f"{value!r} is a FUSE mount whose server is gone (Transport endpoint is not "
                              f"connected): unmount it with `fusermount3 -u {os.path.abspath(value)}` (add -z "
                              f"while files on it are still open) and try again", param, ctx)
            raise


@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="[BACKING_DIR] MOUNTPOINT", type=_ExistingDirectory())
@click.option("--volume-id", default="default", show_default=True)
@click.option("--nats-url", default="", help="NATS server for live policy and events (default: none).")
@click.option("--nats-creds", default=None, type=click.Path(exists=True),
              help="NATS credentials of the worker role: a JSON file (user, password, ca, cert, key) "
                   "or a mounted Secret directory; default: anonymous.")
@click.option("--policy-file", default="", type=click.Path(dir_okay=False), help="Initial JSON policy.")
@click.option("--backend", default="passthrough", show_default=True,
              type=click.Choice(["passthrough", "memory", "null"]),
              help="passthrough serves BACKING_DIR; memory and null take only MOUNTPOINT.")
@click.option("--memory-size-bytes", default=1 << 30, show_default=True, type=click.IntRange(min=4096),
              help="Most bytes of file contents the memory backend holds.")
@click.option("--kernel-passthrough", is_flag=True,
              help="The kernel reads and writes files no layer acts on straight from BACKING_DIR "
                   "(Linux >= 6.9, CAP_SYS_ADMIN): native speed, but those reads and writes make no "
                   "events or metrics.")
@click.option("--skip-needless-flush/--always-flush", default=True, show_default=True,
              help="Spare close(2) its FLUSH request where flushing does nothing (no layer acts on flush "
                   "there; ext4, xfs, btrfs, tmpfs, memory, null); --always-flush sends one per close.")
@click.option("--read-only", is_flag=True)
def mount(paths: tuple[str, ...], **flags: object) -> None:
    """Serve BACKING_DIR (or, with --backend memory|null, nothing) at MOUNTPOINT until unmounted or SIGTERM."""
    from interposer.fuse_worker import WorkerConfig, run

    wanted = 2 if flags["backend"] == "passthrough" else 1
    if len(paths) != wanted:
        usage = "BACKING_DIR MOUNTPOINT" if wanted == 2 else "MOUNTPOINT (no BACKING_DIR)"
        raise click.UsageError(f"--backend {flags['backend']} takes {usage}; got {len(paths)} path(s)")
    if wanted == 2:
        flags["backing_dir"] = paths[0]
    flags["mountpoint"] = paths[-1]
    flags["nats_creds"] = flags["nats_creds"] or ""
    if not flags["nats_url"] and (running := read_endpoints(DEFAULT_STATE_DIR)) is not None:
        # A mount off the bus looks like a mount that ignores `policy set`: say so.
        click.echo(f"note: no --nats-url, so this mount takes no live policy and sends no events; the running "
                   f"stack's is --nats-url {running.nats_url} --nats-creds "
                   f"{credentials_path(Path(running.state_dir), 'worker')}", err=True)
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        # In the foreground: say when the mount is served, each policy applied, the totals at exit.
        logging.getLogger("interposer.fuse_worker").setLevel(logging.INFO)
    try:
        config = msgspec.convert(flags, WorkerConfig)
        connect_options(config.nats_creds)
        run(config)
    except (msgspec.ValidationError, PolicyError, CredentialsError) as exc:
        raise click.UsageError(str(exc)) from None
    except (OSError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None


# ---- top ---------------------------------------------------------------------------


def _default_metrics_url() -> str:
    endpoints = read_endpoints(DEFAULT_STATE_DIR)
    return endpoints.metrics_url if endpoints else "http://127.0.0.1:9464/metrics"


@main.command()
@click.option("--url", default=_default_metrics_url, show_default="running stack or http://127.0.0.1:9464/metrics",
              help="The collector's /metrics URL.")
@click.option("--interval", "interval_s", default=2.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds between scrapes (the rates' window).")
@click.option("--once", is_flag=True, help="Print one frame (two scrapes INTERVAL apart) and exit.")
def top(url: str, interval_s: float, once: bool) -> None:
    """Live per volume/pod I/O: IOPS, MB/s, p99 latency, errors and injected faults."""
    from ._top import run_top

    try:
        run_top(url, interval_s, once)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise click.ClickException(f"cannot scrape {url}: {exc}") from None


@main.command()
@click.option("--prometheus", "prometheus_url", envvar="PROMETHEUS_URL", default="http://127.0.0.1:9090",
              show_default=True, help="Prometheus that scrapes the collectors (env PROMETHEUS_URL).")
@click.option("--days", default=14.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="History to read, days (Prometheus keeps 15 by default).")
@click.option("--window", "window_s", default="2h", show_default=True, type=Duration(),
              help="Length of the window wanted (30m, 2h, 1h30m).")
@click.option("--step", "step_s", default="5m", show_default=True, type=Duration(),
              help="Resolution; must divide a day and hold two scrapes or more.")
@click.option("--period", type=click.Choice(["week", "day"]), default=None,
              help="Fold the history onto a week or a day [default: week when the samples span 7 days or more].")
@click.option("--tz", "zone_name", default="UTC", show_default=True,
              help="IANA time zone of the answer (Europe/Berlin, America/New_York).")
@click.option("--metric", type=click.Choice(["ops", "bytes"]), default="ops", show_default=True,
              help="What counts as load: FUSE ops, or bytes read and written.")
@click.option("--by-volume", is_flag=True, help="One answer per volume instead of one for all selected.")
@click.option("--volume", "volumes", multiple=True, help="Only this volume (repeatable).")
@click.option("--namespace", "namespaces", multiple=True, help="Only volumes of pods in this namespace (repeatable).")
@click.option("--count", default=3, show_default=True, type=click.IntRange(1, 50), help="Windows per answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def windows(prometheus_url: str, days: float, window_s: float, step_s: float, period: str | None, zone_name: str,
            metric: str, by_volume: bool, volumes: tuple[str, ...], namespaces: tuple[str, ...], count: int,
            as_json: bool) -> None:
    """The quietest maintenance windows of the volumes, from the I/O history in Prometheus.

    Folds the collectors' op (or byte) rate over the last --days onto one week (or
    day) of --tz wall-clock time, averaged over the weeks seen, and names the
    --count quietest non-overlapping windows of --window length. Only fully
    measured windows count: an hour without samples is not a quiet one.
    """
    from ._windows import WindowsError, find_windows
    from ._windows_render import windows_table

    if window_s != int(window_s) or step_s != int(step_s):
        raise click.UsageError("--window and --step are whole seconds")
    try:
        report = find_windows(prometheus_url, days=days, window_s=int(window_s), step_s=int(step_s),
                              period=period, zone_name=zone_name,  # type: ignore[arg-type]
                              metric=metric, by_volume=by_volume, volumes=volumes, namespaces=namespaces,
                              count=count)  # type: ignore[arg-type]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except WindowsError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(report), indent=2).decode())
        return
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 160).print(windows_table(report))

# ---- analyze -------------------------------------------------------------------------


def _default_recordings() -> Path:
    endpoints = read_endpoints(DEFAULT_STATE_DIR)
    if endpoints is not None and endpoints.recordings_dir:
        return Path(endpoints.recordings_dir)
    return DEFAULT_STATE_DIR / RECORDINGS_DIR


def _time_bound(ctx: click.Context, param: click.Parameter, value: str | None):  # noqa: ANN202
    """Click callback: ``--since``/``--until`` text → ``TimeBound`` (a usage error when unparsable)."""
    from ._analyze import AnalysisError, parse_time_bound

    if value is None:
        return None
    try:
        return parse_time_bound(value)
    except AnalysisError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _recordings_or_default(paths: tuple[Path, ...]) -> tuple[Path, ...]:
    """``paths``, or the running (or last) embedded stack's recordings directory.

    Raises:
        click.UsageError: no paths, and the stack has recorded nothing.
    """
    if paths:
        return paths
    default = _default_recordings()
    if not default.is_dir():
        raise click.UsageError(f"no recordings at {default}: `interposer up` records there (or pass "
                               "recording files or directories; INTERPOSER_STATE_DIR names another stack)")
    return (default,)


def _time_range(files: list[Path], volumes: frozenset[str], since, until) -> tuple[int | None, int | None]:  # noqa: ANN001
    """``--since``/``--until`` as ns since the epoch (None = open); a relative bound counts back from the newest event.

    Raises:
        AnalysisError: a relative bound, and no events of ``volumes`` in ``files``.
    """
    from ._analyze import AnalysisError, newest_event_ns, read_recordings

    if not ((since and since.at_ns is None) or (until and until.at_ns is None)):
        return (since.at_ns if since else None), (until.at_ns if until else None)
    newest = newest_event_ns(read_recordings(files), volumes)  # one pass more to find it
    if newest is None:
        raise AnalysisError(f"no events{' of volume ' + ', '.join(sorted(volumes)) if volumes else ''} in "
                            f"{len(files)} recording(s)")
    return (since.resolve(newest) if since else None), (until.resolve(newest) if until else None)


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--volume", "volumes", multiple=True, callback=lambda ctx, param, value: tuple(
    _volume_id(ctx, param, v) for v in value), help="Only this volume (repeatable); default: every volume.")
@click.option("--since", callback=_time_bound, metavar="TIME",
              help="Only events that started at or after TIME: ISO 8601 (UTC unless it says otherwise) or a "
                   "duration before the newest event (90s, 15m, 2h, 1h30m, 7d).")
@click.option("--until", callback=_time_bound, metavar="TIME", help="Only events that started before TIME (as --since).")
@click.option("--top", default=10, show_default=True, type=click.IntRange(1), help="Files and directories listed.")
@click.option("--bucket", "bucket_s", type=Duration(),
              help="Timeline bucket (60, 5m, 1h); default: chosen from the span (at most 24 buckets).")
@click.option("--window", "window_s", default="1h", show_default=True, type=Duration(),
              help="Length of the quietest window to find (the suggested maintenance window: 30m, 2h).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
def analyze(paths: tuple[Path, ...], volumes: tuple[str, ...], since, until, top: int,  # noqa: ANN001
            bucket_s: float | None, window_s: float, as_json: bool) -> None:
    """Access patterns per volume from the collector's recordings of op events.

    PATHS are recording files (events-*.msgpack) or directories holding them
    (default: the running or last `interposer up` stack's STATE_DIR/recordings).
    Per volume: ops, errors and faults, bytes, request sizes, sequential share,
    top files and directories, file sessions read whole, a timeline and the
    quietest window. Definitions: docs/telemetry.md, "Recording and
    access-pattern analysis".
    """
    from interposer.proto import RecordingError

    from ._analyze import AnalysisError, encode_report, read_recordings, recording_files
    from ._analyze import analyze as compute

    wanted = frozenset(volumes)
    try:
        files = recording_files(_recordings_or_default(paths))
        since_ns, until_ns = _time_range(files, wanted, since, until)
        report = compute(read_recordings(files), volumes=wanted, since_ns=since_ns, until_ns=until_ns, top=top,
                         bucket_s=bucket_s, window_s=window_s, recordings=len(files))
    except (AnalysisError, RecordingError) as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot read {exc.filename or 'a recording'}: {exc.strerror or exc}") from None
    if as_json:
        click.echo(encode_report(report).decode())
        return
    from ._analyze_render import print_report

    print_report(report)


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--target", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to replay into (a mount with a profile, a cloud disk…); created if missing.")
@click.option("--volume", callback=lambda ctx, param, value: _volume_id(ctx, param, value),
              help="The recorded volume to replay (needed when there are several).")
@click.option("--since", callback=_time_bound, metavar="TIME", help="Only ops that started at or after TIME (as analyze).")
@click.option("--until", callback=_time_bound, metavar="TIME", help="Only ops that started before TIME (as analyze).")
@click.option("--timing", type=click.Choice(["closed", "asap", "open"]), default="closed", show_default=True,
              help="closed: each thread waits for its ops and keeps its think time (an application); asap: no "
                   "think time, every thread at once (the most the target gives this op mix); open: every op "
                   "at its recorded time, however slow the target (requests from outside).")
@click.option("--think-scale", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="closed timing: the recorded think time (the application's compute between ops) times this, "
                   "e.g. 0.5 for a job whose compute runs twice as fast.")
@click.option("--direct/--buffered", default=True, show_default=True,
              help="Read and write with O_DIRECT where the requests are 4 KiB-aligned, so the target serves "
                   "the recorded requests and no page cache answers them.")
@click.option("--prepare/--no-prepare", default=True, show_default=True,
              help="First make the target hold what the recording found (directories, files as long as it "
                   "read) and remove what it creates.")
@click.option("--prepare-only", is_flag=True, help="Prepare the target, replay nothing.")
@click.option("--force", is_flag=True, help="Prepare a non-empty target that `interposer replay` did not prepare.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def replay(paths: tuple[Path, ...], target: Path, volume: str | None, since, until, timing: str,  # noqa: ANN001
           think_scale: float, direct: bool, prepare: bool, prepare_only: bool, force: bool, as_json: bool) -> None:
    """Replay a volume's recorded ops into another directory, and compare the times.

    PATHS are recordings, as for `interposer analyze`. The ops that reached the worker
    (after the page cache) are issued again in TARGET, thread by thread, with the
    recorded dependencies and think time, and the report holds the recorded and
    replayed wall time and latencies per op: how the same work goes on other storage.
    Docs: docs/telemetry.md, "interposer replay".
    """
    from interposer.proto import RecordingError

    from ._analyze import AnalysisError, read_recordings, recording_files
    from ._replay_plan import ReplayError, plan_replay
    from ._replay_report import build_report, encode_report
    from ._replay_run import Replayer, write_pattern
    from ._replay_target import Target

    try:
        files = recording_files(_recordings_or_default(paths))
        since_ns, until_ns = _time_range(files, frozenset([volume]) if volume else frozenset(), since, until)
        plan = plan_replay(read_recordings(files), volume=volume, since_ns=since_ns, until_ns=until_ns)
        target.mkdir(parents=True, exist_ok=True)
        with Target(target) as where:
            largest = max((op.size for s in plan.streams for op in s.ops if op.op == "write"), default=0)
            pattern = write_pattern(max(largest, 1 << 20))
            prepared = None
            if prepare or prepare_only:
                where.check_preparable(force)
                prepared = where.prepare(plan.start, pattern)
            if prepare_only:
                from ._replay_render import describe_prepared

                click.echo(f"prepared {target}: {describe_prepared(prepared)}")
                return
            replayer = Replayer(plan, where, timing=timing, direct=direct, pattern=pattern, think_scale=think_scale)
            run = _run_with_progress(replayer, plan.ops)
    except KeyboardInterrupt:
        interrupted = click.ClickException("interrupted: the replay stopped; files it opened are closed")
        interrupted.exit_code = 130  # 128 + SIGINT, as a shell reports it
        raise interrupted from None
    except (AnalysisError, ReplayError, RecordingError) as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{exc.filename or target}: {exc.strerror or exc}") from None
    report = build_report(plan, run, target=str(target), timing=timing, prepared=prepared, think_scale=think_scale)
    if as_json:
        click.echo(encode_report(report).decode())
        return
    from ._replay_render import print_report as print_replay

    print_replay(report)


def _run_with_progress(replayer, total: int):  # noqa: ANN001, ANN202
    """Run ``replayer``, with a progress bar on stderr when it is a terminal."""
    if not sys.stderr.isatty():
        return replayer.run()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("replay", total=total)
        return replayer.run(on_progress=lambda done: progress.update(task, completed=done))


# ---- policy ------------------------------------------------------------------------

#: Exit code of ``policy set/clear/rollback --wait`` when workers did not apply in time.
EXIT_WAIT_TIMEOUT = 3


@main.group()
def policy() -> None:
    """Set, show, roll back and follow the live policy of volumes (through the policy service).

    Exit codes: 0 ok; 1 rejected or failed; 3 --wait timed out (laggards named on stderr).
    """


def _print_reply(reply: msgspec.Struct) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(reply), indent=2).decode())
    if not reply.ok:
        sys.exit(1)


def _call(coro):  # noqa: ANN001, ANN202
    try:
        return asyncio.run(coro)
    except PolicyClientError as exc:
        raise click.ClickException(str(exc)) from None


def _nats_option(f):  # noqa: ANN001, ANN202
    f = click.option("--nats-creds", default=_default_nats_creds, type=click.Path(dir_okay=False),
                     show_default="$INTERPOSER_NATS_CREDS, else the running stack's user credentials",
                     help="NATS credentials file (JSON: user, password, ca, cert, key); "
                          "empty = anonymous.")(f)
    return click.option("--nats-url", default=_default_nats_url,
                        show_default="running stack or nats://127.0.0.1:4222")(f)


def _change_options(f):  # noqa: ANN001, ANN202
    """Options of every command that makes a revision: author and --wait."""
    f = click.option("--author", default=default_author, show_default="user@host",
                     help="Recorded with the revision (header Interposer-Author).")(f)
    f = click.option("--wait", is_flag=True,
                     help="Return once every live worker of VOLUME has applied the new revision.")(f)
    f = click.option("--timeout", "timeout_s", default=DEFAULT_WAIT_TIMEOUT_S, show_default=True,
                     type=click.FloatRange(0, 3600), help="Longest --wait, seconds.")(f)
    f = click.option("--min-workers", default=1, show_default=True, type=click.IntRange(0),
                     help="With --wait: fewest workers that must report the revision.")(f)
    return f


def _change(nats_url: str, nats_creds: str, volume: str, subject: str, body: bytes, author: str, wait: bool,
            timeout_s: float, min_workers: int) -> None:
    if not wait:
        _print_reply(_call(request(nats_url, subject, body, author=author, creds_file=nats_creds)))
        return
    result = _call(set_and_wait(nats_url, volume, subject, body, min_workers=min_workers,
                                timeout_s=timeout_s, author=author, creds_file=nats_creds))
    if not result.reply.ok:
        _print_reply(result.reply)
    click.echo(msgspec.json.format(msgspec.json.encode(result.reply), indent=2).decode())
    if result.laggards:
        lag = ", ".join(w if w.startswith("(") else f"{w} (at revision {r})" if r >= 0 else f"{w} (no heartbeat)"
                        for w, r in sorted(result.laggards.items()))
        click.echo(f"timed out after {timeout_s:g} s: revision {result.reply.revision} not applied by {lag}", err=True)
        sys.exit(EXIT_WAIT_TIMEOUT)
    click.echo(f"revision {result.reply.revision} applied by {len(result.applied)} worker(s), the last "
               f"{result.waited_s * 1000:.0f} ms after the service stored it", err=True)
    for worker, files in sorted(result.bypassing.items()):
        click.echo(f"warning: worker {worker}: {files} open file(s) bypass this policy's layers until they are "
                   "closed and reopened (kernel passthrough serves their reads and writes, or they were opened "
                   "without FLUSH on close)", err=True)


def _volume_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback: VOLUME must be a volume id (a clear usage error, not a traceback, otherwise)."""
    if value is None or subjects.is_valid_volume_id(value):
        return value
    if value.startswith(subjects.SELECTOR_KEY_PREFIX):
        raise click.BadParameter(f"{value!r} is a selector policy: `interposer policy history {value}` shows its "
                                 "revisions (the last one is in force)", ctx, param)
    raise click.BadParameter(f"{value!r} is not a volume id: it must match {subjects.VOLUME_ID_PATTERN.pattern}",
                             ctx, param)


@policy.command("set")
@click.argument("volume", callback=_volume_id)
@click.argument("policy_file", type=click.File("rb"))
@_nats_option
@_change_options
def policy_set(volume: str, policy_file, nats_url: str, nats_creds: str, author: str,  # noqa: ANN001
               wait: bool, timeout_s: float, min_workers: int) -> None:
    """Validate POLICY_FILE (JSON, or - for stdin) and make it VOLUME's policy."""
    body = policy_file.read()
    try:
        decode_policy(body)  # fail fast, with the same message the service would give
    except PolicyError as exc:
        _print_reply(PolicyReply(ok=False, error=str(exc)))
    _change(nats_url, nats_creds, volume, subjects.policy_set(volume), body, author, wait, timeout_s,
            min_workers)


def _check_selector_name(name: str) -> None:
    if not subjects.is_valid_volume_id(name):
        raise click.BadParameter(f"{name!r} must match {subjects.VOLUME_ID_PATTERN.pattern}",
                                 param_hint="NAME")


@policy.command("select")
@click.argument("name")
@click.argument("request_file", type=click.File("rb"))
@_nats_option
@click.option("--author", default=default_author, show_default="user@host",
              help="Recorded with the revision (header Interposer-Author).")
def policy_select(name: str, request_file, nats_url: str, nats_creds: str,  # noqa: ANN001
                  author: str) -> None:
    """Store selector policy NAME from REQUEST_FILE (JSON, or - for stdin): a fleet push.

    REQUEST_FILE is {"selector": {"namespace": GLOB, "pod": GLOB, "node": GLOB,
    "volume": GLOB} or {"all": true}, "policy": {...}, "priority": N}. Every worker
    whose volume matches merges the policy's layers after its own.
    """
    _check_selector_name(name)
    body = request_file.read()
    try:
        decode_selector_request(body)
    except PolicyError as exc:
        _print_reply(PolicyReply(ok=False, error=str(exc)))
    _print_reply(_call(request(nats_url, subjects.policy_select(name), body, author=author,
                               creds_file=nats_creds)))


@policy.command("unselect")
@click.argument("name")
@_nats_option
@click.option("--author", default=default_author, show_default="user@host",
              help="Recorded with the revision (header Interposer-Author).")
def policy_unselect(name: str, nats_url: str, nats_creds: str, author: str) -> None:
    """Deactivate selector policy NAME (a new revision; its volumes drop its layers)."""
    _check_selector_name(name)
    _print_reply(_call(request(nats_url, subjects.policy_unselect(name), b"", author=author,
                               creds_file=nats_creds)))


@policy.command("get")
@click.argument("volume", callback=_volume_id)
@_nats_option
def policy_get(volume: str, nats_url: str, nats_creds: str) -> None:
    """Show VOLUME's stored policy and its revision."""
    _print_reply(_call(get_policy(nats_url, volume, creds_file=nats_creds)))


@policy.command("clear")
@click.argument("volume", callback=_volume_id)
@_nats_option
@_change_options
def policy_clear(volume: str, nats_url: str, nats_creds: str, author: str, wait: bool, timeout_s: float,
                 min_workers: int) -> None:
    """Remove every layer from VOLUME's policy (plain passthrough), as a new revision."""
    _change(nats_url, nats_creds, volume, subjects.policy_clear(volume), b"", author, wait, timeout_s,
            min_workers)


def _target(target: str, selector: bool) -> tuple[str, bool]:
    """``(name, is a selector)`` of a history/rollback TARGET: a volume id, ``_sel.NAME``
    (as ``list`` shows selector policies) or, with ``--selector``, a selector NAME.

    Raises:
        click.BadParameter: not a valid volume id / selector name.
    """
    if target.startswith(subjects.SELECTOR_KEY_PREFIX):
        target, selector = target[len(subjects.SELECTOR_KEY_PREFIX):], True
    if not subjects.is_valid_volume_id(target):
        raise click.BadParameter(f"{target!r} must match {subjects.VOLUME_ID_PATTERN.pattern} "
                                 f"(or be {subjects.SELECTOR_KEY_PREFIX}NAME for a selector policy)",
                                 param_hint="TARGET")
    return target, selector


_selector_flag = click.option("--selector", is_flag=True,
                              help="TARGET is the name of a selector policy (as `select NAME`).")


@policy.command("rollback")
@click.argument("target")
@click.argument("revision", type=click.IntRange(1))
@_selector_flag
@_nats_option
@_change_options
def policy_rollback(target: str, revision: int, selector: bool, nats_url: str, nats_creds: str, author: str,
                    wait: bool, timeout_s: float, min_workers: int) -> None:
    """Make REVISION's policy TARGET's policy again (stored as a new revision).

    TARGET is a volume id, or a selector policy: _sel.NAME or NAME with --selector
    (its selector and priority come back with its policy).
    """
    name, selector = _target(target, selector)
    body = encode_json(RollbackRequest(revision=revision))
    if selector:
        if wait:
            raise click.UsageError("--wait is per volume: which workers a selector reaches is decided by "
                                   "the workers (see `interposer policy status`)")
        _print_reply(_call(request(nats_url, subjects.selector_rollback(name), body, author=author,
                                   creds_file=nats_creds)))
        return
    _change(nats_url, nats_creds, name, subjects.policy_rollback(name), body, author, wait, timeout_s,
            min_workers)


@policy.command("history")
@click.argument("target")
@_selector_flag
@_nats_option
@click.option("--json", "as_json", is_flag=True, help="Print the HistoryReply JSON.")
def policy_history_cmd(target: str, selector: bool, nats_url: str, nats_creds: str, as_json: bool) -> None:
    """Show every stored revision of TARGET: who, when, what (oldest first).

    TARGET is a volume id, or a selector policy: _sel.NAME or NAME with --selector.
    """
    name, selector = _target(target, selector)
    reply = _call(policy_history(nats_url, name, creds_file=nats_creds, selector=selector))
    if as_json or not reply.ok:
        _print_reply(reply)
        return
    click.echo(render_history(reply))


@policy.command("list")
@_nats_option
@click.option("--json", "as_json", is_flag=True, help="Print the ListReply JSON.")
def policy_list(nats_url: str, nats_creds: str, as_json: bool) -> None:
    """List the volumes that have a stored policy."""
    reply = _call(list_policies(nats_url, creds_file=nats_creds))
    if as_json or not reply.ok:
        _print_reply(reply)
        return
    click.echo(render_list(reply))


@policy.command("status")
@click.argument("volume", required=False, callback=_volume_id)
@_nats_option
@click.option("--json", "as_json", is_flag=True, help="Print the StatusReply JSON.")
def policy_status_cmd(volume: str | None, nats_url: str, nats_creds: str, as_json: bool) -> None:
    """Show desired (stored) vs applied (worker heartbeats) revision per volume."""
    reply = _call(policy_status(nats_url, volume, creds_file=nats_creds))
    if as_json or not reply.ok:
        _print_reply(reply)
        return
    click.echo(render_status(reply))


@policy.command("watch")
@click.argument("volume", required=False)
@_nats_option
def policy_watch(volume: str | None, nats_url: str, nats_creds: str) -> None:
    """Print each new revision of VOLUME (of every volume and selector if omitted) until Ctrl-C.

    One JSON line per revision, in revision order: {"volume", "revision", "action",
    "updated_at_s", "author", "policy", ...}; selector keys show as _sel.NAME.
    Only revisions stored after the watch began are printed (`history` shows
    the earlier ones); after a lost connection the watch resumes after the last
    revision it printed.
    """
    if volume is not None and not (subjects.is_valid_volume_id(volume) or (
            volume.startswith(subjects.SELECTOR_KEY_PREFIX)
            and subjects.is_valid_volume_id(volume[len(subjects.SELECTOR_KEY_PREFIX):]))):
        raise click.BadParameter(f"{volume!r} is neither a volume id ({subjects.VOLUME_ID_PATTERN.pattern}) "
                                 f"nor {subjects.SELECTOR_KEY_PREFIX}NAME", param_hint="VOLUME")

    def ready(revision: int) -> None:
        click.echo(f"watching {volume or 'every volume and selector'} for revisions after {revision} "
                   "(Ctrl-C to stop)", err=True)

    def changed(change: PolicyChange) -> None:
        click.echo(encode_json(change).decode())

    async def watch_until_signalled() -> None:
        # Ctrl-C and SIGTERM set ``stop``: the watch unsubscribes and closes in
        # order instead of being cancelled wherever it happens to wait.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await follow(nats_url, volume, changed, creds_file=nats_creds, on_ready=ready, stop=stop)

    try:
        _call(watch_until_signalled())
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends


@policy.command("validate")
@click.argument("policy_file", type=click.File("rb"))
def policy_validate(policy_file) -> None:  # noqa: ANN001
    """Check POLICY_FILE offline and print it with every default filled in (fields a layer ignores left out)."""
    try:
        policy = decode_policy(policy_file.read())
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from None
    shown = msgspec.json.decode(encode_policy(policy))
    for layer, fields in zip(policy.layers, shown.get("layers", [])):
        for name in layer.fields_not_in_effect():
            fields.pop(name, None)
    click.echo(msgspec.json.format(msgspec.json.encode(shown), indent=2).decode())


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the profiles and their layers as JSON.")
def profiles(as_json: bool) -> None:
    """List the storage profiles usable as {"type": "profile", "name": NAME} in a policy."""
    from interposer.proto.profiles import PROFILES

    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(list(PROFILES.values())), indent=2).decode())
        return
    width = max(len(name) for name in PROFILES)
    for profile in PROFILES.values():
        click.echo(f"{profile.name:<{width}} {profile.summary}\n{'':<{width}} source: {profile.source}")
        for field, meaning in profile.parameters.items():
            click.echo(f"{'':<{width}} sizing: {field}: {meaning}")
        click.echo()


if __name__ == "__main__":
    main()
