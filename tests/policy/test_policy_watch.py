"""``interposer policy watch``: the real CLI process against a real nats-server and policy service."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from interposer.cli._policy_client import request, rollback_policy, set_policy
from interposer.proto import PolicyChange, subjects
from interposer_testing import wait_until

DELAY = b'{"layers": [{"type": "delay", "delay_s": 0.001}], "description": "slow"}'
FAULT = b'{"layers": [{"type": "fault", "errno": "EIO", "ops": ["read"]}]}'
BAD = b'{"layers": [{"type": "fault", "probability": 2}]}'
#: Longest wait for one line of the watch (a failure guard, not a measured time), seconds.
LINE_TIMEOUT_S = 30.0


class Watch:
    """``python -m interposer.cli policy watch …`` with its stdout read line by line in a thread."""

    def __init__(self, nats_url: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "interposer.cli", "policy", "watch", *args, "--nats-url", nats_url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.errors: queue.Queue[bytes] = queue.Queue()
        for stream, sink in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _pump(stream, sink: queue.Queue[bytes]) -> None:  # noqa: ANN001 - a pipe
        for line in iter(stream.readline, b""):
            sink.put(line)
        sink.put(b"")  # EOF

    def wait_ready(self) -> str:
        """Wait for the "watching … after revision N" line on stderr; return it."""
        try:
            line = self.errors.get(timeout=LINE_TIMEOUT_S).decode()
        except queue.Empty:
            pytest.fail("the watch did not say it was ready")
        assert line.startswith("watching "), line
        return line

    def next_change(self) -> PolicyChange:
        """The next JSON line on stdout, decoded."""
        try:
            line = self.lines.get(timeout=LINE_TIMEOUT_S)
        except queue.Empty:
            pytest.fail("no change reported")
        if not line:
            pytest.fail(f"the watch ended (exit {self.proc.poll()}): {self._stderr()}")
        return msgspec.json.decode(line, type=PolicyChange)

    def next_change_of(self, keys: set[str]) -> PolicyChange:
        """The next change of one of ``keys`` (an every-key watch also sees other tests' keys)."""
        while True:
            change = self.next_change()
            if change.volume in keys:
                return change

    def interrupt(self) -> int:
        """Ctrl-C; return the exit code."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=LINE_TIMEOUT_S)

    def _stderr(self) -> str:
        out = []
        while not self.errors.empty():
            out.append(self.errors.get().decode(errors="replace"))
        return "".join(out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    started: list[Watch] = []
    yield started
    for watch in started:
        watch.stop()


def test_watch_prints_each_new_revision_of_a_volume_until_ctrl_c(nats_url, policy_service, fresh_volume,
                                                                  watches) -> None:
    volume, other = fresh_volume, f"{fresh_volume}-other"
    before = asyncio.run(set_policy(nats_url, volume, FAULT, author="old@lab"))
    watch = Watch(nats_url, volume)
    watches.append(watch)
    ready = watch.wait_ready()
    assert int(ready.split(" after ")[1].split()[0]) >= before.revision  # the bucket's last revision then

    first = asyncio.run(set_policy(nats_url, volume, DELAY, author="alice@lab"))
    assert not asyncio.run(set_policy(nats_url, volume, BAD)).ok  # rejected: no revision, no line
    assert asyncio.run(set_policy(nats_url, other, FAULT)).ok  # another volume: not this watch's
    rolled = asyncio.run(rollback_policy(nats_url, volume, before.revision, author="bob@lab"))
    cleared = asyncio.run(request(nats_url, subjects.policy_clear(volume), author="carol@lab"))

    change = watch.next_change()  # the revision stored before the watch began is not printed
    assert (change.volume, change.revision, change.action, change.author) == (volume, first.revision, "set",
                                                                               "alice@lab")
    assert change.policy is not None and change.policy.description == "slow"
    assert change.policy.layers[0].delay_s == 0.001 and change.updated_at_s > 0
    change = watch.next_change()
    assert (change.revision, change.action, change.source_revision, change.author) == (
        rolled.revision, "rollback", before.revision, "bob@lab")
    assert change.policy.layers[0].errno == "EIO"
    change = watch.next_change()
    assert (change.revision, change.action, change.author) == (cleared.revision, "clear", "carol@lab")
    assert change.policy.layers == []
    assert watch.interrupt() == 0
    assert watch.lines.get(timeout=LINE_TIMEOUT_S) == b"", "nothing after the last change"


def test_watch_without_a_volume_follows_every_volume_and_selector(nats_url, policy_service, fresh_volume,
                                                                 watches) -> None:
    name = f"{fresh_volume}-sel"
    watch = Watch(nats_url)
    watches.append(watch)
    assert "every volume and selector" in watch.wait_ready()
    stored = asyncio.run(set_policy(nats_url, fresh_volume, DELAY, author="dan@lab"))
    select_body = (b'{"selector": {"namespace": "ml"}, '
                   b'"policy": {"layers": [{"type": "profile", "name": "gp3"}]}}')
    selected = asyncio.run(request(nats_url, subjects.policy_select(name), select_body, author="erin@lab"))
    assert stored.ok and selected.ok

    keys = {fresh_volume, subjects.selector_key(name)}
    change = watch.next_change_of(keys)
    assert (change.volume, change.revision, change.author) == (fresh_volume, stored.revision, "dan@lab")
    change = watch.next_change_of(keys)
    assert (change.volume, change.revision, change.action) == (subjects.selector_key(name), selected.revision,
                                                               "select")
    assert change.selector is not None and change.selector.namespace == "ml"
    assert change.policy.layers[0].name == "gp3"


def test_watch_resumes_after_a_nats_restart_without_losing_a_revision(private_bus, watches) -> None:
    url = private_bus.url
    watch = Watch(url, "resume")
    watches.append(watch)
    watch.wait_ready()
    first = asyncio.run(set_policy(url, "resume", DELAY))
    assert watch.next_change().revision == first.revision

    # The watch is frozen across the restart and while two revisions are stored, so
    # it can only learn of them by resuming after the last revision it printed.
    watch.proc.send_signal(signal.SIGSTOP)
    try:
        private_bus.stop_nats()
        private_bus.start_nats()  # same port and JetStream store
        wait_until(lambda: _stored(url, "resume") == first.revision, "the policy service to answer again",
                   timeout_s=20)
        second = asyncio.run(set_policy(url, "resume", FAULT))
        third = asyncio.run(set_policy(url, "resume", DELAY))
    finally:
        watch.proc.send_signal(signal.SIGCONT)
    assert [watch.next_change().revision, watch.next_change().revision] == [second.revision, third.revision]
    fourth = asyncio.run(set_policy(url, "resume", FAULT))
    assert watch.next_change().revision == fourth.revision
    assert watch.proc.poll() is None


def _stored(url: str, volume: str) -> int:
    from interposer.cli._policy_client import PolicyClientError, get_policy

    try:
        return asyncio.run(get_policy(url, volume, timeout_s=1)).revision or 0
    except PolicyClientError:
        return -1


def test_watch_refuses_a_bad_volume_and_a_bucket_that_does_not_exist(tmp_path: Path) -> None:
    from interposer.cli._procs import start_nats_server

    bad = subprocess.run([sys.executable, "-m", "interposer.cli", "policy", "watch", "a.b"],
                         capture_output=True, timeout=60)
    assert bad.returncode == 2 and b"'a.b' is neither a volume id" in bad.stderr
    child, url = start_nats_server(tmp_path / "nats")  # no policy service ever ran here
    try:
        empty = subprocess.run([sys.executable, "-m", "interposer.cli", "policy", "watch", "--nats-url", url],
                               capture_output=True, timeout=60)
    finally:
        child.stop()
    assert empty.returncode == 1 and b"no bucket 'interposer-policy'" in empty.stderr


def test_watch_with_user_credentials(auth_bus, fresh_volume, watches) -> None:
    """The ``user`` role may watch the bucket (it still cannot put a key: test_policy_auth)."""
    watch = Watch(auth_bus.url, fresh_volume, env={"INTERPOSER_NATS_CREDS": auth_bus.creds["user"]})
    watches.append(watch)
    watch.wait_ready()
    stored = asyncio.run(set_policy(auth_bus.url, fresh_volume, DELAY, creds_file=auth_bus.creds["user"]))
    assert stored.ok
    assert watch.next_change().revision == stored.revision
