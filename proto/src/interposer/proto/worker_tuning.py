"""Bounds of the fuse-worker's kernel cache and request loop settings.

The worker's flags (``--entry-timeout``, ``--attr-timeout``, ``--negative-timeout``,
``--busy-poll-us``, ``--max-background``, ``--max-file-fds``) accept these ranges, and the csi-node checks a volume's
``volume_context`` and a StorageClass's parameters against the same ones, so a bad
value is refused at NodePublishVolume or CreateVolume rather than by a worker that
then fails to start. The defaults stay with the worker (``fuse_worker._config``).
"""

from __future__ import annotations

#: Longest kernel cache time (entry, attribute, negative entry) a worker accepts, seconds.
MAX_CACHE_TIMEOUT_S = 3600.0
#: Longest time a worker's lean request loop may busy-poll the FUSE device, µs.
MAX_BUSY_POLL_US = 10_000
#: Most asynchronous FUSE requests a worker may let the kernel keep in flight
#: (``max_background`` is a 16-bit field of the FUSE_INIT reply, ``fuse_init_out``).
MAX_BACKGROUND_REQUESTS = (1 << 16) - 1
#: Most ``O_PATH`` file descriptors of files (or of directories) a worker may be told to hold: the largest
#: open-file limit Linux allows at all (``sysctl_nr_open_max`` in fs/file.c on 64-bit:
#: INT_MAX rounded down to a multiple of 64).
MAX_FILE_FDS = 2_147_483_584
