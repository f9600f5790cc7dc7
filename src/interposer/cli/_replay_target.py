"""``interposer replay``, the target: a directory the recorded ops are replayed in, reached only beneath its root.

Recordings are data, and a replay runs as whoever starts it, often root: a recorded
symlink followed by a path through it must not let a replayed write land outside the
target. So every path is walked one component at a time from the target's root fd
(``openat(O_PATH | O_NOFOLLOW | O_DIRECTORY)``: a symlink on the way fails with
ENOTDIR), and the last component is used relative to its parent's fd without following
a symlink (``O_NOFOLLOW``, ``AT_SYMLINK_NOFOLLOW``) — the passthrough backend's rule
(docs/posix.md, "Security model").

Preparing writes the start state (:class:`_replay_plan.StartState`) into the target:
the directories, files (at least as long as the recording read) and symlinks the
recording found there, and removes what the recording created, so that a replay can
run again. It touches only the paths the recording names, and only in a target that
is empty or that it prepared before (:data:`MARKER`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

from ._replay_plan import ReplayError, StartState

#: File a prepared target holds in its root; a non-empty target without it is not prepared (`--force` overrides).
MARKER = ".interposer-replay"
#: Contents of a symlink the recording found but whose contents it did not record.
UNKNOWN_SYMLINK_CONTENTS = "interposer-replay-unknown-target"
#: Bytes written per call when filling a prepared file.
FILL_CHUNK_BYTES = 1 << 20
_DIR_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC


class Prepared(msgspec.Struct, frozen=True, kw_only=True):
    """What preparing changed in the target.

    Attributes:
        directories: directories created.
        files: files created or lengthened.
        bytes_written: bytes written into them.
        symlinks: symlinks created.
        removed: names removed (what the recording creates, or had not found).
        kept: paths that were already as needed.
    """

    directories: int = 0
    files: int = 0
    bytes_written: int = 0
    symlinks: int = 0
    removed: int = 0
    kept: int = 0


class Target:
    """A replay target directory, kept open by fd.

    Raises:
        ReplayError: ``root`` is not a directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            self.root_fd = os.open(root, _DIR_FLAGS)
        except OSError as exc:
            raise ReplayError(f"replay target {root}: {exc.strerror}") from None

    def close(self) -> None:
        os.close(self.root_fd)

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def parent(self, path: str) -> Iterator[tuple[int, str]]:
        """Yield ``(fd of the directory holding path's last component, that component)``.

        The root itself is ``(root fd, ".")``. The fd is closed afterwards.

        Raises:
            OSError: a component is missing (ENOENT), or is not a directory or is a symlink (ENOTDIR).
        """
        parts = path.split("/")[1:]
        if path == "/":
            yield self.root_fd, "."
            return
        fd = self.root_fd
        try:
            for part in parts[:-1]:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                if fd != self.root_fd:
                    os.close(fd)
                fd = child
            yield fd, parts[-1]
        finally:
            if fd != self.root_fd:
                os.close(fd)

    @contextlib.contextmanager
    def node(self, path: str) -> Iterator[int]:
        """Yield an ``O_PATH`` fd of ``path`` itself (a symlink is not followed); closed afterwards.

        Raises:
            OSError: as :meth:`parent`, or the last component is missing.
        """
        with self.parent(path) as (dir_fd, name):
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            yield fd
        finally:
            os.close(fd)

    # ---- preparing ---------------------------------------------------------------------

    def check_preparable(self, force: bool) -> None:
        """Refuse to prepare a non-empty directory this command did not prepare, unless ``force``.

        Raises:
            ReplayError: the target holds other things and no :data:`MARKER`.
        """
        names = os.listdir(self.root)
        if names and MARKER not in names and not force:
            raise ReplayError(f"replay target {self.root} is not empty and was not prepared by `interposer replay` "
                              f"(no {MARKER}): preparing it removes the names the recording creates; use an "
                              "empty directory, or --force")

    def prepare(self, start: StartState, pattern: bytes) -> Prepared:
        """Make the target hold ``start``: see the module docstring.

        Args:
            start: the recording's start state.
            pattern: bytes written (repeated) into files that must grow.

        Raises:
            OSError: the target refused a change (ENOSPC, EACCES…).
        """
        counts = {"directories": 0, "files": 0, "bytes_written": 0, "symlinks": 0, "removed": 0, "kept": 0}
        fd = os.open(MARKER, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=self.root_fd)
        os.close(fd)
        for path in sorted(start.absent, key=lambda p: -p.count("/")):  # deepest first
            with contextlib.suppress(FileNotFoundError, NotADirectoryError), self.parent(path) as (dir_fd, name):
                if self._remove(dir_fd, name):
                    counts["removed"] += 1
        for path in sorted(start.directories, key=lambda p: p.count("/")):  # shallowest first
            made = self._ensure(path, stat.S_IFDIR, lambda dir_fd, name: os.mkdir(name, 0o755, dir_fd=dir_fd))
            counts["directories" if made else "kept"] += 1
        for path in sorted(start.symlinks):
            made = self._ensure(path, stat.S_IFLNK,
                                lambda dir_fd, name: os.symlink(UNKNOWN_SYMLINK_CONTENTS, name, dir_fd=dir_fd))
            counts["symlinks" if made else "kept"] += 1
        for path, size in sorted(start.files.items()):
            with self.parent(path) as (dir_fd, name):
                written = self._fill(dir_fd, name, size, pattern)
            if written is None:
                counts["kept"] += 1
            else:
                counts["files"] += 1
                counts["bytes_written"] += written
        return Prepared(**counts)

    def _ensure(self, path: str, kind: int, make: Callable[[int, str], object]) -> bool:
        """Make ``path`` a node of type ``kind`` (``S_IFDIR``…) with ``make(dir_fd, name)``, replacing
        another type; False if it already was one."""
        with self.parent(path) as (dir_fd, name):
            found = _kind(dir_fd, name)
            if found == kind:
                return False
            if found is not None:
                self._remove(dir_fd, name)
            make(dir_fd, name)
            return True

    @staticmethod
    def _remove(dir_fd: int, name: str) -> bool:
        kind = _kind(dir_fd, name)
        if kind is None:
            return False
        if kind == stat.S_IFDIR:
            shutil.rmtree(name, dir_fd=dir_fd)  # fd-based: never follows a symlink out
        else:
            os.unlink(name, dir_fd=dir_fd)
        return True

    def _fill(self, dir_fd: int, name: str, size: int, pattern: bytes) -> int | None:
        """Make ``name`` a regular file of at least ``size`` bytes; bytes written, or None if it already was."""
        kind = _kind(dir_fd, name)
        if kind is not None and kind != stat.S_IFREG:
            self._remove(dir_fd, name)
        # Write-only: a FUSE target sends it straight to its worker, keeping none of it in its page cache.
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        try:
            have = os.fstat(fd).st_size
            if kind == stat.S_IFREG and have >= size:
                return None
            offset = have
            while offset < size:
                chunk = min(FILL_CHUNK_BYTES, size - offset)
                offset += os.pwrite(fd, pattern[:chunk], offset)
            os.fsync(fd)
            # Start the replay cold: what preparing wrote is not in the page cache.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return size - have
        finally:
            os.close(fd)


def _kind(dir_fd: int, name: str) -> int | None:
    """``S_IFMT`` of ``name`` in ``dir_fd`` (not following a symlink), None if there is none."""
    try:
        return stat.S_IFMT(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            return None
        raise
