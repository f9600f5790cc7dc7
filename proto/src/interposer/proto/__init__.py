"""Contracts shared by the interposer services: bus subjects, policy and telemetry messages, recordings.

Nothing else is shared between services; each imports its messages from here.
"""

from . import recording as recording
from . import subjects as subjects
from .control import (
    HistoryEntry as HistoryEntry,
    HistoryReply as HistoryReply,
    ListReply as ListReply,
    PolicyChange as PolicyChange,
    RollbackRequest as RollbackRequest,
    StatusReply as StatusReply,
    VolumeStatus as VolumeStatus,
    VolumeSummary as VolumeSummary,
    WorkerState as WorkerState,
    decode_json as decode_json,
    encode_json as encode_json,
)
from .events import EventBatch as EventBatch, FaultRecord as FaultRecord, OpEvent as OpEvent, WorkerStatus as WorkerStatus
from .policy import (
    ERRNO_BY_NAME as ERRNO_BY_NAME,
    DelayLayer as DelayLayer,
    FaultLayer as FaultLayer,
    Layer as Layer,
    MetadataLayer as MetadataLayer,
    Policy as Policy,
    PolicyError as PolicyError,
    PolicyRecord as PolicyRecord,
    PolicyReply as PolicyReply,
    ProfileLayer as ProfileLayer,
    QuotaLayer as QuotaLayer,
    S3SemanticsLayer as S3SemanticsLayer,
    Selector as Selector,
    SelectorRequest as SelectorRequest,
    StagedWritesLayer as StagedWritesLayer,
    ThrottleLayer as ThrottleLayer,
    decode_policy as decode_policy,
    decode_record as decode_record,
    decode_reply as decode_reply,
    decode_selector_request as decode_selector_request,
    encode_policy as encode_policy,
    encode_record as encode_record,
    encode_reply as encode_reply,
)
from .recording import RecordingError as RecordingError, read_batches as read_batches
