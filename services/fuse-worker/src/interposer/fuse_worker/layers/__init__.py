"""Layers: one module per layer kind, each a runtime for one policy layer type."""

from .delay import (
    Delay as Delay,
    DelayStatistics as DelayStatistics,
    always_zero as always_zero,
    quantile as quantile,
    sampler as sampler,
)
from .fault import Fault as Fault, FaultStatistics as FaultStatistics
from .metadata import Metadata as Metadata, MetadataStatistics as MetadataStatistics
from .quota import (
    Quota as Quota,
    QuotaContext as QuotaContext,
    QuotaStatistics as QuotaStatistics,
    Usage as Usage,
    walk_usage as walk_usage,
)
from .s3_semantics import S3Semantics as S3Semantics, S3SemanticsStatistics as S3SemanticsStatistics
from .staged_writes import StagedWrites as StagedWrites, StagedWritesStatistics as StagedWritesStatistics
from .throttle import Throttle as Throttle, ThrottleStatistics as ThrottleStatistics, TokenBucket as TokenBucket
