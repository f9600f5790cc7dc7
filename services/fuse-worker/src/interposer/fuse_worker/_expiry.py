"""Drop expired layers on time, with or without a bus."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from ._adapter import InterposerOperations

log = logging.getLogger(__name__)


async def expire_layers(operations: InterposerOperations, wall_clock: Callable[[], float] = time.time) -> None:
    """Run forever: when a layer of the stack in force expires, install the stack without it.

    Sleeps until the earliest expiry of the stack in force (wall clock, so an
    ``expires_at`` is honoured even if the clock is stepped: the wait is re-checked
    on wake-up) or until another stack is installed, whichever comes first.

    Args:
        operations: the FUSE operations whose ``stack`` is watched and replaced.
        wall_clock: seconds since the Unix epoch (injectable for tests).
    """
    while True:
        stack, changed = operations.stack, operations.stack_changed
        deadline = stack.next_expiry_s
        if deadline is None:
            await changed.wait()
            continue
        with trio.move_on_after(max(0.0, deadline - wall_clock())):
            await changed.wait()
        now = wall_clock()
        if now >= deadline and operations.stack is stack:
            new = stack.expire(now)
            if not operations.install(new, replacing=stack):
                continue  # a new revision came in meanwhile (from the bus thread)
            log.info("policy revision %d: layers expired, %d left", stack.revision, len(new.layers))
