"""Client side of the policy service's request subjects (what the CLI and the demo use)."""

from __future__ import annotations

import nats

from interposer.proto import PolicyReply, decode_reply, subjects

#: How long to wait for the policy service's answer, seconds.
DEFAULT_REQUEST_TIMEOUT_S = 5.0


class PolicyClientError(RuntimeError):
    """The policy service could not be reached or did not answer."""


async def request(nats_url: str, subject: str, body: bytes = b"",
                  timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> PolicyReply:
    """Send one request to the policy service and decode its reply.

    Raises:
        PolicyClientError: no NATS, no policy service (no responders) or no answer
            within ``timeout_s``.
    """
    try:
        nc = await nats.connect(nats_url, connect_timeout=timeout_s, max_reconnect_attempts=0)
    except Exception as exc:  # noqa: BLE001 - nats-py raises several unrelated types
        raise PolicyClientError(f"cannot connect to NATS at {nats_url}: {exc}") from None
    try:
        msg = await nc.request(subject, body, timeout=timeout_s)
    except nats.errors.NoRespondersError:
        raise PolicyClientError("no policy service is running (no responders)") from None
    except nats.errors.TimeoutError:
        raise PolicyClientError(f"the policy service did not answer within {timeout_s} s") from None
    finally:
        await nc.close()
    return decode_reply(msg.data)


async def set_policy(nats_url: str, volume: str, policy_json: bytes,
                     timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> PolicyReply:
    """Ask the policy service to validate and store ``policy_json`` for ``volume``."""
    return await request(nats_url, subjects.policy_set(volume), policy_json, timeout_s)


async def get_policy(nats_url: str, volume: str, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> PolicyReply:
    """Ask the policy service for the stored policy of ``volume``."""
    return await request(nats_url, subjects.policy_get(volume), b"", timeout_s)


async def clear_policy(nats_url: str, volume: str, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> PolicyReply:
    """Ask the policy service to clear the policy of ``volume``."""
    return await request(nats_url, subjects.policy_clear(volume), b"", timeout_s)
