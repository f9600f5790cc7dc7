"""fuse-worker: serves one volume through a stack of layers over a backend (pyfuse3 + trio)."""

from ._adapter import InterposerOperations as InterposerOperations
from ._config import WorkerConfig as WorkerConfig
from ._op import Op as Op
from ._stack import Stack as Stack
from ._telemetry import Telemetry as Telemetry
from ._worker import load_policy_file as load_policy_file, run as run, serve as serve
from .backends import (
    Backend as Backend,
    MemoryBackend as MemoryBackend,
    NullBackend as NullBackend,
    PassthroughBackend as PassthroughBackend,
)
