"""Mount helpers shared by the benchmarks."""

from __future__ import annotations

import subprocess
from pathlib import Path

#: How long a worker gets to exit after its mount is gone, seconds.
UNMOUNT_WAIT_S = 10


def unmount(proc: subprocess.Popen, mountpoint: Path) -> None:
    """Unmount ``mountpoint`` and wait for its worker ``proc``; kill it and detach lazily if it hangs."""
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, capture_output=True)
    try:
        proc.wait(UNMOUNT_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False, capture_output=True)
