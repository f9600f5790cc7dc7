"""``python -m interposer.policy``: flags → config → logging → serve."""

from __future__ import annotations

import asyncio
import logging

import click

from interposer.proto.connection import CredentialsError, connect_options

from ._config import PolicyServiceConfig
from ._service import serve


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nats-url", default=PolicyServiceConfig.nats_url, show_default=True)
@click.option("--nats-creds", default="", help="NATS credentials file of the policy role "
              "(JSON: user, password, ca, cert, key); empty = anonymous.")
@click.option("--kv-replicas", default=1, show_default=True, type=click.IntRange(1, 5))
@click.option("--log-level", default="INFO", show_default=True)
def main(nats_url: str, nats_creds: str, kv_replicas: int, log_level: str) -> None:
    """Validate policy changes published on NATS and store them in JetStream KV."""
    try:
        connect_options(nats_creds)  # a bad file is a usage error, before anything starts
    except CredentialsError as exc:
        raise click.BadParameter(str(exc), param_hint="--nats-creds") from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(PolicyServiceConfig(nats_url=nats_url, nats_creds=nats_creds, kv_replicas=kv_replicas)))


if __name__ == "__main__":
    main()
