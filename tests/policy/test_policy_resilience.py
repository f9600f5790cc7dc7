"""Resilience with a real nats-server that the tests stop and restart (same port, same store)."""

from __future__ import annotations

import asyncio
import errno
import signal
import subprocess
import sys
import time

from interposer.cli._policy_client import PolicyClientError, get_policy, policy_status, set_policy
from interposer.cli._procs import Child, free_port

from interposer_testing import is_fuse_mount, read_errno, require_fuse, wait_until

FAULT = b'{"layers": [{"type": "fault", "errno": "EIO", "ops": ["read"]}]}'
DENY = b'{"layers": [{"type": "fault", "errno": "EACCES", "ops": ["read"]}]}'


def _applied(url: str, volume: str) -> int:
    volumes = asyncio.run(policy_status(url, volume)).volumes
    return max((w.applied_revision for w in volumes[0].workers if not w.stale), default=-1)


def test_a_worker_starting_later_serves_the_stored_policy_from_its_first_request(
        private_bus, mount_worker, tmp_path) -> None:
    assert asyncio.run(set_policy(private_bus.url, "late", FAULT)).ok
    backing = tmp_path / "late-backing"
    backing.mkdir()
    (backing / "data.bin").write_bytes(b"x" * 8192)
    vol = mount_worker("late", nats_url=private_bus.url, backing=backing)
    assert read_errno(vol.mountpoint / "data.bin") == errno.EIO  # the very first read: no polling


def test_nats_restart_worker_keeps_serving_and_converges_to_the_newest_revision(private_bus, mount_worker) -> None:
    url = private_bus.url
    vol = mount_worker("restart", nats_url=url)
    data = vol.mountpoint / "data.bin"
    data.write_bytes(b"x" * 8192)
    first = asyncio.run(set_policy(url, "restart", FAULT))
    wait_until(lambda: read_errno(data) == errno.EIO, "the first policy")

    private_bus.stop_nats()
    time.sleep(1.0)
    assert read_errno(data) == errno.EIO  # NATS down: the last policy stays in force
    assert (vol.mountpoint / "other.txt").write_text("still serving") == 13

    private_bus.start_nats()  # same port and JetStream store: the bucket survives
    wait_until(lambda: _policy_service_answers(url), "the policy service to reconnect", timeout_s=15)
    newest = asyncio.run(set_policy(url, "restart", DENY))
    assert newest.revision > first.revision
    wait_until(lambda: read_errno(data) == errno.EACCES, "the worker to apply the revision set after the restart",
               timeout_s=15)
    wait_until(lambda: _applied(url, "restart") == newest.revision, "the heartbeat to report it", timeout_s=15)
    assert vol.proc.poll() is None


def _policy_service_answers(url: str) -> bool:
    from interposer.cli._policy_client import PolicyClientError, get_policy

    try:
        return asyncio.run(get_policy(url, "_probe", timeout_s=1)).ok
    except PolicyClientError:
        return False


def test_policy_service_down_worker_keeps_its_policy_and_follows_again_after(private_bus, mount_worker) -> None:
    url = private_bus.url
    vol = mount_worker("svcdown", nats_url=url)
    data = vol.mountpoint / "data.bin"
    data.write_bytes(b"x" * 8192)
    asyncio.run(set_policy(url, "svcdown", FAULT))
    wait_until(lambda: read_errno(data) == errno.EIO, "the policy")
    private_bus.stop_policy()
    time.sleep(1.5)
    assert read_errno(data) == errno.EIO and vol.proc.poll() is None
    private_bus.start_policy()
    asyncio.run(set_policy(url, "svcdown", DENY))
    wait_until(lambda: read_errno(data) == errno.EACCES, "the change after the service came back")


def test_worker_started_while_nats_is_down_serves_passthrough_then_the_stored_policy(
        private_bus, mount_worker) -> None:
    url = private_bus.url
    assert asyncio.run(set_policy(url, "offline", FAULT)).ok
    private_bus.stop_policy()
    private_bus.stop_nats()
    vol = mount_worker("offline", nats_url=url, extra=["--policy-wait", "0.5"])
    data = vol.mountpoint / "data.bin"
    data.write_bytes(b"x" * 8192)
    assert read_errno(data) == 0  # passthrough while the bus is unreachable
    private_bus.start_nats()
    wait_until(lambda: read_errno(data) == errno.EIO, "the stored policy once NATS is back", timeout_s=20)


def test_refuse_mode_does_not_mount_without_the_bus(tmp_path) -> None:
    require_fuse()
    backing, mountpoint = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mountpoint.mkdir()
    dead = f"nats://127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "interposer.fuse_worker", "--backing-dir", str(backing), "--mountpoint",
         str(mountpoint), "--volume-id", "refused", "--nats-url", dead, "--policy-wait", "0.5",
         "--on-bus-unreachable", "refuse"], capture_output=True, timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert b"not mounting (on_bus_unreachable=refuse)" in proc.stderr
    assert not is_fuse_mount(mountpoint)


def test_a_policy_service_started_before_nats_waits_for_it_quietly(private_bus, tmp_path) -> None:
    """Started first (a pod scheduled before the NATS one), the service retries without a traceback per attempt."""
    private_bus.stop_policy()
    private_bus.stop_nats()
    log_path = tmp_path / "early-policy.log"
    early = Child("policy", [sys.executable, "-m", "interposer.policy", "--nats-url", private_bus.url],
                  log_path).start()
    try:
        time.sleep(5)  # two reconnect attempts or more
        assert early.proc.poll() is None, log_path.read_text()
        text = log_path.read_text()
        assert "Traceback" not in text
        assert text.count(f"NATS {private_bus.url}: ConnectionRefusedError") == 1, text
        private_bus.start_nats()
        wait_until(lambda: _answers(private_bus.url), "the service to answer once NATS is up", timeout_s=20)
        assert asyncio.run(set_policy(private_bus.url, "late", FAULT)).ok
    finally:
        early.stop()


def test_a_policy_service_stopped_while_nats_is_down_exits_cleanly(private_bus) -> None:
    """A rollout that stops NATS first: SIGTERM still ends the service with status 0, no traceback."""
    service = private_bus.policy
    private_bus.stop_nats()
    wait_until(lambda: "ConnectionRefusedError" in service.log_path.read_text(), "the service to notice")
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(30) == 0, service.log_tail()
    assert "Traceback" not in service.log_path.read_text()


def test_the_policy_service_defaults_to_the_local_nats_server() -> None:
    out = subprocess.run([sys.executable, "-m", "interposer.policy", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "[default: nats://127.0.0.1:4222]" in " ".join(out.split())  # help text wraps


def _answers(url: str) -> bool:
    try:
        return asyncio.run(get_policy(url, "_probe", timeout_s=1)).ok
    except PolicyClientError:
        return False
