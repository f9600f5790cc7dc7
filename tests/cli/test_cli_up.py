"""`interposer up` with its defaults: the embedded stack comes up, answers, and stops on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from interposer_testing import wait_until


def test_up_runs_the_stack_until_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-m", "interposer.cli", "up", "--state-dir", str(state),
                             "--nats-port", "0", "--metrics-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (state / "stack.json").exists() or proc.poll() is not None, "stack.json", timeout_s=60)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        endpoints = json.loads((state / "stack.json").read_text())
        assert endpoints["nats_url"].startswith("nats://127.0.0.1:")
        got = subprocess.run([sys.executable, "-m", "interposer.cli", "policy", "get", "vol1"],
                             env={"INTERPOSER_STATE_DIR": str(state), "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, timeout=30)
        assert got.returncode == 0 and json.loads(got.stdout)["ok"] is True, got.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not (state / "stack.json").exists()
