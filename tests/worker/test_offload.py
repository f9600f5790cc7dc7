"""Where the passthrough backend's blocking syscalls run (``backends._offload``), on real files."""

from __future__ import annotations

import os
import posix  # the real pread, while the test counts calls of os.pread
import threading
from pathlib import Path

import pytest
import trio

from interposer.fuse_worker.backends import _offload
from interposer.fuse_worker.backends._offload import (
    OFFLOAD_ABOVE_S,
    SOLO_CALLS_BEFORE_LOOP,
    ThreadHop,
    BlockingCalls,
    CallRouter,
    read_cached,
    readable,
)


def test_a_slow_call_nobody_waited_for_stays_on_the_loop() -> None:
    # Queue depth 1 on a slow volume: the hop would only add its latency.
    router = CallRouter("adaptive", queued=lambda: False)
    for _ in range(10):
        router.observe(5e-3, router.queued)
    assert router.mean_s > OFFLOAD_ABOVE_S and not router.offloaded
    router.queued = lambda: True  # a second reader arrives and waits behind the next slow call
    router.observe(5e-3, router.queued)
    assert router.offloaded


def test_hops_that_let_nothing_else_run_return_to_the_loop() -> None:
    router = CallRouter("adaptive")
    router.observe(5e-3)
    assert router.offloaded
    for _ in range(SOLO_CALLS_BEFORE_LOOP - 1):
        router.observe(5e-3, others_waited=False)
        assert router.offloaded
    router.observe(5e-3, others_waited=True)  # the loop did serve something: count again
    for _ in range(SOLO_CALLS_BEFORE_LOOP):
        assert router.offloaded
        router.observe(5e-3, others_waited=False)
    assert not router.offloaded


def test_readable_sees_data_waiting_on_a_descriptor() -> None:
    r, w = os.pipe()
    try:
        has_data = readable(r)
        assert not has_data()
        os.write(w, b"x")
        assert has_data()
    finally:
        os.close(r)
        os.close(w)


def test_slow_calls_move_to_a_thread_and_back_when_fast_again() -> None:
    router = CallRouter("adaptive")
    for _ in range(3):
        router.observe(2e-6)  # cached reads
    assert not router.offloaded
    router.observe(5e-3)  # one 5 ms miss lifts the mean past the threshold
    assert router.offloaded and router.mean_s > OFFLOAD_ABOVE_S
    while router.mean_s >= OFFLOAD_ABOVE_S / 2:
        assert router.offloaded  # hysteresis: no flapping around the threshold
        router.observe(2e-6)
    assert not router.offloaded


@pytest.mark.parametrize(("mode", "offloaded"), [("loop", False), ("thread", True)])
def test_pinned_modes_ignore_the_measure(mode: str, offloaded: bool) -> None:
    router = CallRouter(mode)
    for took in (1.0, 1e-9, 1.0):
        router.observe(took)
        assert router.offloaded is offloaded


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="blocking I/O mode 'sometimes'"):
        CallRouter("sometimes")  # type: ignore[arg-type]


def test_calls_run_on_the_thread_the_router_chose() -> None:
    async def thread_of(router: CallRouter) -> int:
        return await router.call(threading.get_ident)

    loop_thread = threading.get_ident()
    assert trio.run(thread_of, CallRouter("loop")) == loop_thread
    assert trio.run(thread_of, CallRouter("thread")) != loop_thread


def _uncached_file(path: Path, data: bytes) -> int:
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # clean pages can be dropped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd


def test_read_cached_returns_a_prefix_of_the_data_or_nothing(tmp_path: Path) -> None:
    # Whether an uncached page comes back depends on how fast the I/O that NOWAIT
    # starts completes, so only what holds either way is asserted.
    data = os.urandom(4 * 4096)
    fd = _uncached_file(tmp_path / "f", data)
    try:
        first = read_cached(fd, len(data), 0)
        assert first is None or bytes(first) == data[: len(first)]
        assert os.pread(fd, len(data), 0) == data  # now cached
        assert bytes(read_cached(fd, len(data), 0)) == data
        assert len(read_cached(fd, 4096, len(data))) == 0  # end of file needs no I/O
    finally:
        os.close(fd)


@pytest.mark.parametrize("cached_pages", [0, 3, 8])
def test_pread_completes_what_the_cache_did_not_hold(tmp_path: Path, monkeypatch, cached_pages: int) -> None:
    data = os.urandom(16 * 4096)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    # The cache "holds" the first cached_pages pages of any read (None: nothing).
    monkeypatch.setattr(_offload, "read_cached", lambda fd, size, off: (
        memoryview(os.pread(fd, min(size, cached_pages * 4096), off)) if cached_pages else None))
    try:
        calls = BlockingCalls("adaptive")
        assert bytes(trio.run(calls.pread, fd, 8 * 4096, 0)) == data[: 8 * 4096]
        assert bytes(trio.run(calls.pread, fd, 8 * 4096, 12 * 4096)) == data[12 * 4096:]  # short at EOF
        assert bytes(trio.run(calls.pread, fd, 4096, len(data))) == b""
    finally:
        os.close(fd)


def test_thread_hop_runs_calls_concurrently_and_passes_errors_back() -> None:
    hop = ThreadHop()
    barrier = threading.Barrier(4, timeout=5)  # only passes if 4 calls run at once

    async def main() -> list[int]:
        results: list[int] = []

        async def one(i: int) -> None:
            results.append(await hop.run(lambda: barrier.wait() * 0 + i))

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(one, i)
        with pytest.raises(FileNotFoundError):
            await hop.run(os.stat, "/nonexistent/interposer")
        return sorted(results)

    assert trio.run(main) == [0, 1, 2, 3]


class ArrivingCache:
    """Stands in for ``read_cached``: the page cache "receives" the data after ``misses`` probes.

    What a probe that submitted a disk read then sees, without depending on the disk's speed.
    """

    def __init__(self, misses: int) -> None:
        self.misses, self.probes = misses, 0

    def __call__(self, fd: int, size: int, offset: int) -> bytes | None:
        self.probes += 1
        return None if self.probes <= self.misses else posix.pread(fd, size, offset)


def _polling_calls(window_s: float, queued: bool = False) -> BlockingCalls:
    calls = BlockingCalls("adaptive")
    calls.watch(lambda: queued, lambda: 0, miss_poll_s=window_s)
    return calls


def _read_with(calls: BlockingCalls, cache: ArrivingCache, monkeypatch, tmp_path: Path) -> int:
    """One 4 KiB read through ``calls`` with ``cache`` as the page cache (checked); the plain preads made."""
    data = os.urandom(4096)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    preads = []
    monkeypatch.setattr(_offload, "read_cached", cache)
    monkeypatch.setattr(_offload.os, "pread", lambda *a: (preads.append(a), posix.pread(*a))[1])
    try:
        got = bytes(trio.run(calls.pread, fd, 4096, 0))
    finally:
        os.close(fd)
        monkeypatch.undo()
    assert got == data
    return len(preads)


def test_a_miss_is_polled_for_until_the_cache_holds_it(monkeypatch, tmp_path: Path) -> None:
    cache = ArrivingCache(misses=20)
    preads = _read_with(_polling_calls(window_s=1.0), cache, monkeypatch, tmp_path)
    assert preads == 0 and cache.probes == 21  # served from the cache, no blocking read


@pytest.mark.parametrize("why", ["window closes first", "requests are queued", "misses are slow", "polling off"])
def test_a_miss_falls_back_to_a_blocking_read(monkeypatch, tmp_path: Path, why: str) -> None:
    cache = ArrivingCache(misses=10**9)
    calls = _polling_calls(window_s=0.0 if why == "polling off" else 200e-6 if why != "misses are slow" else 1e-3,
                           queued=why == "requests are queued")
    if why == "misses are slow":
        calls.reads.mean_s = _offload.MISS_POLL_MEAN_FACTOR * 1e-3 * 1.1  # a network volume's misses
    preads = _read_with(calls, cache, monkeypatch, tmp_path)
    assert preads == 1
    if why == "window closes first":
        assert cache.probes > 2  # it did poll, then gave up
    else:
        assert cache.probes == 1  # the probe only: no polling
