"""The ``interposer`` command."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

import click
import msgspec

from interposer.proto import PolicyError, PolicyReply, decode_policy, encode_policy

from ._policy_client import PolicyClientError, clear_policy, get_policy, set_policy
from ._stack import EmbeddedStack, describe, read_endpoints

#: Where ``interposer up`` keeps its state unless told otherwise.
DEFAULT_STATE_DIR = Path(os.environ.get("INTERPOSER_STATE_DIR", "/var/lib/interposer"))
#: NATS URL used when neither --nats-url, $INTERPOSER_NATS_URL nor a running stack says otherwise.
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def _default_nats_url() -> str:
    if url := os.environ.get("INTERPOSER_NATS_URL"):
        return url
    endpoints = read_endpoints(DEFAULT_STATE_DIR)
    return endpoints.nats_url if endpoints else DEFAULT_NATS_URL


def _sigterm_as_interrupt() -> None:
    # Clean up on SIGTERM exactly as on Ctrl-C: unwind through every finally block.
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="WARNING", show_default=True, help="Log level of the CLI itself.")
def main(log_level: str) -> None:
    """See, slow down, break and emulate the storage under your pods."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ---- demo --------------------------------------------------------------------------


@main.command()
@click.option("--phase-seconds", default=10.0, show_default=True, type=click.FloatRange(1, 3600),
              help="Length of each fio phase, seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
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
def up(state_dir: Path, nats_port: int, metrics_port: int) -> None:
    """Run the embedded stack (nats-server, policy, collector, csi-node) until Ctrl-C."""
    _sigterm_as_interrupt()
    stack = EmbeddedStack(state_dir, nats_port=nats_port or None, metrics_port=metrics_port)
    try:
        endpoints = stack.start()
        click.echo(describe(endpoints))
        click.echo("running; Ctrl-C stops everything", err=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


# ---- mount -------------------------------------------------------------------------


@main.command()
@click.argument("backing_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--volume-id", default="default", show_default=True)
@click.option("--nats-url", default="", help="NATS server for live policy and events (default: none).")
@click.option("--policy-file", default="", type=click.Path(dir_okay=False), help="Initial JSON policy.")
@click.option("--backend", default="passthrough", show_default=True, type=click.Choice(["passthrough"]))
@click.option("--read-only", is_flag=True)
def mount(**flags: object) -> None:
    """Serve BACKING_DIR at MOUNTPOINT in the foreground until unmounted or SIGTERM."""
    from interposer.fuse_worker import WorkerConfig, run

    try:
        config = msgspec.convert({k: v for k, v in flags.items()}, WorkerConfig)
        run(config)
    except (msgspec.ValidationError, PolicyError) as exc:
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


# ---- policy ------------------------------------------------------------------------


@main.group()
def policy() -> None:
    """Set, show and clear the live policy of a volume (through the policy service)."""


def _print_reply(reply: PolicyReply) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(reply), indent=2).decode())
    if not reply.ok:
        sys.exit(1)


def _call(coro) -> PolicyReply:  # noqa: ANN001
    try:
        return asyncio.run(coro)
    except PolicyClientError as exc:
        raise click.ClickException(str(exc)) from None


@policy.command("set")
@click.argument("volume")
@click.argument("policy_file", type=click.File("rb"))
@click.option("--nats-url", default=_default_nats_url, show_default="running stack or nats://127.0.0.1:4222")
def policy_set(volume: str, policy_file, nats_url: str) -> None:  # noqa: ANN001
    """Validate POLICY_FILE (JSON, or - for stdin) and make it VOLUME's policy."""
    body = policy_file.read()
    try:
        decode_policy(body)  # fail fast, with the same message the service would give
    except PolicyError as exc:
        _print_reply(PolicyReply(ok=False, error=str(exc)))
    _print_reply(_call(set_policy(nats_url, volume, body)))


@policy.command("get")
@click.argument("volume")
@click.option("--nats-url", default=_default_nats_url, show_default="running stack or nats://127.0.0.1:4222")
def policy_get(volume: str, nats_url: str) -> None:
    """Show VOLUME's stored policy and its revision."""
    _print_reply(_call(get_policy(nats_url, volume)))


@policy.command("clear")
@click.argument("volume")
@click.option("--nats-url", default=_default_nats_url, show_default="running stack or nats://127.0.0.1:4222")
def policy_clear(volume: str, nats_url: str) -> None:
    """Remove every layer from VOLUME's policy (plain passthrough)."""
    _print_reply(_call(clear_policy(nats_url, volume)))


@policy.command("validate")
@click.argument("policy_file", type=click.File("rb"))
def policy_validate(policy_file) -> None:  # noqa: ANN001
    """Check POLICY_FILE offline and print it in canonical form."""
    try:
        click.echo(msgspec.json.format(encode_policy(decode_policy(policy_file.read())), indent=2).decode())
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the profiles and their layers as JSON.")
def profiles(as_json: bool) -> None:
    """List the storage profiles usable as {"type": "profile", "name": NAME} in a policy."""
    from interposer.proto.profiles import PROFILES

    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(list(PROFILES.values())), indent=2).decode())
        return
    for profile in PROFILES.values():
        click.echo(f"{profile.name:<12} {profile.summary}\n{'':<12} source: {profile.source}\n")


if __name__ == "__main__":
    main()
