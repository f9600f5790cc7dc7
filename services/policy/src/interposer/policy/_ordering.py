"""Concurrent request handling that keeps each volume's requests in arrival order.

nats-py runs a subscription's callback for one message at a time, so a policy
service that awaited each KV write inside the callback stored a fleet push of 50
volumes one after another (~1.4 ms each: the last volume's change landed ~70 ms
after the first; issue #5's goal is p99 ≤ 50 ms to 50 workers). Requests for
different volumes are independent; requests for the same volume (key) must be
stored in the order they arrived, or a later ``set`` could be overwritten by an
earlier one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

#: Requests handled at once; further ones wait in the subscription's pending queue.
DEFAULT_MAX_IN_FLIGHT = 64


class OrderedPerKey:
    """Runs request handlers concurrently across keys and in arrival order within a key.

    Args:
        max_in_flight: most handlers running or queued at once; :meth:`submit`
            waits for a slot beyond that (back-pressure to NATS's pending queue).
    """

    def __init__(self, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        self._slots = asyncio.Semaphore(max_in_flight)
        # key → (lock, handlers holding or waiting for it); dropped at zero, so the
        # table holds only keys with work in flight.
        self._keys: dict[str, tuple[asyncio.Lock, int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, key: str, handler: Callable[[], Awaitable[None]]) -> None:
        """Start ``handler`` after every earlier handler of ``key``; return once it is queued.

        Handlers of one key start in the order ``submit`` was called (asyncio
        runs new tasks and grants ``Lock`` waiters first come, first served).
        """
        await self._slots.acquire()
        lock, users = self._keys.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._keys[key] = (lock, users + 1)
        task = asyncio.create_task(self._run(key, lock, handler))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: str, lock: asyncio.Lock, handler: Callable[[], Awaitable[None]]) -> None:
        try:
            async with lock:
                await handler()
        finally:
            lock_, users = self._keys[key]
            if users == 1:
                del self._keys[key]
            else:
                self._keys[key] = (lock_, users - 1)
            self._slots.release()

    async def drain(self) -> None:
        """Wait until every submitted handler has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
