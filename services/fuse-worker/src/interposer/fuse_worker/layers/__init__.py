"""Layers: one module per layer kind, each a runtime for one policy layer type."""

from .delay import Delay as Delay, DelayStatistics as DelayStatistics
from .fault import Fault as Fault, FaultStatistics as FaultStatistics
from .throttle import Throttle as Throttle, ThrottleStatistics as ThrottleStatistics, TokenBucket as TokenBucket
