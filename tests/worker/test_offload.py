"""Where the passthrough backend's blocking syscalls run (``backends._offload``), on real files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from interposer.fuse_worker.backends._offload import (
    OFFLOAD_ABOVE_S,
    SOLO_CALLS_BEFORE_LOOP,
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
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: only what a test reads gets cached
    return fd


def test_read_cached_returns_only_what_the_page_cache_holds(tmp_path: Path) -> None:
    data = os.urandom(4 * 4096)
    fd = _uncached_file(tmp_path / "f", data)
    try:
        assert read_cached(fd, 4096, 0) is None, "dropped from the cache (tmp_path must be on a disk fs, not tmpfs)"
        assert os.pread(fd, 4096, 0) == data[:4096]  # now cached
        assert bytes(read_cached(fd, 4096, 0)) == data[:4096]
        assert len(read_cached(fd, 4096, len(data))) == 0  # end of file needs no I/O
    finally:
        os.close(fd)


def test_a_partly_cached_read_returns_all_the_data(tmp_path: Path) -> None:
    data = os.urandom(16 * 4096)
    fd = _uncached_file(tmp_path / "f", data)
    try:
        os.pread(fd, 4096, 0)  # only the first pages come into the cache
        os.posix_fadvise(fd, 4096, 0, os.POSIX_FADV_DONTNEED)
        calls = BlockingCalls("adaptive")
        partial = read_cached(fd, 8 * 4096, 0)
        assert partial is not None and 0 < len(partial) < 8 * 4096
        assert bytes(trio.run(calls.pread, fd, 8 * 4096, 0)) == data[: 8 * 4096]
        assert bytes(trio.run(calls.pread, fd, 8 * 4096, 12 * 4096)) == data[12 * 4096:]  # short at EOF
    finally:
        os.close(fd)
