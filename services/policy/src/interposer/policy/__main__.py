"""``python -m interposer.policy``: flags → config → logging → serve."""

from __future__ import annotations

import asyncio
import logging

import click

from interposer.proto.connection import DEFAULT_NATS_URL, CredentialsError, connect_options

from ._config import PolicyServiceConfig
from ._service import serve


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nats-url", default=DEFAULT_NATS_URL, show_default=True, help="NATS server with JetStream.")
@click.option("--nats-creds", default="", help="NATS credentials file of the policy role "
              "(JSON: user, password, ca, cert, key); empty = anonymous.")
@click.option("--kv-replicas", default=1, show_default=True, type=click.IntRange(1, 5),
              help="JetStream replicas of the policy bucket, when this service creates it.")
@click.option("--kubernetes", is_flag=True, help="Also reconcile InterposerPolicy resources into the bucket "
              "(in-cluster config, or --kubeconfig).")
@click.option("--kubeconfig", default="", type=click.Path(dir_okay=False),
              help="kubeconfig file for --kubernetes; empty = the pod's service account.")
@click.option("--log-level", default="INFO", show_default=True)
def main(nats_url: str, nats_creds: str, kv_replicas: int, kubernetes: bool, kubeconfig: str,
         log_level: str) -> None:
    """Validate policy changes published on NATS and store them in JetStream KV."""
    try:
        connect_options(nats_creds)  # a bad file is a usage error, before anything starts
    except CredentialsError as exc:
        raise click.BadParameter(str(exc), param_hint="--nats-creds") from None
    if kubeconfig and not kubernetes:
        raise click.BadParameter("only used with --kubernetes", param_hint="--kubeconfig")
    if kubernetes:
        from ._kubernetes import load_api

        try:
            load_api(kubeconfig)  # no cluster config is a usage error too
        except Exception as exc:  # noqa: BLE001 - ConfigException, a malformed file
            raise click.BadParameter(f"no usable Kubernetes configuration: {exc}",
                                     param_hint="--kubeconfig" if kubeconfig else "--kubernetes") from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(PolicyServiceConfig(nats_url=nats_url, nats_creds=nats_creds, kv_replicas=kv_replicas,
                                          kubernetes=kubernetes, kubeconfig=kubeconfig)))


if __name__ == "__main__":
    main()
