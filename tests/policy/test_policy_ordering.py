"""``OrderedPerKey``: the policy service's request handling order."""

from __future__ import annotations

import asyncio

from interposer.policy._ordering import OrderedPerKey


def test_other_keys_run_while_one_waits_and_a_key_keeps_its_order() -> None:
    async def main() -> list[str]:
        requests = OrderedPerKey(max_in_flight=8)
        release_a1 = asyncio.Event()
        log: list[str] = []

        async def handler(name: str, wait: asyncio.Event | None = None) -> None:
            log.append(f"{name} start")
            if wait is not None:
                await wait.wait()
            log.append(f"{name} end")

        await requests.submit("a", lambda: handler("a1", release_a1))
        await requests.submit("a", lambda: handler("a2"))
        await requests.submit("b", lambda: handler("b1"))
        for _ in range(5):
            await asyncio.sleep(0)
        assert "b1 end" in log and "a2 start" not in log, log
        release_a1.set()
        await requests.drain()
        assert not requests._keys, "finished keys are forgotten"
        return log

    log = asyncio.run(main())
    assert log.index("a1 end") < log.index("a2 start")


def test_submit_waits_for_a_slot_beyond_max_in_flight() -> None:
    async def main() -> tuple[bool, bool]:
        requests = OrderedPerKey(max_in_flight=1)
        gate = asyncio.Event()
        await requests.submit("a", gate.wait)
        second = asyncio.create_task(requests.submit("b", lambda: asyncio.sleep(0)))
        await asyncio.sleep(0.01)
        blocked = not second.done()
        gate.set()
        await asyncio.wait_for(second, 5)
        await requests.drain()
        return blocked, second.done()

    blocked, done = asyncio.run(main())
    assert blocked and done
