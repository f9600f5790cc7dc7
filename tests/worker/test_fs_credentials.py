"""Caller credentials: a non-root caller gets the errors and ownership it would get natively.

The same script runs as uid/gid 65534 (nobody/nogroup, no supplementary groups)
against a native directory and through the mount, over identical trees built as
root; every outcome (errno name, or the owner/mode of what it created) must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

NOBODY = 65534
#: The system interpreter: uid 65534 cannot enter the venv under /work or /root (the
#: script needs only the standard library).
CALLER_PYTHON = "/usr/bin/python3"
OTHER_GID = 1234

CALLER_SCRIPT = r'''
import errno, json, os, stat

def outcome(fn):
    try:
        value = fn()
    except OSError as exc:
        return errno.errorcode[exc.errno]
    if isinstance(value, os.stat_result):
        return [value.st_uid, value.st_gid, oct(value.st_mode)]
    return value if isinstance(value, (int, str, list, type(None))) else repr(value)

def create(path):
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o664))
    return os.stat(path)

def mkdir(path):
    os.mkdir(path, 0o775)
    return os.stat(path)

def create_mode(path, mode):
    old = os.umask(0)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, mode))
    finally:
        os.umask(old)
    return os.stat(path)

def write_then_mode(path, flags):
    fd = os.open(path, flags)
    try:
        if flags & os.O_DIRECT:  # needs an aligned buffer: an anonymous map is page-aligned
            import mmap
            buf = mmap.mmap(-1, 4096)
            buf.write(b"x" * 4096)
            os.write(fd, buf)
        else:
            os.write(fd, b"x")
    finally:
        os.close(fd)
    return oct(os.stat(path).st_mode)

checks = {
    "create in 0755 root dir": lambda: create("ro/x"),
    "create in 0777 dir": lambda: create("rw/x"),
    "mkdir in 0777 dir": lambda: mkdir("rw/sub"),
    "create in setgid dir": lambda: create("sg/f"),
    "mkdir in setgid dir": lambda: mkdir("sg/d"),
    # the file's group is the directory's, which the caller is not in: S_ISGID must go
    "create setgid executable in setgid dir": lambda: create_mode("sg/sgid-exec", 0o2755),
    "chmod own file setgid in setgid dir": lambda: (os.chmod("sg/f", 0o2775), os.stat("sg/f"))[1],
    "read 0600 root file": lambda: open("secret", "rb").read().decode(),
    "read 0644 root file": lambda: open("public", "rb").read().decode(),
    "write 0644 root file": lambda: open("public", "ab").write(b"x"),
    "truncate 0644 root file": lambda: os.truncate("public", 0),
    "chmod root file": lambda: os.chmod("public", 0o777),
    "chown own file": lambda: os.chown("rw/x", 0, 0),
    "chmod own file": lambda: (os.chmod("rw/x", 0o600), os.stat("rw/x"))[1],
    "utime root file explicit": lambda: os.utime("public", (1, 1)),
    "utime root file now": lambda: os.utime("public", None),
    "unlink root file in sticky dir": lambda: os.unlink("sticky/rootfile"),
    "unlink own file in sticky dir": lambda: (create("sticky/mine"), os.unlink("sticky/mine"))[1],
    "rename into 0755 dir": lambda: os.rename("rw/x", "ro/y"),
    "setxattr on root file": lambda: os.setxattr("public", "user.k", b"v"),
    "listdir 0700 root dir": lambda: os.listdir("private"),
    "lookup in 0700 root dir": lambda: os.stat("private/inner"),
    # Checks the kernel makes in the caller's context, whatever the file system:
    "hard link to root file (protected_hardlinks)": lambda: os.link("public", "rw/link"),
    "mknod character device": lambda: os.mknod("rw/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3)),
    "setxattr trusted.* on own file": lambda: (create("rw/t"), os.setxattr("rw/t", "trusted.k", b"v"))[1],
    "open root file O_NOATIME": lambda: os.close(os.open("public", os.O_RDONLY | os.O_NOATIME)),
}
for kind in SETID_KINDS:
    for how, flags in (("O_WRONLY", os.O_WRONLY), ("O_RDWR", os.O_RDWR), ("O_DIRECT", os.O_WRONLY | os.O_DIRECT)):
        path = f"setid-{kind}-{how}"
        checks[f"write {path}"] = lambda path=path, flags=flags: write_then_mode(path, flags)
    checks[f"truncate setid-{kind}-truncate"] = lambda path=f"setid-{kind}-truncate": (
        os.truncate(path, 1), oct(os.stat(path).st_mode))[1]
    checks[f"open O_TRUNC setid-{kind}-O_TRUNC"] = lambda path=f"setid-{kind}-O_TRUNC": (
        os.close(os.open(path, os.O_WRONLY | os.O_TRUNC)), oct(os.stat(path).st_mode))[1]
    # Linux truncates on O_RDONLY | O_TRUNC too (the VFS asks for write permission).
    checks[f"open O_RDONLY|O_TRUNC setid-{kind}-O_RDONLY_TRUNC"] = lambda path=f"setid-{kind}-O_RDONLY_TRUNC": (
        os.close(os.open(path, os.O_RDONLY | os.O_TRUNC)), [oct(os.stat(path).st_mode), os.stat(path).st_size])[1]
    # chgrp of an own file from a group the caller is not in to its own group
    checks[f"chgrp own setid-{kind}-chgrp"] = lambda path=f"setid-{kind}-chgrp": (
        os.chown(path, -1, os.getgid()), oct(os.stat(path).st_mode))[1]
print(json.dumps({name: outcome(fn) for name, fn in checks.items()}))
'''
#: Set-ID files written by the caller: a write clears S_ISUID, and S_ISGID of a
#: group-executable file or of one whose group the writer is not in.
SETID_MODES = {"setuid": 0o4777, "setgid-exec": 0o2777, "setgid-noexec-other-group": 0o2767}
#: The mount variants, by worker flags. Every one must match native exactly, set-ID
#: bits included: the worker clears them for writes, truncations and O_TRUNC opens by
#: non-root callers (``_setid``), with the native rule, where the kernel's FUSE module
#: would clear S_ISGID only of a group-executable file (fuse_setattr's own rule).
VARIANTS = {
    "passthrough": ["--backend", "passthrough"],
    # One file fd held: files are reopened by name when used (_inodes.InodeTable).
    "passthrough-reopening": ["--backend", "passthrough", "--max-file-fds", "1", "--max-dir-fds", "1"],
    "memory": ["--backend", "memory"],
    # Set-ID files opened for writing by a non-root caller are not passed through.
    "kernel-passthrough": ["--kernel-passthrough"],
    # The kernel clears set-ID bits too (no FUSE_HANDLE_KILLPRIV_V2).
    "no-killpriv-v2": ["--no-handle-killpriv-v2"],
}
CALLER_SCRIPT = f"SETID_KINDS = {sorted(SETID_MODES)!r}\n" + CALLER_SCRIPT


def _build_tree(root: Path) -> None:
    """The tree every check runs over, built as root."""
    os.umask(0o022)
    for name, mode in (("ro", 0o755), ("rw", 0o777), ("sticky", 0o1777), ("sg", 0o2777), ("private", 0o700)):
        (root / name).mkdir()
        os.chmod(root / name, mode)
    os.chown(root / "sg", 0, OTHER_GID)
    (root / "secret").write_text("s")
    os.chmod(root / "secret", 0o600)
    (root / "public").write_text("p")
    (root / "sticky" / "rootfile").write_text("r")
    os.chmod(root / "sticky" / "rootfile", 0o666)
    (root / "private" / "inner").write_text("i")
    for kind, mode in SETID_MODES.items():
        for how in ("O_WRONLY", "O_RDWR", "O_DIRECT", "truncate", "O_TRUNC", "O_RDONLY_TRUNC"):
            path = root / f"setid-{kind}-{how}"
            path.write_bytes(b"\0" * 4096)
            os.chown(path, 0, OTHER_GID)
            os.chmod(path, mode)
        path = root / f"setid-{kind}-chgrp"
        path.write_bytes(b"\0")
        os.chown(path, NOBODY, OTHER_GID)
        os.chmod(path, mode)


def _run_as_nobody(cwd: Path, script: str = CALLER_SCRIPT) -> dict[str, object]:
    def drop() -> None:
        os.chdir(cwd)  # before dropping: the tmp dirs above are 0700 root
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    result = subprocess.run([CALLER_PYTHON, "-c", script], preexec_fn=drop, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.fuse
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_non_root_caller_gets_native_errors_and_ownership(mount_worker, tmp_path: Path, variant: str) -> None:
    assert os.geteuid() == 0, "this test switches to uid 65534, so it must start as root"
    native = tmp_path / "native"
    native.mkdir()
    vol = mount_worker(extra=VARIANTS[variant])
    _build_tree(native)
    _build_tree(vol.mountpoint)
    expected = _run_as_nobody(native)
    got = _run_as_nobody(vol.mountpoint)
    # Sanity: the script exercised both refusals and successes.
    assert expected["create in 0755 root dir"] == "EACCES"
    assert expected["create in 0777 dir"][:2] == [NOBODY, NOBODY]
    assert expected["create in setgid dir"][:2] == [NOBODY, OTHER_GID]
    assert expected["write setid-setuid-O_DIRECT"] == oct(0o100777)
    assert expected["truncate setid-setuid-truncate"] == oct(0o100777)
    assert expected["open O_TRUNC setid-setgid-exec-O_TRUNC"] == oct(0o100777)
    assert expected["open O_RDONLY|O_TRUNC setid-setuid-O_RDONLY_TRUNC"] == [oct(0o100777), 0]
    assert expected["create setgid executable in setgid dir"][2] == oct(0o100755)
    assert expected["chgrp own setid-setgid-noexec-other-group-chgrp"] == oct(0o100767)
    assert expected["mknod character device"] == "EPERM"
    assert expected["setxattr trusted.* on own file"] == "EPERM"
    assert expected["open root file O_NOATIME"] == "EPERM"
    differences = {k: (expected[k], got[k]) for k in expected if expected[k] != got[k]}
    assert differences == {}, f"native vs mount: {differences}"
    if variant != "memory":
        st = os.stat(vol.backing / "rw" / "x")
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)


LOOK_SCRIPT = r'''
import json, os
print(json.dumps({name: os.path.exists(name) for name in ("sticky/target", "rw/victim")}))
'''

#: Caller-side helper of the scripts below: an errno name, or "ok".
OUTCOME = r'''
import errno, json, os

def outcome(fn):
    try:
        fn()
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "ok"
'''

ACT_SCRIPT = OUTCOME + r'''

def replace_in_sticky():
    os.close(os.open("sticky/mine", os.O_CREAT | os.O_WRONLY, 0o644))
    os.rename("sticky/mine", "sticky/target")

print(json.dumps({
    "rename onto root's file in sticky dir": outcome(replace_in_sticky),
    "open(O_CREAT) of root's 0600 file": outcome(lambda: os.close(os.open("rw/victim", os.O_CREAT | os.O_WRONLY))),
}))
'''


@pytest.mark.fuse
def test_a_name_created_below_a_cached_absence_gets_the_checks_of_an_existing_file(
        mount_worker, tmp_path: Path) -> None:
    """The kernel checks create/rename against its cached view; the worker must not act on a stale one.

    The caller sees two names missing (negative entries, cached for 30 s), then root
    creates them directly in the backing dir. Natively the caller may neither
    replace root's file in a sticky directory nor open root's 0600 file. The kernel
    looks a rename target up again itself (``LOOKUP_RENAME_TARGET``); a plain
    ``O_CREAT`` it sends as CREATE, which the worker answers with ESTALE when the
    name exists, so that the VFS looks it up again (``LOOKUP_REVAL``).
    """
    vol = mount_worker(extra=["--negative-timeout", "30"])
    _build_tree(vol.mountpoint)
    assert _run_as_nobody(vol.mountpoint, LOOK_SCRIPT) == {"sticky/target": False, "rw/victim": False}
    (vol.backing / "sticky" / "target").write_text("root's")
    (vol.backing / "rw" / "victim").write_text("secret")
    os.chmod(vol.backing / "rw" / "victim", 0o600)
    assert _run_as_nobody(vol.mountpoint, LOOK_SCRIPT) == {"sticky/target": False, "rw/victim": False}, \
        "the absences were not cached, so this test proves nothing"
    got = _run_as_nobody(vol.mountpoint, ACT_SCRIPT)
    assert got == {"rename onto root's file in sticky dir": "EPERM", "open(O_CREAT) of root's 0600 file": "EACCES"}
    for path, text in ((vol.backing / "sticky" / "target", "root's"), (vol.backing / "rw" / "victim", "secret")):
        assert path.read_text() == text and path.stat().st_uid == 0


STAT_MINE_SCRIPT = r'''
import json, os
for name in ("sticky/mine-a", "sticky/mine-b"):
    os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644))
print(json.dumps([os.stat(name).st_uid for name in ("sticky/mine-a", "sticky/mine-b")]))
'''

REMOVE_SCRIPT = OUTCOME + r'''

print(json.dumps({
    "unlink": outcome(lambda: os.unlink("sticky/mine-a")),
    "rename away": outcome(lambda: os.rename("sticky/mine-b", "rw/taken")),
}))
'''


@pytest.mark.fuse
def test_a_name_replaced_below_a_cached_entry_gets_the_checks_of_what_is_there_now(
        mount_worker, tmp_path: Path) -> None:
    """An unlink or a rename's source is checked by the kernel against its cached inode; not the worker's excuse.

    The caller creates two files in a sticky directory (entries cached for 30 s);
    root then replaces both directly in the backing dir with files of its own.
    Natively the caller may neither remove nor move root's files out of a sticky
    directory: EPERM, and root's files stay.
    """
    vol = mount_worker(extra=["--entry-timeout", "30", "--attr-timeout", "30"])
    _build_tree(vol.mountpoint)
    assert _run_as_nobody(vol.mountpoint, STAT_MINE_SCRIPT) == [NOBODY, NOBODY]
    for name in ("mine-a", "mine-b"):
        replacement = vol.backing / "sticky" / f".{name}.new"
        replacement.write_text("root's")
        os.replace(replacement, vol.backing / "sticky" / name)
    got = _run_as_nobody(vol.mountpoint, REMOVE_SCRIPT)
    assert got == {"unlink": "EPERM", "rename away": "EPERM"}
    for name in ("mine-a", "mine-b"):
        path = vol.backing / "sticky" / name
        assert path.read_text() == "root's" and path.stat().st_uid == 0
