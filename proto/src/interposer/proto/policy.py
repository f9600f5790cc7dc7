"""The user-facing policy of a volume: an ordered list of layers.

A policy arrives as JSON (``nats pub interposer.policy.set.<volume> '{...}'``), is
decoded with :func:`decode_policy`, which rejects unknown fields, out-of-range
values, unknown op names and unknown errno names with a message that names the
field (``... - at `$.layers[0].probability```), and is stored as a
:class:`PolicyRecord` in the JetStream KV bucket.

Example::

    {"layers": [
        {"type": "delay", "delay_s": 0.002, "ops": ["read", "write"]},
        {"type": "throttle", "rate_bytes_per_s": 20971520},
        {"type": "fault", "errno": "EIO", "probability": 0.01, "ops": ["read"]}
    ]}

Layers apply in list order: the first layer sees an op first.
"""

from __future__ import annotations

import errno as _errno
from typing import Annotated, Literal, Union

import msgspec

#: FUSE op names a layer can match (pyfuse3 / libfuse low-level names).
OpName = Literal[
    "lookup", "getattr", "setattr", "readlink", "symlink", "mknod", "mkdir", "unlink",
    "rmdir", "rename", "link", "open", "read", "write", "flush", "release", "fsync",
    "opendir", "readdir", "releasedir", "fsyncdir", "statfs", "access", "create",
    "getxattr", "setxattr", "listxattr", "removexattr",
]
#: The ops that move file data; throttle layers can only match these.
DataOpName = Literal["read", "write"]

#: Upper bound of a fixed delay, seconds: longer than this stalls kernel requests
#: past any useful experiment (and past FUSE's own request timeouts in some kernels).
MAX_DELAY_S = 60.0
#: Most layers one policy may hold.
MAX_LAYERS = 64
#: Longest path glob, characters.
MAX_GLOB_LENGTH = 4096
#: Largest encoded policy accepted, bytes.
MAX_POLICY_BYTES = 64 * 1024
#: Longest experiment a policy may declare with ``expires_after_s``, seconds (30 days).
MAX_EXPIRES_AFTER_S = 30 * 24 * 3600.0

Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Glob = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_GLOB_LENGTH)]


class _Layer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    """Fields every layer has.

    Attributes:
        ops: FUSE op names the layer applies to; empty = every op.
        path_glob: ``fnmatch`` pattern matched against the op's path inside the
            volume (``/data/*.bin``); ``*`` matches ``/`` too.
    """

    ops: frozenset[OpName] = frozenset()
    path_glob: Glob = "*"


class FaultLayer(_Layer, tag="fault", kw_only=True):
    """Fail matching ops with an errno.

    Attributes:
        errno: errno name returned to the application (``EIO``, ``ENOSPC``, …);
            any name in Python's ``errno.errorcode``.
        probability: chance, 0..1, that a matching op fails.
    """

    errno: str = "EIO"
    probability: Probability = 1.0

    def __post_init__(self) -> None:
        if self.errno not in ERRNO_BY_NAME:
            raise ValueError(f"field `errno`: unknown errno name {self.errno!r} (expected a name such as EIO, ENOSPC)")


class DelayLayer(_Layer, tag="delay", kw_only=True):
    """Delay matching ops by a fixed time before passing them on.

    Attributes:
        delay_s: delay in seconds, 0..60.
    """

    delay_s: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_DELAY_S)]


class ThrottleLayer(_Layer, tag="throttle", kw_only=True):
    """Limit the bandwidth of reads and writes with one token bucket.

    Matching reads and writes share the bucket. An op waits until the bucket has
    credit for its size; it is never shortened (a FUSE reply must be whole).

    Attributes:
        rate_bytes_per_s: sustained rate, bytes per second (> 0).
        burst_bytes: bucket size in bytes; 0 = ``DEFAULT_BURST_S`` of rate, at
            least one 1 MiB request.
        ops: ``read`` and/or ``write``; empty = both.
    """

    rate_bytes_per_s: Annotated[int, msgspec.Meta(gt=0, le=1 << 50)]
    burst_bytes: Annotated[int, msgspec.Meta(ge=0, le=1 << 50)] = 0
    ops: frozenset[DataOpName] = frozenset()


Layer = Union[FaultLayer, DelayLayer, ThrottleLayer]


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """The desired behaviour of one volume.

    Attributes:
        layers: layers, outermost first (the first sees each op first).
        description: free text shown by ``interposer policy get``.
        expires_after_s: make this policy an experiment: the policy service
            reverts the volume to the revision that was in force before it this
            many seconds after accepting it (0 < x ≤ 30 days). ``None`` = no expiry.
        expires_at_s: the same as an absolute deadline, seconds since the Unix
            epoch (must be in the future when the policy is accepted). At most one
            of ``expires_after_s`` and ``expires_at_s`` may be set.
    """

    layers: Annotated[list[Layer], msgspec.Meta(max_length=MAX_LAYERS)] = []
    description: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    expires_after_s: Annotated[float, msgspec.Meta(gt=0.0, le=MAX_EXPIRES_AFTER_S)] | None = None
    expires_at_s: Annotated[float, msgspec.Meta(gt=0.0, le=1e11)] | None = None

    def __post_init__(self) -> None:
        if self.expires_after_s is not None and self.expires_at_s is not None:
            raise ValueError("fields `expires_after_s` and `expires_at_s`: set at most one of them")


class PolicyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What the policy service stores in the KV bucket under the volume id.

    The KV revision of the entry is the policy revision. Fields after
    ``updated_at_s`` were added later and have defaults, so older records decode.

    Attributes:
        policy: the accepted policy.
        updated_at_s: when it was accepted, seconds since the Unix epoch.
        author: who asked for it (the request's ``Interposer-Author`` header; the
            CLI sends ``user@host``); ``""`` when the request did not say.
        action: ``set``, ``clear``, ``rollback`` (re-stored an older revision) or
            ``expire`` (the policy service reverted an experiment).
        source_revision: for ``rollback`` and ``expire``: the revision whose
            policy was re-stored (0 = the empty policy); 0 otherwise.
        expires_at_s: when the policy service reverts this revision, seconds since
            the Unix epoch; ``None`` = never.
        revert_to: the revision in force before this one, restored at
            ``expires_at_s`` (0 = the empty policy).
    """

    policy: Policy
    updated_at_s: float
    author: str = ""
    action: str = "set"  # a str, not a Literal: readers must accept actions added later
    source_revision: int = 0
    expires_at_s: float | None = None
    revert_to: int = 0


class PolicyReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Reply of the policy service to set/get/clear requests.

    ``{"ok": true, "revision": 7}`` or ``{"ok": false, "error": "..."}``; ``get``
    adds ``policy``.
    """

    ok: bool
    revision: int | None = None
    error: str | None = None
    policy: Policy | None = None


#: errno name → number, for every name the platform knows.
ERRNO_BY_NAME: dict[str, int] = {name: num for num, name in _errno.errorcode.items()}

_policy_json_decoder = msgspec.json.Decoder(Policy)
_record_json_decoder = msgspec.json.Decoder(PolicyRecord)
_reply_json_decoder = msgspec.json.Decoder(PolicyReply)


class PolicyError(ValueError):
    """A policy was rejected; ``str(error)`` says which field and why."""


def decode_policy(data: bytes | str) -> Policy:
    """Decode and validate a JSON policy.

    Args:
        data: JSON text, at most ``MAX_POLICY_BYTES`` bytes.

    Returns:
        The validated, immutable ``Policy``.

    Raises:
        PolicyError: malformed JSON (also invalid UTF-8, and nesting deep enough
            to exhaust the decoder's recursion), unknown fields, wrong types,
            out-of-range values, unknown op or errno names. The message is
            printable, at most ``MAX_ERROR_CHARS`` long, and names the field
            (`` - at `$.layers[0].probability` ``) or the byte offset.
    """
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy is {len(data)} bytes, more than the {MAX_POLICY_BYTES} allowed - at `$`")
    try:
        return _policy_json_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise PolicyError(_with_location(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise PolicyError(_with_location(f"malformed JSON: {exc}")) from None
    except UnicodeDecodeError as exc:
        # A string with invalid UTF-8 (found by the fuzz test): msgspec lets Python's codec error through.
        raise PolicyError(f"malformed JSON: invalid UTF-8 in a string (byte {exc.start})") from None
    except RecursionError:
        # msgspec decodes recursively; ``[[[[…`` thousands deep exhausts the stack
        # (found by tests/proto/test_policy_fuzz.py). No valid policy nests past 5.
        raise PolicyError("malformed JSON: nested too deeply - at `$`") from None


#: Longest rejection message, characters; longer ones (an echoed 60 KiB field name)
#: keep their head and their tail, where the location is.
MAX_ERROR_CHARS = 1024


def _with_location(message: str) -> str:
    """Make a decoder message readable: printable, bounded, and naming a location.

    msgspec names the location of every error below the root (`` - at `$.layers[0]` ``)
    and of JSON syntax errors (``(byte 12)``); errors about the document itself
    ("Expected `object`, got `int`", "Input data was truncated") get `` `$` ``.
    Messages echo user input (unknown field names), so control characters are
    escaped (``\\x7f``) and the length is capped at ``MAX_ERROR_CHARS``.
    """
    if " - at `$" not in message and "(byte " not in message:
        message = f"{message} - at `$`"
    if not message.isprintable():
        message = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)
    if len(message) > MAX_ERROR_CHARS:
        tail = MAX_ERROR_CHARS // 4
        message = f"{message[:MAX_ERROR_CHARS - tail - 1]}…{message[-tail:]}"
    return message


def encode_policy(policy: Policy) -> bytes:
    """Encode a policy as canonical JSON (sets sorted, so equal policies encode equally)."""
    return msgspec.json.encode(policy, order="deterministic")


def decode_record(data: bytes) -> PolicyRecord:
    """Decode a KV value written by the policy service.

    Raises:
        msgspec.ValidationError, msgspec.DecodeError: the value is not a ``PolicyRecord``.
    """
    return _record_json_decoder.decode(data)


def encode_record(record: PolicyRecord) -> bytes:
    """Encode a ``PolicyRecord`` as JSON for the KV bucket."""
    return msgspec.json.encode(record, order="deterministic")


def encode_reply(reply: PolicyReply) -> bytes:
    """Encode a ``PolicyReply`` as JSON."""
    return msgspec.json.encode(reply, order="deterministic")


def decode_reply(data: bytes) -> PolicyReply:
    """Decode a ``PolicyReply``.

    Raises:
        msgspec.ValidationError, msgspec.DecodeError: not a reply of the policy service.
    """
    return _reply_json_decoder.decode(data)
