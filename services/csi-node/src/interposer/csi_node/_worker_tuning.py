"""The kernel cache and request loop settings a volume's fuse-worker is started with, and its pod's memory."""

from __future__ import annotations

import msgspec


class WorkerTuning(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How long the kernel may cache what the worker answered, and how the worker polls.

    A setting left None is not passed, so the worker's own default applies (the
    bounds are ``interposer.proto.worker_tuning``'s).

    Attributes:
        entry_timeout_s: how long the kernel may cache a name it looked up, seconds
            (``--entry-timeout``; worker default 1 s).
        attr_timeout_s: how long the kernel may cache a file's attributes, seconds
            (``--attr-timeout``; worker default 1 s).
        negative_timeout_s: how long the kernel may cache a lookup that found no such
            name, seconds (``--negative-timeout``; worker default: the entry timeout).
        busy_poll_us: how long the worker keeps polling the FUSE device for the next
            request before it sleeps, µs (``--busy-poll-us``; worker default 50; 0 = never).
        max_background: most asynchronous requests (async direct I/O, readahead) the
            kernel keeps in flight, i.e. the deepest queue an application gets
            (``--max-background``; worker default 64; 0 = the kernel's 12).
        kernel_passthrough: let the kernel serve reads and writes of files no layer
            acts on straight from the backing files (``--kernel-passthrough``;
            worker default off).
        always_flush: every ``close(2)`` sends FLUSH (``--always-flush``), not only
            where a layer acts on flush or the backing fs has a flush method
            (``--skip-needless-flush``, the worker's default).
        handle_killpriv_v2: ask the kernel for FUSE_HANDLE_KILLPRIV_V2, so the worker
            clears set-ID bits on writes and truncations and the kernel asks for no
            ``security.capability`` before each write (``--handle-killpriv-v2``,
            the worker's default); False: the kernel's older rule and round trip.
        max_file_fds: most files (not directories) the worker keeps an ``O_PATH``
            fd of; others are reopened by name when used (``--max-file-fds``;
            worker default 0 = half of its open-file limit).
        max_dir_fds: the same for directories (``--max-dir-fds``; worker default
            0 = a quarter of its open-file limit).
        memory_limit: the memory limit of the volume's worker pod, a Kubernetes
            quantity (Kubernetes launcher; not a worker flag); None = the csi-node's
            ``--worker-memory-limit``.
    """

    entry_timeout_s: float | None = None
    attr_timeout_s: float | None = None
    negative_timeout_s: float | None = None
    busy_poll_us: int | None = None
    max_background: int | None = None
    kernel_passthrough: bool | None = None
    always_flush: bool | None = None
    handle_killpriv_v2: bool | None = None
    max_file_fds: int | None = None
    max_dir_fds: int | None = None
    memory_limit: str | None = None

    def arguments(self) -> list[str]:
        """The worker flags of the settings that are not None, e.g. ``["--entry-timeout", "0.0"]``."""
        settings = (
            ("--entry-timeout", self.entry_timeout_s),
            ("--attr-timeout", self.attr_timeout_s),
            ("--negative-timeout", self.negative_timeout_s),
            ("--busy-poll-us", self.busy_poll_us),
            ("--max-background", self.max_background),
            ("--max-file-fds", self.max_file_fds),
            ("--max-dir-fds", self.max_dir_fds),
        )
        # repr: the shortest text that parses back to the same float.
        flags = [item for flag, value in settings if value is not None for item in (flag, repr(value))]
        if self.kernel_passthrough is not None:
            flags.append("--kernel-passthrough" if self.kernel_passthrough else "--no-kernel-passthrough")
        if self.always_flush is not None:
            flags.append("--always-flush" if self.always_flush else "--skip-needless-flush")
        if self.handle_killpriv_v2 is not None:
            flags.append("--handle-killpriv-v2" if self.handle_killpriv_v2 else "--no-handle-killpriv-v2")
        return flags
