"""Create the per-role NATS Secrets of a cluster install, once.

``python -m interposer.policy.nats_secrets --namespace NS`` runs as an init
container of the NATS StatefulSet (``deploy/base/nats``). For each role in
``NATS_ROLES`` it creates the ``kubernetes.io/basic-auth`` Secret
``interposer-nats-<role>`` with a random password, and keeps a Secret that
already exists: a restarted NATS pod never changes a password that running
services hold. So ``skaffold run`` installs in one command; pods that mount a
Secret (policy, collector, csi-node) wait in ContainerCreating until it exists.

Only ``create`` is needed (an existing Secret answers 409 Conflict), so the
init container's Role grants no read of any Secret.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable

import click

from interposer.proto.connection import NATS_ROLES, nats_secret_name

log = logging.getLogger("interposer.policy.nats_secrets")

#: Random bytes in each generated password (``secrets.token_urlsafe``), bytes.
PASSWORD_BYTES = 32
#: Labels on every created Secret (Kubernetes recommended labels).
SECRET_LABELS = {"app.kubernetes.io/part-of": "interposer", "app.kubernetes.io/component": "nats",
                 "app.kubernetes.io/managed-by": "interposer-nats-secrets"}
_CONFLICT = 409


def ensure_nats_secrets(core_api, namespace: str, roles: Iterable[str] = NATS_ROLES,
                        new_password: Callable[[], str] = lambda: secrets.token_urlsafe(PASSWORD_BYTES),
                        ) -> dict[str, str]:
    """Create each role's basic-auth Secret unless it exists.

    Args:
        core_api: a ``kubernetes.client.CoreV1Api`` (or an object with its
            ``create_namespaced_secret``).
        namespace: namespace of the Secrets (the NATS server's).
        roles: NATS users to provide for.
        new_password: returns a fresh password.

    Returns:
        ``{role: "created" | "kept"}``.

    Raises:
        kubernetes.client.exceptions.ApiException: any API error but 409 Conflict
            (e.g. 403 when RBAC does not allow ``create``).
    """
    from kubernetes.client.exceptions import ApiException

    outcome = {}
    for role in roles:
        body = {
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
            "metadata": {"name": nats_secret_name(role), "namespace": namespace, "labels": SECRET_LABELS},
            "stringData": {"username": role, "password": new_password()},
        }
        try:
            core_api.create_namespaced_secret(namespace, body)
            outcome[role] = "created"
        except ApiException as exc:
            if exc.status != _CONFLICT:
                raise
            outcome[role] = "kept"
        log.info("Secret %s/%s: %s", namespace, nats_secret_name(role), outcome[role])
    return outcome


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--namespace", envvar="POD_NAMESPACE", required=True,
              help="Namespace of the Secrets (default: $POD_NAMESPACE).")
def main(namespace: str) -> None:
    """Create the per-role NATS Secrets that do not exist yet (in-cluster credentials)."""
    from kubernetes import client, config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config.load_incluster_config()
    ensure_nats_secrets(client.CoreV1Api(), namespace)


if __name__ == "__main__":
    main()
