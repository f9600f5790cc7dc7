"""Differential test: random op sequences on a native directory and through a mount agree.

A hypothesis ``RuleBasedStateMachine`` applies each generated op to a native tmp
directory (ext4 here) and to a fresh directory inside the mount (writes, reads,
truncates, ``fallocate``, ``copy_file_range``, renames, links, modes, owners,
xattrs, timestamps set to the ns, opens whose flags clash with what the path is…),
compares the
outcome (the result, or the errno name), and after every step compares the whole
trees: names, types and modes, nlink, owners, sizes, contents, symlink targets,
``user.*`` xattrs and which names share an inode; directories opened at the start
are listed through their fds later. Any difference fails with the
shortest op sequence hypothesis can find.
"""

from __future__ import annotations

import itertools
import os
import shutil
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from interposer.fuse_worker.backends._libc import fallocate, renameat2

from fs_compare_support import describe_difference, outcome, snapshot

#: Hypothesis budget: small enough for well under a minute per backend on 2 cores;
#: ``DIFFERENTIAL_EXAMPLES=<n>`` in the environment searches deeper (by hand, not in CI).
MAX_EXAMPLES = int(os.environ.get("DIFFERENTIAL_EXAMPLES", "40"))
STEPS_PER_EXAMPLE = 30

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
#: fallocate(2) modes both backends share with ext4: allocate, keep size, punch a hole.
FALLOCATE_MODES = st.sampled_from([0, 0x01, 0x02 | 0x01])
NAMES = ("a", "b", "d", "e")
PREFIXES = ("", "", "d/", "e/", "d/d/", "d/e/")
PATHS = st.sampled_from([prefix + name for prefix in PREFIXES for name in NAMES])
DATA = st.binary(max_size=300)
OFFSETS = st.integers(min_value=0, max_value=400)
MODES = st.sampled_from([0o644, 0o600, 0o755, 0o000, 0o4755, 0o2775, 0o1777, 0o444])
OPEN_FLAGS = st.sampled_from([0, os.O_TRUNC, os.O_EXCL, os.O_APPEND, os.O_TRUNC | os.O_APPEND])
SYMLINK_TARGETS = st.sampled_from(["a", "../a", "d", "missing", "d/a", "/nonexistent/x"])
XATTR_NAMES = st.sampled_from(["user.one", "user.two"])
#: open(2) flag sets whose outcome is decided by what the path is (file, directory,
#: symlink, missing), not by data: EISDIR, ENOTDIR, ELOOP, EEXIST, EINVAL, and Linux's
#: truncation on O_RDONLY | O_TRUNC.
PROBE_OPEN_FLAGS = st.sampled_from([
    os.O_RDONLY | os.O_DIRECTORY, os.O_WRONLY, os.O_RDWR | os.O_NOFOLLOW, os.O_CREAT | os.O_EXCL | os.O_WRONLY,
    os.O_RDONLY | os.O_TRUNC, os.O_CREAT | os.O_DIRECTORY | os.O_WRONLY, os.O_PATH | os.O_NOFOLLOW,
    os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW,
])
#: Timestamps to set, ns: sub-second parts that a µs or s rounding would lose, and
#: times before 1970 and after 2038.
TIMES_NS = st.sampled_from([0, 1, 999_999_999, 1_000_000_000, 1_700_000_000_123_456_789,
                            -1_000_000_001, 4_102_444_800_000_000_007])


class DifferentialMachine(RuleBasedStateMachine):
    """Same ops on ``native_root/<n>`` and ``mount_root/<n>``; both must agree."""

    native_root: Path
    mount_root: Path
    _counter = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        n = next(self._counter)
        self.roots = (self.native_root / f"ex{n}", self.mount_root / f"ex{n}")
        for root in self.roots:
            root.mkdir()
            # A starting tree, so most generated paths name something or can be created.
            for directory in ("d", "e", "d/d"):
                (root / directory).mkdir()
            for file, data in (("a", b"alpha"), ("d/a", b"delta"), ("e/b", b"echo")):
                (root / file).write_bytes(data)
        # Directories opened now and listed through the same fd later (os.listdir(fd)
        # rewinds it): the listing must show the directory as it is then, wherever
        # it has been renamed to, or ENOENT once removed.
        self.held_dirs = {name: [os.open(root / name, os.O_RDONLY | os.O_DIRECTORY) for root in self.roots]
                          for name in ("d", "d/d")}

    def existing(self, data: st.DataObject, label: str) -> str:
        """Draw a path that exists in the native tree (or, now and then, any path)."""
        native = self.roots[0]
        present = sorted(os.path.relpath(os.path.join(d, n), native)
                         for d, dirs, files in os.walk(native) for n in dirs + files)
        return data.draw(st.one_of(st.sampled_from(present), PATHS) if present else PATHS, label=label)

    def both(self, fn, *paths_and_args):  # noqa: ANN001, ANN201
        """Run ``fn(root, *args)`` on both trees; the outcomes must be equal."""
        native, mounted = (outcome(fn, root, *paths_and_args) for root in self.roots)
        assert native == mounted, f"{fn.__name__}{paths_and_args}: native {native} != mount {mounted}"

    @rule(path=PATHS, flags=OPEN_FLAGS, data=DATA, mode=MODES)
    def create_and_write(self, path: str, flags: int, data: bytes, mode: int) -> None:
        def create_and_write(root: Path, path: str) -> int:
            fd = os.open(root / path, os.O_CREAT | os.O_WRONLY | flags, mode)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)
        self.both(create_and_write, path)

    @rule(pick=st.data(), offset=OFFSETS, data=DATA)
    def pwrite(self, pick: st.DataObject, offset: int, data: bytes) -> None:
        path = self.existing(pick, "path")
        def pwrite(root: Path, path: str) -> int:
            fd = os.open(root / path, os.O_WRONLY)
            try:
                return os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        self.both(pwrite, path)

    @rule(pick=st.data(), offset=OFFSETS, size=st.integers(min_value=0, max_value=500))
    def pread(self, pick: st.DataObject, offset: int, size: int) -> None:
        path = self.existing(pick, "path")
        def pread(root: Path, path: str) -> bytes:
            fd = os.open(root / path, os.O_RDONLY)
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)
        self.both(pread, path)

    @rule(pick=st.data(), mode=FALLOCATE_MODES, offset=OFFSETS, length=st.integers(min_value=0, max_value=400))
    def fallocate(self, pick: st.DataObject, mode: int, offset: int, length: int) -> None:
        path = self.existing(pick, "path")
        def fallocate_(root: Path, path: str) -> None:
            fd = os.open(root / path, os.O_WRONLY)
            try:
                fallocate(fd, mode, offset, length)
            finally:
                os.close(fd)
        self.both(fallocate_, path)

    @rule(pick=st.data(), off_in=OFFSETS, off_out=OFFSETS, size=st.integers(min_value=0, max_value=500))
    def copy_file_range(self, pick: st.DataObject, off_in: int, off_out: int, size: int) -> None:
        src, dst = self.existing(pick, "src"), self.existing(pick, "dst")
        def copy_file_range(root: Path, src: str, dst: str) -> int:
            fd_in = os.open(root / src, os.O_RDONLY)
            try:
                fd_out = os.open(root / dst, os.O_WRONLY)
                try:
                    return os.copy_file_range(fd_in, fd_out, size, off_in, off_out)
                finally:
                    os.close(fd_out)
            finally:
                os.close(fd_in)
        self.both(copy_file_range, src, dst)

    @rule(pick=st.data(), size=OFFSETS)
    def truncate(self, pick: st.DataObject, size: int) -> None:
        path = self.existing(pick, "path")
        self.both(lambda root, p: os.truncate(root / p, size), path)

    @rule(pick=st.data(), dst=PATHS, flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, pick: st.DataObject, dst: str, flags: int) -> None:
        src = self.existing(pick, "src")
        def rename(root: Path, src: str, dst: str) -> None:
            renameat2(-100, os.fsencode(root / src), -100, os.fsencode(root / dst), flags)  # AT_FDCWD
        self.both(rename, src, dst)

    @rule(pick=st.data(), dst=PATHS)
    def link(self, pick: st.DataObject, dst: str) -> None:
        src = self.existing(pick, "src")
        self.both(lambda root, s, d: os.link(root / s, root / d, follow_symlinks=False), src, dst)

    @rule(link_target=SYMLINK_TARGETS, dst=PATHS)
    def symlink(self, link_target: str, dst: str) -> None:
        self.both(lambda root, d: os.symlink(link_target, root / d), dst)

    @rule(pick=st.data())
    def unlink(self, pick: st.DataObject) -> None:
        path = self.existing(pick, "path")
        self.both(lambda root, p: os.unlink(root / p), path)

    @rule(path=PATHS, mode=MODES)
    def mkdir(self, path: str, mode: int) -> None:
        self.both(lambda root, p: os.mkdir(root / p, mode), path)

    @rule(pick=st.data())
    def rmdir(self, pick: st.DataObject) -> None:
        path = self.existing(pick, "path")
        self.both(lambda root, p: os.rmdir(root / p), path)

    @rule(pick=st.data(), mode=MODES)
    def chmod(self, pick: st.DataObject, mode: int) -> None:
        path = self.existing(pick, "path")
        self.both(lambda root, p: os.chmod(root / p, mode, follow_symlinks=True), path)

    @rule(pick=st.data(), uid=st.sampled_from([0, 65534]), gid=st.sampled_from([0, 65534]))
    def chown(self, pick: st.DataObject, uid: int, gid: int) -> None:
        path = self.existing(pick, "path")
        self.both(lambda root, p: os.chown(root / p, uid, gid, follow_symlinks=False), path)

    @rule(pick=st.data(), name=XATTR_NAMES, value=st.binary(max_size=40))
    def setxattr(self, pick: st.DataObject, name: str, value: bytes) -> None:
        path = self.existing(pick, "path")
        self.both(lambda root, p: os.setxattr(root / p, name, value, follow_symlinks=False), path)

    @rule(pick=st.data(), name=XATTR_NAMES)
    def removexattr(self, pick: st.DataObject, name: str) -> None:
        path = self.existing(pick, "path")
        self.both(lambda root, p: os.removexattr(root / p, name, follow_symlinks=False), path)

    @rule(pick=st.data(), flags=PROBE_OPEN_FLAGS)
    def open_with_flags(self, pick: st.DataObject, flags: int) -> None:
        path = self.existing(pick, "path")
        def open_with_flags(root: Path, p: str) -> int:
            fd = os.open(root / p, flags, 0o640)
            try:
                return stat.S_IFMT(os.fstat(fd).st_mode)
            finally:
                os.close(fd)
        self.both(open_with_flags, path)

    @rule(pick=st.data(), atime_ns=TIMES_NS, mtime_ns=TIMES_NS, follow=st.booleans())
    def utime_ns(self, pick: st.DataObject, atime_ns: int, mtime_ns: int, follow: bool) -> None:
        path = self.existing(pick, "path")
        def utime_ns(root: Path, p: str) -> tuple[int, int]:
            os.utime(root / p, ns=(atime_ns, mtime_ns), follow_symlinks=follow)
            st_ = os.stat(root / p, follow_symlinks=follow)
            return st_.st_atime_ns, st_.st_mtime_ns
        self.both(utime_ns, path)

    @rule(pick=st.data())
    def stat_follow(self, pick: st.DataObject) -> None:
        path = self.existing(pick, "path")
        def stat_follow(root: Path, p: str) -> tuple[int, int]:
            st_ = os.stat(root / p)
            return st_.st_mode, st_.st_nlink
        self.both(stat_follow, path)

    @rule(pick=st.data())
    def listdir(self, pick: st.DataObject) -> None:
        path = self.existing(pick, "path")
        self.both(lambda root, p: sorted(os.listdir(root / p)), path)

    @rule(path=PATHS, data=DATA)
    def unlink_while_open(self, path: str, data: bytes) -> None:
        def unlink_while_open(root: Path, p: str) -> bytes:
            fd = os.open(root / p, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.unlink(root / p)
                os.pwrite(fd, data, 0)
                return os.pread(fd, len(data) + 10, 0)
            finally:
                os.close(fd)
        self.both(unlink_while_open, path)

    @rule(name=st.sampled_from(["d", "d/d"]))
    def listdir_of_a_dir_opened_earlier(self, name: str) -> None:
        native, mounted = (outcome(lambda fd: sorted(os.listdir(fd)), fd) for fd in self.held_dirs[name])
        assert native == mounted, f"listdir(fd of {name} opened at start): native {native} != mount {mounted}"

    @invariant()
    def trees_agree(self) -> None:
        native, mounted = (snapshot(root) for root in self.roots)
        assert native == mounted, describe_difference(native, mounted)

    def teardown(self) -> None:
        for fds in self.held_dirs.values():
            for fd in fds:
                os.close(fd)
        for root in self.roots:
            for dirpath, dirnames, _ in os.walk(root):
                for name in dirnames:
                    os.chmod(os.path.join(dirpath, name), 0o755)
            shutil.rmtree(root)


def _run(native_root: Path, mount_root: Path) -> None:
    machine = type("Machine", (DifferentialMachine,), {"native_root": native_root, "mount_root": mount_root})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=MAX_EXAMPLES,
            stateful_step_count=STEPS_PER_EXAMPLE,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


@pytest.mark.fuse
@pytest.mark.parametrize("backend", ["passthrough", "passthrough-reopening", "memory", "kernel-passthrough",
                                     "passthrough-direct-io"])
def test_random_op_sequences_agree_with_the_native_fs(mount_worker, tmp_path: Path, backend: str) -> None:
    native = tmp_path / "native"
    native.mkdir()
    extra = {"passthrough": [], "memory": ["--backend", "memory"], "kernel-passthrough": ["--kernel-passthrough"],
             # One file fd held: every other file is reopened by name when used (_inodes.InodeTable).
             "passthrough-reopening": ["--max-file-fds", "1", "--max-dir-fds", "1"], "passthrough-direct-io": []}
    # A layer acting on reads and writes: every file is opened with FOPEN_DIRECT_IO,
    # so reads, writes, appends and copies all take the uncached path.
    policy = ('{"layers": [{"type": "delay", "delay_s": 0.000001, "ops": ["read", "write"]}]}'
              if backend == "passthrough-direct-io" else None)
    vol = mount_worker(extra=extra[backend], policy=policy)
    _run(native, vol.mountpoint)
    assert vol.proc.poll() is None, vol.log()
