"""Run one worker: mount, serve until unmounted or signalled, clean up."""

from __future__ import annotations

import logging
import os
import resource
import signal
from pathlib import Path

import pyfuse3
import trio

from interposer.proto import Policy, PolicyError, decode_policy

from ._adapter import InterposerOperations
from ._bus import Bus
from ._config import WorkerConfig
from ._expiry import expire_layers
from ._telemetry import Telemetry
from .backends import PassthroughBackend
from .layers import QuotaContext, Usage, walk_usage

log = logging.getLogger(__name__)


def load_policy_file(path: str) -> Policy:
    """Read and validate a JSON policy file.

    Raises:
        PolicyError: the file is not a valid policy (message names the field).
        OSError: the file cannot be read.
    """
    return decode_policy(Path(path).read_bytes())


def _raise_fd_limit() -> None:
    # The passthrough backend holds one O_PATH fd per inode the kernel knows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def mount_options(config: WorkerConfig) -> set[str]:
    """FUSE mount options for ``config``.

    ``default_permissions``: the kernel checks permissions against the attributes
    we return (those of the backing files), so callers get the backing fs's EACCES.
    """
    options = set(pyfuse3.default_options)
    options |= {f"fsname=interposer:{config.volume_id}", "subtype=interposer"}
    if config.allow_other:
        options.add("allow_other")
    if config.read_only:
        options.add("ro")
    return options


def quota_context(backend: object, backing_dir: str) -> QuotaContext:
    """Quota state of a worker: usage comes from ``backend.usage()`` if it has one, else a walk of ``backing_dir``."""
    usage = getattr(backend, "usage", None)
    measure = (lambda: Usage(*usage())) if callable(usage) else (lambda: walk_usage(backing_dir))
    return QuotaContext(backend, measure)  # type: ignore[arg-type]


async def serve(config: WorkerConfig) -> None:
    """Mount ``config.mountpoint`` and serve it until unmounted, SIGTERM or SIGINT.

    Raises:
        PolicyError: the initial policy file is invalid (nothing is mounted).
        OSError: backing dir or mountpoint unusable.
        RuntimeError: the mount failed (pyfuse3).
    """
    policy = load_policy_file(config.policy_file) if config.policy_file else Policy()
    os.umask(0)  # modes from the kernel already carry the caller's umask
    _raise_fd_limit()
    backend = PassthroughBackend(config.backing_dir, config.entry_timeout_s, config.attr_timeout_s)
    telemetry = Telemetry(config.event_buffer, config.event_sampling, enabled=config.events,
                          volume=config.volume_id)
    operations = InterposerOperations(backend, telemetry, policy, quota=quota_context(backend, config.backing_dir))
    bus: Bus | None = None
    pyfuse3.init(operations, config.mountpoint, mount_options(config))
    log.info("volume %s: %s mounted on %s", config.volume_id, config.backing_dir, config.mountpoint)
    try:
        if config.nats_url:
            bus = Bus(config, telemetry, operations.apply, lambda: operations.revision, trio.lowlevel.current_trio_token())
            bus.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_terminate_on_signal)
            nursery.start_soon(expire_layers, operations)
            await pyfuse3.main(min_tasks=4, max_tasks=config.max_tasks)
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
        if bus is not None:
            bus.stop()
        backend.close()
        log.info("volume %s: unmounted; %d ops served, %d events dropped",
                 config.volume_id, telemetry.ops_total, telemetry.events_dropped_total)


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("got %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def run(config: WorkerConfig) -> None:
    """Blocking entry point: ``trio.run(serve, config)``."""
    trio.run(serve, config)


__all__ = ["PolicyError", "load_policy_file", "mount_options", "run", "serve"]
