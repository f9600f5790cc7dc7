"""Selector policies ("fleet push"): which apply to a volume, and the merged result.

A selector policy is stored under the KV key ``_sel.<name>`` as a ``PolicyRecord``
whose ``selector`` says which volumes it is for. Every worker watches its own key
and ``_sel.>``, matches the selectors against what it knows about itself (volume
id, pod namespace, name and labels, node) and serves :func:`effective_policy`:

1. the volume's own policy (its key) — its layers come first, so they see each op
   first (a fault there fires before any selector's layers run);
2. then every matching selector's layers, higher ``priority`` first, equal
   priorities by name.

A selector whose record has no ``selector`` (deactivated by ``unselect``, or an
expiry that restored "nothing") contributes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

from .policy import Policy, PolicyRecord


def selected(selectors: Mapping[str, PolicyRecord], *, volume: str, namespace: str, pod: str,
             node: str, labels: Mapping[str, str] | None = None) -> list[tuple[str, PolicyRecord]]:
    """The selector records that apply to a volume, in merge order.

    Args:
        selectors: selector name → its latest record.
        volume: the volume id.
        namespace: namespace of the pod using it (``""`` = unknown).
        pod: that pod's name (``""`` = unknown).
        node: the node the worker runs on (``""`` = unknown).
        labels: that pod's labels (None or empty = unknown).

    Returns:
        ``[(name, record), …]``: higher ``priority`` first, then by name.
    """
    chosen = [(name, record) for name, record in selectors.items()
              if record.selector is not None
              and record.selector.matches(volume=volume, namespace=namespace, pod=pod, node=node,
                                          labels=labels)]
    return sorted(chosen, key=lambda item: (-item[1].priority, item[0]))


def effective_policy(own: Policy, chosen: list[tuple[str, PolicyRecord]]) -> Policy:
    """Merge a volume's own policy with the selector policies chosen for it.

    Args:
        own: the policy stored under the volume's key (empty if none).
        chosen: from :func:`selected`, in merge order.

    Returns:
        ``own`` itself when nothing is chosen; else a policy whose layers are
        ``own``'s followed by each chosen selector's, and whose description names
        the selectors.
    """
    if not chosen:
        return own
    layers = list(own.layers)
    for _, record in chosen:
        layers.extend(record.policy.layers)
    names = ", ".join(f"_sel.{name}" for name, _ in chosen)
    description = f"{own.description} + {names}" if own.description else f"+ {names}"
    return Policy(layers=layers, description=description[:1024])
