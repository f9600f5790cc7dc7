"""Edge cases naive FUSE passthroughs get wrong, compared with ext4 op by op.

Issue #3 names the failures of libfuse's high-level passthrough example:
ENAMETOOLONG from prefixing the backing path, ENOSYS, timestamps dropped. Each
scenario below runs once in a native directory and once through the mount (every
backend) and must give the same outcome: long names and paths deeper than
``PATH_MAX``, special files (fifo, socket, device node), ``utimensat`` with
``UTIME_NOW``/``UTIME_OMIT``, ``access(2)``, opens with ``O_SYNC``/``O_DSYNC``/
``O_DIRECT``, opens whose flags concern the path (``O_NOFOLLOW`` of a regular
file, ``O_DIRECTORY``) or Linux's truncation on ``O_RDONLY | O_TRUNC``, ``fsync``
of a directory, ``statfs``'s name length, ``renameat2``'s
``RENAME_WHITEOUT``, and a rewound
directory stream that must list the directory as it is now. Two differences
docs/posix.md states are checked as such: device nodes cannot be opened
(``nodev``), and ``O_TMPFILE`` is refused with EOPNOTSUPP.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from interposer_testing import make_chain, remove_chain

NAME_MAX = 255
PATH_MAX = 4096
#: utimensat(2)'s special tv_nsec values (<linux/stat.h>).
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
AT_FDCWD = -100
#: renameat2(2) flags (<linux/fs.h>).
RENAME_EXCHANGE, RENAME_WHITEOUT = 1 << 1, 1 << 2

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """``utimensat(AT_FDCWD, path, {atime, mtime}, 0)``; each time is ``(sec, nsec)``.

    Raises:
        OSError: with the call's errno.
    """
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def outcome(call: Callable[[], Any]) -> Any:
    """The call's result, or its errno name."""
    try:
        return call()
    except OSError as e:
        return errno.errorcode[e.errno]


def long_names(root: Path) -> dict[str, Any]:
    out = {}
    out["255-byte name"] = outcome(lambda: (root / ("n" * NAME_MAX)).write_bytes(b"ok") and "ok")
    out["256-byte name"] = outcome(lambda: (root / ("n" * (NAME_MAX + 1))).write_bytes(b"x"))
    out["256-byte name, lookup"] = outcome(lambda: os.stat(root / ("m" * (NAME_MAX + 1))) and "found")
    # A tree deeper than PATH_MAX, built and walked with dir fds: a worker that
    # prefixes the backing dir's path to every name fails long before the kernel would.
    component = "d" * 200
    depth = PATH_MAX // len(component) + 2
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for _ in range(depth):
            os.mkdir(component, dir_fd=fds[-1])
            fds.append(os.open(component, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        fd = os.open("leaf", os.O_CREAT | os.O_RDWR, 0o644, dir_fd=fds[-1])
        os.write(fd, b"deep data")
        os.close(fd)
        with open(f"/proc/self/fd/{fds[-1]}/leaf", "rb") as f:
            out["leaf below PATH_MAX x 1.1"] = f.read()
        out["leaf nlink, size"] = (lambda st: (st.st_nlink, st.st_size))(os.stat("leaf", dir_fd=fds[-1]))
        os.rename("leaf", "moved", src_dir_fd=fds[-1], dst_dir_fd=fds[1])
        out["renamed across the depth"] = sorted(os.listdir(fds[1]))
        full = root.joinpath(*[component] * depth)
        out["absolute path longer than PATH_MAX"] = outcome(lambda: os.stat(full))
    finally:
        for fd in fds:
            os.close(fd)
    return out


def special_files(root: Path) -> dict[str, Any]:
    out = {}
    os.mkfifo(root / "fifo", 0o644)
    os.mknod(root / "sock", 0o600 | stat.S_IFSOCK)
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for name in ("fifo", "sock", "null"):
        st = os.lstat(root / name)
        out[name] = (stat.filemode(st.st_mode), os.major(st.st_rdev), os.minor(st.st_rdev))
    # The fifo carries data between two opens (the kernel's pipe, not the worker).
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append((root / "fifo").read_bytes()))
    reader.start()
    (root / "fifo").write_bytes(b"through the pipe")
    reader.join(timeout=30)
    out["fifo data"] = received
    return out


def times(root: Path) -> dict[str, Any]:
    out = {}
    f = root / "t"
    f.write_bytes(b"t")
    utimensat(f, (1_000, 111), (2_000, 222))
    st = os.stat(f)
    out["explicit"] = (st.st_atime_ns, st.st_mtime_ns)
    utimensat(f, (0, UTIME_OMIT), (3_000, 333))
    st = os.stat(f)
    out["atime omitted"] = (st.st_atime_ns, st.st_mtime_ns)
    before = time.time_ns()
    utimensat(f, (4_000, 444), (0, UTIME_NOW))
    st = os.stat(f)
    out["mtime now"] = (st.st_atime_ns, abs(st.st_mtime_ns - before) < 5 * 10**9)
    utimensat(f, (0, UTIME_OMIT), (0, UTIME_OMIT))
    out["both omitted"] = os.stat(f).st_mtime_ns == st.st_mtime_ns
    return out


def access_checks(root: Path) -> dict[str, Any]:
    (root / "plain").write_bytes(b"")
    os.chmod(root / "plain", 0o644)
    (root / "exe").write_bytes(b"")
    os.chmod(root / "exe", 0o700)
    return {name: [os.access(root / name, mode) for mode in (os.R_OK, os.W_OK, os.X_OK)]
            for name in ("plain", "exe")} | {"missing": os.access(root / "missing", os.F_OK)}


def sync_and_direct_opens(root: Path) -> dict[str, Any]:
    out = {}
    for name, flag in (("O_SYNC", os.O_SYNC), ("O_DSYNC", os.O_DSYNC)):
        fd = os.open(root / name, os.O_CREAT | os.O_RDWR | flag, 0o644)
        try:
            os.write(fd, name.encode() * 100)
            out[name] = os.pread(fd, 12, 0)
        finally:
            os.close(fd)
    block = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
    block.write(b"direct" * 682 + b"dire")
    fd = os.open(root / "direct", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    try:
        out["O_DIRECT write"] = os.pwritev(fd, [block], 0)
        back = mmap.mmap(-1, 4096)
        out["O_DIRECT read"] = os.preadv(fd, [back], 0)
        out["O_DIRECT data"] = back[:] == block[:]
    finally:
        os.close(fd)
    out["O_DIRECT file"] = (root / "direct").read_bytes()[:12]
    return out


def open_flags_about_the_path(root: Path) -> dict[str, Any]:
    """Flags that concern the caller's path or Linux's own rules, not the data."""
    (root / "file").write_bytes(b"contents")
    os.symlink("file", root / "link")
    os.mkdir(root / "dir")

    def opened(name: str, flags: int) -> Any:
        def call() -> str:
            fd = os.open(root / name, flags)
            try:
                return stat.filemode(os.fstat(fd).st_mode)
            finally:
                os.close(fd)
        return outcome(call)

    out = {
        # O_NOFOLLOW refuses only a symlink as the last component: a regular file opens.
        "O_RDWR | O_NOFOLLOW of a file": opened("file", os.O_RDWR | os.O_NOFOLLOW),
        "O_RDONLY | O_NOFOLLOW of a symlink": opened("link", os.O_RDONLY | os.O_NOFOLLOW),
        "O_RDONLY | O_NOFOLLOW | O_DIRECTORY of a dir": opened("dir", os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY),
        "O_WRONLY of a dir": opened("dir", os.O_WRONLY),
        "O_DIRECTORY of a file": opened("file", os.O_RDONLY | os.O_DIRECTORY),
        # Linux truncates on O_RDONLY | O_TRUNC too (POSIX leaves it undefined).
        "O_RDONLY | O_TRUNC": opened("file", os.O_RDONLY | os.O_TRUNC),
    }
    out["size after O_RDONLY | O_TRUNC"] = os.stat(root / "file").st_size
    return out


def directory_fsync_and_statfs(root: Path) -> dict[str, Any]:
    os.mkdir(root / "dir")
    fd = os.open(root / "dir", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync = outcome(lambda: os.fsync(fd) or "ok")
        fdatasync = outcome(lambda: os.fdatasync(fd) or "ok")
    finally:
        os.close(fd)
    return {"fsync(dir)": fsync, "fdatasync(dir)": fdatasync, "f_namemax": os.statvfs(root).f_namemax}


def renameat2(old: Path, new: Path, flags: int) -> None:
    """``renameat2(AT_FDCWD, old, AT_FDCWD, new, flags)``.

    Raises:
        OSError: with the call's errno.
    """
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old))


def rename_whiteout(root: Path) -> dict[str, Any]:
    """``RENAME_WHITEOUT`` (overlayfs's): the file moves and a 0:0 character device takes its old name."""
    (root / "dir").mkdir()
    (root / "dir" / "upper").write_bytes(b"moved")
    out = {"rename": outcome(lambda: renameat2(root / "dir" / "upper", root / "moved", RENAME_WHITEOUT) or "ok")}
    out["moved data"] = outcome(lambda: (root / "moved").read_bytes())
    out["whiteout"] = outcome(lambda: (lambda st: (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_rdev))(
        os.lstat(root / "dir" / "upper")))
    out["listing"] = sorted(os.listdir(root / "dir"))
    out["with RENAME_EXCHANGE"] = outcome(lambda: renameat2(root / "moved", root / "dir" / "upper",
                                                            RENAME_WHITEOUT | RENAME_EXCHANGE))
    return out


def rewound_listing(root: Path) -> dict[str, Any]:
    """``os.listdir(fd)`` rewinds the fd's stream (``rewinddir``): it must show the directory as it is now."""
    os.mkdir(root / "dir")
    (root / "dir" / "old").write_bytes(b"")
    fd = os.open(root / "dir", os.O_RDONLY | os.O_DIRECTORY)
    try:
        before = sorted(os.listdir(fd))
        (root / "dir" / "new").write_bytes(b"")
        os.unlink(root / "dir" / "old")
        after = sorted(os.listdir(fd))
        os.mkdir(root / "dir" / "sub")
        again = sorted(os.listdir(fd))
    finally:
        os.close(fd)
    return {"first listing": before, "after rewind": after, "after another change": again}


def rename_above_a_deep_tree(root: Path) -> dict[str, Any]:
    # The worker names every op's file by its path (events, layer globs); a rename
    # changes the path of everything below, rebuilt when next asked, which must not
    # recurse once per level (Python's limit is ~1,000 frames).
    depth = 1500
    os.mkdir(root / "top")
    fd = make_chain(root / "top", "d", depth)  # the bottom, held open: nothing asks for the paths between
    try:
        os.rename(root / "top", root / "moved")
        try:
            created = outcome(lambda: os.close(os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)) or "ok")
            listed = os.listdir(fd)
        finally:
            os.close(fd)
    finally:
        remove_chain(root / "moved", "d", depth)
    return {"file created at the bottom after the rename": created, "listing there": listed}


SCENARIOS = {f.__name__: f for f in (long_names, special_files, times, access_checks, sync_and_direct_opens,
                                     open_flags_about_the_path, directory_fsync_and_statfs, rename_whiteout,
                                     rewound_listing, rename_above_a_deep_tree)}
BACKENDS = {"passthrough": [], "memory": ["--backend", "memory"], "kernel-passthrough": ["--kernel-passthrough"]}


@pytest.mark.fuse
@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases_behave_as_on_the_native_fs(mount_worker, tmp_path: Path, backend: str) -> None:
    vol = mount_worker(extra=BACKENDS[backend])
    differences = {}
    for name, scenario in SCENARIOS.items():
        native, mounted = tmp_path / "native" / name, vol.mountpoint / name
        native.mkdir(parents=True)
        mounted.mkdir()
        expected, got = scenario(native), scenario(mounted)
        differences |= {f"{name}: {key}": (expected[key], got.get(key)) for key in expected if got.get(key) != expected[key]}
    assert differences == {}, "(native, mount) per differing outcome"
    assert vol.proc.poll() is None, vol.log()


@pytest.mark.fuse
def test_device_nodes_are_created_but_not_opened_on_a_nodev_mount(mount_worker, tmp_path: Path) -> None:
    """The mount is ``nodev,nosuid`` (docs/posix.md): a pod cannot reach a device through a volume."""
    vol = mount_worker()
    for root in (tmp_path, vol.mountpoint):
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    assert (tmp_path / "null").read_bytes() == b""  # the real /dev/null, natively
    assert outcome(lambda: (vol.mountpoint / "null").read_bytes()) == "EACCES"
    assert stat.S_ISCHR(os.stat(vol.backing / "null").st_mode)
    options = next(line.split()[3] for line in Path("/proc/self/mounts").read_text().splitlines()
                   if line.split()[1] == str(vol.mountpoint))
    assert {"nodev", "nosuid"} <= set(options.split(","))


@pytest.mark.fuse
@pytest.mark.parametrize("backend", BACKENDS)
def test_o_tmpfile_is_refused_so_callers_fall_back_to_a_named_file(mount_worker, backend: str) -> None:
    """``O_TMPFILE`` gives EOPNOTSUPP through the mount (docs/posix.md), the errno its callers fall back on.

    libfuse 3.14 answers the kernel's FUSE_TMPFILE with ENOSYS (it has no slot for
    it), which the kernel reports as EOPNOTSUPP and remembers. glibc's ``tmpfile``,
    Python's ``tempfile.TemporaryFile`` and systemd then create and unlink a named
    file, so the data still reaches the backing store while in use.
    """
    vol = mount_worker(extra=BACKENDS[backend])
    for _ in range(2):  # the first refusal comes from libfuse, the second from the kernel's memory of it
        assert outcome(lambda: os.open(vol.mountpoint, os.O_TMPFILE | os.O_RDWR, 0o600)) == errno.errorcode[errno.EOPNOTSUPP]
    with tempfile.TemporaryFile(dir=vol.mountpoint) as f:
        f.write(b"scratch data" * 1000)
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        assert f.read() == b"scratch data" * 1000
        assert os.fstat(f.fileno()).st_nlink == 0
    assert os.listdir(vol.mountpoint) == []
    if backend != "memory":
        assert os.listdir(vol.backing) == []
    assert vol.proc.poll() is None, vol.log()
