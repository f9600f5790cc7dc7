"""Path matching shared by the layers."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable


def compile_glob(pattern: str) -> Callable[[str], bool] | None:
    """Compile an ``fnmatch`` glob into a predicate on op paths.

    Returns:
        None for ``*`` (matches every path, so layers can skip the test), else a
        function ``path -> bool``. ``*`` and ``?`` also match ``/``.
    """
    if pattern == "*":
        return None
    return re.compile(fnmatch.translate(pattern)).match  # type: ignore[return-value]
