"""``interposer.policy.nats_secrets``: the per-role Secrets of a cluster install.

No Kubernetes API server runs here, so a small stand-in for ``CoreV1Api`` keeps
created Secrets and answers an existing name with the real client's
``ApiException(409)``; what the manifests grant is checked in tests/deploy.
"""

from __future__ import annotations

import pytest
from kubernetes.client.exceptions import ApiException

from interposer.cli._auth import PERMISSIONS
from interposer.policy.nats_secrets import ensure_nats_secrets
from interposer.proto.connection import NATS_ROLES, load_credentials, nats_secret_name


class SecretsApi:
    """``create_namespaced_secret`` of a ``CoreV1Api``, over a dict (see the module docstring)."""

    def __init__(self, status: int = 0) -> None:
        self.secrets: dict[tuple[str, str], dict] = {}
        self.status = status

    def create_namespaced_secret(self, namespace: str, body: dict) -> dict:
        if self.status:
            raise ApiException(status=self.status, reason="Forbidden")
        key = (namespace, body["metadata"]["name"])
        if key in self.secrets:
            raise ApiException(status=409, reason="AlreadyExists")
        self.secrets[key] = body
        return body


def test_creates_one_basic_auth_secret_per_role_that_services_can_read(tmp_path) -> None:
    api = SecretsApi()
    assert ensure_nats_secrets(api, "ns") == {role: "created" for role in NATS_ROLES}
    passwords = set()
    for role in NATS_ROLES:
        secret = api.secrets[("ns", nats_secret_name(role))]
        assert secret["type"] == "kubernetes.io/basic-auth"
        # Mounted as a volume, a Secret is one file per key: the --nats-creds directory layout.
        mounted = tmp_path / role
        mounted.mkdir()
        for key, value in secret["stringData"].items():
            (mounted / key).write_text(value)
        creds = load_credentials(str(mounted))
        assert creds.user == role and len(creds.password) >= 40
        passwords.add(creds.password)
    assert len(passwords) == len(NATS_ROLES), "every role gets its own password"


def test_a_second_run_keeps_every_existing_password() -> None:
    api = SecretsApi()
    ensure_nats_secrets(api, "ns")
    before = {k: v["stringData"]["password"] for k, v in api.secrets.items()}
    assert ensure_nats_secrets(api, "ns") == {role: "kept" for role in NATS_ROLES}
    assert {k: v["stringData"]["password"] for k, v in api.secrets.items()} == before


def test_an_api_error_other_than_conflict_is_raised() -> None:
    with pytest.raises(ApiException) as err:
        ensure_nats_secrets(SecretsApi(status=403), "ns")
    assert err.value.status == 403


def test_the_roles_with_secrets_are_the_roles_with_permissions() -> None:
    assert set(PERMISSIONS) == set(NATS_ROLES)
