"""Plain-text tables for ``interposer policy history|list|status`` (pipe- and grep-friendly)."""

from __future__ import annotations

import time
from datetime import datetime

import msgspec

from interposer.proto import HistoryReply, ListReply, Policy, Selector, StatusReply
from interposer.proto.subjects import SELECTOR_KEY_PREFIX

#: Longest policy summary in a table cell, characters.
SUMMARY_WIDTH = 72


def _when(epoch_s: float | None) -> str:
    if not epoch_s:
        return "-"
    return datetime.fromtimestamp(epoch_s).astimezone().isoformat(timespec="seconds")


def _ago(epoch_s: float, now_s: float) -> str:
    seconds = max(0.0, now_s - epoch_s)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _layer_summary(layer: msgspec.Struct) -> str:
    """Compact JSON of what ``layer`` sets: its type, then only the fields that differ from their defaults
    (``{"type":"profile","name":"gp3"}``, not a line of defaults cut before the name)."""
    fields: dict[str, object] = {"type": type(layer).__struct_config__.tag}
    for field in msgspec.structs.fields(layer):
        value = getattr(layer, field.name)
        default = field.default_factory() if field.default_factory is not msgspec.NODEFAULT else field.default
        if field.default is msgspec.NODEFAULT and field.default_factory is msgspec.NODEFAULT or value != default:
            fields[field.encode_name] = value
    return msgspec.json.encode(fields).decode()


def summarize(policy: Policy) -> str:
    """One line: the layers as compact JSON (type first, default fields left out), cut to ``SUMMARY_WIDTH``."""
    if not policy.layers:
        text = "(no layers)"
    else:
        text = " ".join(_layer_summary(layer) for layer in policy.layers)
    if policy.expires_after_s is not None:
        text = f"[expires after {policy.expires_after_s:g}s] {text}"
    return text if len(text) <= SUMMARY_WIDTH else text[: SUMMARY_WIDTH - 1] + "…"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _selector_text(selector: Selector | None, priority: int) -> str:
    """``all`` / ``namespace=ml pod=train-*`` (``p=N`` when not 0); ``(inactive)`` if None."""
    if selector is None:
        return "(inactive)"
    fields = msgspec.structs.asdict(selector)
    text = "all" if selector.all else " ".join(
        f"{k}={v}" if k != "labels" else " ".join(f"label:{lk}={lv}" for lk, lv in sorted(v.items()))
        for k, v in fields.items() if v and k != "all")
    return f"{text} p={priority}" if priority else text


def render_history(reply: HistoryReply) -> str:
    """``REV  WHEN  AUTHOR  ACTION  EXPIRES  POLICY`` per revision, oldest first
    (a selector policy's history, key ``_sel.<name>``, adds ``SELECTOR``)."""
    is_selector = reply.volume.startswith(SELECTOR_KEY_PREFIX)
    rows = []
    for e in reply.entries:
        action = e.action + (f" r{e.source_revision}" if e.action in ("rollback", "expire") else "")
        row = (str(e.revision), _when(e.updated_at_s), e.author or "-", action, _when(e.expires_at_s))
        if is_selector:
            row += (_selector_text(e.selector, e.priority),)
        rows.append(row + (summarize(e.policy),))
    if not rows:
        return f"{'selector' if is_selector else 'volume'} {reply.volume}: no policy stored"
    header = ("REV", "WHEN", "AUTHOR", "ACTION", "EXPIRES") + (("SELECTOR",) if is_selector else ()) + ("POLICY",)
    return _table(header, rows)


def render_list(reply: ListReply) -> str:
    """``VOLUME  REV  WHEN  AUTHOR  ACTION  LAYERS  EXPIRES`` per volume."""
    rows = [(v.volume, str(v.revision), _when(v.updated_at_s), v.author or "-", v.action, str(v.layers),
             _when(v.expires_at_s)) for v in reply.volumes]
    if not rows:
        return "no volume has a policy"
    return _table(("VOLUME", "REV", "WHEN", "AUTHOR", "ACTION", "LAYERS", "EXPIRES"), rows)


def render_status(reply: StatusReply, now_s: float | None = None) -> str:
    """One row per worker (or per volume without workers): desired vs applied and since when."""
    now_s = time.time() if now_s is None else now_s
    rows = []
    for v in reply.volumes:
        state = "converged" if v.converged else ("no workers" if not v.workers else "pending")
        if not v.workers:
            rows.append((v.volume, str(v.desired_revision), "-", "-", "-", "-", state))
        for w in v.workers:
            worker_state = "stale" if w.stale else ("ok" if w.applied_revision >= v.desired_revision else "lagging")
            rows.append((v.volume, str(v.desired_revision), w.worker_id, str(w.applied_revision),
                         _ago(w.applied_since_s, now_s), _ago(w.last_seen_s, now_s), worker_state))
    if not rows:
        return "no volumes and no workers known"
    return _table(("VOLUME", "DESIRED", "WORKER", "APPLIED", "SINCE", "LAST SEEN", "STATE"), rows)
