"""`interposer up` with its defaults: the embedded stack comes up, answers, and stops on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from interposer.cli._stack import EmbeddedStack
from interposer.csi_node._config import DRIVER_NAME, MAX_GRPC_UNIX_SOCKET_PATH_BYTES, socket_path_of
from interposer.proto.csi import csi_pb2, csi_pb2_grpc
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
        # The collector records events for `interposer analyze` (its default directory).
        assert endpoints["recordings_dir"] == str(state.resolve() / "recordings")
        assert any(p.name.startswith("events-") for p in (state / "recordings").iterdir())
        got = subprocess.run([sys.executable, "-m", "interposer.cli", "policy", "get", "vol1"],
                             env={"INTERPOSER_STATE_DIR": str(state), "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, timeout=30)
        assert got.returncode == 0 and json.loads(got.stdout)["ok"] is True, got.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not (state / "stack.json").exists()


def test_stack_starts_when_the_state_dir_is_too_deep_for_a_socket(tmp_path: Path) -> None:
    """A state dir whose ``csi/csi.sock`` is 106 bytes (one past what grpcio binds) still works.

    CI hit this: pytest's tmp dir for a long test name made the csi-node fail to bind.
    """
    suffix, failing_length = "/csi/csi.sock", 106  # the length of the socket path CI failed on
    state = tmp_path / ("s" * (failing_length - len(str(tmp_path)) - len("/") - len(suffix)))
    assert len(str(state) + suffix) == failing_length
    stack = EmbeddedStack(state, metrics_port=0)
    with stack as endpoints:
        socket_path = endpoints.csi_endpoint[len("unix://"):]
        assert len(socket_path) <= MAX_GRPC_UNIX_SOCKET_PATH_BYTES
        with grpc.insecure_channel(endpoints.csi_endpoint) as channel:
            info = csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
        assert info.name == DRIVER_NAME
    assert not Path(socket_path).parent.exists(), "the short socket dir outlived the stack"


def test_csi_node_refuses_an_endpoint_longer_than_grpc_binds() -> None:
    fits = "/" + "a" * (MAX_GRPC_UNIX_SOCKET_PATH_BYTES - 1)
    assert socket_path_of(f"unix://{fits}") == fits
    with pytest.raises(ValueError, match="106 bytes, longer than the 105"):
        socket_path_of(f"unix://{fits}b")


def test_a_second_signal_does_not_cut_the_clean_up_short(tmp_path: Path) -> None:
    """A supervisor escalating (SIGTERM, then Ctrl-C) while `up` stops its services: none outlives it."""
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-m", "interposer.cli", "up", "--state-dir", str(state),
                             "--nats-port", "0", "--metrics-port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (state / "stack.json").exists() or proc.poll() is not None, "stack.json", timeout_s=60)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: not (state / "stack.json").exists(), "the clean-up to begin", timeout_s=10)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    survivors = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout.split()
    for pid in survivors:  # not left behind by a failing run
        subprocess.run(["kill", "-9", pid], check=False)
    assert survivors == [], f"services left running: {survivors}"
    assert not (state / "collector.port").exists()
