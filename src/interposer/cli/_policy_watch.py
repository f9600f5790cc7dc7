"""``interposer policy watch``: report every new revision of the policy bucket as it lands.

The watch reads the JetStream KV bucket itself (a consumer on the bucket's stream,
as the workers' KV watch is) instead of asking the policy service: the bucket is
the one record of every change whoever made it (a request, an expiry, the
Kubernetes reconciler), its revisions are stream sequences, so they are totally
ordered, and a watch that lost its connection resumes exactly after the last
revision it saw. The ``user`` role may create such a consumer (read-only; it still
cannot put a key, see ``_auth.PERMISSIONS``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
import nats
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from interposer.proto import PolicyChange, decode_record, subjects
from interposer.proto.connection import CredentialsError, NatsErrorLog, connect_options

from ._policy_client import DEFAULT_REQUEST_TIMEOUT_S, PolicyClientError, connect_failure

log = logging.getLogger(__name__)

#: Wait between reconnect attempts, seconds.
DEFAULT_RECONNECT_TIME_WAIT_S = 1.0
#: The server drops a watch consumer its client has not used for this long, seconds
#: (after a lost connection; a live watch keeps it through heartbeats).
DEFAULT_INACTIVE_THRESHOLD_S = 300.0


def change_of(subject: str, revision: int, data: bytes, operation: str | None) -> PolicyChange | None:
    """Turn one message of the bucket's stream into a :class:`PolicyChange`.

    Args:
        subject: the message subject, ``$KV.<bucket>.<key>``.
        revision: its stream sequence (the KV revision).
        data: the value, a JSON ``PolicyRecord`` for a put.
        operation: the ``KV-Operation`` header (``DEL``/``PURGE``), None for a put.

    Returns:
        The change, or None for a value that is not a ``PolicyRecord`` (logged).
    """
    key = subject[len(subjects.POLICY_KV_SUBJECT_PREFIX):]
    if operation:
        return PolicyChange(volume=key, revision=revision, action=operation.lower())
    try:
        record = decode_record(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        log.warning("key %s: revision %d is not a PolicyRecord (%s); not reported", key, revision, exc)
        return None
    return PolicyChange(
        volume=key, revision=revision, action=record.action, updated_at_s=record.updated_at_s,
        author=record.author, source_revision=record.source_revision, expires_at_s=record.expires_at_s,
        selector=record.selector, priority=record.priority, policy=record.policy,
    )


async def follow(nats_url: str, key: str | None, on_change: Callable[[PolicyChange], None], *,
                 creds_file: str = "", on_ready: Callable[[int], None] | None = None,
                 stop: asyncio.Event | None = None,
                 timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> None:
    """Call ``on_change`` for every revision stored after the watch began, in revision order.

    The first consumer starts right after the bucket's last revision at the time
    (nothing already stored is reported). After a lost connection the consumer is
    created again from the revision after the last one seen, so revisions stored
    in between are reported once and in order — as far as the bucket's history
    (64 revisions per key) still holds them.

    Args:
        nats_url: NATS server.
        key: a volume id or ``_sel.<name>``; None = every key of the bucket.
        on_change: called with each new revision (in the event loop; keep it short).
        creds_file: ``--nats-creds`` file; ``""`` = anonymous.
        on_ready: called once with the last revision stored when the watch began
            (0 = empty bucket); every later revision reaches ``on_change``.
        stop: return when set; None = run until cancelled.
        timeout_s: timeout of the first connection and of each JetStream call, seconds.

    Raises:
        PolicyClientError: NATS unreachable at the start, refused credentials,
            no policy bucket yet (no policy service ever ran), or a watch these
            credentials may not create.
    """
    try:
        options = connect_options(creds_file)
    except CredentialsError as exc:
        raise PolicyClientError(str(exc)) from None
    rewatch = asyncio.Event()

    async def on_reconnect() -> None:
        # The consumer lived on the server we lost; a restarted server has none.
        rewatch.set()

    # Reconnect for ever once connected, but not at the start: nats-py's first
    # connection retries on the same terms, so its first error ends the attempt here.
    first_error: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
    later_errors = NatsErrorLog(log, nats_url)

    async def on_error(exc: Exception) -> None:
        if first_error.done():
            await later_errors.log(exc)
        else:
            first_error.set_result(exc)

    connecting = asyncio.ensure_future(nats.connect(
        nats_url, connect_timeout=timeout_s, max_reconnect_attempts=-1, reconnect_time_wait=DEFAULT_RECONNECT_TIME_WAIT_S,
        reconnected_cb=on_reconnect, error_cb=on_error, **options))
    await asyncio.wait({connecting, first_error}, return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done() or connecting.exception() is not None:
        connecting.cancel()
        raise connect_failure(nats_url, first_error.result() if first_error.done() else connecting.exception())
    nc = connecting.result()
    if not first_error.done():
        first_error.set_result(RuntimeError("connected"))  # from now on errors are logged
    try:
        js = nc.jetstream(timeout=timeout_s)
        try:
            last = (await js.stream_info(subjects.POLICY_KV_STREAM)).state.last_seq
        except NotFoundError:
            raise PolicyClientError(f"no bucket {subjects.POLICY_KV_BUCKET!r}: has a policy service "
                                    "ever run on this NATS?") from None
        except Exception as exc:  # noqa: BLE001 - timeouts, permission violations
            raise PolicyClientError(_explain(nc, f"cannot read the policy bucket: {exc}")) from None
        if on_ready is not None:
            on_ready(last)

        async def on_msg(msg: Msg) -> None:
            nonlocal last
            revision = msg.metadata.sequence.stream
            if revision <= last:
                return  # a duplicate across a consumer reset
            last = revision
            operation = (msg.headers or {}).get(subjects.KV_OPERATION_HEADER)
            change = change_of(msg.subject, revision, msg.data, operation)
            if change is not None:
                on_change(change)

        loop = asyncio.get_running_loop()
        stopped = asyncio.ensure_future(stop.wait()) if stop is not None else loop.create_future()
        first = True
        try:
            while not stopped.done():
                rewatch.clear()
                start = last + 1
                config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
                                        inactive_threshold=DEFAULT_INACTIVE_THRESHOLD_S)
                try:
                    sub = await js.subscribe(f"{subjects.POLICY_KV_SUBJECT_PREFIX}{key or '>'}",
                                             stream=subjects.POLICY_KV_STREAM, cb=on_msg,
                                             ordered_consumer=True, config=config)
                except Exception as exc:  # noqa: BLE001 - denied, or the server is away
                    if first:
                        raise PolicyClientError(_explain(nc, f"cannot watch the policy bucket: {exc}")
                                                ) from None
                    log.warning("re-creating the watch failed (%s); retrying", exc)
                    await asyncio.sleep(DEFAULT_RECONNECT_TIME_WAIT_S)
                    continue
                first = False
                waiter = asyncio.ensure_future(rewatch.wait())
                await asyncio.wait({stopped, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                try:
                    await asyncio.wait_for(sub.unsubscribe(), timeout_s)
                except Exception:  # noqa: BLE001 - the old server and its consumer may be gone
                    pass
                if not stopped.done():
                    log.info("reconnected; watching again after revision %d", last)
        finally:
            stopped.cancel()
    finally:
        # Bounded: a watch must end promptly on Ctrl-C even if the server is slow or gone.
        try:
            await asyncio.wait_for(nc.close(), timeout_s)
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - closing is best effort
            pass


def _explain(nc: nats.NATS, message: str) -> str:
    """Add the server's permission error to ``message`` when that is why a call timed out."""
    if nc.last_error is not None and "permissions violation" in str(nc.last_error).lower():
        return f"{message} (not allowed: {nc.last_error})"
    return message
