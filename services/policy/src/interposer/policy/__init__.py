"""Policy service: the only writer of desired state (NATS JetStream KV)."""

from ._config import PolicyServiceConfig as PolicyServiceConfig
from ._service import PolicyService as PolicyService, ensure_bucket as ensure_bucket, serve as serve
