"""What object-store FUSE clients would make of a recorded volume's writes and namespace changes.

Mountpoint for Amazon S3, Cloud Storage FUSE (gcsfuse) and blobfuse2 keep whole
objects, so some things a local file system does cheaply fail there or move whole
files. From the events alone (``OpEvent.flags`` holds the open flags of each write's
handle; a ``create`` handle's include ``O_CREAT``, an ``open`` handle's never do, as
the kernel strips it for an existing file) this counts, per file session, what such a
client would refuse or pay for: a change to a file that existed (Mountpoint: EPERM
at the open; gcsfuse: the whole object down and up again, only the appended bytes
going up for appends to objects of 2 MiB or more; blobfuse2: the whole file up at close), an existing file emptied
with ``O_TRUNC`` and rewritten (Mountpoint: only with ``--allow-overwrite``), writes
that do not each begin where the previous one ended (Mountpoint: EINVAL; gcsfuse:
staged, not streamed) and writes after an ``fsync`` (Mountpoint: EIO), plus renames
and links. Sources: Mountpoint's doc/SEMANTICS.md, gcsfuse's docs/semantics.md,
Microsoft Learn "Configure BlobFuse for caching mode"; docs/layers.md
(``s3_semantics``, ``staged_writes``) has the details.
"""

from __future__ import annotations

import os

import msgspec

from interposer.proto import OpEvent

#: Example paths kept per finding.
EXAMPLES = 3
#: Findings, in report order: key → (what it is, what Mountpoint for S3, gcsfuse and blobfuse2 in
#: caching mode do with it). Counted in file sessions, renames and links in ops.
FINDINGS = {
    "changed_in_place": ("changed existing files", "EPERM", "down + up whole", "up whole"),
    "appended": ("  of which appends only", "EPERM", "down whole; >= 2 MiB: up the append", "up whole"),
    "overwritten": ("emptied by O_TRUNC, rewritten", "--allow-overwrite", "down + up whole", "up whole"),
    "out_of_order": ("new files, out of order", "EINVAL", "staged, up whole", "-"),
    "written_after_fsync": ("writes after an fsync", "EIO", "-", "-"),
    "renamed": ("renames", "ENOSYS", "copy + delete", "copy + delete"),
    "linked": ("hard links", "EPERM", "not supported", "not supported"),
}


class ObjectStoreFit(msgspec.Struct, frozen=True, kw_only=True):
    """What an object-store FUSE client would refuse or pay for, counted over file sessions and ops.

    Attributes:
        changed_in_place: sessions that wrote into a file that existed when opened,
            without ``O_TRUNC``.
        appended: of those, sessions that only wrote through ``O_APPEND``.
        overwritten: sessions that opened an existing file with ``O_TRUNC`` and wrote.
        out_of_order: sessions writing a new or emptied file whose writes did not
            each begin where the previous one ended (from offset 0).
        written_after_fsync: sessions that wrote after an ``fsync`` of the same handle.
        renamed: ``rename`` ops; linked: ``link`` ops.
        unknown_flags: sessions that wrote whose open flags the recording lacks (made
            before ``OpEvent.flags``): not classified above.
        examples: finding → up to :data:`EXAMPLES` paths, the first seen.
    """

    changed_in_place: int
    appended: int
    overwritten: int
    out_of_order: int
    written_after_fsync: int
    renamed: int
    linked: int
    unknown_flags: int
    examples: dict[str, list[str]]


#: A session's finding bits, so each is counted once per session.
_IN_PLACE, _APPEND_ONLY, _OVERWRITE, _OUT_OF_ORDER, _AFTER_FSYNC, _UNKNOWN = (1 << i for i in range(6))


class ObjectStoreTally:
    """Running counts of one volume; fed the write, fsync, release, rename and link events in order."""

    __slots__ = ("sessions", "counts", "examples")

    def __init__(self) -> None:
        #: (worker, session) → [bits found, next offset a streaming write must begin at, synced].
        self.sessions: dict[tuple[str, int], list] = {}
        self.counts = dict.fromkeys(FINDINGS, 0)
        self.counts["unknown_flags"] = 0
        self.examples: dict[str, list[str]] = {}

    def _note(self, key: str, path: str) -> None:
        self.counts[key] += 1
        seen = self.examples.setdefault(key, [])
        if len(seen) < EXAMPLES and path not in seen:
            seen.append(path)

    def _found(self, state: list, bit: int, key: str, path: str) -> None:
        """Count finding ``key`` for the session, once."""
        if not state[0] & bit:
            state[0] |= bit
            self._note(key, path)

    def write(self, worker: str, event: OpEvent) -> None:
        """A successful write of a file session."""
        if not event.session:
            return
        key = (worker, event.session)
        state = self.sessions.get(key)
        flags, path = event.flags, event.path
        if state is None:
            state = self.sessions[key] = [0, 0, False]
        if flags & os.O_ACCMODE == os.O_RDONLY:  # a write through a read-only handle: flags not recorded
            self._found(state, _UNKNOWN, "unknown_flags", path)
            return
        if state[2]:
            self._found(state, _AFTER_FSYNC, "written_after_fsync", path)
        if flags & os.O_CREAT or flags & os.O_TRUNC:  # a new object, written front to back to stream
            if flags & os.O_TRUNC and not flags & os.O_CREAT:
                self._found(state, _OVERWRITE, "overwritten", path)
            if event.offset != state[1]:
                self._found(state, _OUT_OF_ORDER, "out_of_order", path)
            state[1] = event.offset + event.result
        else:
            if flags & os.O_APPEND:  # a handle's flags are the same for all its writes
                state[0] |= _APPEND_ONLY
            self._found(state, _IN_PLACE, "changed_in_place", path)

    def fsync(self, worker: str, event: OpEvent) -> None:
        state = self.sessions.get((worker, event.session)) if event.session else None
        if state is not None:
            state[2] = True

    def release(self, worker: str, event: OpEvent) -> None:
        """The end of a session: an in-place change made only of appends is counted as one."""
        state = self.sessions.pop((worker, event.session), None)
        if state is not None and state[0] & _IN_PLACE and state[0] & _APPEND_ONLY:
            self._note("appended", event.path)

    def namespace(self, op: str, path: str) -> None:
        """A successful ``rename`` or ``link``."""
        self._note("renamed" if op == "rename" else "linked", path)

    def report(self) -> ObjectStoreFit:
        """The counts so far; sessions not released yet count as they stand."""
        appending = sum(1 for state in self.sessions.values() if state[0] & _IN_PLACE and state[0] & _APPEND_ONLY)
        counts = {**self.counts, "appended": self.counts["appended"] + appending}
        return ObjectStoreFit(**counts, examples={key: paths for key, paths in self.examples.items() if paths})
