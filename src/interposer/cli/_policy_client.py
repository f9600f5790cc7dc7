"""Client side of the policy service's request subjects (what the CLI and the demo use)."""

from __future__ import annotations

import asyncio
import getpass
import socket
import time
from typing import TypeVar

import msgspec
import nats

from interposer.proto import (
    HistoryReply,
    ListReply,
    PolicyReply,
    RollbackRequest,
    StatusReply,
    WorkerStatus,
    decode_json,
    encode_json,
    subjects,
)
from interposer.proto.connection import CredentialsError, connect_options

#: How long to wait for the policy service's answer, seconds.
DEFAULT_REQUEST_TIMEOUT_S = 5.0
#: How long ``set --wait`` waits for the workers to apply a revision, seconds.
DEFAULT_WAIT_TIMEOUT_S = 30.0

R = TypeVar("R", bound=msgspec.Struct)


class PolicyClientError(RuntimeError):
    """The policy service could not be reached or did not answer."""


def default_author() -> str:
    """``user@host`` of the caller, sent as the ``Interposer-Author`` header."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def connect_failure(nats_url: str, exc: BaseException) -> PolicyClientError:
    """The error to show for a failed first connection to ``nats_url`` (``exc``: what nats-py reported)."""
    if isinstance(exc, ConnectionRefusedError):
        reason = "connection refused (is `interposer up` running, and is --nats-url its server?)"
    elif isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        reason = "no answer (timed out)"
    else:
        reason = str(exc) or type(exc).__name__
    return PolicyClientError(f"cannot connect to NATS at {nats_url}: {reason}")


async def _connect(nats_url: str, timeout_s: float, creds_file: str = "") -> nats.NATS:
    try:
        options = connect_options(creds_file)
    except CredentialsError as exc:
        raise PolicyClientError(str(exc)) from None
    errors: list[Exception] = []

    async def remember(exc: Exception) -> None:
        errors.append(exc)  # instead of nats-py's own ERROR log with a traceback per error

    try:
        # One attempt: nats-py counts a first connection's failures against
        # max_reconnect_attempts even with allow_reconnect=False, and 0 there means
        # "no limit" (it would retry a refused connection forever).
        return await nats.connect(nats_url, connect_timeout=timeout_s, max_reconnect_attempts=1,
                                  reconnect_time_wait=0.1, allow_reconnect=False, error_cb=remember,
                                  **options)
    except Exception as exc:  # noqa: BLE001 - nats-py raises several unrelated types
        raise connect_failure(nats_url, errors[0] if errors else exc) from None


async def _request_on(nc: nats.NATS, subject: str, body: bytes, timeout_s: float, author: str | None,
                      kind: type[R]) -> R:
    headers = {subjects.AUTHOR_HEADER: author} if author else None
    try:
        msg = await nc.request(subject, body, timeout=timeout_s, headers=headers)
    except nats.errors.NoRespondersError:
        raise PolicyClientError("no policy service is running (no responders)") from None
    except nats.errors.TimeoutError:
        if nc.last_error is not None and "permissions violation" in str(nc.last_error).lower():
            raise PolicyClientError(f"not allowed to publish on {subject}: {nc.last_error}") from None
        raise PolicyClientError(f"the policy service did not answer within {timeout_s} s") from None
    try:
        return decode_json(msg.data, kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise PolicyClientError(f"unexpected answer on {subject}: {exc}") from None


async def request(nats_url: str, subject: str, body: bytes = b"",
                  timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, *, author: str | None = None,
                  kind: type[R] = PolicyReply, creds_file: str = "") -> R:
    """Send one request to the policy service and decode its reply.

    Args:
        nats_url: NATS server.
        subject: request subject (``interposer.proto.subjects``).
        body: request body.
        timeout_s: how long to wait for connection and answer, seconds.
        author: sent as the ``Interposer-Author`` header when given.
        kind: reply type (``PolicyReply``, ``HistoryReply``, ``ListReply``, ``StatusReply``).
        creds_file: ``--nats-creds`` file (``interposer.proto.connection``); ``""`` = anonymous.

    Raises:
        PolicyClientError: no NATS, refused credentials, a subject these
            credentials may not publish on, no policy service (no responders), no
            answer within ``timeout_s``, or an answer that is not a ``kind``.
    """
    nc = await _connect(nats_url, timeout_s, creds_file)
    try:
        return await _request_on(nc, subject, body, timeout_s, author, kind)
    finally:
        await nc.close()


async def set_policy(nats_url: str, volume: str, policy_json: bytes,
                     timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, author: str | None = None,
                     creds_file: str = "") -> PolicyReply:
    """Ask the policy service to validate and store ``policy_json`` for ``volume``."""
    return await request(nats_url, subjects.policy_set(volume), policy_json, timeout_s, author=author,
                         creds_file=creds_file)


async def get_policy(nats_url: str, volume: str, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                     creds_file: str = "") -> PolicyReply:
    """Ask the policy service for the stored policy of ``volume``."""
    return await request(nats_url, subjects.policy_get(volume), b"", timeout_s, creds_file=creds_file)


async def clear_policy(nats_url: str, volume: str, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                       author: str | None = None, creds_file: str = "") -> PolicyReply:
    """Ask the policy service to clear the policy of ``volume``."""
    return await request(nats_url, subjects.policy_clear(volume), b"", timeout_s, author=author,
                         creds_file=creds_file)


async def rollback_policy(nats_url: str, volume: str, revision: int,
                          timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, author: str | None = None,
                          creds_file: str = "", selector: bool = False) -> PolicyReply:
    """Ask the policy service to re-store ``revision`` of ``volume`` as a new revision.

    ``selector=True``: ``volume`` is the name of a selector policy (key ``_sel.<name>``).

    Raises:
        ValueError: ``volume`` is not a valid volume id / selector name.
        PolicyClientError: as :func:`request`.
    """
    body = encode_json(RollbackRequest(revision=revision))
    subject = subjects.selector_rollback(volume) if selector else subjects.policy_rollback(volume)
    return await request(nats_url, subject, body, timeout_s, author=author, creds_file=creds_file)


async def policy_history(nats_url: str, volume: str, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                         creds_file: str = "", selector: bool = False) -> HistoryReply:
    """Every stored revision of ``volume`` (of the selector policy ``volume`` if ``selector``), oldest first.

    Raises:
        ValueError: ``volume`` is not a valid volume id / selector name.
        PolicyClientError: as :func:`request`.
    """
    subject = subjects.selector_history(volume) if selector else subjects.policy_history(volume)
    return await request(nats_url, subject, b"", timeout_s, kind=HistoryReply, creds_file=creds_file)


async def list_policies(nats_url: str, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                        creds_file: str = "") -> ListReply:
    """Every volume with a stored policy."""
    return await request(nats_url, subjects.POLICY_LIST, b"", timeout_s, kind=ListReply,
                         creds_file=creds_file)


async def policy_status(nats_url: str, volume: str | None = None,
                        timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, creds_file: str = "") -> StatusReply:
    """Desired vs applied revision of ``volume`` (or of every volume)."""
    return await request(nats_url, subjects.policy_status(volume), b"", timeout_s, kind=StatusReply,
                         creds_file=creds_file)


class WaitResult(msgspec.Struct, kw_only=True):
    """Outcome of :func:`set_and_wait`.

    Attributes:
        reply: the policy service's answer to the ``set``.
        applied: worker id → revision it reported, for the workers that applied it.
        laggards: worker id → last revision it reported, for those that did not
            apply it in time (``-1`` = never heard from since the wait began).
        waited_s: time from the ``set`` reply to the end of the wait, seconds.
        bypassing: worker id → open files the new policy's layers do not reach
            until they are reopened (reads and writes served by kernel passthrough,
            closes that send no FLUSH), for the workers whose latest heartbeat
            reported any.
    """

    reply: PolicyReply
    applied: dict[str, int] = {}
    laggards: dict[str, int] = {}
    waited_s: float = 0.0
    bypassing: dict[str, int] = {}

    @property
    def complete(self) -> bool:
        """The set was accepted and no targeted worker lags."""
        return self.reply.ok and not self.laggards


async def set_and_wait(nats_url: str, volume: str, subject: str, body: bytes, *, min_workers: int = 1,
                       timeout_s: float = DEFAULT_WAIT_TIMEOUT_S, author: str | None = None,
                       request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                       creds_file: str = "") -> WaitResult:
    """Send a revision-making request and wait until the volume's workers applied it.

    The targeted workers are those the policy service reports as live for the
    volume when the request is made, plus any that start heartbeating during the
    wait; at least ``min_workers`` must have applied the revision. The client
    listens to the heartbeats itself (``interposer.status.<volume>``, subscribed
    before the request so the immediate "applied" heartbeat cannot be missed).

    Args:
        nats_url: NATS server.
        volume: volume id.
        subject: ``policy_set``/``policy_clear``/``policy_rollback`` subject of ``volume``.
        body: request body.
        min_workers: fewest workers that must report the revision (0 = none needed).
        timeout_s: how long to wait for the workers after the reply, seconds.
        author: ``Interposer-Author`` header.
        request_timeout_s: timeout of each request to the policy service, seconds.
        creds_file: ``--nats-creds`` file; ``""`` = anonymous.

    Raises:
        PolicyClientError: as :func:`request`.
    """
    nc = await _connect(nats_url, request_timeout_s, creds_file)
    try:
        seen: dict[str, int] = {}
        bypassing: dict[str, int] = {}
        changed = asyncio.Event()
        decoder = msgspec.msgpack.Decoder(WorkerStatus)

        async def on_status(msg) -> None:  # noqa: ANN001 - nats Msg
            try:
                status = decoder.decode(msg.data)
            except (msgspec.ValidationError, msgspec.DecodeError):
                return
            seen[status.worker_id] = max(status.policy_revision, seen.get(status.worker_id, 0))
            bypassing[status.worker_id] = status.files_bypassing_layers
            changed.set()

        sub = await nc.subscribe(subjects.status(volume), cb=on_status)
        await nc.flush()
        known = await _request_on(nc, subjects.policy_status(volume), b"", request_timeout_s, None, StatusReply)
        targets = {w.worker_id for v in known.volumes for w in v.workers if not w.stale}
        reply = await _request_on(nc, subject, body, request_timeout_s, author, PolicyReply)
        if not reply.ok or reply.revision is None:
            return WaitResult(reply=reply)
        revision = reply.revision
        start = time.monotonic()
        deadline = start + timeout_s

        def done() -> bool:
            everyone = targets | set(seen)
            applied = [w for w in everyone if seen.get(w, -1) >= revision]
            return len(applied) == len(everyone) and len(applied) >= min_workers

        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            changed.clear()
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                break
        await sub.unsubscribe()
        everyone = targets | set(seen)
        applied = {w: seen[w] for w in everyone if seen.get(w, -1) >= revision}
        laggards = {w: seen.get(w, -1) for w in everyone if w not in applied}
        if len(applied) < min_workers and not laggards:
            laggards = {f"(no worker; {min_workers} expected)": -1}
        return WaitResult(reply=reply, applied=applied, laggards=laggards, waited_s=time.monotonic() - start,
                          bypassing={w: n for w in applied if (n := bypassing.get(w, 0))})
    finally:
        await nc.close()
