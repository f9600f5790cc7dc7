"""Shared fixtures: a real nats-server, FUSE availability checks.

Nothing here skips: a test that needs FUSE, NATS or Prometheus fails when they are
missing, so a green run always means the real parts ran.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from interposer.cli._procs import start_nats_server

from interposer_testing import REPO_ROOT, MountedVolume, is_fuse_mount, require_fuse


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real nats-server with JetStream, shared by the whole session."""
    child, url = start_nats_server(tmp_path_factory.mktemp("nats"))
    try:
        yield url
    finally:
        child.stop()


@pytest.fixture
def mount_worker(tmp_path: Path) -> Iterator[Callable[..., MountedVolume]]:
    """Factory: start ``python -m interposer.fuse_worker`` on a fresh backing dir; unmount after."""
    require_fuse()
    volumes: list[MountedVolume] = []

    def start(volume_id: str = "test", *, nats_url: str = "", policy: str | None = None,
              backing: Path | None = None, extra: Sequence[str] = ()) -> MountedVolume:
        index = len(volumes)
        backing = backing or tmp_path / f"backing{index}"
        backing.mkdir(exist_ok=True)
        mountpoint = tmp_path / f"mnt{index}"
        mountpoint.mkdir()
        argv = [sys.executable, "-m", "interposer.fuse_worker", "--backing-dir", str(backing),
                "--mountpoint", str(mountpoint), "--volume-id", volume_id, "--log-level", "DEBUG", *extra]
        if nats_url:
            argv += ["--nats-url", nats_url]
        if policy is not None:
            policy_path = tmp_path / f"policy{index}.json"
            policy_path.write_text(policy)
            argv += ["--policy-file", str(policy_path)]
        log_path = tmp_path / f"worker{index}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        volume = MountedVolume(backing, mountpoint, proc, log_path)
        volumes.append(volume)
        deadline = time.monotonic() + 15
        while not is_fuse_mount(mountpoint):
            if proc.poll() is not None:
                pytest.fail(f"worker exited with {proc.returncode}:\n{volume.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"worker did not mount within 15 s:\n{volume.log()}")
            time.sleep(0.02)
        return volume

    yield start
    for volume in reversed(volumes):  # a mount may serve another one's backing dir
        volume.unmount()
