"""Backends: what the layer stack finally talks to (see ``_base.Backend``)."""

from ._base import Backend as Backend
from .memory import DEFAULT_MEMORY_SIZE_BYTES as DEFAULT_MEMORY_SIZE_BYTES, MemoryBackend as MemoryBackend
from .null import NullBackend as NullBackend
from .passthrough import PassthroughBackend as PassthroughBackend

#: Backend kinds accepted by ``--backend`` and the CSI ``volume_context["backend"]``.
BACKEND_KINDS = ("passthrough", "memory", "null")
