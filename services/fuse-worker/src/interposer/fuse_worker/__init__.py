"""fuse-worker: serves one volume through a stack of layers over a backend (pyfuse3 + trio)."""

import sys

# nats-py imports aiohttp, when installed, for NATS over websockets, which a worker
# never uses. The worker image does not ship it, but a shared venv does (the
# kubernetes client depends on it): the import alone costs ~9 MB of RSS and ~0.1 s of
# start-up (measured with -X importtime and VmRSS). A None entry makes nats-py take
# its "aiohttp not installed" path, exactly as in the image.
sys.modules.setdefault("aiohttp", None)  # type: ignore[arg-type]

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
