"""Acknowledgement: desired vs applied revision, and ``set --wait`` with real workers."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys

import msgspec
import pytest

from interposer.cli._policy_client import policy_status, set_and_wait, set_policy
from interposer.proto import StatusReply, subjects

from interposer_testing import wait_until

DELAY = b'{"layers": [{"type": "delay", "delay_s": 0.001}]}'


def _cli(nats_url: str, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "INTERPOSER_NATS_URL": nats_url}
    return subprocess.run([sys.executable, "-m", "interposer.cli", "policy", *args], input=stdin,
                          capture_output=True, env=env, timeout=60)


def _status(nats_url: str, volume: str):  # noqa: ANN202
    reply = asyncio.run(policy_status(nats_url, volume))
    assert reply.ok and [v.volume for v in reply.volumes] == [volume]
    return reply.volumes[0]


def test_set_wait_returns_once_the_worker_applied_and_status_shows_it(
        nats_url, policy_service, mount_worker, fresh_volume) -> None:
    volume = fresh_volume
    mount_worker(volume, nats_url=nats_url)
    wait_until(lambda: len(_status(nats_url, volume).workers) == 1, "the worker's first heartbeat")

    done = _cli(nats_url, "set", volume, "-", "--wait", "--timeout", "20", stdin=DELAY)
    assert done.returncode == 0, done.stderr
    revision = msgspec.json.decode(done.stdout)["revision"]
    assert f"revision {revision} applied by 1 worker" in done.stderr.decode()

    status = _status(nats_url, volume)
    assert status.desired_revision == revision and status.converged
    (worker,) = status.workers
    assert worker.applied_revision == revision and not worker.stale
    assert worker.applied_since_s >= status.desired_since_s - 1

    table = _cli(nats_url, "status", volume).stdout.decode().splitlines()
    assert table[0].split()[:4] == ["VOLUME", "DESIRED", "WORKER", "APPLIED"]
    assert volume in table[1] and worker.worker_id in table[1] and table[1].rstrip().endswith("ok")
    everything = msgspec.json.decode(_cli(nats_url, "status", "--json").stdout, type=StatusReply)
    assert volume in {v.volume for v in everything.volumes}


def test_set_wait_times_out_naming_a_worker_that_does_not_apply(
        nats_url, policy_service, mount_worker, fresh_volume) -> None:
    volume = fresh_volume
    vol = mount_worker(volume, nats_url=nats_url)
    wait_until(lambda: len(_status(nats_url, volume).workers) == 1, "the worker's first heartbeat")
    (worker,) = _status(nats_url, volume).workers
    os.kill(vol.proc.pid, signal.SIGSTOP)  # alive for the service (not stale yet), but applies nothing
    try:
        late = _cli(nats_url, "set", volume, "-", "--wait", "--timeout", "1", stdin=DELAY)
    finally:
        os.kill(vol.proc.pid, signal.SIGCONT)
    assert late.returncode == 3, late.stderr
    assert worker.worker_id in late.stderr.decode() and "not applied by" in late.stderr.decode()
    revision = msgspec.json.decode(late.stdout)["revision"]
    wait_until(lambda: _status(nats_url, volume).converged, "the resumed worker to apply the revision")
    assert _status(nats_url, volume).workers[0].applied_revision == revision


def test_an_unmounted_worker_leaves_the_status_and_a_killed_one_turns_stale(
        nats_url, policy_service, mount_worker, fresh_volume) -> None:
    """A worker that stopped on request says so in its last heartbeat: gone at once
    (not listed as stale for the 300 s a silent worker is kept)."""
    volume = fresh_volume
    unmounted = mount_worker(volume, nats_url=nats_url)
    killed = mount_worker(volume, nats_url=nats_url)
    wait_until(lambda: len(_status(nats_url, volume).workers) == 2, "both workers' first heartbeats")
    assert unmounted.unmount() == 0
    killed.proc.kill()
    killed.proc.wait()
    subprocess.run(["fusermount3", "-uz", str(killed.mountpoint)], check=False, capture_output=True)
    wait_until(lambda: len(_status(nats_url, volume).workers) == 1, "the unmounted worker to leave the status")
    wait_until(lambda: _status(nats_url, volume).workers[0].stale, "the killed worker to turn stale",
               timeout_s=15)


def test_set_wait_without_workers(nats_url, policy_service, fresh_volume) -> None:
    none = asyncio.run(set_and_wait(nats_url, fresh_volume, subjects.policy_set(fresh_volume), DELAY, timeout_s=0.5))
    assert none.reply.ok and not none.complete and "no worker" in next(iter(none.laggards))
    optional = asyncio.run(set_and_wait(nats_url, fresh_volume, subjects.policy_set(fresh_volume), DELAY,
                                        min_workers=0, timeout_s=0.5))
    assert optional.complete
    rejected = _cli(nats_url, "set", fresh_volume, "-", "--wait", stdin=b'{"layers": 3}')
    assert rejected.returncode == 1 and b"$.layers" in rejected.stdout


def test_status_of_a_volume_without_workers(nats_url, policy_service, fresh_volume) -> None:
    reply = asyncio.run(set_policy(nats_url, fresh_volume, DELAY))
    status = _status(nats_url, fresh_volume)
    assert (status.desired_revision, status.workers, status.converged) == (reply.revision, [], False)
    assert status.desired_since_s > 0
    shown = _cli(nats_url, "status", fresh_volume, "--json")
    assert shown.returncode == 0, shown.stderr
    volume = msgspec.json.decode(shown.stdout)["volumes"][0]  # scripts read these keys: none may be left out
    assert (volume["workers"], volume["converged"], volume["desired_revision"]) == ([], False, reply.revision)


def test_set_wait_warns_of_open_files_kernel_passthrough_keeps_from_the_new_layers(
        nats_url, policy_service, mount_worker, fresh_volume) -> None:
    volume = fresh_volume
    vol = mount_worker(volume, nats_url=nats_url, extra=["--kernel-passthrough"])
    (vol.backing / "data").write_bytes(b"d" * 4096)
    wait_until(lambda: len(_status(nats_url, volume).workers) == 1, "the worker's first heartbeat")
    held = os.open(vol.mountpoint / "data", os.O_RDONLY)  # opened in passthrough: no layer in force
    try:
        elsewhere = b'{"layers": [{"type": "fault", "errno": "EIO", "ops": ["read"], "path_glob": "/other/*"}]}'
        done = _cli(nats_url, "set", volume, "-", "--wait", "--timeout", "20", stdin=elsewhere)
        assert done.returncode == 0 and "kernel passthrough" not in done.stderr.decode(), done.stderr
        fault = b'{"layers": [{"type": "fault", "errno": "EIO", "ops": ["read"]}]}'
        done = _cli(nats_url, "set", volume, "-", "--wait", "--timeout", "20", stdin=fault)
        assert done.returncode == 0, done.stderr
        assert "1 open file(s) bypass this policy's layers" in done.stderr.decode()
        assert os.pread(held, 4096, 0) == b"d" * 4096  # what the warning says: the fault does not reach it
    finally:
        os.close(held)
    reopened = os.open(vol.mountpoint / "data", os.O_RDONLY)  # not passed through while the fault is in force
    try:
        with pytest.raises(OSError) as info:
            os.pread(reopened, 4096, 0)
        assert info.value.errno == errno.EIO
    finally:
        os.close(reopened)
    cleared = _cli(nats_url, "set", volume, "-", "--wait", "--timeout", "20", stdin=DELAY)
    assert "kernel passthrough" not in cleared.stderr.decode()  # nothing open in passthrough now


def test_set_wait_warns_of_open_files_whose_close_a_new_flush_layer_cannot_reach(
        nats_url, policy_service, mount_worker, fresh_volume) -> None:
    volume = fresh_volume
    vol = mount_worker(volume, nats_url=nats_url)
    wait_until(lambda: len(_status(nats_url, volume).workers) == 1, "the worker's first heartbeat")
    held = os.open(vol.mountpoint / "held", os.O_CREAT | os.O_WRONLY, 0o644)  # no layer on flush: opened without
    fault = b'{"layers": [{"type": "fault", "errno": "EIO", "ops": ["flush"]}]}'
    done = _cli(nats_url, "set", volume, "-", "--wait", "--timeout", "20", stdin=fault)
    assert done.returncode == 0, done.stderr
    assert "1 open file(s) bypass this policy's layers" in done.stderr.decode()
    os.close(held)  # what the warning says: the fault does not reach this close
    reopened = os.open(vol.mountpoint / "held", os.O_WRONLY)
    with pytest.raises(OSError) as info:
        os.close(reopened)
    assert info.value.errno == errno.EIO
