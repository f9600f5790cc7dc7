"""What a user sees when something is wrong: one line saying what, an exit code, never a hang or a traceback.

Found by a first-user review (session 26): every `interposer policy` command retried a
refused NATS connection for ever (nats-py reads ``max_reconnect_attempts=0`` as "no
limit" even for a first connection), `policy watch` could then not be stopped, `up`
took another stack's nats-server on its port for its own, and bad volume ids or a
bad ``--log-level`` ended in Python tracebacks.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from interposer.cli._policy_render import summarize
from interposer.cli._procs import free_port
from interposer.proto import decode_policy

CLI = [sys.executable, "-m", "interposer.cli"]


def _run(*args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    # A hang fails the test (TimeoutExpired) rather than the suite.
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout_s,
                          env={"PATH": "/usr/bin:/bin", "INTERPOSER_STATE_DIR": "/nonexistent"})


@pytest.mark.parametrize("command", [
    ["policy", "get", "data"], ["policy", "status"], ["policy", "list"], ["policy", "history", "data"],
    ["policy", "clear", "data"], ["policy", "watch"], ["policy", "rollback", "data", "1"],
])
def test_an_unreachable_nats_fails_at_once_with_one_line(command: list[str]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    result = _run(*command, "--nats-url", url, timeout_s=20)
    assert result.returncode == 1, result.stderr
    assert f"cannot connect to NATS at {url}: connection refused" in result.stderr
    assert "Traceback" not in result.stderr and "encountered error" not in result.stderr


@pytest.mark.parametrize(("command", "says"), [
    (["policy", "get", "a.b"], "'a.b' is not a volume id"),
    (["policy", "status", "a b"], "'a b' is not a volume id"),
    (["policy", "clear", "*"], "'*' is not a volume id"),
    (["policy", "set", "a.b", "-"], "'a.b' is not a volume id"),
    (["policy", "get", "_sel.gpu"], "'_sel.gpu' is a selector policy: `interposer policy history _sel.gpu`"),
    (["--log-level", "bogus", "policy", "list"], "'bogus' is not one of"),
    (["demo", "--work-dir", "/nonexistent/demo"], "Directory '/nonexistent/demo' does not exist"),
])
def test_a_bad_argument_is_a_usage_error_not_a_traceback(command: list[str], says: str) -> None:
    result = _run(*command)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flag", ["--nats-port", "--metrics-port"])
def test_up_refuses_a_taken_port_before_starting_anything(tmp_path: Path, flag: str) -> None:
    with socket.socket() as holder:  # another stack's server, as far as `up` can tell
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        other = "--metrics-port" if flag == "--nats-port" else "--nats-port"
        result = _run("up", "--state-dir", str(tmp_path / "state"), flag, str(port), other, "0", timeout_s=60)
    assert result.returncode == 1, result.stderr
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr and f"pass {flag} 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "nats").exists()  # nothing was started


def test_history_shows_what_each_layer_sets_not_its_defaults() -> None:
    assert summarize(decode_policy(b'{"layers": [{"type": "profile", "name": "s3"}]}')) == \
        '{"type":"profile","name":"s3"}'  # was a line of defaults cut before the name
    fault = b'{"layers": [{"type": "fault", "errno": "ENOSPC", "ops": ["write"], "probability": 0.5}]}'
    assert summarize(decode_policy(fault)) == '{"type":"fault","ops":["write"],"errno":"ENOSPC","probability":0.5}'


def test_validate_fills_in_defaults_but_not_fields_a_layer_ignores(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text('{"layers": [{"type": "quota", "bytes": 1000}, {"type": "fault", "kind": "short_read"},'
                      ' {"type": "fault", "errnos": {"EIO": 1}}, {"type": "delay", "delay_s": 0.001},'
                      ' {"type": "delay", "delay_s": 0.001, "mode": "floor"}]}')
    result = _run("policy", "validate", str(policy))
    assert result.returncode == 0, result.stderr
    quota, short, weighted, added, floor = json.loads(result.stdout)["layers"]
    assert "one_floor_per_call" not in added and floor["one_floor_per_call"] is True  # only a floor spans a call
    assert quota["errno"] == "ENOSPC" and quota["inodes"] is None  # defaults in force are shown
    assert not {"ops", "path_glob", "page_cache"} & quota.keys()  # a quota is volume-wide, cache or not
    assert short["short_ratio"] == 0.5 and short["page_cache"] == "bypass"
    assert not {"errno", "errnos", "corrupt_bytes", "corrupt_mode"} & short.keys()
    assert weighted["errnos"] == {"EIO": 1} and "errno" not in weighted
