"""The passthrough worker never touches anything outside its backing directory.

Layout: the backing dir is ``tmp/deep/backing`` and the forbidden directory
``tmp/deep/outside``, while the mount is ``tmp/mnt0``. A symlink ``../outside``
planted in the backing dir therefore points at the forbidden directory only if
the *worker* followed it; the caller (the kernel, resolving in the caller's
namespace) finds ``tmp/outside``, which does not exist. So anything appearing in
or changing under ``tmp/deep/outside`` was done by the worker: an escape.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from interposer.fuse_worker.backends._libc import renameat2

RENAME_EXCHANGE = 2
#: How long the swap race runs, seconds (a bound on work, not an assertion on speed).
RACE_DURATION_S = 1.5
#: How much longer the swap race may go on while no create has succeeded yet, seconds.
RACE_MAX_EXTRA_S = 15.0


def _errno_of(fn, *args, **kwargs) -> int:
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return exc.errno or -1
    return 0


def _snapshot(directory: Path) -> dict[str, tuple[int, int, int, int, int, int]]:
    """name → (mode, uid, gid, nlink, mtime_ns, size) of everything under ``directory``, the dir included."""
    found = {}
    for path in [directory, *directory.rglob("*")]:
        st = os.lstat(path)
        found[str(path.relative_to(directory))] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns,
                                                   st.st_size)
    return found


#: Worker flags of the two ways a file is reached: through the fd held since its
#: lookup, or (one file fd held) reopened from its directory's fd and name.
FD_MODES = {"held": [], "reopened": ["--max-file-fds", "1", "--max-dir-fds", "1"]}


@pytest.fixture(params=list(FD_MODES))
def escape_setup(mount_worker, tmp_path: Path, request: pytest.FixtureRequest):  # noqa: ANN201
    deep = tmp_path / "deep"
    deep.mkdir()
    outside = deep / "outside"
    outside.mkdir()
    (outside / "victim").write_text("do not touch")
    backing = deep / "backing"
    backing.mkdir()
    os.symlink("../outside", backing / "rel")  # outside, but only from the backing dir
    os.symlink("../outside/victim", backing / "rel_file")
    os.symlink("../..", backing / "up")
    os.symlink("/", backing / "slash")
    os.symlink(str(outside / "victim"), backing / "abs_file")
    assert not (tmp_path / "outside").exists()
    vol = mount_worker(backing=backing, extra=FD_MODES[request.param])
    before = _snapshot(outside)
    yield vol, outside
    assert _snapshot(outside) == before, "the worker changed something outside the backing dir"
    assert vol.proc.poll() is None, vol.log()


@pytest.mark.fuse
def test_planted_symlinks_are_never_followed_by_the_worker(escape_setup) -> None:
    vol, outside = escape_setup
    m = vol.mountpoint
    assert os.readlink(m / "rel") == "../outside" and os.readlink(m / "slash") == "/"
    # Resolved by the caller against the mount: ../outside from the mount root does not exist.
    assert _errno_of(os.open, m / "rel" / "new", os.O_CREAT | os.O_WRONLY) == errno.ENOENT
    assert _errno_of(os.open, m / "rel_file", os.O_RDONLY) == errno.ENOENT
    # Ops on the symlink inode itself reach the worker; none may act on the target.
    os.utime(m / "rel_file", ns=(1, 1), follow_symlinks=False)
    os.utime(m / "abs_file", ns=(1, 1), follow_symlinks=False)
    assert os.lstat(vol.backing / "abs_file").st_mtime_ns == 1
    os.chown(m / "abs_file", 65534, 65534, follow_symlinks=False)
    os.chown(m / "rel_file", 65534, 65534, follow_symlinks=False)
    assert os.lstat(vol.backing / "rel_file").st_uid == 65534
    assert _errno_of(os.setxattr, m / "abs_file", "user.k", b"v", follow_symlinks=False) == errno.EPERM
    assert _errno_of(os.getxattr, m / "abs_file", "user.k", follow_symlinks=False) == errno.ENODATA
    # A hard link of a symlink links the symlink, not its target.
    os.link(m / "abs_file", m / "abs_file2", follow_symlinks=False)
    assert os.readlink(vol.backing / "abs_file2") == str(outside / "victim")
    # Renames and unlinks of the links touch only the links.
    os.rename(m / "up", m / "up2")
    os.unlink(m / "up2")
    os.unlink(m / "slash")
    assert sorted(os.listdir(m)) == ["abs_file", "abs_file2", "rel", "rel_file"]


@pytest.mark.fuse
def test_hard_links_to_outside_files_are_impossible(escape_setup, tmp_path: Path) -> None:
    vol, outside = escape_setup
    m = vol.mountpoint
    assert _errno_of(os.link, outside / "victim", m / "stolen") == errno.EXDEV
    # linkat(AT_SYMLINK_FOLLOW) of the planted absolute symlink resolves (caller side)
    # to the outside file: EXDEV. (A dir_fd makes os.link call linkat with the flag;
    # plain link(2) on Linux links the symlink itself.)
    dir_fd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert _errno_of(os.link, "abs_file", "stolen", src_dir_fd=dir_fd, dst_dir_fd=dir_fd,
                         follow_symlinks=True) == errno.EXDEV
    finally:
        os.close(dir_fd)
    assert not os.path.lexists(vol.backing / "stolen")


@pytest.mark.fuse
def test_dot_dot_chains_stay_inside(escape_setup) -> None:
    vol, outside = escape_setup
    m = vol.mountpoint
    os.makedirs(m / "a" / "b")
    # The kernel resolves ".." itself; a lookup of ".." that reaches the worker is
    # answered from the inode table, never from the backing dir's parent.
    assert sorted(os.listdir(m / "a" / "b" / ".." / "..")) == sorted(os.listdir(m))
    fd = os.open(m / "a", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert "backing" not in os.listdir(fd) and "outside" not in os.listdir(fd)
    finally:
        os.close(fd)


@pytest.mark.fuse
def test_a_directory_swapped_for_a_symlink_mid_use_never_leads_outside(escape_setup) -> None:
    """A thread keeps exchanging ``d`` (a directory) with ``d_link`` (symlink to ../outside)
    in the backing dir while the mount creates, renames and stats files under ``d``."""
    vol, outside = escape_setup
    m, backing = vol.mountpoint, vol.backing
    (backing / "d").mkdir()
    os.symlink("../outside", backing / "d_link")
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        while not stop.is_set():
            renameat2(-100, os.fsencode(backing / "d"), -100, os.fsencode(backing / "d_link"), RENAME_EXCHANGE)
            swaps += 1

    thread = threading.Thread(target=swapper)
    thread.start()
    attempts = created = 0
    deadline = time.monotonic() + RACE_DURATION_S
    # The kernel caches "d" for the entry timeout (1 s): looked up while it was the
    # symlink, every create under it fails until the next revalidation. Go on past
    # the deadline until at least one create got through (each revalidation is a
    # coin flip), so the race is exercised both ways.
    give_up = deadline + RACE_MAX_EXTRA_S
    try:
        while time.monotonic() < deadline or (created == 0 and time.monotonic() < give_up):
            attempts += 1
            name = f"f{attempts}"
            try:
                fd = os.open(m / "d" / name, os.O_CREAT | os.O_WRONLY, 0o644)
                os.write(fd, b"x")
                os.close(fd)
                created += 1
                os.rename(m / "d" / name, m / "d" / f"{name}.r")
                os.stat(m / "d_link" / f"{name}.r")
            except OSError:
                pass
    finally:
        stop.set()
        thread.join()
    assert swaps > 10 and created > 0, (swaps, created)
    # Everything created landed inside the backing dir.
    real_dir = backing / ("d" if (backing / "d").is_dir() and not (backing / "d").is_symlink() else "d_link")
    assert len(list(real_dir.iterdir())) == created


@pytest.mark.fuse
def test_a_file_swapped_for_a_symlink_before_it_is_reopened_is_not_followed(
        escape_setup, request: pytest.FixtureRequest) -> None:
    """A file the worker has let go of (one file fd held) is replaced in the backing dir by a
    symlink to an outside file: reopening it by name must find the swap, never the target."""
    vol, outside = escape_setup
    m, backing = vol.mountpoint, vol.backing
    (backing / "f").write_text("inside")
    (backing / "other").write_text("other")
    known = os.stat(m / "f")
    os.stat(m / "other")  # with one file fd held, f's is closed now
    os.rename(backing / "f", backing / "f.moved")
    # Relative: outside only as seen from the backing dir (the kernel resolves a
    # symlink on the caller's side, where ../outside does not exist).
    os.symlink("../outside/victim", backing / "f")
    for attempt in (lambda: os.chmod(m / "f", 0o777), lambda: os.truncate(m / "f", 0),
                    lambda: os.setxattr(m / "f", "user.k", b"v"), lambda: (m / "f").write_text("pwned"),
                    lambda: os.utime(m / "f", (1, 1))):
        try:
            attempt()
        except OSError:
            pass
    assert (outside / "victim").read_text() == "do not touch"
    # Held, the fd still leads to the moved file (as a file handle would); reopened,
    # the swap is found and refused (ESTALE): the moved file is untouched.
    assert known.st_ino == os.stat(m / "f.moved").st_ino
    if request.node.callspec.params["escape_setup"] == "reopened":
        assert (backing / "f.moved").read_text() == "inside"


@pytest.mark.fuse
def test_a_directory_swapped_for_a_symlink_before_it_is_reopened_is_not_followed(
        escape_setup, request: pytest.FixtureRequest) -> None:
    """A directory the worker has let go of (one directory fd held) is replaced in the backing dir
    by a symlink to an outside directory: lookups, creates and listings in it must find the swap
    (ESTALE), never the outside directory."""
    vol, outside = escape_setup
    m, backing = vol.mountpoint, vol.backing
    (backing / "d").mkdir()
    (backing / "d" / "inner").write_text("inside")
    (backing / "other").mkdir()
    known = os.stat(m / "d")
    os.listdir(m / "other")  # with one directory fd held, d's is closed now
    os.rename(backing / "d", backing / "d.moved")
    os.symlink("../outside", backing / "d")
    before = _snapshot(outside)
    for attempt in (lambda: os.stat(m / "d" / "victim"), lambda: (m / "d" / "new").write_text("pwned"),
                    lambda: os.listdir(m / "d"), lambda: os.mkdir(m / "d" / "sub"),
                    lambda: os.unlink(m / "d" / "victim"), lambda: os.chmod(m / "d", 0o700),
                    lambda: os.rename(m / "d" / "victim", m / "stolen")):
        try:
            attempt()
        except OSError:
            pass
    assert _snapshot(outside) == before
    assert not (m / "stolen").exists() and not (backing / "stolen").exists()
    assert known.st_ino == os.stat(m / "d.moved").st_ino
    assert (backing / "d.moved" / "inner").read_text() == "inside"
