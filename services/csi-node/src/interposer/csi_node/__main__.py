"""``python -m interposer.csi_node``: flags → config → logging → serve until SIGTERM."""

from __future__ import annotations

import logging
import shlex
import signal
import sys

import click
import msgspec

from ._config import LAUNCHERS, MODES, CsiNodeConfig
from ._server import CsiNodeServer

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_DEFAULTS = CsiNodeConfig()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--endpoint", default=_DEFAULTS.endpoint, show_default=True, help="unix:///path/csi.sock to listen on."
)
@click.option(
    "--nodeid", "node_id", default=_DEFAULTS.node_id, show_default="hostname", help="NodeGetInfo node id."
)
@click.option(
    "--state-dir",
    default=_DEFAULTS.state_dir,
    show_default=True,
    help="Per-volume state, policy files and worker logs.",
)
@click.option("--nats-url", default=_DEFAULTS.nats_url, help="NATS URL handed to workers; empty: none.")
@click.option(
    "--nats-creds",
    default=_DEFAULTS.nats_creds,
    help="NATS credentials file (worker role, an absolute path) handed to workers; empty: anonymous.",
)
@click.option(
    "--worker-command",
    default=shlex.join(_DEFAULTS.worker_command),
    show_default="python -m interposer.fuse_worker",
    help="Command (shell-quoted) that starts a fuse-worker; per-volume flags are appended.",
)
@click.option(
    "--mount-timeout-s",
    type=float,
    default=_DEFAULTS.mount_timeout_s,
    show_default=True,
    help="Seconds NodePublishVolume waits for the mount to answer.",
)
@click.option(
    "--unmount-timeout-s",
    type=float,
    default=_DEFAULTS.unmount_timeout_s,
    show_default=True,
    help="Seconds NodeUnpublishVolume waits for the worker to exit after SIGTERM.",
)
@click.option(
    "--max-volumes-per-node",
    type=int,
    default=_DEFAULTS.max_volumes_per_node,
    show_default=True,
    help="NodeGetInfo max_volumes_per_node; 0 = no limit.",
)
@click.option(
    "--grpc-workers",
    type=int,
    default=_DEFAULTS.grpc_workers,
    show_default=True,
    help="gRPC handler threads.",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default=_DEFAULTS.mode,
    show_default=True,
    help="node: Identity + Node (DaemonSet); controller: Identity + Controller (Deployment).",
)
@click.option(
    "--watch-interval-s",
    type=float,
    default=_DEFAULTS.watch_interval_s,
    show_default=True,
    help="Seconds between checks for dead fuse-workers to restore; 0 = no recovery.",
)
@click.option(
    "--launcher",
    type=click.Choice(LAUNCHERS),
    default=_DEFAULTS.launcher,
    show_default=True,
    help="local: workers are child processes; kubernetes: one worker pod per volume on this node.",
)
@click.option(
    "--fuse-fd-handoff/--no-fuse-fd-handoff",
    default=_DEFAULTS.fuse_fd_handoff,
    show_default=True,
    help="Mount targets here and hand the /dev/fuse fd to the worker (always on with --launcher kubernetes).",
)
@click.option("--pod-name", envvar="POD_NAME", default="", help="This csi-node's pod (owner of worker pods).")
@click.option("--pod-namespace", envvar="POD_NAMESPACE", default="", help="Its namespace, where worker pods run.")
@click.option(
    "--worker-image",
    envvar="INTERPOSER_WORKER_IMAGE",
    default="",
    help="fuse-worker image of worker pods; empty: the image of --worker-image-container in this pod.",
)
@click.option(
    "--worker-image-container",
    envvar="INTERPOSER_WORKER_IMAGE_CONTAINER",
    default=_DEFAULTS.worker_image_container,
    show_default=True,
    help="The container of this pod whose image is the fuse-worker image.",
)
@click.option(
    "--pod-start-timeout-s",
    type=float,
    default=_DEFAULTS.pod_start_timeout_s,
    show_default=True,
    help="Seconds a new worker pod may take to start and take its FUSE fd.",
)
@click.option(
    "--worker-memory-request",
    default=_DEFAULTS.worker_memory_request,
    show_default=True,
    help="Memory request of each worker pod (Kubernetes quantity).",
)
@click.option(
    "--worker-memory-limit",
    default=_DEFAULTS.worker_memory_limit,
    show_default=True,
    help="Memory limit of each worker pod: ~44 MiB plus ~260 B per file or directory the kernel knows "
    "(1Gi: ~3.8 million).",
)
@click.option("--log-level", default=_DEFAULTS.log_level, show_default=True)
def main(worker_command: str, log_level: str, **flags: object) -> None:
    """Serve the CSI Identity and Node (or Controller) services of fs.interposer.io until SIGTERM."""
    try:
        config = msgspec.convert(
            {**flags, "worker_command": shlex.split(worker_command), "log_level": log_level.upper()},
            CsiNodeConfig,
        )
    except msgspec.ValidationError as exc:
        raise click.UsageError(str(exc)) from None
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT, stream=sys.stderr)
    try:
        server = CsiNodeServer(config)
        server.start()
    except (ValueError, OSError, RuntimeError) as exc:
        click.echo(f"csi-node: {exc}", err=True)
        sys.exit(1)

    def on_signal(signum: int, frame: object) -> None:
        logging.getLogger(__name__).info("%s: stopping", signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
