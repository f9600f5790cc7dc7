"""``python -m interposer.csi_node``: flags → config → logging → serve until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
from collections.abc import Sequence

import msgspec

from ._config import CsiNodeConfig
from ._server import CsiNodeServer

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_config(argv: Sequence[str] | None = None) -> CsiNodeConfig:
    """Turn command-line flags into a :class:`CsiNodeConfig` (unset flags keep its defaults)."""
    defaults = CsiNodeConfig()
    parser = argparse.ArgumentParser(prog="python -m interposer.csi_node", description=__doc__)
    parser.add_argument("--endpoint", default=defaults.endpoint, help="unix:///path/csi.sock to listen on")
    parser.add_argument("--nodeid", default=defaults.node_id, help="node id reported by NodeGetInfo")
    parser.add_argument("--state-dir", default=defaults.state_dir, help="per-volume state, policies, worker logs")
    parser.add_argument("--nats-url", default=defaults.nats_url, help="NATS URL handed to workers (empty: none)")
    parser.add_argument(
        "--worker-command", default=shlex.join(defaults.worker_command),
        help="command that starts a fuse-worker (shell-quoted); volume flags are appended",
    )
    parser.add_argument("--mount-timeout-s", type=float, default=defaults.mount_timeout_s)
    parser.add_argument("--unmount-timeout-s", type=float, default=defaults.unmount_timeout_s)
    parser.add_argument("--max-volumes-per-node", type=int, default=defaults.max_volumes_per_node)
    parser.add_argument("--grpc-workers", type=int, default=defaults.grpc_workers)
    parser.add_argument("--log-level", default=defaults.log_level)
    args = parser.parse_args(argv)
    return msgspec.convert(
        {
            "endpoint": args.endpoint,
            "node_id": args.nodeid,
            "state_dir": args.state_dir,
            "nats_url": args.nats_url,
            "worker_command": shlex.split(args.worker_command),
            "mount_timeout_s": args.mount_timeout_s,
            "unmount_timeout_s": args.unmount_timeout_s,
            "max_volumes_per_node": args.max_volumes_per_node,
            "grpc_workers": args.grpc_workers,
            "log_level": args.log_level.upper(),
        },
        CsiNodeConfig,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the csi-node until SIGTERM or SIGINT; return the exit status."""
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT, stream=sys.stderr)
    server = CsiNodeServer(config)
    server.start()

    def on_signal(signum: int, frame: object) -> None:
        logging.getLogger(__name__).info("%s: stopping", signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
