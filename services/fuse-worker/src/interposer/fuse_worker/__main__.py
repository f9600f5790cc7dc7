"""``python -m interposer.fuse_worker``: flags → config → logging → serve."""

from __future__ import annotations

import logging
import os
import sys

import click
import msgspec

from interposer.proto import PolicyError
from interposer.proto.connection import CredentialsError, connect_options
from interposer.proto.worker_tuning import MAX_BACKGROUND_REQUESTS, MAX_BUSY_POLL_US, MAX_CACHE_TIMEOUT_S

from ._config import (
    DEFAULT_ATTR_TIMEOUT_S,
    DEFAULT_BUSY_POLL_US,
    DEFAULT_ENTRY_TIMEOUT_S,
    DEFAULT_MAX_BACKGROUND,
    DEFAULT_POLICY_WAIT_S,
    DEFAULT_WAKE_COMPENSATION,
    WorkerConfig,
    parse_sample_rule,
)
from ._readahead import DEFAULT_READ_AHEAD_KIB
from .backends import BACKEND_KINDS, DEFAULT_MEMORY_SIZE_BYTES
from ._worker import run


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--backing-dir", default="", type=click.Path(file_okay=False),
              help="Directory to serve (passthrough backend; required for it).")
@click.option("--mountpoint", type=click.Path(file_okay=False),
              help="Where to mount (required without --fuse-fd-socket; with it, not accessed: the "
                   "csi-node's mount blocks until this worker answers FUSE_INIT).")
@click.option("--fuse-fd-socket", type=click.Path(dir_okay=False),
              help="Receive an already mounted /dev/fuse fd from this csi-node unix socket instead of "
                   "mounting (no CAP_SYS_ADMIN needed).")
@click.option("--volume-id", default="default", show_default=True, help="Volume id (subjects, KV key, labels).")
@click.option("--nats-url", default="", help="NATS server URL; empty runs without a bus.")
@click.option("--nats-creds", default="", help="NATS credentials file of the worker role "
              "(JSON: user, password, ca, cert, key); empty = anonymous.")
@click.option("--policy-file", default="", help="Initial JSON policy.")
@click.option("--backend", default="passthrough", show_default=True, type=click.Choice(BACKEND_KINDS),
              help="passthrough: the backing dir; memory: a file system in memory; null: contents discarded.")
@click.option("--memory-size-bytes", default=DEFAULT_MEMORY_SIZE_BYTES, show_default=True, type=click.IntRange(min=4096),
              help="Most bytes of file contents the memory backend holds (ENOSPC beyond); statfs size of memory/null.")
@click.option("--pod-namespace", default="", help="Namespace of the pod using the volume.")
@click.option("--pod-name", default="", help="Name of the pod using the volume.")
@click.option("--pod-uid", default="", help="Uid of the pod using the volume (csi.storage.k8s.io/pod.uid).")
@click.option("--service-account", default="", help="ServiceAccount of that pod (csi.storage.k8s.io/serviceAccount.name).")
@click.option("--node-name", default="", help="Node this worker runs on (for selector policies).")
@click.option("--pod-label", "pod_label", multiple=True, metavar="KEY=VALUE",
              help="A label of the pod using the volume (for selector policies with labels). Repeatable.")
@click.option("--read-only", is_flag=True, help="Mount read-only.")
@click.option("--read-ahead-kib", type=click.IntRange(0, 65536), default=DEFAULT_READ_AHEAD_KIB, show_default=True,
              help="Kernel readahead of the mount, KiB (0 = kernel default, 128).")
@click.option("--max-file-fds", type=click.IntRange(0), default=0, show_default=True,
              help="Most files (not directories) the passthrough backend keeps an fd of while the kernel "
                   "knows them; others are reopened by name when used (0 = half the open-file "
                   "limit; see docs/ARCHITECTURE.md).")
@click.option("--max-dir-fds", type=click.IntRange(0), default=0, show_default=True,
              help="The same for directories (0 = a quarter of the open-file limit).")
@click.option("--session-loop", type=click.Choice(["lean", "pyfuse3"]), default="lean", show_default=True,
              help="FUSE request loop: pyfuse3's own on leaner primitives (lean), or as it is (see docs/ARCHITECTURE.md).")
@click.option("--busy-poll-us", type=click.IntRange(0, MAX_BUSY_POLL_US), default=DEFAULT_BUSY_POLL_US, show_default=True,
              help="How long to keep polling for the next request (lean loop), and for a disk read the page "
                   "cache is waiting for (passthrough), before sleeping, µs (0 = never; costs CPU only right "
                   "after a request or a miss, see docs/ARCHITECTURE.md).")
@click.option("--max-background", type=click.IntRange(0, MAX_BACKGROUND_REQUESTS), default=DEFAULT_MAX_BACKGROUND,
              show_default=True,
              help="Most asynchronous requests (async direct I/O, readahead) the kernel keeps in flight: "
                   "the deepest queue an application gets (0 = kernel default, 12).")
@click.option("--kernel-passthrough/--no-kernel-passthrough", default=False, show_default=True,
              help="Let the kernel serve reads and writes of files no layer acts on straight from the "
                   "backing files (Linux >= 6.9, CAP_SYS_ADMIN): native speed, but those reads and "
                   "writes make no op events or metrics (see docs/ARCHITECTURE.md).")
@click.option("--skip-needless-flush/--always-flush", default=True, show_default=True,
              help="Spare close(2) its FLUSH request where flushing does nothing: no layer acts on flush "
                   "at the path, and the backing fs has no flush method (ext4, xfs, btrfs, tmpfs; memory "
                   "and null backends). --always-flush: every close sends one (see docs/ARCHITECTURE.md).")
@click.option("--handle-killpriv-v2/--no-handle-killpriv-v2", default=True, show_default=True,
              help="Clear set-ID bits on writes and truncations here (FUSE_HANDLE_KILLPRIV_V2), so the "
                   "kernel stops sending a GETXATTR before every write(2) (see docs/posix.md).")
@click.option("--held-reads/--sleeping-holds", default=True, show_default=True,
              help="While a delay layer acts on reads, send each held READ's reply from the timer "
                   "when its hold ends, instead of parking a reader task for it: less worker CPU "
                   "per held read (see docs/layers.md). --sleeping-holds: every hold sleeps.")
@click.option("--entry-timeout", "entry_timeout_s", type=click.FloatRange(0, MAX_CACHE_TIMEOUT_S),
              default=DEFAULT_ENTRY_TIMEOUT_S, show_default=True, help="Seconds the kernel may cache a name it looked up (see docs/posix.md).")
@click.option("--attr-timeout", "attr_timeout_s", type=click.FloatRange(0, MAX_CACHE_TIMEOUT_S),
              default=DEFAULT_ATTR_TIMEOUT_S, show_default=True, help="Seconds the kernel may cache a file's attributes (see docs/posix.md).")
@click.option("--negative-timeout", "negative_timeout_s", type=click.FloatRange(0, MAX_CACHE_TIMEOUT_S),
              default=None,
              help="Seconds the kernel may cache a lookup that found no such name (0 = never, like NFS's "
                   "lookupcache=positive; off anyway while a layer acts on lookups)  [default: the entry "
                   "timeout]")
@click.option("--blocking-io", type=click.Choice(["adaptive", "loop", "thread"]), default="adaptive",
              show_default=True,
              help="Passthrough reads/writes/syncs: on the event loop while fast, in a thread once slow "
                   "(adaptive), or always one way (see docs/ARCHITECTURE.md).")
@click.option("--wake-compensation", type=click.Choice(["off", "worker", "round-trip"]),
              default=DEFAULT_WAKE_COMPENSATION, show_default=True,
              help="Arm the timers of delays (not throttle waits) early by the measured wake-up "
                   "lateness: the worker's own, or also the application's wait for the reply "
                   "(floor-mode delays; add-mode ones take the worker's own only; see docs/layers.md).")
@click.option("--policy-wait", "policy_wait_s", type=float, default=DEFAULT_POLICY_WAIT_S, show_default=True,
              help="With --nats-url: seconds to wait for the stored policy before mounting.")
@click.option("--on-bus-unreachable", type=click.Choice(["passthrough", "refuse"]),
              default="passthrough", show_default=True,
              help="If that wait times out: mount with the local policy, or exit without mounting.")
@click.option("--events/--no-events", default=True, show_default=True,
              help="Publish one op event per served op (--no-events: heartbeat counters only).")
@click.option("--event-sample", "event_sampling", multiple=True, metavar="OPS:GLOB:RATIO",
              help="Record only RATIO (0..1) of the ops named in OPS (comma-separated, empty = all) "
                   "whose path matches GLOB, e.g. 'getattr,lookup:*:0.01'. Repeatable; the first "
                   "matching rule wins; unmatched ops are all recorded.")
@click.option("--log-level", default="INFO", show_default=True)
def main(log_level: str, event_sampling: tuple[str, ...], pod_label: tuple[str, ...],
         **flags: object) -> None:
    """Serve one interposed volume in the foreground until unmounted or SIGTERM."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rules = [parse_sample_rule(text) for text in event_sampling]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--event-sample") from None
    for text in pod_label:
        if "=" not in text:
            raise click.BadParameter(f"{text!r} is not KEY=VALUE", param_hint="--pod-label")
    flags["pod_labels"] = dict(text.split("=", 1) for text in pod_label)  # validated by WorkerConfig
    if flags["mountpoint"] and not flags["fuse_fd_socket"] and not os.path.isdir(flags["mountpoint"]):
        raise click.BadParameter(f"directory {flags['mountpoint']!r} does not exist", param_hint="--mountpoint")
    try:
        connect_options(str(flags.get("nats_creds") or ""))  # a bad file is a usage error, before mounting
    except CredentialsError as exc:
        raise click.BadParameter(str(exc), param_hint="--nats-creds") from None
    try:
        config = msgspec.convert({k: v for k, v in flags.items() if v is not None}, WorkerConfig)
        config = msgspec.structs.replace(config, event_sampling=tuple(rules))
        run(config)
    except (msgspec.ValidationError, PolicyError) as exc:
        raise click.UsageError(str(exc)) from None
    except (OSError, RuntimeError) as exc:
        click.echo(f"fuse-worker: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
