"""Policy service configuration."""

from __future__ import annotations

import msgspec

from interposer.proto.connection import DEFAULT_NATS_URL


class PolicyServiceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Configuration of one policy service replica.

    Attributes:
        nats_url: NATS server with JetStream.
        nats_creds: ``--nats-creds`` file of the ``policy`` role
            (``interposer.proto.connection``); ``""`` = anonymous.
        kv_history: revisions kept per volume in the KV bucket (JetStream allows ≤ 64);
            ``history`` and ``rollback`` reach this far back.
        kv_replicas: JetStream replicas of the bucket (1 for a single server).
        worker_stale_after_s: a worker without a heartbeat for this long is shown
            as stale and no longer counts for ``converged``, seconds (workers beat
            every second by default).
        worker_forget_after_s: a worker silent for this long leaves the status, seconds.
        kubernetes: reconcile ``InterposerPolicy`` resources into the bucket
            (``_reconciler.py``); off in the embedded stack, which has no API server.
        kubeconfig: kubeconfig file for ``kubernetes``; ``""`` = the in-cluster
            config (the pod's service account).
        kubernetes_resync_s: list every resource again this often (besides the
            watch), which also retries status writes that failed, seconds.
        kubernetes_status_interval_s: least time between two acknowledgement
            patches (``targetedVolumes``/``appliedVolumes``/``laggingVolumes``) of
            one resource, seconds.
    """

    nats_url: str = DEFAULT_NATS_URL
    nats_creds: str = ""
    kv_history: int = 64
    kv_replicas: int = 1
    worker_stale_after_s: float = 5.0
    worker_forget_after_s: float = 300.0
    kubernetes: bool = False
    kubeconfig: str = ""
    kubernetes_resync_s: float = 300.0
    kubernetes_status_interval_s: float = 1.0
