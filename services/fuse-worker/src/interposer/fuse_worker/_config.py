"""Worker configuration: one frozen Struct, filled from flags (``__main__``) or by callers."""

from __future__ import annotations

from typing import Literal

import msgspec

from interposer.proto.subjects import VOLUME_ID_PATTERN

from .backends import BACKEND_KINDS, DEFAULT_MEMORY_SIZE_BYTES


#: How long a worker with a bus waits for its stored policy before mounting, seconds.
DEFAULT_POLICY_WAIT_S = 5.0


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a fuse-worker needs to serve one volume.

    Attributes:
        volume_id: the volume's id (CSI volume_id); names its subjects and KV key.
        backing_dir: directory served by the passthrough backend (required for it;
            unused by ``memory`` and ``null``).
        mountpoint: where the FUSE file system is mounted.
        backend: backend kind: ``passthrough`` (a backing directory), ``memory`` (a
            file system in the worker's memory) or ``null`` (contents discarded).
        memory_size_bytes: most bytes of file contents the ``memory`` backend holds
            (ENOSPC beyond); the size ``statfs`` reports for ``memory`` and ``null``.
        nats_url: NATS server; ``""`` runs without a bus (initial policy only, no events).
        policy_file: JSON policy applied before the first request; ``""`` = none.
        pod_namespace: namespace of the pod using the volume (labels telemetry).
        pod_name: name of that pod.
        read_only: mount read-only (writes fail with EROFS in the kernel).
        allow_other: let users other than the mounting one use the mount (pods run
            as arbitrary uids); needs root or ``user_allow_other`` in /etc/fuse.conf.
        entry_timeout_s: kernel cache time of name lookups, seconds.
        attr_timeout_s: kernel cache time of attributes, seconds.
        max_tasks: most FUSE requests served concurrently (pyfuse3 worker tasks).
        event_buffer: most op events buffered before new ones are dropped.
        batch_max_events: most events in one published batch.
        flush_interval_s: how often buffered events are published, seconds.
        status_interval_s: how often a ``WorkerStatus`` heartbeat is published, seconds.
        policy_wait_s: with ``nats_url``: how long the worker waits, before it
            mounts, for the volume's stored policy, seconds; a worker that
            (re)starts while the bus is reachable never serves a stale policy.
        on_bus_unreachable: what to do when that wait times out: ``passthrough``
            mounts with the local policy (``policy_file`` or none, revision 0) and
            applies the stored one when the bus comes back; ``refuse`` exits
            without mounting.
    """

    volume_id: str = msgspec.field(default="default")
    backing_dir: str = ""
    mountpoint: str
    backend: str = "passthrough"
    memory_size_bytes: int = DEFAULT_MEMORY_SIZE_BYTES
    nats_url: str = ""
    policy_file: str = ""
    pod_namespace: str = ""
    pod_name: str = ""
    read_only: bool = False
    allow_other: bool = True
    entry_timeout_s: float = 1.0
    attr_timeout_s: float = 1.0
    max_tasks: int = 128
    event_buffer: int = 100_000
    batch_max_events: int = 5_000
    flush_interval_s: float = 0.1
    status_interval_s: float = 1.0
    policy_wait_s: float = DEFAULT_POLICY_WAIT_S
    on_bus_unreachable: Literal["passthrough", "refuse"] = "passthrough"

    def __post_init__(self) -> None:
        if not VOLUME_ID_PATTERN.fullmatch(self.volume_id):
            raise ValueError(f"volume_id {self.volume_id!r} must match {VOLUME_ID_PATTERN.pattern}")
        if self.backend not in BACKEND_KINDS:
            raise ValueError(f"backend {self.backend!r} is not supported (supported: {', '.join(BACKEND_KINDS)})")
        if self.backend == "passthrough" and not self.backing_dir:
            raise ValueError("backing_dir is required for the passthrough backend")
        if self.memory_size_bytes < 4096:
            raise ValueError(f"memory_size_bytes = {self.memory_size_bytes} must be >= 4096")
        if self.max_tasks < 1 or self.event_buffer < 1 or self.batch_max_events < 1:
            raise ValueError("max_tasks, event_buffer and batch_max_events must be >= 1")
        if self.flush_interval_s <= 0 or self.status_interval_s <= 0:
            raise ValueError("flush_interval_s and status_interval_s must be > 0")
        if self.policy_wait_s < 0:
            raise ValueError("policy_wait_s must be >= 0")
