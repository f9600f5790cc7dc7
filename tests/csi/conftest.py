"""Fixtures for the csi-node tests: a real csi-node process on a unix socket.

Each test gets its own csi-node (``python -m interposer.csi_node``) in a fresh
``csi-*`` directory in ``$TMPDIR``, or shares one per module where nothing is published,
and talks to it with the generated CSI stubs, as kubelet does. Teardown stops the
csi-node, kills any fuse-worker it left (pids from its state files) and lazily
unmounts anything still mounted under the directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from csi_support import CsiNode, fresh_csi_root, running_csi_node


@pytest.fixture
def csi_root() -> Iterator[Path]:
    """A fresh ``csi-*`` directory (in ``$TMPDIR``) for one test, mounts under it removed at the end."""
    with fresh_csi_root() as root:
        yield root


@pytest.fixture
def csi_node(csi_root: Path) -> Iterator[CsiNode]:
    """A csi-node of this test alone, serving on ``<csi_root>/csi.sock``."""
    with running_csi_node(csi_root) as node:
        yield node


@pytest.fixture(scope="module")
def shared_csi_node() -> Iterator[CsiNode]:
    """One csi-node for a whole module of tests that publish nothing successfully."""
    with fresh_csi_root() as root, running_csi_node(root) as node:
        yield node


@pytest.fixture
def backing_dir(csi_root: Path) -> Path:
    """An existing, empty backing directory."""
    path = csi_root / "backing"
    path.mkdir()
    return path
