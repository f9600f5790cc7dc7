"""Policy service: the only writer of desired state (NATS JetStream KV)."""

from ._config import PolicyServiceConfig as PolicyServiceConfig
from ._expiry import ExpiryScheduler as ExpiryScheduler
from ._service import PolicyService as PolicyService, serve as serve
from ._status import StatusCache as StatusCache
from ._store import PolicyStore as PolicyStore, ensure_bucket as ensure_bucket
