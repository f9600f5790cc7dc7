"""Durations on the command line: ``90``, ``90s``, ``30m``, ``2h``, ``1d``, ``1w``, ``1h30m``."""

from __future__ import annotations

import re

import click

#: Seconds per unit letter (PromQL's duration units, less ``ms`` and ``y``).
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number of seconds, or number+unit parts (``1h30m``).

    Raises:
        ValueError: anything else, or a duration of 0 (the message quotes ``text``).
    """
    stripped = text.strip()
    try:
        seconds = float(stripped)
    except ValueError:
        parts = _PART.findall(stripped)
        if not parts or "".join(number + unit for number, unit in parts) != stripped:
            raise ValueError(f"{text!r} is not a duration (e.g. 90, 90s, 30m, 2h, 1d, 1w, 1h30m)") from None
        seconds = sum(float(number) * UNIT_S[unit] for number, unit in parts)
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


class Duration(click.ParamType):
    """A click parameter holding :func:`parse_duration`'s seconds (a float)."""

    name = "duration"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
