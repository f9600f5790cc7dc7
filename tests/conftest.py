"""Shared fixtures: a real nats-server, FUSE availability checks.

Nothing here skips: a test that needs FUSE, NATS or Prometheus fails when they are
missing, so a green run always means the real parts ran.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from interposer.cli._procs import start_nats_server

REPO_ROOT = Path(__file__).resolve().parent.parent


def require_fuse() -> None:
    """Fail the calling test unless FUSE mounts can be made here."""
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: FUSE tests need it (install fuse3, run as root)")
    if shutil.which("fusermount3") is None:
        pytest.fail("fusermount3 is missing: apt-get install fuse3 (make setup does)")


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real nats-server with JetStream, shared by the whole session."""
    child, url = start_nats_server(tmp_path_factory.mktemp("nats"))
    try:
        yield url
    finally:
        child.stop()
