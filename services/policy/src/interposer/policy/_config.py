"""Policy service configuration."""

from __future__ import annotations

import msgspec


class PolicyServiceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Configuration of one policy service replica.

    Attributes:
        nats_url: NATS server with JetStream.
        kv_history: revisions kept per volume in the KV bucket (JetStream allows ≤ 64).
        kv_replicas: JetStream replicas of the bucket (1 for a single server).
    """

    nats_url: str = "nats://127.0.0.1:4222"
    kv_history: int = 64
    kv_replicas: int = 1
