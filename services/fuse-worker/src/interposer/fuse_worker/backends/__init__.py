"""Backends: what the layer stack finally talks to."""

from .passthrough import PassthroughBackend as PassthroughBackend
