"""NATS authentication and per-role permissions, on a real nats-server with the generated config."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import subprocess
import sys
import urllib.request

import nats
import pytest
from click.testing import CliRunner
from interposer_testing import REPO_ROOT, read_errno, wait_until

from interposer.cli.__main__ import main as cli
from interposer.cli._auth import (
    ROLES,
    ensure_credentials,
    kubernetes_auth_conf,
    password_env,
    server_config,
    write_server_config,
)
from interposer.cli._policy_client import PolicyClientError, get_policy, policy_status, request, set_policy
from interposer.cli._procs import start_nats_server
from interposer.cli._stack import EmbeddedStack
from interposer.proto import HistoryReply, ListReply, StatusReply, subjects
from interposer.proto.connection import CredentialsError, connect_options, load_credentials

FAULT_READS = b'{"layers": [{"type": "fault", "errno": "EIO", "ops": ["read"]}]}'
DELAY = b'{"layers": [{"type": "delay", "delay_s": 0.001}]}'
#: Short: a denied request is dropped by the server, so the client only sees a timeout.
DENIED_TIMEOUT_S = 1.0
KV_SUBJECT_PREFIX = f"$KV.{subjects.POLICY_KV_BUCKET}"


async def _connect(bus, role: str, errors: list[str]) -> nats.NATS:  # noqa: ANN001 - AuthBus
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    return await nats.connect(bus.url, allow_reconnect=False, connect_timeout=2, error_cb=on_error,
                              **connect_options(bus.creds[role]))


def _stored(bus, volume: str):  # noqa: ANN001, ANN202 - AuthBus (tests/policy/conftest.py) → PolicyReply
    return asyncio.run(get_policy(bus.url, volume, creds_file=bus.creds["user"]))


def _violations(errors: list[str]) -> str:
    return "\n".join(e for e in errors if "permissions violation" in e)


def test_anonymous_connections_are_refused_and_an_anonymous_set_changes_nothing(auth_bus, fresh_volume) -> None:
    before = asyncio.run(set_policy(auth_bus.url, fresh_volume, FAULT_READS, creds_file=auth_bus.creds["user"]))
    assert before.ok

    async def anonymous() -> None:
        nc = await nats.connect(auth_bus.url, allow_reconnect=False, connect_timeout=2)
        await nc.publish(subjects.policy_set(fresh_volume), DELAY)  # `nats pub` without credentials
        await nc.close()

    with pytest.raises(Exception) as refused:
        asyncio.run(anonymous())
    assert "authorization" in f"{type(refused.value).__name__} {refused.value}".lower()
    with pytest.raises(PolicyClientError, match="cannot connect"):
        asyncio.run(set_policy(auth_bus.url, fresh_volume, DELAY, timeout_s=DENIED_TIMEOUT_S))
    wrong = auth_bus.state_dir / "wrong.json"
    wrong.write_text(json.dumps({"user": "user", "password": "not-the-password"}))
    with pytest.raises(PolicyClientError, match="cannot connect"):
        asyncio.run(set_policy(auth_bus.url, fresh_volume, DELAY, creds_file=str(wrong)))
    after = _stored(auth_bus, fresh_volume)
    assert after.revision == before.revision
    assert after.policy is not None and after.policy.layers[0].errno == "EIO"


def test_worker_credentials_read_policy_but_cannot_write_it(auth_bus, fresh_volume) -> None:
    before = asyncio.run(set_policy(auth_bus.url, fresh_volume, FAULT_READS, creds_file=auth_bus.creds["user"]))
    assert before.ok
    errors: list[str] = []

    async def as_worker() -> int:
        nc = await _connect(auth_bus, "worker", errors)
        try:
            js = nc.jetstream(timeout=DENIED_TIMEOUT_S)
            kv = await js.key_value(subjects.POLICY_KV_BUCKET)
            watcher = await kv.watch(fresh_volume)  # what a worker does: allowed
            entry = await watcher.updates(timeout=5)
            await watcher.stop()
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await kv.put(fresh_volume, b'{"policy": {}}')  # KV put = publish on $KV.…
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await js.purge_stream(f"KV_{subjects.POLICY_KV_BUCKET}")
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await nc.request(subjects.policy_set(fresh_volume), DELAY, timeout=DENIED_TIMEOUT_S)
            # Nor may it pose as the policy service (answer requests itself).
            await nc.subscribe(f"{subjects.POLICY_SET_PREFIX}.*")
            await nc.flush()
            await asyncio.sleep(0.2)  # the -ERR of a subscription arrives after the PONG
            return entry.revision
        finally:
            await nc.close()

    assert asyncio.run(as_worker()) == before.revision
    denied = _violations(errors)
    assert f"publish to \"{KV_SUBJECT_PREFIX}.{fresh_volume}\"".lower() in denied
    assert "stream.purge" in denied
    assert f"publish to \"{subjects.policy_set(fresh_volume)}\"" in denied
    assert "subscription to \"interposer.policy.set.*\"" in denied
    after = _stored(auth_bus, fresh_volume)
    assert after.revision == before.revision
    assert after.policy is not None and after.policy.layers[0].errno == "EIO"


def test_collector_and_user_credentials_cannot_write_the_bucket(auth_bus, fresh_volume) -> None:
    before = asyncio.run(set_policy(auth_bus.url, fresh_volume, FAULT_READS, creds_file=auth_bus.creds["user"]))
    with pytest.raises(PolicyClientError, match="not allowed to publish"):
        asyncio.run(set_policy(auth_bus.url, fresh_volume, DELAY, timeout_s=DENIED_TIMEOUT_S,
                               creds_file=auth_bus.creds["collector"]))
    errors: list[str] = []

    async def direct_put(role: str) -> None:
        nc = await _connect(auth_bus, role, errors)
        try:
            js = nc.jetstream(timeout=DENIED_TIMEOUT_S)
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await js.publish(f"{KV_SUBJECT_PREFIX}.{fresh_volume}", b'{"policy": {}}')
        finally:
            await nc.close()

    for role in ("collector", "user"):
        asyncio.run(direct_put(role))
    assert _violations(errors).count(f"publish to \"{KV_SUBJECT_PREFIX}.{fresh_volume}\"".lower()) == 2
    assert _stored(auth_bus, fresh_volume).revision == before.revision


def test_a_worker_with_its_credentials_applies_policy_and_acknowledges(auth_bus, mount_worker, fresh_volume) -> None:
    user = auth_bus.creds["user"]
    volume = mount_worker(fresh_volume, nats_url=auth_bus.url, extra=["--nats-creds", auth_bus.creds["worker"]])
    data = volume.mountpoint / "data"
    data.write_bytes(b"x" * 8192)
    reply = asyncio.run(set_policy(auth_bus.url, fresh_volume, FAULT_READS, creds_file=user))
    assert reply.ok
    wait_until(lambda: read_errno(data) == errno.EIO, "the worker to apply the fault policy")

    def acknowledged() -> bool:
        status = asyncio.run(policy_status(auth_bus.url, fresh_volume, creds_file=user))
        return any(w.applied_revision == reply.revision for v in status.volumes for w in v.workers)

    wait_until(acknowledged, "the worker's heartbeat (published with worker credentials)")
    assert "permissions violation" not in volume.log().lower()


def test_cli_sets_policy_with_user_credentials_and_names_a_bad_file(auth_bus, fresh_volume, tmp_path) -> None:
    policy_file = tmp_path / "p.json"
    policy_file.write_bytes(DELAY)
    runner = CliRunner()
    ok = runner.invoke(cli, ["policy", "set", fresh_volume, str(policy_file), "--nats-url", auth_bus.url,
                             "--nats-creds", auth_bus.creds["user"]])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["ok"] is True
    via_env = runner.invoke(cli, ["policy", "get", fresh_volume, "--nats-url", auth_bus.url],
                            env={"INTERPOSER_NATS_CREDS": auth_bus.creds["user"]})
    assert via_env.exit_code == 0, via_env.output
    assert json.loads(via_env.output)["policy"]["layers"][0]["type"] == "delay"
    bad = tmp_path / "bad.json"
    bad.write_text('{"user": "user", "passwd": "x"}')
    rejected = runner.invoke(cli, ["policy", "get", fresh_volume, "--nats-url", auth_bus.url,
                                   "--nats-creds", str(bad)])
    assert rejected.exit_code == 1
    assert "passwd" in rejected.output and str(bad) in rejected.output


def test_services_refuse_a_malformed_credentials_file(tmp_path) -> None:
    bad = tmp_path / "creds.json"
    bad.write_text('{"user": 7}')
    with pytest.raises(CredentialsError, match=r"\$\.user"):
        load_credentials(bad)
    for module in ("interposer.policy", "interposer.collector"):
        proc = subprocess.run([sys.executable, "-m", module, "--nats-creds", str(bad)],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 2, (module, proc.stderr)
        assert "$.user" in proc.stderr and str(bad) in proc.stderr


def test_generated_credentials_are_private_and_kept(tmp_path) -> None:
    first = ensure_credentials(tmp_path)
    assert set(first) == set(ROLES)
    assert stat.S_IMODE(os.stat(tmp_path / "credentials").st_mode) == 0o700
    passwords = {}
    for role, path in first.items():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, role
        creds = load_credentials(path)
        assert creds.user == role and len(creds.password) >= 40
        passwords[role] = creds.password
    assert len(set(passwords.values())) == len(ROLES)
    os.chmod(first["user"], 0o644)
    again = ensure_credentials(tmp_path)
    assert {r: load_credentials(p).password for r, p in again.items()} == passwords
    assert stat.S_IMODE(os.stat(again["user"]).st_mode) == 0o600
    config = write_server_config(tmp_path / "nats.conf", again)
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    assert "no_auth_user" not in config.read_text()


def _self_signed(directory) -> tuple[str, str]:  # noqa: ANN001 - Path
    """A self-signed certificate for 127.0.0.1 made with openssl: ``(cert, key)`` paths."""
    cert, key = directory / "server.pem", directory / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def test_tls_by_configuration(tmp_path) -> None:
    """The server serves TLS from its config; clients verify it with the `ca` of their credentials file."""
    cert, key = _self_signed(tmp_path)
    creds = ensure_credentials(tmp_path, ca=cert)
    assert load_credentials(creds["user"]).ca == cert
    config = tmp_path / "nats.conf"
    config.write_bytes(server_config(creds, tls_cert=cert, tls_key=key))
    child, url = start_nats_server(tmp_path / "nats", config_file=config)
    try:
        async def connect(options: dict) -> bool:
            nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2, **options)
            try:
                return nc.is_connected and nc.client_id is not None
            finally:
                await nc.close()

        assert asyncio.run(connect(connect_options(creds["user"])))
        plain = {"user": "user", "password": load_credentials(creds["user"]).password}
        with pytest.raises(Exception):
            asyncio.run(connect(plain))  # no TLS context: the server requires TLS
    finally:
        child.stop()


def test_embedded_stack_runs_with_auth_and_the_cli_uses_its_user_credentials(tmp_path, fresh_volume) -> None:
    state = tmp_path / "state"
    with EmbeddedStack(state, metrics_port=0) as endpoints:
        assert endpoints.user_creds == str(state / "credentials" / "user.json")
        recorded = json.loads((state / "stack.json").read_text())
        assert recorded["user_creds"] == endpoints.user_creds and "password" not in json.dumps(recorded)
        env = {**os.environ, "INTERPOSER_STATE_DIR": str(state)}
        env.pop("INTERPOSER_NATS_URL", None)
        env.pop("INTERPOSER_NATS_CREDS", None)
        policy_file = tmp_path / "p.json"
        policy_file.write_bytes(DELAY)
        proc = subprocess.run([sys.executable, "-m", "interposer.cli", "policy", "set", fresh_volume,
                               str(policy_file)], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["ok"] is True
        with pytest.raises(PolicyClientError, match="cannot connect"):
            asyncio.run(get_policy(endpoints.nats_url, fresh_volume, timeout_s=DENIED_TIMEOUT_S))
        for role in ROLES:
            assert stat.S_IMODE(os.stat(state / "credentials" / f"{role}.json").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(state / "nats" / "nats.conf").st_mode) == 0o600


def test_deploy_auth_conf_is_generated_from_the_permissions_and_serves(tmp_path, monkeypatch) -> None:
    """deploy/base/nats/auth.conf is current, and a nats-server with it accepts a mounted Secret's credentials."""
    auth_conf = REPO_ROOT / "deploy" / "base" / "nats" / "auth.conf"
    assert auth_conf.read_text() == kubernetes_auth_conf(), (
        "deploy/base/nats/auth.conf is stale: run `python -m interposer.cli._auth > deploy/base/nats/auth.conf`")
    for role in ROLES:
        monkeypatch.setenv(password_env(role), f"secret-of-{role}")
    config = tmp_path / "nats.conf"  # as deploy/base/nats/nats.conf: include a file next to it
    (tmp_path / "auth.conf").write_text(auth_conf.read_text())
    config.write_text("include auth.conf\n")
    secret = tmp_path / "secret"  # as Kubernetes mounts a kubernetes.io/basic-auth Secret
    secret.mkdir()
    (secret / "username").write_text("user")
    (secret / "password").write_text("secret-of-user")
    child, url = start_nats_server(tmp_path / "nats", config_file=config)
    try:
        async def connect(options: dict) -> bool:
            nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2, **options)
            await nc.close()
            return True

        assert asyncio.run(connect(connect_options(secret)))
        with pytest.raises(Exception):
            asyncio.run(connect({}))
    finally:
        child.stop()


def test_the_policy_role_covers_every_request_the_service_answers(auth_bus, fresh_volume) -> None:
    user = auth_bus.creds["user"]

    def ask(subject: str, body: bytes = b"", kind=None):  # noqa: ANN001, ANN202
        kwargs = {"kind": kind} if kind else {}
        reply = asyncio.run(request(auth_bus.url, subject, body, creds_file=user, **kwargs))
        assert reply.ok, (subject, reply.error)
        return reply

    first = ask(subjects.policy_set(fresh_volume), FAULT_READS)
    ask(subjects.policy_set(fresh_volume), DELAY)
    ask(subjects.policy_rollback(fresh_volume), json.dumps({"revision": first.revision}).encode())
    assert len(ask(subjects.policy_history(fresh_volume), kind=HistoryReply).entries) == 3
    ask(subjects.POLICY_LIST, kind=ListReply)
    ask(subjects.policy_status(fresh_volume), kind=StatusReply)
    ask(subjects.policy_clear(fresh_volume))
    ask(subjects.policy_select(fresh_volume), b'{"selector": {"namespace": "nobody"}, "policy": {}}')
    ask(subjects.policy_unselect(fresh_volume))
    log = (auth_bus.state_dir / "policy.log").read_text().lower()
    assert "permissions violation" not in log and "traceback" not in log


def test_embedded_stack_over_tls(tmp_path, fresh_volume) -> None:
    """Every service of the stack connects over TLS with the CA from its credentials file."""
    cert, key = _self_signed(tmp_path)
    with EmbeddedStack(tmp_path / "state", metrics_port=0, tls_cert=cert, tls_key=key, tls_ca=cert) as endpoints:
        reply = asyncio.run(set_policy(endpoints.nats_url, fresh_volume, DELAY, creds_file=endpoints.user_creds))
        assert reply.ok  # the policy service (TLS) stored it; the client verified the server
        with urllib.request.urlopen(endpoints.metrics_url, timeout=5) as response:
            metrics = response.read().decode()
        assert "interposer_collector_nats_connected 1.0" in metrics


def test_a_worker_cannot_make_jetstream_send_requests_on_its_behalf(auth_bus, fresh_volume) -> None:
    """A push consumer delivering the bucket's records to `interposer.policy.clear.<victim>` changes nothing.

    Creating a consumer is allowed to workers (a KV watch is one) and nats-server
    does not check its deliver subject against the creator's permissions. It is
    harmless because a delivered message keeps its own subject (`$KV.…`) and the
    service dispatches on the message subject, not on the subscription's.
    """
    before = asyncio.run(set_policy(auth_bus.url, fresh_volume, FAULT_READS, creds_file=auth_bus.creds["user"]))
    errors: list[str] = []

    async def as_worker() -> None:
        nc = await _connect(auth_bus, "worker", errors)
        try:
            js = nc.jetstream(timeout=2)
            try:
                await js.add_consumer(f"KV_{subjects.POLICY_KV_BUCKET}", nats.js.api.ConsumerConfig(
                    deliver_subject=subjects.policy_clear(fresh_volume), deliver_group=subjects.POLICY_QUEUE, ack_policy="none",
                    deliver_policy="all", inactive_threshold=5.0))
            except Exception:  # noqa: BLE001 - a refusal is as good
                pass
            await asyncio.sleep(1.0)
        finally:
            await nc.close()

    asyncio.run(as_worker())
    after = _stored(auth_bus, fresh_volume)
    assert after.revision == before.revision
    assert after.policy is not None and after.policy.layers[0].errno == "EIO"
