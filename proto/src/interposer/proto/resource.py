"""The ``InterposerPolicy`` Kubernetes custom resource: its names, its spec, and its KV key.

An ``InterposerPolicy`` (CRD in ``deploy/base/crd``) is a policy kept in the
cluster; the policy service (``--kubernetes``) stores it in the policy bucket
through the same validation and write path as ``interposer.policy.set`` /
``….select`` requests::

    apiVersion: interposer.io/v1alpha1
    kind: InterposerPolicy
    metadata: {name: slow-training, namespace: ml}
    spec:
      target:
        selector: {namespace: ml, pod: "train-*"}   # or: volume: <volume id>
      priority: 10                                   # selector targets only
      policy:
        layers: [{type: profile, name: gp3}]

A ``volume`` target writes the volume's own key; a ``selector`` target writes
the selector key ``_sel.k8s_<namespace>_<name>`` (:func:`selector_name_of`).
Every revision the reconciler writes has the author ``k8s:<namespace>/<name>``
(:func:`author_of`): that is how it knows which keys a resource still owns.

The CRD's OpenAPI schema only checks shapes loosely (it keeps unknown fields, so
that a misspelt field reaches this decoder instead of being pruned); the real
check is :func:`decode_spec` plus ``decode_policy``, whose messages name the
field under ``spec`` (`` - at `spec.policy.layers[0].probability` ``).
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import msgspec

from . import subjects
from .policy import (
    MAX_POLICY_BYTES,
    MAX_SELECTOR_PRIORITY,
    Policy,
    PolicyError,
    Selector,
    _with_location,
    decode_policy,
)

GROUP = "interposer.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InterposerPolicy"
PLURAL = "interposerpolicies"
SINGULAR = "interposerpolicy"
#: Prefix of the author of every revision the reconciler writes: ``k8s:<namespace>/<name>``.
#: Requests on NATS may not claim it (the policy service refuses them).
AUTHOR_PREFIX = "k8s:"
#: Prefix of the selector names of selector targets (a selector name of ``interposer
#: policy select`` may use it too; the reconciler only touches keys whose record it authored).
SELECTOR_NAME_PREFIX = "k8s_"
#: The condition type the reconciler reports (``status.conditions``).
CONDITION_ACCEPTED = "Accepted"


class ResourceTarget(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                     omit_defaults=True):
    """``spec.target``: exactly one of ``volume`` and ``selector``.

    Attributes:
        volume: one volume id (``interposer.proto.subjects.VOLUME_ID_PATTERN``).
        selector: the volumes a selector matches (``interposer.proto.Selector``:
            ``namespace``, ``pod``, ``node``, ``volume`` globs, or ``all: true``).
    """

    volume: str = ""
    selector: Selector | None = None

    def __post_init__(self) -> None:
        if bool(self.volume) == (self.selector is not None):
            raise ValueError("fields `volume` and `selector`: give exactly one of them")
        if self.volume and not subjects.is_valid_volume_id(self.volume):
            raise ValueError(f"field `volume`: {self.volume!r} is not a volume id "
                             f"({subjects.VOLUME_ID_PATTERN.pattern})")


class ResourceSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``spec`` of an ``InterposerPolicy``.

    Attributes:
        target: which volume(s).
        policy: the policy, kept as raw JSON here and validated by ``decode_policy``.
        priority: merge priority of a selector target, −1000..1000 (higher first);
            a volume target may not set it.
    """

    target: ResourceTarget
    policy: msgspec.Raw
    priority: Annotated[int, msgspec.Meta(ge=-MAX_SELECTOR_PRIORITY, le=MAX_SELECTOR_PRIORITY)] | None = None

    def __post_init__(self) -> None:
        if self.priority is not None and self.target.selector is None:
            raise ValueError("field `priority`: only a `target.selector` has a priority")


_spec_decoder = msgspec.json.Decoder(ResourceSpec)


def _relocate(message: str, prefix: str) -> str:
    """Point a decoder location (`` `$.x` ``) at the resource field (`` `spec.x` ``)."""
    return message.replace("`$", f"`{prefix}")


def decode_spec(spec: object) -> tuple[ResourceSpec, Policy]:
    """Validate the ``spec`` of an ``InterposerPolicy`` (as the API server returns it).

    Args:
        spec: ``object["spec"]``, the decoded JSON (``dict``); None if absent.

    Returns:
        ``(spec, policy)``: the spec and its validated policy.

    Raises:
        PolicyError: the spec or its policy is invalid; the message names the
            field under `` `spec` `` (`` - at `spec.policy.layers[0].probability` ``).
    """
    if spec is None:
        raise PolicyError("field `spec` is missing - at `spec`")
    data = msgspec.json.encode(spec)
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"spec is {len(data)} bytes, more than the {MAX_POLICY_BYTES} allowed - at `spec`")
    try:
        decoded = _spec_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise PolicyError(_relocate(_with_location(str(exc)), "spec")) from None
    try:
        policy = decode_policy(bytes(decoded.policy))
    except PolicyError as exc:
        raise PolicyError(relocate_policy_error(str(exc))) from None
    return decoded, policy


def relocate_policy_error(message: str) -> str:
    """Point the location of a ``decode_policy``/store rejection at `` `spec.policy…` ``."""
    return _relocate(message, "spec.policy")


def author_of(namespace: str, name: str) -> str:
    """Author of the revisions written for the resource ``namespace/name``."""
    return f"{AUTHOR_PREFIX}{namespace}/{name}"


def selector_name_of(namespace: str, name: str) -> str:
    """Selector name (``_sel.<it>`` is the KV key) of a selector target of ``namespace/name``.

    ``k8s_<namespace>_<name>`` with the name's ``.`` as ``_``: Kubernetes names
    have no ``_``, so the first ``_`` after the prefix ends the namespace and the
    mapping is one-to-one. Longer than a volume id may be (128), it keeps 115
    characters and adds 12 hex digits of a hash of ``namespace/name``.
    """
    readable = f"{SELECTOR_NAME_PREFIX}{namespace}_{name.replace('.', '_')}"
    if len(readable) <= 128:
        return readable
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:12]
    return f"{readable[:115]}_{digest}"


def key_of(namespace: str, name: str, spec: ResourceSpec) -> str:
    """The KV key the resource writes: its volume id, or ``_sel.<selector name>``."""
    if spec.target.volume:
        return spec.target.volume
    return subjects.selector_key(selector_name_of(namespace, name))
