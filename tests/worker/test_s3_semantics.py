"""The ``s3_semantics`` layer: what Mountpoint for Amazon S3 refuses fails here, with its errno.

On real mounts, as an application sees it: a file written once, front to back,
and read after it was closed works; what Mountpoint does not support fails with
the errno Mountpoint gives (mountpoint-s3-fs ``fs.rs``/``fs/error.rs``), and is
reported as an injected fault. Validation of the layer in the policy first.
"""

from __future__ import annotations

import errno
import json
import os
import re

from types import SimpleNamespace

import pyfuse3
import pytest
import trio
import trio.testing

from interposer.fuse_worker import Op, Stack
from interposer.fuse_worker._op import invoke_backend
from interposer.fuse_worker.layers.s3_semantics import S3Semantics, S3SemanticsStatistics
from interposer.proto import PolicyError, decode_policy
from interposer.proto.policy import S3_SEMANTICS_OPS


def _policy(**fields: object) -> str:
    return json.dumps({"layers": [{"type": "s3_semantics", **fields}]})


@pytest.mark.parametrize(("fields", "message"), [
    ({"ops": ["read"]}, "field `ops`"),
    ({"page_cache": "keep"}, "field `page_cache`"),
    ({"bucket": "directory"}, "bucket"),  # directory buckets' renames are not modelled
    ({"allow_delete": "yes"}, "allow_delete"),
])
def test_a_malformed_layer_is_refused_naming_the_field(fields, message) -> None:
    with pytest.raises(PolicyError, match=re.escape(message)):
        decode_policy(_policy(**fields))


def test_the_layer_sees_every_op_it_has_a_rule_for_and_keeps_read_only_closes_flushless() -> None:
    stack = Stack(decode_policy(_policy()), 1)
    assert set(S3Semantics._RULES) == S3_SEMANTICS_OPS == set(stack.chains)
    assert stack.acts_on_flush_at("/f", writable=True)  # a close after writes completes the upload
    assert not stack.acts_on_flush_at("/f", writable=False)
    assert not stack.needs_direct_io("/f")  # reads are left to the page cache, as Mountpoint's are


def _errno_of(call, *args) -> int:
    with pytest.raises(OSError) as caught:
        call(*args)
    return caught.value.errno


def _faults_injected(log: str) -> int:
    found = re.search(r"(\d+) faults injected", log)
    assert found is not None, log[-2000:]
    return int(found.group(1))


def test_a_file_written_once_in_order_is_read_back_after_close(mount_worker) -> None:
    vol = mount_worker(policy=_policy())
    data = os.urandom(3 * 65536 + 123)
    with open(vol.mountpoint / "model.bin", "wb") as out:
        for start in range(0, len(data), 65536):
            out.write(data[start:start + 65536])
    assert (vol.mountpoint / "model.bin").read_bytes() == data
    assert (vol.backing / "model.bin").read_bytes() == data
    os.mkdir(vol.mountpoint / "run")
    (vol.mountpoint / "run" / "empty").touch()  # touch: opened for writing, closed with nothing written
    assert (vol.mountpoint / "run" / "empty").read_bytes() == b""
    assert vol.unmount() == 0
    assert _faults_injected(vol.log()) == 0


def test_writes_must_start_at_zero_and_follow_each_other(mount_worker) -> None:
    vol = mount_worker(policy=_policy())
    fd = os.open(vol.mountpoint / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert _errno_of(os.pwrite, fd, b"x" * 10, 4096) == errno.EINVAL
        assert os.pwrite(fd, b"a" * 10, 0) == 10
        assert _errno_of(os.pwrite, fd, b"b" * 10, 0) == errno.EINVAL  # no rewriting
        assert os.pwrite(fd, b"c" * 10, 10) == 10
        os.fsync(fd)  # completes the upload
        assert _errno_of(os.pwrite, fd, b"d", 20) == errno.EIO
    finally:
        os.close(fd)
    assert (vol.backing / "f").read_bytes() == b"a" * 10 + b"c" * 10


def test_a_file_being_written_cannot_be_read_reopened_or_removed(mount_worker) -> None:
    vol = mount_worker(policy=_policy(allow_delete=True))
    writer = os.open(vol.mountpoint / "ckpt", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(writer, b"partial")
        assert _errno_of(os.open, vol.mountpoint / "ckpt", os.O_RDONLY) == errno.EPERM
        assert _errno_of(os.open, vol.mountpoint / "ckpt", os.O_WRONLY) == errno.EPERM
        assert _errno_of(os.unlink, vol.mountpoint / "ckpt") == errno.EPERM
    finally:
        os.close(writer)
    assert (vol.mountpoint / "ckpt").read_bytes() == b"partial"
    os.unlink(vol.mountpoint / "ckpt")  # uploaded, and deletes are allowed
    assert not (vol.backing / "ckpt").exists()


def test_existing_objects_are_overwritten_only_when_allowed_and_truncated(mount_worker) -> None:
    vol = mount_worker(policy=_policy())
    (vol.backing / "data.csv").write_bytes(b"old")
    assert _errno_of(os.open, vol.mountpoint / "data.csv", os.O_WRONLY | os.O_TRUNC) == errno.EPERM
    assert _errno_of(os.open, vol.mountpoint / "data.csv", os.O_WRONLY | os.O_APPEND) == errno.EPERM
    fd = os.open(vol.mountpoint / "data.csv", os.O_RDWR)  # a read handle: Mountpoint decides at open
    try:
        assert os.read(fd, 3) == b"old"
        assert _errno_of(os.pwrite, fd, b"new", 0) == errno.EBADF
    finally:
        os.close(fd)
    assert _errno_of(os.chmod, vol.mountpoint / "data.csv", 0o600) == errno.EPERM
    assert _errno_of(os.truncate, vol.mountpoint / "data.csv", 0) == errno.EPERM
    assert _errno_of(os.unlink, vol.mountpoint / "data.csv") == errno.EPERM  # no --allow-delete
    assert (vol.backing / "data.csv").read_bytes() == b"old"  # nothing refused changed anything
    assert vol.unmount() == 0
    assert _faults_injected(vol.log()) == 6

    vol = mount_worker(policy=_policy(allow_overwrite=True), backing=vol.backing)
    assert _errno_of(os.open, vol.mountpoint / "data.csv", os.O_WRONLY) == errno.EPERM  # no O_TRUNC
    with open(vol.mountpoint / "data.csv", "wb") as out:  # O_WRONLY | O_CREAT | O_TRUNC
        out.write(b"new contents")
    assert (vol.mountpoint / "data.csv").read_bytes() == b"new contents"


def test_renames_links_special_files_and_xattrs_fail_as_on_mountpoint(mount_worker) -> None:
    vol = mount_worker(policy=_policy())
    (vol.backing / "a").write_bytes(b"x")
    (vol.backing / "old-dir").mkdir()
    mnt = vol.mountpoint
    # torch.save(..., tmp) then os.replace(tmp, final): the atomic-save idiom fails on Mountpoint.
    assert _errno_of(os.replace, mnt / "a", mnt / "b") == errno.ENOSYS
    assert _errno_of(os.link, mnt / "a", mnt / "hard") == errno.EPERM  # the kernel's word for Mountpoint's ENOSYS
    assert _errno_of(os.symlink, "a", mnt / "soft") == errno.ENOSYS
    assert _errno_of(os.mkfifo, mnt / "fifo") == errno.EINVAL
    assert _errno_of(os.setxattr, mnt / "a", "user.k", b"v") == errno.EOPNOTSUPP
    assert _errno_of(os.open, mnt / "a", os.O_WRONLY | os.O_SYNC) == errno.EINVAL
    assert _errno_of(os.rmdir, mnt / "old-dir") == errno.EPERM  # a directory of the bucket
    os.mkdir(mnt / "new-dir")  # local until something is uploaded into it
    os.rmdir(mnt / "new-dir")
    assert sorted(os.listdir(vol.backing)) == ["a", "old-dir"]
    # Still fine after the refusals (the kernel was not told to stop sending renames or xattrs).
    assert (mnt / "a").read_bytes() == b"x"


def test_handles_opened_before_the_layer_and_uploads_it_saw_complete() -> None:
    """Unit level (no mount): the layer's handle bookkeeping, on a backend that only counts calls."""
    layer = S3Semantics(decode_policy(_policy(allow_delete=True)).layers[0])
    handler = layer.bind(invoke_backend)
    calls: list[str] = []

    async def backend(result=None):  # noqa: ANN001, ANN202
        calls.append("backend")
        return result

    async def main() -> None:
        # A write on a handle opened before the layer came into force (session 9) passes.
        assert await handler(Op("write", 5, "/old", offset=4096, size=3, session=9), lambda: backend(3)) == 3
        # mkdir /d, then a file in it written through session 1 and released without a close's FLUSH.
        await handler(Op("mkdir", 1, "/d"), backend)
        attrs = SimpleNamespace(st_ino=7)
        await handler(Op("create", 2, "/d/f", open_flags=os.O_WRONLY, session=1), lambda: backend((None, attrs)))
        await handler(Op("write", 7, "/d/f", offset=0, size=4, session=1), lambda: backend(4))
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await handler(Op("open", 7, "/d/f", open_flags=os.O_RDONLY, session=2), backend)
        assert caught.value.errno == errno.EPERM
        layer.released(1, 7)  # the upload completes: /d is now a directory of the bucket
        await handler(Op("open", 7, "/d/f", open_flags=os.O_RDONLY, session=3), backend)
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await handler(Op("rmdir", 1, "/d"), backend)
        assert caught.value.errno == errno.EPERM

    trio.run(main)
    assert calls == ["backend"] * 5  # the two refused ops never reached it
    assert layer.statistics() == S3SemanticsStatistics(refused=2, uploads=1)


def test_of_two_opens_for_writing_at_once_one_is_refused_and_a_failed_open_leaves_nothing() -> None:
    """Unit level: the second writer is refused while the first one's open is still in the backend."""
    layer = S3Semantics(decode_policy(_policy()).layers[0])
    handler = layer.bind(invoke_backend)
    outcomes: list[object] = []

    async def slow_open() -> None:
        await trio.sleep(1)

    async def failing_open() -> None:
        raise pyfuse3.FUSEError(errno.EACCES)

    async def open_for_writing(session: int, call) -> None:  # noqa: ANN001
        try:
            await handler(Op("open", 7, "/f", open_flags=os.O_WRONLY, session=session), call)
            outcomes.append(session)
        except pyfuse3.FUSEError as exc:
            outcomes.append(errno.errorcode[exc.errno])

    async def main() -> None:
        layer._local_files.add(7)  # a file made through the mount (mknod), not written yet
        await open_for_writing(1, failing_open)  # the backend refused: nothing is left behind
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_for_writing, 2, slow_open)
            await trio.sleep(0.5)
            nursery.start_soon(open_for_writing, 3, slow_open)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert outcomes == ["EACCES", "EPERM", 2]
