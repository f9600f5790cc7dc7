"""The staged_writes layer: an existing object is downloaded whole before a change and uploaded whole after.

Virtual time (trio's MockClock) with a fake backend for the charges; a real mount for
what an application sees.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import trio
import trio.testing

from interposer.fuse_worker import Op, Stack
from interposer.proto import DelayLayer, Policy, ProfileLayer, StagedWritesLayer, ThrottleLayer
from interposer.proto.events import FATTR_SIZE, FATTR_MODE
from interposer.proto.policy import FixedDistribution

MIB = 1 << 20
RATE = 4 * MIB  # bytes/s: a second per 4 MiB moved
REQUEST_S = 0.1


def _stack(**fields) -> Stack:
    layer = StagedWritesLayer(rate_bytes_per_s=RATE, distribution=FixedDistribution(delay_s=REQUEST_S), **fields)
    return Stack(Policy(layers=[layer]), 1)


async def _served_s(stack: Stack, op: Op, result=None) -> float:
    """Seconds (virtual) ``op`` took through ``stack`` over a backend answering at once with ``result``."""
    async def call():
        if op.name == "open":
            op.file_size = op.size  # the adapter reads it after the open; tests pass it as size
        return op.size if result is None else result

    chain = stack.chains.get(op.name)
    started = trio.current_time()
    await (call() if chain is None else chain(op, call))
    return trio.current_time() - started


def _run(main):
    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _open(ino: int, size: int, flags: int = os.O_WRONLY) -> Op:
    return Op("open", ino, f"/f{ino}", size=size, open_flags=flags)


def _write(ino: int, offset: int, size: int, flags: int = os.O_WRONLY) -> Op:
    return Op("write", ino, f"/f{ino}", offset=offset, size=size, open_flags=flags)


def _close(ino: int, flags: int = os.O_WRONLY) -> Op:
    return Op("flush", ino, f"/f{ino}", open_flags=flags)


def test_changing_an_existing_object_downloads_it_once_and_uploads_it_whole() -> None:
    stack = _stack()

    async def main() -> list[float]:
        took = [await _served_s(stack, _open(2, 8 * MIB))]
        took.append(await _served_s(stack, _write(2, MIB, 4096)))  # the download: 0.1 s + 8 MiB at 4 MiB/s
        took.append(await _served_s(stack, _write(2, 2 * MIB, 4096)))  # the local copy has it
        took.append(await _served_s(stack, _close(2)))  # the whole file goes up again: a request + 8 MiB
        took.append(await _served_s(stack, _close(2)))  # nothing changed since
        took.append(await _served_s(stack, _write(2, 0, 4096)))  # the local copy went with the upload
        return took

    took = _run(main)
    assert took[0] == 0 and took[2] == 0 and took[4] == 0
    assert took[1] == pytest.approx(REQUEST_S + 2.0)
    assert took[3] == pytest.approx(REQUEST_S + 2.0)
    assert took[5] == pytest.approx(REQUEST_S + 2.0)


def test_new_and_truncated_files_and_readers_pay_nothing() -> None:
    stack = _stack()

    async def main() -> list[float]:
        took = []
        for open_op in (_open(3, 0), _open(4, 0, os.O_WRONLY | os.O_TRUNC),  # empty once opened
                        _open(5, 8 * MIB, os.O_RDONLY)):  # a reader changes nothing
            took.append(await _served_s(stack, open_op))
            ino = open_op.ino
            took.append(await _served_s(stack, _write(ino, 0, MIB)))
            took.append(await _served_s(stack, _close(ino)))
        return took

    assert _run(main) == [0.0] * 9


def test_appends_to_a_large_enough_object_are_downloaded_but_upload_only_what_was_appended() -> None:
    # gcsfuse: "if an append is done to the end of a file, where the original file is at least 2MB,
    # then only the appended content is uploaded" - the temporary file still starts as the whole object
    # (FileInode.writeUsingTempFile -> ensureContent), and the syncer composes a temporary object of the
    # appended bytes onto it only when nothing below the stored size changed (its dirty threshold)
    stack = _stack(append_upload_min_bytes=2 * MIB, download_requests=2, upload_requests=2,
                   append_upload_requests=4)

    async def main() -> list[float]:
        took = [await _served_s(stack, _open(2, 4 * MIB)), await _served_s(stack, _open(3, MIB))]
        took.append(await _served_s(stack, _write(2, 4 * MIB, 4096)))
        took.append(await _served_s(stack, _write(2, 4 * MIB + 4096, 4096)))
        took.append(await _served_s(stack, _close(2)))
        took.append(await _served_s(stack, _write(3, MIB, 4096)))  # below 2 MiB: rewritten
        took.append(await _served_s(stack, _close(3)))
        took.append(await _served_s(stack, _write(2, 4 * MIB + 8192, 4096)))  # appended again...
        took.append(await _served_s(stack, _write(2, 0, 4096)))  # ...and changed at 0: a rewrite
        took.append(await _served_s(stack, _close(2)))
        return took

    took = _run(main)
    assert took[:2] == [0.0, 0.0] and took[3] == 0.0 and took[8] == 0.0
    assert took[2] == pytest.approx(2 * REQUEST_S + 1.0)  # a stat, then the 4 MiB object down
    assert took[4] == pytest.approx(4 * REQUEST_S + 8192 / RATE, abs=1e-6)  # a compose of the 8 KiB appended
    assert took[5] == pytest.approx(2 * REQUEST_S + 0.25)
    assert took[6] == pytest.approx(2 * REQUEST_S + (MIB + 4096) / RATE)  # the 1 MiB object and its append go up
    assert took[7] == pytest.approx(2 * REQUEST_S + (4 * MIB + 8192) / RATE)  # down again: the copy went up
    assert took[9] == pytest.approx(2 * REQUEST_S + (4 * MIB + 3 * 4096) / RATE)


def test_a_staged_new_file_is_uploaded_with_one_request_the_first_time() -> None:
    # gcsfuse's syncUsingContent stats the object before an upload, except for a local file (not stored yet)
    stack = _stack(new_files="staged", upload_requests=2)

    async def main() -> list[float]:
        await _create(stack, 3)
        took = [await _served_s(stack, _write(3, 0, MIB, os.O_RDWR))]
        took.append(await _served_s(stack, Op("fsync", 3, "/f3", open_flags=os.O_RDWR)))
        took.append(await _served_s(stack, _write(3, MIB, MIB, os.O_RDWR)))  # the local copy went up: down again
        took.append(await _served_s(stack, _close(3, os.O_RDWR)))  # stored now: a stat first
        return took

    assert _run(main) == [0.0, pytest.approx(REQUEST_S + 0.25), pytest.approx(REQUEST_S + 0.25),
                          pytest.approx(2 * REQUEST_S + 0.5)]


def test_a_truncation_downloads_the_object_first_even_to_zero() -> None:
    # gcsfuse truncates its temporary file, which starts as the whole object (truncateUsingTempFile ->
    # ensureContent), and an O_TRUNC open reaches it as such a truncation (jacobsa/fuse does not ask for
    # FUSE_ATOMIC_O_TRUNC): overwriting a checkpoint downloads the old one first
    stack = _stack()

    async def main() -> list[float]:
        took = [await _served_s(stack, _open(2, 8 * MIB)), await _served_s(stack, _open(3, 8 * MIB))]
        took.append(await _served_s(stack, Op("setattr", 2, "/f2", size=0, mode=FATTR_SIZE)))
        took.append(await _served_s(stack, _write(2, 0, 4096)))
        took.append(await _served_s(stack, _close(2)))
        took.append(await _served_s(stack, Op("setattr", 3, "/f3", mode=FATTR_MODE)))  # chmod: no data
        took.append(await _served_s(stack, Op("setattr", 3, "/f3", size=4 * MIB, mode=FATTR_SIZE)))
        took.append(await _served_s(stack, Op("fsync", 3, "/f3")))  # the 4 MiB left go up
        took.append(await _served_s(stack, _open(4, 4 * MIB, os.O_WRONLY | os.O_TRUNC)))  # open(path, "w")
        took.append(await _served_s(stack, _write(4, 0, 4096)))
        took.append(await _served_s(stack, _close(4)))
        return took

    took = _run(main)
    assert took[:2] == [0.0] * 2 and took[3] == 0.0 and took[5] == 0.0 and took[9] == 0.0
    assert took[2] == pytest.approx(REQUEST_S + 2.0)  # the 8 MiB object down, then emptied
    assert took[4] == pytest.approx(REQUEST_S + 4096 / RATE, abs=1e-6)  # the emptied file, 4 KiB written since, goes up
    assert took[6] == pytest.approx(REQUEST_S + 2.0)
    assert took[7] == pytest.approx(REQUEST_S + 1.0)
    assert took[8] == pytest.approx(REQUEST_S + 1.0)  # the 4 MiB overwritten object down at the open
    assert took[10] == pytest.approx(REQUEST_S + 4096 / RATE, abs=1e-6)


def test_writes_arriving_during_the_download_wait_for_it_once() -> None:
    stack = _stack()
    ended: list[float] = []

    async def write(offset: int) -> None:
        await _served_s(stack, _write(2, offset, 4096))
        ended.append(trio.current_time())

    async def main() -> float:
        await _served_s(stack, _open(2, 4 * MIB))
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write, 0)
            await trio.sleep(0.5)
            nursery.start_soon(write, 8192)
        return started

    started = _run(main)
    assert [end - started for end in ended] == [pytest.approx(REQUEST_S + 1.0)] * 2


def test_a_staged_file_is_read_and_written_locally_past_the_layers_of_the_store() -> None:
    # gcsfuse serves a staged file from its temporary file until the close uploads it ("writes the
    # contents of the local file back to Cloud Storage ... and deletes temp-file")
    store = [StagedWritesLayer(rate_bytes_per_s=RATE, distribution=FixedDistribution(delay_s=REQUEST_S)),
             ThrottleLayer(rate_bytes_per_s=MIB),  # the link
             DelayLayer(ops=frozenset({"read", "write"}), distribution=FixedDistribution(delay_s=0.02))]
    stack = Stack(Policy(layers=store), 1)
    _, link, store_latency = stack.layers

    def read(ino: int) -> Op:
        return Op("read", ino, f"/f{ino}", offset=0, size=4096, open_flags=os.O_RDWR)

    async def main() -> tuple[list[float], list[bool]]:
        ops = [_open(2, 4 * MIB, os.O_RDWR), read(2), _write(2, 0, 4096, os.O_RDWR), read(2),
               _write(2, 4096, 4096, os.O_RDWR), _close(2, os.O_RDWR), read(2), _write(3, 0, 4096)]
        took = [await _served_s(stack, op) for op in ops]
        return took, [op.charged_by_client for op in ops]

    took, charged = _run(main)
    assert took[1] == pytest.approx(0.02)  # not changed yet: a ranged read from the store
    assert took[2] == pytest.approx(REQUEST_S + 1.0)  # the download; the write itself is local
    assert took[3] == 0.0 and took[4] == 0.0  # the local copy
    assert took[5] == pytest.approx(REQUEST_S + 1.0)  # up whole
    assert took[6] == pytest.approx(0.02)  # the local copy went with the upload
    assert took[7] == pytest.approx(0.02)  # a file this layer never held: the store's
    assert charged == [False, False, True, True, True, True, False, False]  # the close: its upload
    # what went over the link, and waited for the store, are the three ops not served locally
    assert link.statistics().ops == 3 and link.statistics().bytes == 3 * 4096
    assert store_latency.statistics().delayed == 3


def _streaming_stack(**fields) -> tuple[Stack, list]:
    """gcsfuse's write path: the staged layer, then the link and the request that finalizes a streamed file."""
    layers = [StagedWritesLayer(rate_bytes_per_s=RATE, distribution=FixedDistribution(delay_s=REQUEST_S), **fields),
              ThrottleLayer(rate_bytes_per_s=1 << 39),  # counts what goes over the link (never waits)
              DelayLayer(ops=frozenset({"write"}), distribution=FixedDistribution(delay_s=0.05), write_behind=True)]
    stack = Stack(Policy(layers=layers), 1)
    return stack, stack.layers


async def _create(stack: Stack, ino: int) -> None:
    async def created():
        return None, type("Attrs", (), {"st_ino": ino})()

    await stack.chains["create"](Op("create", 1, f"/f{ino}", open_flags=os.O_RDWR | os.O_CREAT), created)


def test_a_new_file_written_in_order_is_streamed_and_its_close_finalizes_it() -> None:
    stack, (_, link, finalize) = _streaming_stack()

    async def main() -> list[float]:
        await _create(stack, 3)
        took = [await _served_s(stack, _write(3, offset, MIB, os.O_RDWR)) for offset in (0, MIB, 2 * MIB)]
        took.append(await _served_s(stack, Op("fsync", 3, "/f3", open_flags=os.O_RDWR)))  # streams, finalizes nothing
        took.append(await _served_s(stack, _close(3, os.O_RDWR)))
        return took

    assert _run(main) == [0.0, 0.0, 0.0, pytest.approx(0.05), 0.0]
    assert link.statistics().bytes == 3 * MIB  # the bytes went over the link as written
    assert finalize.statistics().delayed == 1


def test_a_write_out_of_order_stages_a_streamed_file_and_its_close_uploads_it_whole() -> None:
    # gcsfuse docs/semantics.md: "doing out-of-order writes ... will cause GCSFuse to automatically revert to
    # the existing write path of staging writes to a temporary file on disk"
    stack, (staged, link, finalize) = _streaming_stack()

    async def main() -> list[float]:
        await _create(stack, 3)
        took = [await _served_s(stack, _write(3, 0, MIB, os.O_RDWR))]
        took.append(await _served_s(stack, _write(3, 0, 4096, os.O_RDWR)))  # a header written last
        took.append(await _served_s(stack, Op("read", 3, "/f3", size=4096, open_flags=os.O_RDWR)))  # local
        took.append(await _served_s(stack, _close(3, os.O_RDWR)))
        took.append(await _served_s(stack, _open(3, MIB, os.O_RDWR)))
        took.append(await _served_s(stack, _close(3, os.O_RDWR)))  # nothing written since: nothing to send
        return took

    took = _run(main)
    assert took[0] == 0.0 and took[4:] == [0.0, 0.0]
    # the stream finalized (a request), then downloaded (a request + 1 MiB at 4 MiB/s)
    assert took[1] == pytest.approx(REQUEST_S + REQUEST_S + 0.25)
    assert took[2] == 0.0
    assert took[3] == pytest.approx(REQUEST_S + 0.25)  # up whole; no second request for the deferred writes
    assert link.statistics().bytes == MIB and finalize.statistics().delayed == 0
    assert staged.statistics().downloads == 1 and staged.statistics().uploads == 1


def test_a_read_of_a_file_being_streamed_finalizes_it_once() -> None:
    # gcsfuse: "performing a read operation will finalize the object on GCS"
    stack, (_, _, finalize) = _streaming_stack()

    async def main() -> list[float]:
        await _create(stack, 3)
        took = [await _served_s(stack, _write(3, 0, MIB, os.O_RDWR))]
        took.append(await _served_s(stack, Op("read", 3, "/f3", size=4096, open_flags=os.O_RDWR)))
        took.append(await _served_s(stack, Op("read", 3, "/f3", size=4096, open_flags=os.O_RDWR)))
        took.append(await _served_s(stack, _close(3, os.O_RDWR)))  # already finalized: nothing to send
        return took

    assert _run(main) == [0.0, pytest.approx(REQUEST_S), 0.0, 0.0]
    assert finalize.statistics().delayed == 0


def test_a_rename_of_a_file_being_streamed_finalizes_it_first() -> None:
    # gcsfuse: "Rename operation on a file undergoing writes via streaming writes will be finalized and then
    # renamed. This means that any follow up writes will automatically revert to ... staging writes"
    stack, (staged, _, finalize) = _streaming_stack()

    async def rename(source: str, target: str) -> float:
        return await _served_s(stack, Op("rename", 1, source, target=target), result=None)

    async def main() -> list[float]:
        await _create(stack, 3)
        took = [await _served_s(stack, _write(3, 0, MIB, os.O_RDWR))]
        took.append(await rename("/f3", "/ckpt"))  # the stream is finalized before the rename
        took.append(await rename("/ckpt", "/ckpt.old"))  # an object now: nothing more here
        took.append(await _served_s(stack, _write(3, MIB, MIB, os.O_RDWR)))  # at the end, but staged: down first
        took.append(await _served_s(stack, _close(3, os.O_RDWR)))  # up whole
        return took

    took = _run(main)
    assert took[:3] == [0.0, pytest.approx(REQUEST_S), 0.0]
    assert took[3] == pytest.approx(REQUEST_S + 0.25)  # a request + 1 MiB at 4 MiB/s
    assert took[4] == pytest.approx(REQUEST_S + 0.5)
    assert finalize.statistics().delayed == 0 and staged.statistics().uploaded_bytes == 2 * MIB


def test_a_file_extended_while_streamed_streams_on_and_one_cut_short_is_finalized() -> None:
    # gcsfuse: only a truncation downwards finalizes a file being streamed; after one upwards, a write at
    # the new size is in order (bufferedwrites: offset == totalSize or truncatedSize)
    stack, (staged, link, _) = _streaming_stack()

    def truncate(ino: int, size: int) -> Op:
        return Op("setattr", ino, f"/f{ino}", size=size, mode=FATTR_SIZE)

    async def main() -> list[float]:
        await _create(stack, 3)
        took = [await _served_s(stack, truncate(3, 2 * MIB))]  # preallocated: still streamed
        took.append(await _served_s(stack, _write(3, 0, MIB, os.O_RDWR)))  # in order from the start
        took.append(await _served_s(stack, _write(3, 2 * MIB, MIB, os.O_RDWR)))  # at the extended size
        took.append(await _served_s(stack, truncate(3, MIB)))  # below its size: finalized, then downloaded
        return took

    took = _run(main)
    assert took[:3] == [0.0, 0.0, 0.0]
    assert took[3] == pytest.approx(REQUEST_S + REQUEST_S + 0.75)  # finalize; a request + 3 MiB at 4 MiB/s
    assert link.statistics().bytes == 2 * MIB and staged.statistics().downloaded_bytes == 3 * MIB


def test_files_created_while_max_streamed_files_stream_are_staged() -> None:
    # gcsfuse docs/semantics.md: "writes will automatically fall back to legacy staged writes if more than 4
    # files are concurrently opened for streaming writes" (one block per file, write-global-max-blocks)
    stack, (staged, link, finalize) = _streaming_stack(max_streamed_files=2)

    async def write_and_close(ino: int) -> float:
        await _served_s(stack, _write(ino, 0, MIB, os.O_RDWR))
        return await _served_s(stack, _close(ino, os.O_RDWR))

    async def main() -> list[float]:
        for ino in (3, 4, 5):
            await _create(stack, ino)
        closes = [await write_and_close(ino) for ino in (3, 4, 5)]
        await _create(stack, 6)  # the closes freed their blocks
        closes.append(await write_and_close(6))
        return closes

    closes = _run(main)
    assert closes[0] == pytest.approx(0.05) and closes[1] == pytest.approx(0.05)  # finalized after the link
    assert closes[2] == pytest.approx(REQUEST_S + 0.25)  # the third was staged: uploaded whole at its close
    assert closes[3] == pytest.approx(0.05)
    assert link.statistics().bytes == 3 * MIB and finalize.statistics().delayed == 3
    assert staged.statistics().uploads == 1


def test_an_empty_object_opened_for_writing_is_streamed_and_takes_a_block() -> None:
    # gcsfuse streams an existing object of size 0 as a new file (areBufferedWritesSupported), so it holds one
    # of write-global-max-blocks; one written out of order is finalized and staged, then, being stored, its close
    # stats the object before the upload
    stack, (staged, link, finalize) = _streaming_stack(max_streamed_files=1, upload_requests=2)

    async def main() -> list[float]:
        await _served_s(stack, _open(2, 0, os.O_RDWR))  # the empty object: streamed
        await _create(stack, 3)  # no block left: staged
        took = [await _served_s(stack, _write(3, 0, MIB, os.O_RDWR)),
                await _served_s(stack, _close(3, os.O_RDWR)),  # up whole: one request + 1 MiB
                await _served_s(stack, _write(2, 0, MIB, os.O_RDWR)),  # streamed: the link
                await _served_s(stack, _write(2, 4 * MIB, MIB, os.O_RDWR)),  # out of order: finalized, downloaded
                await _served_s(stack, _close(2, os.O_RDWR))]  # stored: a stat and the upload of 5 MiB
        return took

    took = _run(main)
    assert took[0] == 0.0 and took[1] == pytest.approx(REQUEST_S + 0.25) and took[2] == 0.0
    assert took[3] == pytest.approx(REQUEST_S + REQUEST_S + 0.25)  # finalized, then the 1 MiB object's download
    assert took[4] == pytest.approx(2 * REQUEST_S + 1.25)
    assert link.statistics().bytes == MIB and finalize.statistics().delayed == 0


def _blob_stack() -> Stack:
    """blobfuse2's caching mode: whole files down at open, kept 120 s after the last close, up whole at close."""
    return _stack(download_on_open=True, keep_local_s=120.0, new_files="staged")


def _release(stack: Stack, ino: int) -> None:
    stack.released(0, ino)


def test_caching_mode_downloads_at_every_open_unless_the_file_was_closed_lately() -> None:
    stack = _blob_stack()

    async def main() -> list[float]:
        took = [await _served_s(stack, _open(2, 8 * MIB, os.O_RDONLY))]  # a reader waits for the whole file
        took.append(await _served_s(stack, Op("read", 2, "/f2", size=MIB)))  # then reads locally
        took.append(await _served_s(stack, _open(2, 8 * MIB, os.O_RDONLY)))  # a second handle: the copy is there
        _release(stack, 2)
        _release(stack, 2)
        await trio.sleep(100)
        took.append(await _served_s(stack, _open(2, 8 * MIB, os.O_RDONLY)))  # 100 s after its close: still cached
        _release(stack, 2)
        await trio.sleep(121)
        took.append(await _served_s(stack, _open(2, 8 * MIB, os.O_RDONLY)))  # past the 120 s: down again
        return took

    took = _run(main)
    assert took[1:4] == [0.0] * 3
    assert took[0] == pytest.approx(REQUEST_S + 2.0) and took[4] == pytest.approx(REQUEST_S + 2.0)


def test_caching_mode_uploads_changed_new_and_emptied_files_whole_at_close() -> None:
    stack = _blob_stack()

    async def main() -> list[float]:
        took = [await _served_s(stack, _open(2, 4 * MIB, os.O_RDWR))]  # down: 1 s
        took.append(await _served_s(stack, _write(2, 0, 4096, os.O_RDWR)))  # local
        took.append(await _served_s(stack, _close(2, os.O_RDWR)))  # up whole: 1 s
        took.append(await _served_s(stack, _close(2, os.O_RDWR)))  # unchanged since
        create = Op("create", 1, "/new", open_flags=os.O_WRONLY | os.O_CREAT)

        async def created():
            return None, type("Attrs", (), {"st_ino": 3})()

        chain = stack.chains["create"]
        await chain(create, created)
        took.append(await _served_s(stack, Op("write", 3, "/new", size=2 * MIB, open_flags=os.O_WRONLY)))
        took.append(await _served_s(stack, Op("flush", 3, "/new", open_flags=os.O_WRONLY)))  # up: 0.5 s
        took.append(await _served_s(stack, _open(4, 0, os.O_WRONLY | os.O_TRUNC)))  # emptied: nothing down
        took.append(await _served_s(stack, _close(4)))  # an empty object up: the request
        return took

    took = _run(main)
    assert took[0] == pytest.approx(REQUEST_S + 1.0) and took[2] == pytest.approx(REQUEST_S + 1.0)
    assert took[1] == 0 and took[3] == 0 and took[4] == 0 and took[6] == 0
    assert took[5] == pytest.approx(REQUEST_S + 0.5) and took[7] == pytest.approx(REQUEST_S)


def test_transfers_at_once_share_the_link_in_order() -> None:
    stack = _blob_stack()
    ended: dict[int, float] = {}

    async def open_(ino: int) -> None:
        await _served_s(stack, _open(ino, 4 * MIB, os.O_RDONLY))
        ended[ino] = trio.current_time()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_, 2)
            nursery.start_soon(open_, 3)

    _run(main)
    assert sorted(ended.values()) == [pytest.approx(REQUEST_S + 1.0), pytest.approx(REQUEST_S + 2.0)]


def test_without_upload_at_fsync_the_close_uploads_and_drops_the_local_copy() -> None:
    # blobfuse2: SyncFile only marks the handle; FlushFile at the close uploads; the copy of a file fsync'd
    # is purged at its close, so the next open downloads again
    stack = _stack(download_on_open=True, keep_local_s=120.0, new_files="staged", upload_at_fsync=False)

    async def main() -> list[float]:
        took = [await _served_s(stack, _open(2, 4 * MIB, os.O_RDWR))]  # down: 1 s
        took.append(await _served_s(stack, _write(2, 0, 4096, os.O_RDWR)))
        took.append(await _served_s(stack, Op("fsync", 2, "/f2", open_flags=os.O_RDWR)))  # sends nothing
        took.append(await _served_s(stack, _close(2, os.O_RDWR)))  # up whole: 1 s
        _release(stack, 2)
        took.append(await _served_s(stack, _open(2, 4 * MIB, os.O_RDONLY)))  # purged: down again
        _release(stack, 2)
        took.append(await _served_s(stack, _open(2, 4 * MIB, os.O_RDONLY)))  # not fsync'd since: kept
        return took

    took = _run(main)
    assert took[1:3] == [0.0, 0.0] and took[5] == 0.0
    assert took[0] == took[3] == took[4] == pytest.approx(REQUEST_S + 1.0)


def test_a_transfer_in_blocks_waits_for_each_wave_of_requests_and_commits_a_large_upload() -> None:
    # blobfuse2 through the Azure SDK: 4 MiB ranged GETs, 32 at a time; up to 256 MiB one Put Blob, above
    # it Put Blocks, 32 at a time, and a Put Block List. Here: 1 MiB blocks, 2 at a time, one request up to
    # 2 MiB, so that the link (4 MiB/s, 0.25 s per block) and the requests (0.1 s) both show.
    stack = _stack(download_on_open=True, new_files="staged", transfer_block_bytes=MIB, transfer_parallelism=2,
                   single_upload_max_bytes=2 * MIB)

    async def main() -> list[float]:
        took = [await _served_s(stack, _open(2, 4 * MIB, os.O_RDWR))]
        took.append(await _served_s(stack, _write(2, 0, 4096, os.O_RDWR)))
        took.append(await _served_s(stack, _close(2, os.O_RDWR)))  # 4 MiB > 2 MiB: in blocks
        took.append(await _served_s(stack, _open(3, 2 * MIB, os.O_RDWR)))
        took.append(await _served_s(stack, _write(3, 0, 4096, os.O_RDWR)))
        took.append(await _served_s(stack, _close(3, os.O_RDWR)))  # 2 MiB: one request
        return took

    took = _run(main)
    # blocks 1 and 2 asked at 0, their bytes at 0.1-0.35 and 0.35-0.6; block 3 asked at 0.35 by the first
    # worker, its bytes 0.6-0.85 (the link is busy until 0.6); block 4 asked at 0.6, bytes 0.85-1.1
    assert took[0] == pytest.approx(1.1) and took[2] == pytest.approx(1.1 + REQUEST_S)  # + the commit
    assert took[3] == pytest.approx(0.6)  # two blocks asked at once: 0.1, then 0.25 each on the link
    assert took[5] == pytest.approx(REQUEST_S + 0.5)  # one Put Blob
    assert took[1] == took[4] == 0.0


def test_a_transfer_of_more_blocks_than_are_simulated_takes_the_link_for_the_rest() -> None:
    # 32 GiB in 4 MiB blocks: 8,192, of which the first 4,096 are simulated one by one; at 4 MiB/s the
    # link bounds it: 8,192 s, plus the first request
    stack = _stack(download_on_open=True, new_files="staged", transfer_block_bytes=4 * MIB, transfer_parallelism=32)

    async def main() -> float:
        return await _served_s(stack, _open(2, 32 << 30, os.O_RDONLY))

    assert _run(main) == pytest.approx(REQUEST_S + (32 << 30) / RATE)


def test_blocks_in_flight_at_once_each_wait_for_their_own_request() -> None:
    # with a link fast enough not to matter, 4 blocks 4 at a time wait for the slowest of 4 requests: the
    # median of the max of 4 log-normal draws (median 20 ms, sigma 0.5) is 20 ms * exp(0.5 * z) with
    # Phi(z) = 0.5 ** (1/4), z = 0.998: 33.0 ms; one request's median would be 20 ms
    from interposer.proto.policy import LognormalDistribution
    layer = StagedWritesLayer(rate_bytes_per_s=1 << 50, distribution=LognormalDistribution(median_s=0.020, sigma=0.5),
                              download_on_open=True, new_files="staged", transfer_block_bytes=4 * MIB,
                              transfer_parallelism=4, seed=5)
    stack = Stack(Policy(layers=[layer]), 1)

    async def main() -> list[float]:
        took = []
        for ino in range(2, 2002):
            took.append(await _served_s(stack, _open(ino, 16 * MIB, os.O_RDONLY)))
            _release(stack, ino)
        return took

    assert statistics.median(_run(main)) == pytest.approx(0.0330, rel=0.05)


def test_the_stack_reads_sizes_and_keeps_flush_on_writers_closes_only_while_such_a_layer_is_in_force() -> None:
    gcs = Stack(Policy(layers=[ProfileLayer(name="gcs")]), 1)
    assert gcs.sizes_opened_files
    assert gcs.acts_on_flush_at("/a", writable=True) and not gcs.acts_on_flush_at("/a", writable=False)
    assert not Stack(Policy(layers=[ProfileLayer(name="s3")]), 1).sizes_opened_files
    assert not Stack(Policy(layers=[ProfileLayer(name="gcs", ops=frozenset({"read"}))]), 1).sizes_opened_files
    assert Stack(Policy(layers=[ProfileLayer(name="azure-blob", ops=frozenset({"read"}))]), 1).sizes_opened_files


def _timed(fn) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def test_a_mounted_volume_charges_a_change_to_an_existing_file_and_keeps_every_byte(mount_worker, tmp_path) -> None:
    backing = tmp_path / "bucket"
    backing.mkdir()
    (backing / "log.jsonl").write_bytes(b"a" * (16 * MIB))  # an object already in the bucket
    rate = 64 * MIB  # 16 MiB: 0.25 s each way
    vol = mount_worker(backing=backing, policy=json.dumps({"layers": [
        {"type": "staged_writes", "rate_bytes_per_s": rate}]}))
    path = vol.mountpoint / "log.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        write_s = _timed(lambda: os.write(fd, b"b" * 100))
        second_write_s = _timed(lambda: os.write(fd, b"c" * 100))
    finally:
        close_s = _timed(lambda: os.close(fd))
    assert write_s >= 16 * MIB / rate  # the whole object came down first
    assert second_write_s < 16 * MIB / rate / 2
    assert close_s >= (16 * MIB - 200) / rate * 0.95  # and goes up again whole (the sleep's wake-up lead)
    assert (backing / "log.jsonl").read_bytes() == b"a" * (16 * MIB) + b"b" * 100 + b"c" * 100
    # a new file has nothing to fetch; an existing one opened with O_TRUNC (Python's "w") is truncated in the
    # client's local copy, which starts as the whole object (gcsfuse)
    new_s = _timed(lambda: (vol.mountpoint / "new.bin").write_bytes(b"n" * MIB))
    overwritten_s = _timed(lambda: path.write_bytes(b"t" * MIB))
    assert new_s < 16 * MIB / rate / 2 and overwritten_s >= 16 * MIB / rate
    assert (backing / "log.jsonl").read_bytes() == b"t" * MIB


def test_the_gcs_profile_rewrites_a_changed_object_but_composes_an_append(mount_worker, tmp_path) -> None:
    # At a 64 MiB/s link a 16 MiB object takes 0.25 s each way; a request ~20 ms (log-normal,
    # sigma 0.5), so the four requests of an append's compose stay well below it (their sum above
    # 0.25 s: p < 1e-6). Both first writes download the object.
    backing = tmp_path / "bucket"
    backing.mkdir()
    for name in ("changed.bin", "appended.bin"):
        (backing / name).write_bytes(b"a" * (16 * MIB))
    rate = 64 * MIB
    vol = mount_worker(backing=backing, policy=json.dumps({"layers": [
        {"type": "profile", "name": "gcs", "rate_bytes_per_s": rate}]}))
    transfer_s = 16 * MIB / rate

    def change(name: str, flags: int, offset: int) -> tuple[float, float]:
        fd = os.open(vol.mountpoint / name, os.O_WRONLY | flags)
        try:
            write_s = _timed(lambda: os.pwrite(fd, b"b" * 4096, offset))
        finally:
            close_s = _timed(lambda: os.close(fd))
        return write_s, close_s

    changed_write_s, changed_close_s = change("changed.bin", 0, 8 * MIB)
    appended_write_s, appended_close_s = change("appended.bin", os.O_APPEND, 0)  # O_APPEND: at the end
    assert changed_write_s >= transfer_s and changed_close_s >= transfer_s * 0.95
    assert appended_write_s >= transfer_s and appended_close_s < transfer_s
    assert (backing / "appended.bin").read_bytes() == b"a" * (16 * MIB) + b"b" * 4096
    changed = (backing / "changed.bin").read_bytes()
    assert len(changed) == 16 * MIB and changed[8 * MIB:8 * MIB + 4096] == b"b" * 4096


def _azure_blob_mount(mount_worker, tmp_path, name: str, fill: bytes):
    """A container holding one 16 MiB blob of ``fill`` bytes, mounted with the ``azure-blob`` profile at 64 MiB/s;
    (the container, the blob's path through the mount, seconds a transfer of it takes: 0.25)."""
    backing = tmp_path / "container"
    backing.mkdir()
    (backing / name).write_bytes(fill * (16 * MIB))
    rate = 64 * MIB
    vol = mount_worker(backing=backing, policy=json.dumps({"layers": [
        {"type": "profile", "name": "azure-blob", "rate_bytes_per_s": rate}]}))
    return backing, vol.mountpoint / name, 16 * MIB / rate


def test_the_azure_blob_profile_makes_an_open_wait_for_the_whole_file_and_a_close_for_its_upload(
        mount_worker, tmp_path) -> None:
    backing, path, transfer_s = _azure_blob_mount(mount_worker, tmp_path, "shard-0.bin", b"s")
    fd: list[int] = []
    open_s = _timed(lambda: fd.append(os.open(path, os.O_RDONLY)))
    try:
        read_s = _timed(lambda: os.pread(fd[0], MIB, 8 * MIB))
    finally:
        os.close(fd[0])
    reopen_s = _timed(lambda: os.close(os.open(path, os.O_RDONLY)))  # in the local cache for 120 s
    assert open_s >= transfer_s and read_s < transfer_s / 2 and reopen_s < transfer_s / 2
    fd = [os.open(path, os.O_WRONLY)]
    try:
        write_s = _timed(lambda: os.pwrite(fd[0], b"w" * 4096, 0))
    finally:
        close_s = _timed(lambda: os.close(fd[0]))
    assert write_s < transfer_s / 2 and close_s >= transfer_s * 0.95  # the whole blob goes up again
    assert (backing / "shard-0.bin").read_bytes() == b"w" * 4096 + b"s" * (16 * MIB - 4096)


def test_the_azure_blob_profile_uploads_at_the_close_not_at_fsync(mount_worker, tmp_path) -> None:
    # blobfuse2's fsync sends nothing; the close uploads the whole blob, and drops the local copy of a file
    # that was fsync'd, so the next open downloads it again (a reopen is otherwise local for 120 s)
    backing, path, transfer_s = _azure_blob_mount(mount_worker, tmp_path, "db.bin", b"d")
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"w" * 4096, 4096)
        fsync_s = _timed(lambda: os.fsync(fd))
    finally:
        close_s = _timed(lambda: os.close(fd))
    reopen_s = _timed(lambda: os.close(os.open(path, os.O_RDONLY)))
    assert fsync_s < transfer_s / 2 and close_s >= transfer_s * 0.95 and reopen_s >= transfer_s * 0.95
    assert (backing / "db.bin").read_bytes() == b"d" * 4096 + b"w" * 4096 + b"d" * (16 * MIB - 8192)


def test_the_gcs_profile_serves_a_changed_object_from_its_local_copy_until_its_close(mount_worker, tmp_path) -> None:
    # A ranged read from the bucket waits for a request (log-normal, median 20 ms, sigma 0.5: the median of
    # 15 draws below 10 ms has p < 1e-6); a read of the temporary file gcsfuse staged a change in does not.
    backing = tmp_path / "bucket"
    backing.mkdir()
    (backing / "table.db").write_bytes(b"a" * (4 * MIB))
    vol = mount_worker(backing=backing, policy=json.dumps({"layers": [
        {"type": "profile", "name": "gcs", "rate_bytes_per_s": 64 * MIB}]}))
    offsets = [(15 - k) * 128 * 1024 for k in range(15)]  # backwards: no read continues the one before

    def read_times(fd: int) -> float:
        return statistics.median(_timed(lambda: os.pread(fd, 4096, offset)) for offset in offsets)

    fd = os.open(vol.mountpoint / "table.db", os.O_RDWR)
    try:
        before_s = read_times(fd)
        os.pwrite(fd, b"b" * 4096, 0)  # the whole object comes down
        staged_s = read_times(fd)
        assert os.pread(fd, 8, 4092) == b"bbbbaaaa"
    finally:
        os.close(fd)  # and goes up again
    fd = os.open(vol.mountpoint / "table.db", os.O_RDONLY)
    try:
        after_s = read_times(fd)
    finally:
        os.close(fd)
    assert before_s > 0.010 and after_s > 0.010
    assert staged_s < 0.005
    assert (backing / "table.db").read_bytes() == b"b" * 4096 + b"a" * (4 * MIB - 4096)


def test_the_gcs_profile_stages_a_new_file_written_out_of_order(mount_worker, tmp_path) -> None:
    # An HDF5-style writer: the data in order, then the header at offset 0 rewritten at the end. gcsfuse
    # streams the data, then finalizes it at the out-of-order write, downloads it, and uploads the whole
    # file at the close.
    backing = tmp_path / "bucket"
    backing.mkdir()
    rate = 32 * MIB  # 4 MiB: 0.125 s each way; a request ~20 ms (above 0.125 s with p ~ 1e-4)
    vol = mount_worker(backing=backing, policy=json.dumps({"layers": [
        {"type": "profile", "name": "gcs", "rate_bytes_per_s": rate}]}))
    transfer_s = 4 * MIB / rate

    def write_new(name: str, header_at: int) -> tuple[float, float]:
        fd = os.open(vol.mountpoint / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for offset in range(0, 4 * MIB, MIB):
                os.pwrite(fd, b"d" * MIB, offset)
            header_s = _timed(lambda: os.pwrite(fd, b"h" * 512, header_at))
        finally:
            close_s = _timed(lambda: os.close(fd))
        return header_s, close_s

    appended_s, streamed_close_s = write_new("streamed.h5", header_at=4 * MIB)  # still in order
    header_s, staged_close_s = write_new("staged.h5", header_at=0)
    assert appended_s < transfer_s and streamed_close_s < transfer_s
    assert header_s >= transfer_s and staged_close_s >= transfer_s * 0.95
    assert (backing / "staged.h5").read_bytes() == b"h" * 512 + b"d" * (4 * MIB - 512)
    assert (backing / "streamed.h5").read_bytes() == b"d" * (4 * MIB) + b"h" * 512


def test_the_gcs_profile_stages_new_files_created_past_max_streamed_files(mount_worker, tmp_path) -> None:
    # gcsfuse streams as many new files as it has blocks (write-global-max-blocks); one created beyond that
    # is staged, so its close uploads it whole. Closing a streamed file frees its block.
    backing = tmp_path / "bucket"
    backing.mkdir()
    rate = 32 * MIB  # 4 MiB: 0.125 s on the link; a request ~20 ms (above 0.125 s with p ~ 1e-4)
    vol = mount_worker(backing=backing, policy=json.dumps({"layers": [
        {"type": "profile", "name": "gcs", "rate_bytes_per_s": rate, "max_streamed_files": 1}]}))
    transfer_s = 4 * MIB / rate

    def create(name: str) -> int:
        return os.open(vol.mountpoint / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def fill(fd: int, byte: bytes) -> None:
        for offset in range(0, 4 * MIB, MIB):
            os.pwrite(fd, byte * MIB, offset)

    streamed, staged = create("shard-0"), create("shard-1")  # at once: only the first gets the block
    fill(streamed, b"0")
    fill(staged, b"1")
    staged_close_s = _timed(lambda: os.close(staged))
    streamed_close_s = _timed(lambda: os.close(streamed))
    again = create("shard-2")  # the block is free again
    fill(again, b"2")
    again_close_s = _timed(lambda: os.close(again))
    assert staged_close_s >= transfer_s * 0.95
    assert streamed_close_s < transfer_s and again_close_s < transfer_s
    for index in range(3):
        assert (backing / f"shard-{index}").read_bytes() == str(index).encode() * (4 * MIB)


def test_the_gcs_profile_finalizes_a_new_file_renamed_while_open(mount_worker, tmp_path) -> None:
    # A writer that renames its temporary file into place before closing it: gcsfuse finalizes the stream at
    # the rename, so a write after it changes an existing object: below 2 MiB (no append exception) it is
    # downloaded first, and uploaded whole at the close.
    backing = tmp_path / "bucket"
    backing.mkdir()
    rate = 8 * MIB  # 1 MiB: 0.125 s on the link; a request ~20 ms (above 0.125 s with p ~ 1e-4)
    vol = mount_worker(backing=backing, policy=json.dumps({"layers": [
        {"type": "profile", "name": "gcs", "rate_bytes_per_s": rate}]}))
    transfer_s = MIB / rate

    def write_then_close(name: str, rename_to: str | None) -> tuple[float, float]:
        fd = os.open(vol.mountpoint / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.pwrite(fd, b"d" * MIB, 0)
            if rename_to is not None:
                os.rename(vol.mountpoint / name, vol.mountpoint / rename_to)
            tail_s = _timed(lambda: os.pwrite(fd, b"t" * 4096, MIB))  # in order
        finally:
            close_s = _timed(lambda: os.close(fd))
        return tail_s, close_s

    kept_tail_s, kept_close_s = write_then_close("kept.tmp", None)
    renamed_tail_s, renamed_close_s = write_then_close("ckpt.tmp", "ckpt")
    assert kept_tail_s < transfer_s and kept_close_s < transfer_s
    assert renamed_tail_s >= transfer_s * 0.95 and renamed_close_s >= transfer_s * 0.95
    assert (backing / "ckpt").read_bytes() == b"d" * MIB + b"t" * 4096
    assert not (backing / "ckpt.tmp").exists()
