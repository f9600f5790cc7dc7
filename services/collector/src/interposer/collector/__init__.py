"""interposer collector: NATS op-event batches and worker heartbeats → Prometheus metrics, OTLP traces/logs, recordings.

Run it with ``python -m interposer.collector`` (see ``services/collector/README.md``).
"""

from ._aggregate import (
    DURATION_BUCKETS_NS as DURATION_BUCKETS_NS,
)
from ._aggregate import (
    DURATION_BUCKETS_S as DURATION_BUCKETS_S,
)
from ._aggregate import (
    SIZE_BUCKETS_BYTES as SIZE_BUCKETS_BYTES,
)
from ._aggregate import (
    Aggregator as Aggregator,
)
from ._aggregate import (
    Snapshot as Snapshot,
)
from ._aggregate import (
    errno_name as errno_name,
)
from ._config import (
    CollectorConfig as CollectorConfig,
)
from ._config import (
    make_config as make_config,
)
from ._config import (
    parse_listen as parse_listen,
)
from ._metrics import (
    METRICS as METRICS,
)
from ._metrics import (
    MetricsCollector as MetricsCollector,
)
from ._metrics import (
    families as families,
)
from ._metrics import (
    make_registry as make_registry,
)
from ._otlp import (
    OtlpExporter as OtlpExporter,
)
from ._otlp import (
    op_span_ids as op_span_ids,
)
from ._otlp import (
    session_ids as session_ids,
)
from ._recorder import (
    Recorder as Recorder,
)
from ._recorder import (
    RecorderStatistics as RecorderStatistics,
)
from ._service import (
    EVENTS_SUBJECT as EVENTS_SUBJECT,
)
from ._service import (
    FAULTS_SUBJECT as FAULTS_SUBJECT,
)
from ._service import (
    STATUS_SUBJECT as STATUS_SUBJECT,
)
from ._service import (
    CollectorService as CollectorService,
)
from ._service import (
    serve as serve,
)
from ._service import (
    write_port_file as write_port_file,
)
