"""interposer collector: NATS op-event batches and worker heartbeats → Prometheus metrics.

Run it with ``python -m interposer.collector`` (see ``services/collector/README.md``).
"""

from ._aggregate import (
    DURATION_BUCKETS_NS as DURATION_BUCKETS_NS,
    DURATION_BUCKETS_S as DURATION_BUCKETS_S,
    Aggregator as Aggregator,
    Snapshot as Snapshot,
    errno_name as errno_name,
)
from ._config import (
    CollectorConfig as CollectorConfig,
    make_config as make_config,
    parse_listen as parse_listen,
)
from ._metrics import (
    METRICS as METRICS,
    MetricsCollector as MetricsCollector,
    families as families,
    make_registry as make_registry,
)
from ._service import (
    EVENTS_SUBJECT as EVENTS_SUBJECT,
    STATUS_SUBJECT as STATUS_SUBJECT,
    CollectorService as CollectorService,
    serve as serve,
    write_port_file as write_port_file,
)
