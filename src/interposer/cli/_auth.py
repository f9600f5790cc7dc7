"""NATS users and per-role permissions of the embedded stack.

``ensure_credentials`` gives every role (worker, policy, collector, user) a random
password in ``<state_dir>/credentials/<role>.json`` (mode 0600, the
``--nats-creds`` format of :mod:`interposer.proto.connection`), keeping existing
files so a restarted stack and its still-running workers agree.
``server_config`` renders the nats-server configuration (JSON is valid NATS
config) with one user per role and no ``no_auth_user``, so anonymous connections
are refused. ``deploy/base/nats/auth.conf`` is rendered from the same
permissions by ``python -m interposer.cli._auth`` (:func:`kubernetes_auth_conf`;
a test checks it is current), with each password read from the environment.

Permissions are allow lists (nats-server ``authorization.users[].permissions``);
whatever a role's list does not name is denied, and the server answers a denied
publish with ``-ERR 'Permissions Violation'`` and drops the message.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

import msgspec

from interposer.proto import subjects
from interposer.proto.connection import (
    CredentialsError,
    NatsCredentials,
    encode_credentials,
    load_credentials,
)

#: Directory (inside the state dir) holding one credentials file per role.
CREDENTIALS_DIR = "credentials"
#: Random bytes in each generated password (``secrets.token_urlsafe``), bytes.
DEFAULT_PASSWORD_BYTES = 32
#: Mode of the credentials files and of the server config (they hold passwords).
SECRET_FILE_MODE = 0o600

_KV_STREAM = subjects.POLICY_KV_STREAM
#: The KV bucket's keys (a KV put is a publish here).
_KV_SUBJECTS = f"{subjects.POLICY_KV_SUBJECT_PREFIX}>"
#: Request replies and push-consumer deliveries (nats-py's default inbox prefix).
_INBOX = "_INBOX.>"
#: JetStream API calls on the policy bucket's stream: ``$JS.API.<KIND>.<VERB>.KV_…``
#: (STREAM.CREATE, STREAM.INFO, CONSUMER.CREATE/INFO/DELETE, DIRECT.GET), their longer
#: forms (``CONSUMER.CREATE.<stream>.<name>.<filter>``, ``DIRECT.GET.<stream>.<subject>``)
#: and ``STREAM.MSG.GET.<stream>`` (a read of one revision).
_JS_BUCKET_API = [f"$JS.API.*.*.{_KV_STREAM}", f"$JS.API.*.*.{_KV_STREAM}.>",
                   f"$JS.API.STREAM.MSG.GET.{_KV_STREAM}"]
#: What a KV watch (an ordered push consumer) needs besides creating the consumer:
#: flow-control replies.
_JS_FLOW_CONTROL = "$JS.FC.>"

#: What reading the bucket through a watch needs (a KV watch is an ordered push
#: consumer on the bucket's stream, delivered to an inbox): the stream's info, creating,
#: inspecting and deleting the consumer, and its flow-control replies. No KV put.
_KV_WATCH = [
    f"$JS.API.STREAM.INFO.{_KV_STREAM}",
    f"$JS.API.CONSUMER.CREATE.{_KV_STREAM}", f"$JS.API.CONSUMER.CREATE.{_KV_STREAM}.>",
    f"$JS.API.CONSUMER.INFO.{_KV_STREAM}.>", f"$JS.API.CONSUMER.DELETE.{_KV_STREAM}.>",
    _JS_FLOW_CONTROL,
]

#: Role → ``{"publish": {"allow": [...]}, "subscribe": {"allow": [...]}, ...}``.
PERMISSIONS: dict[str, dict[str, object]] = {
    # Reads its policy (KV watch = consumer on the bucket's stream, delivered to an
    # inbox) and publishes telemetry. It can neither put a KV key nor reach the
    # policy service's request subjects, nor listen to them.
    "worker": {
        "publish": {"allow": [
            f"{subjects.EVENTS_PREFIX}.*", f"{subjects.STATUS_PREFIX}.*", f"{subjects.FAULTS_PREFIX}.*",
            *_KV_WATCH,
        ]},
        "subscribe": {"allow": [_INBOX]},
    },
    # Only reads telemetry.
    "collector": {
        "publish": {"deny": [">"]},
        "subscribe": {"allow": [f"{subjects.EVENTS_PREFIX}.*", f"{subjects.STATUS_PREFIX}.*",
                                f"{subjects.FAULTS_PREFIX}.*", _INBOX]},
    },
    # The only writer of the bucket; answers requests (allow_responses lets it
    # publish to each requester's reply subject, and only once).
    "policy": {
        "publish": {"allow": [_KV_SUBJECTS, *_JS_BUCKET_API, _JS_FLOW_CONTROL]},
        "subscribe": {"allow": ["interposer.policy.>", f"{subjects.STATUS_PREFIX}.*", _INBOX]},
        "allow_responses": True,
    },
    # People (the CLI, `nats req`): may ask the policy service, follow heartbeats
    # (`set --wait`) and the bucket (`policy watch`), nothing else — in particular
    # not write the bucket directly.
    "user": {
        "publish": {"allow": ["interposer.policy.>", *_KV_WATCH]},
        "subscribe": {"allow": [f"{subjects.STATUS_PREFIX}.*", _INBOX]},
    },
}
#: Every role, in the order the files are written.
ROLES = tuple(PERMISSIONS)


def _write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600: temp file → fsync → ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET_FILE_MODE)
    try:
        os.fchmod(fd, SECRET_FILE_MODE)  # the file may have existed with another mode
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def credentials_path(state_dir: Path, role: str) -> Path:
    """Path of ``role``'s credentials file in a stack's state dir."""
    return state_dir / CREDENTIALS_DIR / f"{role}.json"


def ensure_credentials(state_dir: Path, ca: str = "") -> dict[str, str]:
    """Give every role a credentials file, keeping the passwords of valid existing ones.

    Args:
        state_dir: the stack's state directory.
        ca: CA bundle (PEM) the clients verify the server with (TLS); ``""`` = no TLS.

    Returns:
        role → path of its credentials file.
    """
    directory = state_dir / CREDENTIALS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    paths = {}
    for role in ROLES:
        path = credentials_path(state_dir, role)
        try:
            existing: NatsCredentials | None = load_credentials(path)
        except CredentialsError:
            existing = None
        if existing is None or existing.user != role or not existing.password:
            existing = NatsCredentials(user=role, password=secrets.token_urlsafe(DEFAULT_PASSWORD_BYTES))
            _write_secret(path, encode_credentials(msgspec.structs.replace(existing, ca=ca)))
        elif existing.ca != ca or path.stat().st_mode & 0o777 != SECRET_FILE_MODE:
            _write_secret(path, encode_credentials(msgspec.structs.replace(existing, ca=ca)))
        paths[role] = str(path)
    return paths


def server_config(credential_files: dict[str, str], *, tls_cert: str = "", tls_key: str = "",
                  tls_ca: str = "", tls_verify: bool = False) -> bytes:
    """Render the nats-server config holding one user per role.

    The listen address and JetStream come from the command line; this file only
    holds ``authorization`` (and ``tls`` when a certificate is given).

    Args:
        credential_files: role → credentials file (from :func:`ensure_credentials`).
        tls_cert: server certificate (PEM); ``""`` = no TLS.
        tls_key: its private key (PEM).
        tls_ca: CA that verifies client certificates (with ``tls_verify``).
        tls_verify: require client certificates.

    Returns:
        The config as JSON (nats-server reads JSON as config).
    """
    users = []
    for role, path in credential_files.items():
        credentials = load_credentials(path)
        users.append({"user": credentials.user, "password": credentials.password,
                      "permissions": PERMISSIONS[role]})
    config: dict[str, object] = {"authorization": {"users": users}}
    if tls_cert:
        tls: dict[str, object] = {"cert_file": tls_cert, "key_file": tls_key}
        if tls_ca:
            tls["ca_file"] = tls_ca
        if tls_verify:
            tls["verify"] = True
        config["tls"] = tls
    return msgspec.json.format(msgspec.json.encode(config), indent=2) + b"\n"


def write_server_config(path: Path, credential_files: dict[str, str], **tls: object) -> Path:
    """Write :func:`server_config` to ``path`` (mode 0600) and return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_secret(path, server_config(credential_files, **tls))  # type: ignore[arg-type]
    return path


def password_env(role: str) -> str:
    """Environment variable of the Kubernetes nats-server pod holding ``role``'s password."""
    return f"INTERPOSER_NATS_{role.upper()}_PASSWORD"


def kubernetes_auth_conf() -> str:
    """The ``authorization`` block of ``deploy/base/nats/auth.conf``.

    Same users and permissions as :func:`server_config`; each password is a
    nats-server environment reference (``$INTERPOSER_NATS_<ROLE>_PASSWORD``), which
    the StatefulSet fills from the Secret ``interposer-nats-<role>``.
    """
    lines = [
        "# Generated by `python -m interposer.cli._auth > deploy/base/nats/auth.conf` from",
        "# PERMISSIONS in src/interposer/cli/_auth.py; do not edit (a test checks it is current).",
        "# One user per role; no no_auth_user, so anonymous connections are refused. Each",
        "# password comes from the environment, set from the Secret interposer-nats-<role>.",
        "authorization {",
        "  users = [",
    ]
    for role, permissions in PERMISSIONS.items():
        lines.append(f"    {{user: {role}, password: ${password_env(role)},")
        lines.append(f"     permissions: {json.dumps(permissions)}}}")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(kubernetes_auth_conf())
