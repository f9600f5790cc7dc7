"""A bug in the worker's own code fails the request that hit it, not the mount."""

from __future__ import annotations

import errno

import pyfuse3
import pytest
import trio

from interposer.fuse_worker import InterposerOperations, MemoryBackend, Telemetry


class _PathBug(MemoryBackend):
    """A backend whose op naming has a bug: what killed the mount in issue #3 (a RecursionError)."""

    def path_of(self, ino: int) -> str:
        if ino != 1:
            raise RecursionError("maximum recursion depth exceeded")
        return super().path_of(ino)


def test_a_bug_outside_the_layers_fails_one_request_with_eio_not_the_worker() -> None:
    """pyfuse3 answers only FUSEError; anything else left its loop and every user of the
    mount got ENOTCONN. Each handler now answers EIO for an internal error."""
    backend = _PathBug()
    operations = InterposerOperations(backend, Telemetry())
    ctx = pyfuse3.RequestContext()

    async def serve() -> None:
        entry = await operations.mkdir(1, b"d", 0o755, ctx)  # the root's path is fine
        for call in (lambda: operations.getattr(entry.st_ino, ctx), lambda: operations.opendir(entry.st_ino, ctx),
                     lambda: operations.lookup(entry.st_ino, b"x", ctx)):
            with pytest.raises(pyfuse3.FUSEError) as failed:
                await call()
            assert failed.value.errno == errno.EIO
        assert (await operations.getattr(1, ctx)).st_ino == 1  # and the next request is served
        assert operations.telemetry.internal_errors_total == 3  # heartbeats carry it to the collector

    trio.run(serve)
