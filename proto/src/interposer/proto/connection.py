"""How a service connects to NATS: the credentials file and its TLS settings, and error logging.

Every component (fuse-worker, policy service, collector, csi-node, the CLI) takes
``--nats-creds PATH``. Only the path travels on command lines and in the
csi-node's state files; the password stays in a file readable by its owner only
(the embedded stack writes them with mode 0600). ``PATH`` is either

* a JSON file with the same field names as a ``nats`` CLI context (``user``,
  ``password``, ``ca``, ``cert``, ``key``; what ``interposer up`` writes)::

      {"user": "worker", "password": "x7…", "ca": "/etc/interposer/nats/ca.pem"}

* or a directory laid out as Kubernetes mounts Secrets: ``username`` and
  ``password`` (a ``kubernetes.io/basic-auth`` Secret), optionally ``ca.crt``,
  ``tls.crt`` and ``tls.key`` (a ``kubernetes.io/tls`` Secret's keys) — so a
  Secret mounted as a volume is used as is, and the same Secret feeds the
  server's password by ``secretKeyRef``.

Fields:
    user, password: NATS username/password (``authorization { users = [...] }`` in
        the server config). Empty = connect without credentials.
    ca: PEM file of the CA that signed the server's certificate; setting it turns
        TLS on (the server must have a ``tls {}`` block).
    cert, key: PEM client certificate and key, for servers that verify clients
        (``tls { verify: true }``).
"""

from __future__ import annotations

import logging
import ssl
import time
from pathlib import Path

import msgspec

#: NATS server the services and the CLI connect to when told none (the nats-server default port).
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
#: Longest credentials file accepted, bytes (a few paths and a password).
MAX_CREDENTIALS_BYTES = 64 * 1024
#: File names in a credentials directory (Kubernetes basic-auth and TLS Secret keys) → field.
SECRET_DIR_FILES = {"username": "user", "password": "password", "ca.crt": "ca", "tls.crt": "cert",
                    "tls.key": "key"}
#: The NATS users, one per role (their permissions: ``interposer.cli._auth.PERMISSIONS``).
NATS_ROLES = ("worker", "policy", "collector", "user")
#: Of those, the ones whose contents (not path) are the value.
_SECRET_DIR_VALUES = frozenset({"username", "password"})


def nats_secret_name(role: str) -> str:
    """Name of the ``kubernetes.io/basic-auth`` Secret holding ``role``'s NATS password in a cluster."""
    return f"interposer-nats-{role}"


class CredentialsError(ValueError):
    """A credentials file is missing, unreadable or malformed (the message names the file and field)."""


class NatsCredentials(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The contents of a ``--nats-creds`` file.

    Attributes:
        user: NATS username; ``""`` = no username/password.
        password: its password.
        ca: CA bundle (PEM) that verifies the server; ``""`` = no TLS unless
            ``cert`` is set (then the system CAs verify the server).
        cert: client certificate (PEM) for servers that verify clients.
        key: private key (PEM) of ``cert``; ``""`` = in ``cert``.
    """

    user: str = ""
    password: str = ""
    ca: str = ""
    cert: str = ""
    key: str = ""


def encode_credentials(credentials: NatsCredentials) -> bytes:
    """Serialize ``credentials`` as the JSON of a ``--nats-creds`` file (empty fields left out)."""
    fields = {k: v for k, v in msgspec.structs.asdict(credentials).items() if v}
    return msgspec.json.format(msgspec.json.encode(fields), indent=2) + b"\n"


def _load_directory(path: Path) -> NatsCredentials:
    fields = {}
    for name, field in SECRET_DIR_FILES.items():
        item = path / name
        if not item.is_file():
            continue
        if name in _SECRET_DIR_VALUES:
            try:
                fields[field] = item.read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise CredentialsError(f"NATS credentials directory {path}: {name}: {exc}") from None
        else:
            fields[field] = str(item)
    return NatsCredentials(**fields)


def load_credentials(path: str | Path) -> NatsCredentials:
    """Read and validate a ``--nats-creds`` file (JSON) or directory (Secret layout).

    Args:
        path: the file or directory.

    Returns:
        The credentials.

    Raises:
        CredentialsError: the file cannot be read, is larger than
            ``MAX_CREDENTIALS_BYTES``, is not JSON, has an unknown field or a
            field of the wrong type (named in the message), or has a
            ``password`` without a ``user``.
    """
    if Path(path).is_dir():
        credentials = _load_directory(Path(path))
    else:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_CREDENTIALS_BYTES + 1)
        except OSError as exc:
            raise CredentialsError(f"NATS credentials file {path}: {exc.strerror or exc}") from None
        if len(data) > MAX_CREDENTIALS_BYTES:
            raise CredentialsError(f"NATS credentials file {path}: larger than {MAX_CREDENTIALS_BYTES} bytes")
        try:
            credentials = msgspec.json.decode(data, type=NatsCredentials)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise CredentialsError(f"NATS credentials file {path}: {exc}") from None
    if credentials.password and not credentials.user:
        raise CredentialsError(f"NATS credentials file {path}: `password` without `user` - at `$.user`")
    return credentials


def tls_context(credentials: NatsCredentials) -> ssl.SSLContext | None:
    """The client TLS context the credentials ask for, or None for plain TCP.

    Raises:
        CredentialsError: a certificate or key file cannot be loaded.
    """
    if not (credentials.ca or credentials.cert):
        return None
    try:
        context = ssl.create_default_context(cafile=credentials.ca or None)
        if credentials.cert:
            context.load_cert_chain(credentials.cert, credentials.key or None)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"NATS TLS files ({credentials.ca or credentials.cert}): {exc}") from None
    return context


def connect_options(creds_file: str | Path | None) -> dict[str, object]:
    """Keyword arguments for ``nats.connect`` from a ``--nats-creds`` file.

    Args:
        creds_file: the file; ``""``/None = no options (anonymous, plain TCP).

    Returns:
        ``{"user": …, "password": …, "tls": ssl.SSLContext}`` — only the keys the
        file sets.

    Raises:
        CredentialsError: as :func:`load_credentials` and :func:`tls_context`.
    """
    if not creds_file:
        return {}
    credentials = load_credentials(creds_file)
    options: dict[str, object] = {}
    if credentials.user:
        options["user"] = credentials.user
        options["password"] = credentials.password
    if (context := tls_context(credentials)) is not None:
        options["tls"] = context
    return options


#: Seconds during which the same NATS error is logged once (a server that is down
#: fails every reconnect attempt, one every few seconds).
NATS_ERROR_LOG_INTERVAL_S = 60.0


class NatsErrorLog:
    """Logs NATS errors as ``nats.connect(error_cb=NatsErrorLog(…).log)``: one WARNING line each.

    Without one, nats-py logs every error at ERROR with a traceback: while a server
    is down, one per reconnect attempt. Here the first occurrence of an error is a
    line naming its type and message; the same error again within ``interval_s``
    is counted and reported with the next line logged.

    Args:
        logger: where the lines go.
        url: the NATS URL, named in each line.
        interval_s: how long a repeated error stays quiet, seconds.
    """

    def __init__(self, logger: logging.Logger, url: str, interval_s: float = NATS_ERROR_LOG_INTERVAL_S) -> None:
        self._logger = logger
        self._url = url
        self._interval_s = interval_s
        self._last: tuple[str, str] | None = None
        self._last_logged_s = 0.0
        self._repeats = 0

    async def log(self, exc: Exception) -> None:
        """Log ``exc`` (or count it, if it repeats the last error within the interval)."""
        error = (type(exc).__name__, str(exc))
        now = time.monotonic()
        if error == self._last and now - self._last_logged_s < self._interval_s:
            self._repeats += 1
            return
        repeats = f" (and {self._repeats} more times)" if self._repeats and error == self._last else ""
        self._logger.warning("NATS %s: %s: %s%s", self._url, error[0], error[1] or "no details", repeats)
        self._last, self._last_logged_s, self._repeats = error, now, 0
