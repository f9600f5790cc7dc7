"""A real FUSE mount of the passthrough backend behaves like the backing directory."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from interposer_testing import REPO_ROOT, is_fuse_mount, make_chain, remove_chain, wait_until


def test_files_written_through_the_mount_land_in_the_backing_dir(mount_worker) -> None:
    vol = mount_worker()
    (vol.mountpoint / "a.txt").write_bytes(b"hello\n")
    with open(vol.mountpoint / "a.txt", "ab") as f:
        f.write(b"world\n")
    assert (vol.backing / "a.txt").read_bytes() == b"hello\nworld\n"
    (vol.backing / "b.txt").write_bytes(b"from below")
    assert (vol.mountpoint / "b.txt").read_bytes() == b"from below"
    assert sorted(os.listdir(vol.mountpoint)) == ["a.txt", "b.txt"]


def resident_pages(path: Path, size: int) -> int:
    """How many of the first ``size`` bytes' pages of ``path`` are in the page cache (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)  # maps, reads nothing
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        pages = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        try:
            assert libc.mincore(addr, size, pages) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, size)
        return sum(page & 1 for page in pages)
    finally:
        os.close(fd)


def test_data_written_write_only_is_cached_once_below_the_mount(mount_worker) -> None:
    """A write-only open skips the mount's page cache: the backing file's cache holds the data."""
    vol = mount_worker()
    size = 1 << 20
    for flags, expected_pages in ((os.O_WRONLY, 0), (os.O_RDWR, size // mmap.PAGESIZE)):
        path = vol.mountpoint / f"f{flags}"
        fd = os.open(path, flags | os.O_CREAT, 0o644)
        os.write(fd, b"x" * size)
        os.close(fd)
        assert resident_pages(path, size) == expected_pages, f"flags {flags:#o}"
        assert path.read_bytes() == b"x" * size


def test_write_only_writes_are_seen_at_once_by_cached_readers_and_maps(mount_worker) -> None:
    """A write-only open bypasses the page cache (FOPEN_DIRECT_IO); what others cached of it is dropped."""
    vol = mount_worker()
    path = vol.mountpoint / "f"
    for round_ in range(20):  # a stale page would show in some round, not necessarily the first
        path.write_bytes(b"A" * 8192)
        reader = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(reader, 8192, 0) == b"A" * 8192  # now in the page cache
            with mmap.mmap(reader, 8192, prot=mmap.PROT_READ) as view:
                assert view[:1] == b"A"
                writer = os.open(path, os.O_WRONLY)
                os.pwrite(writer, bytes([66 + round_ % 2]) * 4096, 0)
                os.close(writer)
                new = bytes([66 + round_ % 2])
                assert view[:1] == new and view[4096:4097] == b"A", f"round {round_}: stale map"
            assert os.pread(reader, 1, 0) == new, f"round {round_}: stale cached read"
        finally:
            os.close(reader)
    with open(path, "ab") as appender:  # O_WRONLY | O_APPEND
        appender.write(b"tail")
    assert path.stat().st_size == 8196 and (vol.backing / "f").read_bytes()[-4:] == b"tail"
    with pytest.raises(OSError) as info:  # as on any file system: a write-only fd cannot be mapped
        with open(path, "ab") as f:
            mmap.mmap(f.fileno(), 4096)
    assert info.value.errno == errno.EACCES


def test_copying_a_source_tree_round_trips(mount_worker) -> None:
    vol = mount_worker()
    source = REPO_ROOT / "services"
    shutil.copytree(source, vol.mountpoint / "services", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    result = subprocess.run(["diff", "-r", "-x", "__pycache__", "-x", "*.egg-info", str(source),
                             str(vol.mountpoint / "services")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(["diff", "-r", str(vol.mountpoint / "services"), str(vol.backing / "services")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    shutil.rmtree(vol.mountpoint / "services")
    assert os.listdir(vol.backing) == []


def _errno_of(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return 0


def test_errors_are_those_of_the_backing_fs(mount_worker) -> None:
    vol = mount_worker()
    m = vol.mountpoint
    os.mkdir(m / "d")
    (m / "d" / "f").write_text("x")
    assert _errno_of(os.stat, m / "missing") == errno.ENOENT
    assert _errno_of(os.mkdir, m / "d") == errno.EEXIST
    assert _errno_of(os.rmdir, m / "d") == errno.ENOTEMPTY
    assert _errno_of(os.unlink, m / "d") == errno.EISDIR
    assert _errno_of(os.rmdir, m / "d" / "f") == errno.ENOTDIR
    assert _errno_of(os.open, m / "d" / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST


def test_rename_links_and_inode_numbers(mount_worker) -> None:
    vol = mount_worker()
    m = vol.mountpoint
    (m / "a").write_text("data")
    ino = os.stat(m / "a").st_ino
    os.rename(m / "a", m / "b")
    assert os.stat(m / "b").st_ino == ino and not (m / "a").exists()
    os.link(m / "b", m / "c")
    assert os.stat(m / "c").st_ino == ino and os.stat(m / "b").st_nlink == 2
    assert os.stat(vol.backing / "b").st_ino == os.stat(vol.backing / "c").st_ino
    os.symlink("b", m / "s")
    assert os.readlink(m / "s") == "b" and (m / "s").read_text() == "data"
    assert os.path.islink(vol.backing / "s")
    os.mkdir(m / "dir")
    os.rename(m / "c", m / "dir" / "c")
    assert (vol.backing / "dir" / "c").read_text() == "data"


def held_inode_fds(pid: int) -> int:
    """How many O_PATH fds worker ``pid`` holds (one per inode the kernel knows)."""
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except FileNotFoundError:
            continue  # closed meanwhile
        held += bool(int(info.split("flags:")[1].split()[0], 8) & os.O_PATH)
    return held


def test_inode_numbers_outlive_the_kernel_forgetting_the_inode(mount_worker) -> None:
    """st_ino stays the same for the life of the mount, even after the kernel's inode cache dropped the file.

    Tools that tell files apart by (st_dev, st_ino) — tar and rsync finding hard
    links, find -samefile, du, a training job's dataset index — see one file under
    one number however long they run.
    """
    vol = mount_worker()
    m = vol.mountpoint
    (m / "d").mkdir()
    (m / "d" / "a").write_text("data")
    os.link(m / "d" / "a", m / "b")
    before = {name: os.stat(m / name).st_ino for name in ("d", "d/a", "b")}
    held = held_inode_fds(vol.proc.pid)
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2\n")  # the kernel forgets unused inodes (FORGET)
    wait_until(lambda: held_inode_fds(vol.proc.pid) < held, "the worker to get the kernel's FORGETs")
    after = {name: os.stat(m / name).st_ino for name in ("d", "d/a", "b")}
    assert after == before and after["b"] == after["d/a"]
    assert (m / "b").read_text() == "data"


def test_a_walk_over_more_files_than_the_worker_may_open_succeeds(mount_worker) -> None:
    """More files than the worker's open-file limit: held files past a budget are closed and reopened by name.

    The kernel keeps every inode it looked up while memory allows; an fd held for
    each would run out (EMFILE) on a dataset of more files than the limit (a
    million images under a container's limit), where the backing fs would not.
    """
    vol = mount_worker(extra=["--max-file-fds", "100"])
    resource.prlimit(vol.proc.pid, resource.RLIMIT_NOFILE, (300, 300))
    m, files = vol.mountpoint, 2000
    for i in range(files):
        (vol.backing / f"f{i}").write_bytes(b"%d" % i)
    os.link(vol.backing / "f0", vol.backing / "f0-link")
    first = os.stat(m / "f0").st_ino
    with os.scandir(m) as entries:  # readdirplus: the kernel learns of every entry
        walked = {entry.name: entry.stat().st_ino for entry in entries}
    assert len(walked) == files + 1
    for i in range(files):
        path = m / f"f{i}"
        assert path.read_bytes() == b"%d" % i and os.stat(path).st_ino == walked[f"f{i}"]
    assert held_inode_fds(vol.proc.pid) <= 100 + 5  # + the root and directories
    # A file whose fd was closed, reached through each of its names; unlinked while
    # open through one, it lives on through the other and through the open file.
    assert os.stat(m / "f0").st_ino == first == walked["f0"] == walked["f0-link"]
    with open(m / "f0-link", "rb") as f:
        os.unlink(m / "f0")
        assert f.read() == b"0" and os.fstat(f.fileno()).st_nlink == 1
    for i in range(1, 200):  # push f0-link's fd out again
        os.stat(m / f"f{i}")
    os.chmod(m / "f0-link", 0o600)
    assert stat.S_IMODE(os.stat(vol.backing / "f0-link").st_mode) == 0o600
    assert vol.proc.poll() is None, vol.log()


def _tree(root: Path, skip: str = "") -> dict[str, tuple[list[str], list[str]]]:
    """relative dir → (sorted subdirs, sorted files) of everything under ``root``, but not under ``root/skip``."""
    tree = {}
    for top, dirs, files in os.walk(root):
        tree[os.path.relpath(top, root)] = (sorted(dirs), sorted(files))
        if top == str(root) and skip in dirs:
            dirs.remove(skip)
    return tree


def test_a_walk_over_more_directories_than_the_worker_may_open_succeeds(mount_worker) -> None:
    """More directories than the worker's open-file limit: directory fds past a budget are closed too.

    A tree walk leaves every directory in the kernel's cache; an fd held for each
    would run out (EMFILE) on a tree of more directories than the limit. Past
    ``--max-dir-fds`` the least recently used are closed and reopened by name, all
    the way up when their parents were closed as well (here 1,500 levels deep: more
    than Python's recursion limit).
    """
    vol = mount_worker(extra=["--max-file-fds", "50", "--max-dir-fds", "50"])
    resource.prlimit(vol.proc.pid, resource.RLIMIT_NOFILE, (300, 300))
    m, backing = vol.mountpoint, vol.backing
    for top in range(30):
        for sub in range(20):
            d = backing / f"t{top}" / f"s{sub}"
            d.mkdir(parents=True)
            (d / "f").write_text(f"{top}/{sub}")
    depth = 1500
    deep_fd = make_chain(backing, "d", depth)
    with open(os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=deep_fd), "w") as f:
        f.write("bottom")
    os.close(deep_fd)
    deep = m.joinpath(*["d"] * depth)

    def push_out_directory_fds() -> None:  # 210 directories used since
        for top in range(20, 30):
            _tree(m / f"t{top}")

    try:
        assert (deep / "leaf").read_text() == "bottom"  # the kernel now knows all 1,500 levels
        assert _tree(m / "t0") == _tree(backing / "t0")
        assert _tree(m, skip="d") == _tree(backing, skip="d")
        for top in range(30):
            for sub in range(20):
                assert (m / f"t{top}" / f"s{sub}" / "f").read_text() == f"{top}/{sub}"
        assert held_inode_fds(vol.proc.pid) <= 50 + 50 + 5  # + the root and open files
        # The deepest directory's fd and all its parents' were let go by the walk since.
        (deep / "leaf").write_text("rewritten")
        assert (deep / "new").write_text("x") == 1 and (deep / "new").exists()
        assert backing.joinpath(*["d"] * depth, "leaf").read_text() == "rewritten"
        # A directory renamed through the mount after its fd was let go: reopened by its new name.
        os.rename(m / "t0", m / "t0-renamed")
        push_out_directory_fds()
        assert (m / "t0-renamed" / "s3" / "f").read_text() == "0/3"
        # A removed directory still open somewhere stays reachable (by no name) however many come after.
        os.mkdir(m / "gone")
        fd = os.open(m / "gone", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.rmdir(m / "gone")
            push_out_directory_fds()
            os.fchmod(fd, 0o700)
            assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o700 and os.listdir(fd) == []
        finally:
            os.close(fd)
        assert vol.proc.poll() is None, vol.log()
    finally:
        remove_chain(backing, "d", depth)


def test_attributes_truncate_chmod_times_xattrs_statfs(mount_worker) -> None:
    vol = mount_worker()
    f = vol.mountpoint / "f"
    f.write_bytes(b"0123456789")
    os.truncate(f, 4)
    assert f.read_bytes() == b"0123"
    os.chmod(f, 0o640)
    assert stat.S_IMODE(os.stat(vol.backing / "f").st_mode) == 0o640
    os.utime(f, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(vol.backing / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    os.setxattr(f, b"user.color", b"blue")
    assert os.getxattr(vol.backing / "f", b"user.color") == b"blue"
    assert "user.color" in os.listxattr(f)
    os.removexattr(f, b"user.color")
    assert _errno_of(os.getxattr, f, b"user.color") == errno.ENODATA
    fd = os.open(f, os.O_RDWR)
    try:
        os.write(fd, b"x")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert os.statvfs(vol.mountpoint).f_blocks == os.statvfs(vol.backing).f_blocks


def test_dot_dot_at_the_root_does_not_leave_the_backing_dir(mount_worker, tmp_path: Path) -> None:
    (tmp_path / "outside.txt").write_text("secret")
    vol = mount_worker()
    # Through the mount, ".." of the root is the mount's parent in the caller's own
    # namespace; the worker never resolves it against the backing dir's parent.
    assert "outside.txt" not in os.listdir(vol.mountpoint)
    assert _errno_of(os.stat, vol.mountpoint / "outside.txt") == errno.ENOENT


def test_unmount_and_sigterm_stop_the_worker_cleanly(mount_worker) -> None:
    vol = mount_worker()
    assert vol.unmount() == 0
    assert not is_fuse_mount(vol.mountpoint)
    vol2 = mount_worker()
    vol2.proc.send_signal(signal.SIGTERM)
    assert vol2.proc.wait(10) == 0
    assert not is_fuse_mount(vol2.mountpoint)


def test_a_missing_name_is_cached_until_created_through_the_mount_or_the_timeout(mount_worker) -> None:
    """A lookup that found nothing is cached (negative entry); the mount's own creates show at once."""
    vol = mount_worker(extra=["--negative-timeout", "30"])
    m = vol.mountpoint
    assert not (m / "outside").exists()
    (vol.backing / "outside").write_text("made below the mount")
    assert not (m / "outside").exists(), "the negative entry was not cached"
    assert not (m / "inside").exists()
    (m / "inside").write_text("made through the mount")
    assert (m / "inside").read_text() == "made through the mount"
    os.unlink(m / "inside")
    assert not (m / "inside").exists()
    os.mkdir(m / "dir")
    os.rename(m / "dir", m / "moved")
    assert (m / "moved").is_dir() and not (m / "dir").exists()

    short = mount_worker(extra=["--negative-timeout", "0.3"])
    assert not (short.mountpoint / "later").exists()
    (short.backing / "later").write_text("x")
    started = time.monotonic()
    wait_until(lambda: (short.mountpoint / "later").exists(), "a name created below the mount to show", 5.0)
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("setting", ["--negative-timeout 0", "--entry-timeout 0", "delay layer on lookup"])
def test_a_missing_name_is_looked_up_every_time_when_asked_or_when_a_layer_acts_on_lookups(
        mount_worker, setting: str) -> None:
    """With caching off, or a layer that must see every lookup (its delay, its fault), nothing is cached.

    An unset ``--negative-timeout`` follows ``--entry-timeout``.
    """
    if setting == "delay layer on lookup":
        vol = mount_worker(policy='{"layers": [{"type": "delay", "delay_s": 0.001, "ops": ["lookup"]}]}')
    else:
        vol = mount_worker(extra=setting.split())
    assert not (vol.mountpoint / "f").exists()
    (vol.backing / "f").write_text("x")
    assert (vol.mountpoint / "f").exists()


def test_initial_policy_file_injects_faults_only_where_it_says(mount_worker) -> None:
    policy = '{"layers": [{"type": "fault", "errno": "EIO", "ops": ["read"], "path_glob": "/bad*"}]}'
    vol = mount_worker(policy=policy)
    (vol.mountpoint / "bad.txt").write_text("unreadable")  # writes are not matched
    (vol.mountpoint / "good.txt").write_text("fine")
    assert (vol.mountpoint / "good.txt").read_text() == "fine"
    with pytest.raises(OSError) as info:
        (vol.mountpoint / "bad.txt").read_text()
    assert info.value.errno == errno.EIO
    assert (vol.backing / "bad.txt").read_text() == "unreadable"


@pytest.mark.parametrize("session_loop", ["lean", "pyfuse3"])
def test_a_delayed_read_does_not_block_other_requests(mount_worker, session_loop: str) -> None:
    policy = '{"layers": [{"type": "delay", "delay_s": 3, "ops": ["read"], "path_glob": "/slow"}]}'
    vol = mount_worker(policy=policy, extra=["--session-loop", session_loop])
    (vol.mountpoint / "slow").write_text("s")
    (vol.mountpoint / "fast").write_text("f")
    slow_done = threading.Event()

    def read_slow() -> None:
        fd = os.open(vol.mountpoint / "slow", os.O_RDONLY | os.O_DIRECT)
        try:
            os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        slow_done.set()

    thread = threading.Thread(target=read_slow)
    started = time.monotonic()
    thread.start()
    time.sleep(0.3)  # let the slow read enter the delay layer
    for _ in range(20):
        assert (vol.mountpoint / "fast").read_text() == "f"
        os.stat(vol.mountpoint / "fast")
    assert not slow_done.is_set(), "the fast reads should finish while the slow read is still delayed"
    thread.join()
    assert time.monotonic() - started >= 3



@pytest.mark.parametrize("blocking_io", ["adaptive", "loop"])
def test_a_read_blocked_in_a_slow_backing_store_does_not_stall_other_requests(mount_worker, blocking_io: str) -> None:
    # The backing store of the worker under test is itself a worker whose reads of
    # /slow take 1 s each: to the worker under test its pread of /slow blocks, as on a
    # slow network volume. With --blocking-io adaptive such reads move to a thread once
    # one of them is measured slow while other requests queued behind it (the first
    # two concurrent reads below); from then on reads of /fast are served while a
    # slow read is pending. Pinned to the loop, they queue behind it every time.
    slow_store = mount_worker(policy='{"layers": [{"type": "delay", "delay_s": 1.0, "ops": ["read"], '
                                     '"path_glob": "/slow"}]}')
    (slow_store.mountpoint / "slow").write_bytes(b"s" * 4096)
    (slow_store.mountpoint / "fast").write_bytes(b"f" * 4096)
    vol = mount_worker(backing=slow_store.mountpoint, extra=["--blocking-io", blocking_io])

    def direct_read(name: str) -> bytes:
        fd = os.open(vol.mountpoint / name, os.O_RDONLY | os.O_DIRECT)  # every read reaches the worker
        try:
            return os.pread(fd, 4096, 0)
        finally:
            os.close(fd)

    def fast_read_finishes_first(first: str) -> bool:
        """Start a read of /slow in a thread, then read ``first``: did it finish while /slow was pending?"""
        slow_done = threading.Event()
        thread = threading.Thread(target=lambda: (direct_read("slow"), slow_done.set()))
        thread.start()
        time.sleep(0.3)  # the slow read is now blocked in the backing store
        data = direct_read(first)
        finished_first = not slow_done.is_set()
        thread.join()
        assert data == (b"f" if first == "fast" else b"s") * 4096
        return finished_first

    fast_read_finishes_first("slow")  # warm-up: a slow read with another queued behind it
    assert fast_read_finishes_first("fast") == (blocking_io == "adaptive")


@pytest.mark.parametrize(("flag", "expected_kib"), [((), 1024), (("--read-ahead-kib", "0"), 128)])
def test_mount_reads_ahead_in_whole_fuse_requests(mount_worker, flag: tuple[str, ...], expected_kib: int) -> None:
    """By default sequential reads reach the worker as 1 MiB requests (readahead 1 MiB),
    with 0 the kernel's 128 KiB stays."""
    from interposer.fuse_worker._readahead import mount_device

    vol = mount_worker(extra=list(flag))
    (vol.mountpoint / "warm").write_text("x")  # FUSE_INIT is long answered
    device = mount_device(str(vol.mountpoint))
    assert device is not None
    read_ahead = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
    deadline = time.monotonic() + 5
    while int(read_ahead.read_text()) != expected_kib and time.monotonic() < deadline:
        time.sleep(0.05)
    assert int(read_ahead.read_text()) == expected_kib


def test_mount_device_reads_escaped_mountinfo_paths(tmp_path: Path) -> None:
    from interposer.fuse_worker._readahead import mount_device

    table = tmp_path / "mountinfo"
    table.write_text(
        "22 1 0:21 / / rw - ext4 /dev/vda rw\n"
        "40 22 0:39 / /mnt/with\\040space rw,nosuid - fuse.interposer interposer:a rw\n"
        "41 22 0:40 / /mnt/other rw - fuse.interposer interposer:b rw\n"
        "42 40 0:41 / /mnt/with\\040space rw - fuse.interposer interposer:c rw\n"
    )
    assert mount_device("/mnt/with space", str(table)) == "0:41", "the newest mount on a path is the visible one"
    assert mount_device("/mnt/other", str(table)) == "0:40"
    assert mount_device("/mnt/none", str(table)) is None
