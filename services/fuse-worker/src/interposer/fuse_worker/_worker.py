"""Run one worker: mount, serve until unmounted or signalled, clean up."""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import time
from pathlib import Path

import pyfuse3
import trio

from interposer.proto import Policy, PolicyError, decode_policy

from ._adapter import InterposerOperations
from ._bus import Bus
from ._config import WorkerConfig
from . import _session_loop
from ._extra_ops import ExtraOps, ExtraOpsUnavailable
from ._pauses import freeze_long_lived_objects, grow_fd_table
from .layers import _timer
from ._expiry import expire_layers
from ._mountinfo import refuse_to_cover_an_interposer_mount
from ._readahead import set_read_ahead
from .backends._libc import limit_malloc_arenas
from .backends._offload import fuse_device_fd, readable
from ._telemetry import DEFAULT_FAULT_BUFFER, Telemetry, burst_balance, quota_usage
from .backends import Backend, MemoryBackend, NullBackend, PassthroughBackend
from .layers import QuotaContext, Usage, walk_usage

log = logging.getLogger(__name__)


def load_policy_file(path: str) -> Policy:
    """Read and validate a JSON policy file.

    Raises:
        PolicyError: the file is not a valid policy (message names the file and the field).
        OSError: the file cannot be read.
    """
    try:
        return decode_policy(Path(path).read_bytes())
    except PolicyError as exc:
        raise PolicyError(f"policy file {path}: {exc}") from None


#: Most bytes of the csi-node's answer on the fd-handoff socket.
FD_HANDOFF_ANSWER_MAX_BYTES = 1024
#: Pause between attempts to connect to the fd-handoff socket, seconds.
FD_HANDOFF_RETRY_S = 0.05


def receive_fuse_fd(socket_path: str, volume_id: str, timeout_s: float) -> int:
    """Receive the mounted ``/dev/fuse`` fd of ``volume_id`` from the csi-node.

    The csi-node (privileged) opened ``/dev/fuse`` and mounted it at the target
    with ``fd=N``; it listens on ``socket_path``. The worker connects, sends its
    volume id (UTF-8), and gets ``b"OK"`` with the fd as ``SCM_RIGHTS`` ancillary
    data, or ``b"ERR <reason>"`` without one (protocol of
    ``interposer.csi_node._fuse_fd.FdHandoff``). libfuse then serves the fd when
    given the mountpoint ``/dev/fd/N`` and never calls ``mount(2)``.

    Args:
        socket_path: the csi-node's unix socket for this volume.
        volume_id: this worker's volume id (the csi-node checks it).
        timeout_s: how long to keep trying to connect and wait for the answer, seconds.

    Returns:
        The received fd (inheritable: not closed across libfuse's use).

    Raises:
        OSError: no answer within ``timeout_s`` (``ETIMEDOUT``), or the csi-node
            refused (the message carries its reason).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            sock.connect(socket_path)
            sock.sendall(volume_id.encode())
            sock.shutdown(socket.SHUT_WR)
            answer, fds, _flags, _addr = socket.recv_fds(sock, FD_HANDOFF_ANSWER_MAX_BYTES, 1)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no fd-handoff socket at {socket_path} within {timeout_s:g} s") from None
            time.sleep(FD_HANDOFF_RETRY_S)
            continue
        except socket.timeout:
            raise TimeoutError(f"no FUSE fd from {socket_path} within {timeout_s:g} s") from None
        finally:
            sock.close()
        if answer != b"OK" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ConnectionRefusedError(f"{socket_path} refused the FUSE fd: {answer.decode(errors='replace')}")
        return fds[0]


#: glibc malloc arenas the worker may use. With the default (8 per core), the
#: threads that read cold data (``backends._offload``) each get an arena, and each
#: keeps the 1 MiB read buffers it freed: measured after 1 GiB of cold 1 MiB reads,
#: RSS 59-61 MB with the default, 54-56 MB with one arena, at the same CPU per MiB
#: (docs/benchmarks.md). Small objects never reach malloc (pymalloc), so the shared
#: arena's lock is rarely taken.
MALLOC_ARENAS = 1


#: Shares of the worker's open-file limit the passthrough backend may spend on
#: holding the files (``--max-file-fds`` 0) and the directories (``--max-dir-fds``
#: 0) the kernel knows; the rest is for the files applications open (one backing
#: fd each), sockets and pipes.
FILE_FD_SHARE = 0.5
DIR_FD_SHARE = 0.25


def _raise_fd_limit() -> int:
    """Raise the open-file limit as far as allowed; return the soft limit now in force.

    The passthrough backend holds an O_PATH fd per directory and (up to a budget)
    per file the kernel knows. With CAP_SYS_RESOURCE the hard limit itself goes up
    to the kernel's ``fs.nr_open``; otherwise the soft limit goes up to the hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        nr_open = hard
    for target in (max(nr_open, hard), hard):
        if soft >= target:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (OSError, ValueError):
            continue
    return soft


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


def make_backend(config: WorkerConfig) -> Backend:
    """The backend ``config.backend`` names, configured from ``config``.

    Raises:
        OSError: the passthrough backing dir is unusable.
    """
    timeouts = (config.entry_timeout_s, config.attr_timeout_s)
    if config.backend == "memory":
        return MemoryBackend(config.memory_size_bytes, *timeouts)
    if config.backend == "null":
        return NullBackend(config.memory_size_bytes, *timeouts)
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return PassthroughBackend(config.backing_dir, *timeouts, blocking_io=config.blocking_io,
                              max_file_fds=config.max_file_fds or max(int(fd_limit * FILE_FD_SHARE), 1),
                              max_dir_fds=config.max_dir_fds or max(int(fd_limit * DIR_FD_SHARE), 1))


async def serve(config: WorkerConfig) -> None:
    """Mount ``config.mountpoint`` and serve it until unmounted, SIGTERM or SIGINT.

    Raises:
        PolicyError: the initial policy file is invalid (nothing is mounted).
        OSError: backing dir or mountpoint unusable.
        RuntimeError: the mount failed (pyfuse3), or an interposer mount is already
            at the mountpoint (nothing is mounted).
    """
    policy = load_policy_file(config.policy_file) if config.policy_file else Policy()
    if not config.fuse_fd_socket:
        refuse_to_cover_an_interposer_mount(config.mountpoint)
    os.umask(0)  # modes from the kernel already carry the caller's umask
    fd_limit = _raise_fd_limit()
    fd_slots = grow_fd_table(fd_limit)
    limit_malloc_arenas(MALLOC_ARENAS)
    backend = make_backend(config)
    if isinstance(backend, PassthroughBackend):
        log.info("up to %d files and %d directories held open (O_PATH) at once, open-file limit %d; beyond, "
                 "the longest held are reopened by name when used", backend.inodes.max_file_fds,
                 backend.inodes.max_dir_fds, fd_limit)
    # Without a bus nothing drains the buffers: recording events would only fill them
    # (up to ~25 MB of OpEvents) and then count drops. Counters still run.
    has_bus = bool(config.nats_url)
    telemetry = Telemetry(config.event_buffer, config.event_sampling, enabled=config.events and has_bus,
                          volume=config.volume_id, namespace=config.pod_namespace, pod=config.pod_name,
                          fault_capacity=DEFAULT_FAULT_BUFFER if has_bus else 0)
    operations = InterposerOperations(backend, telemetry, policy, quota=quota_context(backend, config.backing_dir),
                                      negative_timeout_s=config.negative_entry_timeout_s)
    bus: Bus | None = None
    if config.nats_url:
        # The throttles' buckets run on trio's clock (perf_counter plus an offset); the bus thread has no trio clock.
        trio_clock_offset_s = trio.current_time() - time.perf_counter()
        bus = Bus(config, telemetry, operations.apply, lambda: operations.revision, trio.lowlevel.current_trio_token(),
                  quota_usage=lambda: quota_usage(operations.stack.layers),
                  burst_balance=lambda: burst_balance(operations.stack.layers, time.perf_counter() + trio_clock_offset_s),
                  apply_off_trio=operations.apply_off_trio,
                  passthrough_files=lambda: (operations.kernel_passthrough_files, operations.files_bypassing_layers))
        bus.start()
        await _wait_for_stored_policy(bus, config)
    try:
        mountpoint = config.mountpoint
        if config.fuse_fd_socket:
            # Mounted by the csi-node; libfuse serves /dev/fd/N without mounting.
            fd = await trio.to_thread.run_sync(receive_fuse_fd, config.fuse_fd_socket, config.volume_id,
                                               config.fuse_fd_wait_s)
            mountpoint = f"/dev/fd/{fd}"
        pyfuse3.init(operations, mountpoint, mount_options(config))
        if isinstance(backend, PassthroughBackend):
            fuse_fd = fuse_device_fd()
            if fuse_fd is not None:
                backend.blocking.watch(readable(fuse_fd), lambda: telemetry.ops_total, config.busy_poll_us * 1e-6)
    except BaseException:
        if bus is not None:
            bus.stop()
        raise
    log.info("volume %s: %s backend%s serving %s%s", config.volume_id, config.backend,
             f" of {config.backing_dir}" if config.backend == "passthrough" else "", mountpoint,
             f" (mounted by the csi-node at {config.mountpoint or 'its target'})" if config.fuse_fd_socket else "")
    extra_ops: ExtraOps | None = None
    ended_on_request = False  # pyfuse3.main returned: a signal or an unmount, not a failure
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_terminate_on_signal)
            nursery.start_soon(expire_layers, operations)
            if config.read_ahead_kib and not config.fuse_fd_socket:
                nursery.start_soon(_set_read_ahead_after_init, operations, os.path.abspath(mountpoint),
                                   config.read_ahead_kib)
            try:
                extra_ops = ExtraOps(operations, config.max_background,
                                     kernel_passthrough=config.kernel_passthrough,
                                     skip_needless_flush=config.skip_needless_flush,
                                     handle_killpriv=config.handle_killpriv_v2, held_reads=config.held_reads)
                extra_ops.install(nursery)
            except ExtraOpsUnavailable as exc:
                log.warning("fallocate, copy_file_range and lseek answered ENOSYS (kernel fallbacks), "
                            "max_background the kernel's: %s", exc)
            if operations.noflush_opens:
                # Users comparing traces with strace would otherwise wonder where the flushes went.
                log.info("close(2) sends FLUSH only where a layer acts on flush or the backing fs has a "
                         "flush method (--always-flush: on every close)")
            _timer.configure(config.wake_compensation)
            if config.session_loop == "lean":
                _session_loop.install(config.busy_poll_us * 1e-6)
            log.debug("fd table grown to %d slots, %d objects frozen (_pauses)", fd_slots, freeze_long_lived_objects())
            try:
                await pyfuse3.main(min_tasks=4, max_tasks=config.max_tasks)
            finally:
                _session_loop.uninstall()
                _timer.call_pending_now()  # held replies leave before their session is destroyed
            nursery.cancel_scope.cancel()
        ended_on_request = True
    finally:
        held_reads = extra_ops.held_reads_total if extra_ops is not None else 0
        pyfuse3.close(unmount=True)
        if bus is not None:
            bus.stop(on_request=ended_on_request)
        backend.close()
        log.info("volume %s: %s; %d ops served, %d faults injected, %d events dropped%s", config.volume_id,
                 "FUSE fd closed (the csi-node unmounts)" if config.fuse_fd_socket else "unmounted",
                 telemetry.ops_total, telemetry.faults_total, telemetry.events_dropped_total,
                 _lateness_summary(telemetry, held_reads))


def _lateness_summary(telemetry: Telemetry, held_reads: int = 0) -> str:
    """``"; N delayed ops resumed a mean X µs late (M reads answered by the timer)"`` for the exit log.

    "" when nothing was delayed; ``held_reads``: replies ``_held_reads`` sent after a hold.
    """
    if not telemetry.delayed_ops_total:
        return ""
    mean_us = telemetry.delay_late_ns_total / telemetry.delayed_ops_total / 1e3
    held = f" ({held_reads} held reads answered by the timer)" if held_reads else ""
    return f"; {telemetry.delayed_ops_total} delayed ops resumed a mean {mean_us:.0f} µs after their delays{held}"


async def _set_read_ahead_after_init(operations: InterposerOperations, mountpoint: str, kib: int) -> None:
    """Set the mount's readahead once FUSE_INIT is answered (the kernel resets it then)."""
    await operations.initialized.wait()
    await trio.sleep(0)  # the INIT reply is written when the handler that set the event returns
    await trio.to_thread.run_sync(set_read_ahead, mountpoint, kib)


async def _wait_for_stored_policy(bus: Bus, config: WorkerConfig) -> None:
    """Wait up to ``config.policy_wait_s`` for the volume's stored policy, before mounting.

    Raises:
        RuntimeError: the bus did not answer in time and ``on_bus_unreachable`` is
            ``refuse`` (nothing is mounted).
    """
    if await trio.to_thread.run_sync(bus.wait_initial_policy, config.policy_wait_s):
        return
    if config.on_bus_unreachable == "refuse":
        bus.stop()
        raise RuntimeError(f"no policy from NATS {config.nats_url} within {config.policy_wait_s:g} s; "
                           "not mounting (on_bus_unreachable=refuse)")
    log.warning("no policy from NATS %s within %g s: serving the local policy until the bus answers",
                config.nats_url, config.policy_wait_s)


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("got %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def run(config: WorkerConfig) -> None:
    """Blocking entry point: ``trio.run(serve, config)``."""
    trio.run(serve, config)


__all__ = ["PolicyError", "load_policy_file", "make_backend", "mount_options", "receive_fuse_fd", "run", "serve"]
