"""The user-facing policy of a volume: an ordered list of layers.

A policy arrives as JSON (``nats pub interposer.policy.set.<volume> '{...}'``), is
decoded with :func:`decode_policy`, which rejects unknown fields, out-of-range
values, unknown op names and unknown errno names with a message that names the
field (``... - at `$.layers[0].probability```), and is stored as a
:class:`PolicyRecord` in the JetStream KV bucket.

Example::

    {"layers": [
        {"type": "delay", "delay_s": 0.002, "ops": ["read", "write"]},
        {"type": "throttle", "rate_bytes_per_s": 20971520},
        {"type": "fault", "errno": "EIO", "probability": 0.01, "ops": ["read"]}
    ]}

Layers apply in list order: the first layer sees an op first.
"""

from __future__ import annotations

import errno as _errno
import fnmatch
import re
from collections.abc import Mapping
from typing import Annotated, Literal, Union

import msgspec

from ._profile_names import ProfileName

#: FUSE op names a layer can match (pyfuse3 / libfuse low-level names).
OpName = Literal[
    "lookup", "getattr", "setattr", "readlink", "symlink", "mknod", "mkdir", "unlink",
    "rmdir", "rename", "link", "open", "read", "write", "flush", "release", "fsync",
    "opendir", "readdir", "releasedir", "fsyncdir", "statfs", "access", "create",
    "getxattr", "setxattr", "listxattr", "removexattr", "fallocate", "copy_file_range", "lseek",
]
#: The ops that move file data; throttle layers can only match these.
DataOpName = Literal["read", "write"]

#: Upper bound of any single injected delay, seconds: longer than this stalls kernel
#: requests past any useful experiment (and past FUSE's own request timeouts in some kernels).
MAX_DELAY_S = 60.0
#: Most layers one policy may hold.
MAX_LAYERS = 64
#: Longest path glob, characters.
MAX_GLOB_LENGTH = 4096
#: Largest encoded policy accepted, bytes.
MAX_POLICY_BYTES = 64 * 1024
#: Longest experiment a policy or a layer may declare with ``expires_after_s``, seconds (30 days).
MAX_EXPIRES_AFTER_S = 30 * 24 * 3600.0
#: Most bytes one corrupt fault alters in one read.
MAX_CORRUPT_BYTES = 4096
#: Largest random seed (int64).
MAX_SEED = (1 << 63) - 1
#: Largest rate, IOPS or byte limit a layer accepts (2**50, about 1 PiB).
MAX_LIMIT = 1 << 50

Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Glob = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_GLOB_LENGTH)]
DelaySeconds = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_DELAY_S)]
PositiveLimit = Annotated[int, msgspec.Meta(gt=0, le=MAX_LIMIT)]


def check_glob(pattern: str) -> None:
    """Reject ``fnmatch`` patterns that can never match a path inside the volume.

    Two mistakes would otherwise pass silently, leaving a fault or delay that
    never acts while its author believes it does: an unbalanced ``[`` (``fnmatch``
    takes it as a literal character, so ``/data/[ab*`` matches nothing), and a
    pattern whose first character cannot match ``/``, with which every path
    starts (``data/*``, written as if relative to the volume root).

    Raises:
        ValueError: the pattern has an unbalanced ``[``, or cannot match a leading
            ``/`` (message names the field and suggests the absolute form).
    """
    first = ""  # the pattern's first element: a character, a wildcard or a [set]
    i, n = 0, len(pattern)
    while i < n:
        end = i + 1
        if pattern[i] == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":  # a leading ] is part of the set
                j += 1
            close = pattern.find("]", j)
            if close < 0:
                raise ValueError(f"field `path_glob`: unbalanced '[' at position {i} in {pattern!r}")
            end = close + 1
        first = first or pattern[i:end]
        i = end
    if first and not fnmatch.fnmatchcase("/", first):
        hint = f" (did you mean {'/' + pattern!r}?)" if len(first) == 1 else ""
        raise ValueError(f"field `path_glob`: {pattern!r} can never match: every path inside the volume "
                         f"starts with '/'{hint}")


def _check_no_page_cache_choice(layer: _Layer, kind: str) -> None:
    if layer.page_cache != "bypass":
        raise ValueError(f"field `page_cache`: a {kind} layer never bypasses the page cache, so there is nothing to keep")


def _check_errno(field: str, name: str) -> None:
    if name not in ERRNO_BY_NAME:
        raise ValueError(f"field `{field}`: unknown errno name {name!r} (expected a name such as EIO, ENOSPC)")


#: Where the page cache sits for a layer acting on reads: see ``_Layer.page_cache``.
PageCache = Literal["bypass", "keep"]


class _Layer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    """Fields every layer has.

    Attributes:
        ops: FUSE op names the layer applies to; empty = every op the layer kind
            can act on.
        path_glob: ``fnmatch`` pattern matched against the op's path inside the
            volume (``/data/*.bin``); ``*`` matches ``/`` too; an unbalanced ``[``
            is an error.
        expires_after_s: drop the layer this many seconds after the worker applied
            the policy revision (0 < s <= one year); ``None`` = never.
        expires_at: drop the layer at this wall-clock time, seconds since the Unix
            epoch; ``None`` = never. At most one of the two expiries may be given.
        page_cache: where the kernel's page cache sits for a layer acting on reads
            (fault, delay, throttle, profile). ``bypass`` (default): files the layer
            matches are opened with ``FOPEN_DIRECT_IO``, so every application read
            reaches the layer and nothing hides the fault, delay or wait; a shared
            ``mmap`` of such a file needs Linux >= 6.6 (ENODEV before; see docs/posix.md).
            ``keep``: the page cache stays in front of the layer, as it stands in
            front of a real device: only reads it misses (readahead-sized, up to
            1 MiB) reach the layer, cached reads are served at memory speed, and
            ``mmap`` works. Refused where the cache would change what the layer
            does: short reads, short writes and corruption (the kernel would cache
            a short or altered page as the file's content), quota and metadata
            layers (they never bypass the cache).
    """

    ops: frozenset[OpName] = frozenset()
    path_glob: Glob = "*"
    expires_after_s: Annotated[float, msgspec.Meta(gt=0.0, le=MAX_EXPIRES_AFTER_S)] | None = None
    expires_at: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    page_cache: PageCache = "bypass"

    def fields_not_in_effect(self) -> frozenset[str]:
        """Names of the fields this layer, as configured, ignores (``interposer policy
        validate`` leaves them out, so nobody reads a default as a setting in force)."""
        return frozenset()

    def __post_init__(self) -> None:
        check_glob(self.path_glob)
        if self.expires_after_s is not None and self.expires_at is not None:
            raise ValueError("fields `expires_after_s` and `expires_at`: give at most one of them")


FaultKind = Literal["errno", "short_read", "short_write", "corrupt"]
#: Ops each fault kind can act on (``errno`` acts on any op).
FAULT_KIND_OPS: dict[str, frozenset[str]] = {
    "short_read": frozenset({"read"}),
    "short_write": frozenset({"write"}),
    "corrupt": frozenset({"read"}),
}
#: The kind-specific fields each fault kind reads.
_FAULT_KIND_FIELDS: dict[str, frozenset[str]] = {
    "errno": frozenset({"errno", "errnos"}),
    "short_read": frozenset({"short_ratio"}),
    "short_write": frozenset({"short_ratio"}),
    "corrupt": frozenset({"corrupt_bytes", "corrupt_mode"}),
}
#: Ops a fault with ``on="open"`` acts on.
OPEN_OPS: frozenset[str] = frozenset({"open", "create", "opendir"})


class FaultLayer(_Layer, tag="fault", kw_only=True):
    """Fail matching ops with an errno, shorten their I/O, or corrupt read data.

    A matching op is *eligible* once ``after_bytes`` bytes of matching reads and
    writes have passed the layer, and only every ``every_nth`` matching op; an
    eligible op is faulted with ``probability``.

    Attributes:
        kind: ``errno`` (fail the op), ``short_read`` (return fewer bytes than
            asked), ``short_write`` (write and report fewer bytes than asked; the
            kernel passes a short write to the application), ``corrupt`` (alter
            bytes of the data a read returns).
        errno: errno name returned to the application (``EIO``, ``ENOSPC``, …);
            any name in Python's ``errno.errorcode``. Used when ``errnos`` is empty.
        errnos: errno name → relative weight (> 0), e.g. ``{"EIO": 3, "ENOSPC": 1}``;
            each fault draws one name with these weights. Overrides ``errno``.
        probability: chance, 0..1, that an eligible op is faulted.
        every_nth: only every n-th matching op is eligible (the n-th, 2n-th, …);
            0 or 1 = every op.
        after_bytes: bytes that matching reads/writes the layer lets through
            must have moved (a read's reply, a write's count) before any op is
            eligible; 0 = from the start.
        on: ``every_op`` (act on each matching op) or ``open`` (act only on
            open/create/opendir: the file cannot be opened, later I/O is left alone).
        short_ratio: for short reads/writes, the fraction (0 < r < 1) of the
            requested bytes transferred (at least 1 byte).
        corrupt_bytes: for ``corrupt``, how many bytes of one read are altered
            (1..4096, fewer if the read is shorter).
        corrupt_mode: ``zero`` (set the bytes to 0) or ``random`` (random values,
            each different from the original byte).
    """

    kind: FaultKind = "errno"
    errno: str = "EIO"
    errnos: dict[str, Annotated[float, msgspec.Meta(gt=0.0)]] = {}
    probability: Probability = 1.0
    every_nth: Annotated[int, msgspec.Meta(ge=0, le=MAX_LIMIT)] = 0
    after_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_LIMIT)] = 0
    on: Literal["every_op", "open"] = "every_op"
    short_ratio: Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)] = 0.5
    corrupt_bytes: Annotated[int, msgspec.Meta(ge=1, le=MAX_CORRUPT_BYTES)] = 1
    corrupt_mode: Literal["zero", "random"] = "random"

    def fields_not_in_effect(self) -> frozenset[str]:
        """See :meth:`_Layer.fields_not_in_effect`: the other kinds' fields; ``errno`` under ``errnos``."""
        unused = {"errno", "errnos", "short_ratio", "corrupt_bytes", "corrupt_mode"} - _FAULT_KIND_FIELDS[self.kind]
        if self.errnos:
            unused.add("errno")
        return frozenset(unused)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_errno("errno", self.errno)
        for name in self.errnos:
            _check_errno("errnos", name)
        allowed = FAULT_KIND_OPS.get(self.kind)
        if allowed is not None:
            if self.on == "open":
                raise ValueError(f"field `on`: kind {self.kind!r} acts on data, not on open")
            extra = sorted(set(self.ops) - allowed)
            if extra:
                raise ValueError(f"field `ops`: kind {self.kind!r} acts only on {sorted(allowed)}, not {extra}")
            if self.page_cache == "keep":
                raise ValueError(f"field `page_cache`: kind {self.kind!r} needs the page cache bypassed "
                                 "(the kernel would cache the short or altered data as the file's content)")


class FixedDistribution(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type", tag="fixed"):
    """Always the same delay.

    Attributes:
        delay_s: the delay, seconds.
    """

    delay_s: DelaySeconds


class UniformDistribution(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type", tag="uniform"):
    """Delay uniform on ``[min_s, max_s]`` seconds."""

    min_s: DelaySeconds
    max_s: DelaySeconds

    def __post_init__(self) -> None:
        if self.max_s < self.min_s:
            raise ValueError("field `max_s`: must be >= `min_s`")


class NormalDistribution(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type", tag="normal"):
    """Normal delay with ``mean_s`` and ``stddev_s`` seconds; draws below 0 become 0."""

    mean_s: DelaySeconds
    stddev_s: DelaySeconds


class LognormalDistribution(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type", tag="lognormal"):
    """Log-normal delay: ``median_s * exp(sigma * Z)``, Z standard normal.

    Attributes:
        median_s: median delay, seconds (> 0).
        sigma: shape, the standard deviation of ``ln(delay)`` (0 < sigma <= 10).
    """

    median_s: Annotated[float, msgspec.Meta(gt=0.0, le=MAX_DELAY_S)]
    sigma: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)]


class ParetoDistribution(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type", tag="pareto"):
    """Pareto (heavy-tailed) delay: ``P(delay > x) = (scale_s / x) ** alpha`` for x >= scale_s.

    Attributes:
        scale_s: smallest delay, seconds (> 0).
        alpha: tail index (> 0; the mean is finite only for alpha > 1).
    """

    scale_s: Annotated[float, msgspec.Meta(gt=0.0, le=MAX_DELAY_S)]
    alpha: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)]


Distribution = Union[
    FixedDistribution, UniformDistribution, NormalDistribution, LognormalDistribution, ParetoDistribution
]


#: How a delay layer uses its draw: see :class:`DelayLayer`.
DelayMode = Literal["add", "floor"]


#: The ops that pay the deferred latency of a delay layer's writes (``DelayLayer.write_behind``).
WRITE_BEHIND_OPS: frozenset[str] = frozenset({"flush", "fsync"})


#: Paths a delay layer's ``lookup_cache_s`` remembers at most: as many as gcsfuse's default stat cache
#: of 32 MiB holds (``DefaultStatCacheCapacity``, 20,460 entries, in its internal/config constants).
LOOKUP_CACHE_ENTRIES = 20_460


#: Inodes a delay layer's ``attr_cache`` remembers at most (the oldest go first): as many paths as
#: ``lookup_cache_s`` remembers.
ATTR_CACHE_ENTRIES = LOOKUP_CACHE_ENTRIES

#: Most entries a delay layer's ``list_page_entries`` takes for one listing request (Azure List Blobs
#: answers at most 5,000; the bound only refuses nonsense).
MAX_LIST_PAGE_ENTRIES = 1_000_000

#: How long a client may trust cached attributes, seconds (nfs(5) takes up to 3,600 for ``actimeo``).
CacheSeconds = Annotated[float, msgspec.Meta(ge=0.0, le=86_400.0)]


class AttrCache(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A network file system client's attribute cache, as the Linux NFS client keeps it (delay layer
    ``attr_cache``).

    A ``getattr`` of an inode is held when its cached attributes are older than
    its timeout, and answered unheld before. The timeout starts at the minimum,
    doubles each time a held ``getattr`` finds the attributes unchanged (same
    ctime, mtime and size) and goes back to the minimum when they changed, capped
    at the maximum (``nfs_update_inode`` in the kernel's fs/nfs/inode.c). The
    defaults are the Linux NFS client's (nfs(5): ``acregmin`` 3, ``acregmax`` 60,
    ``acdirmin`` 30, ``acdirmax`` 60).

    Attributes:
        file_min_s: first timeout of a non-directory's attributes, seconds (``acregmin``).
        file_max_s: longest one (``acregmax``); at least ``file_min_s``.
        dir_min_s: first timeout of a directory's attributes (``acdirmin``).
        dir_max_s: longest one (``acdirmax``); at least ``dir_min_s``.
    """

    file_min_s: CacheSeconds = 3.0
    file_max_s: CacheSeconds = 60.0
    dir_min_s: CacheSeconds = 30.0
    dir_max_s: CacheSeconds = 60.0

    def __post_init__(self) -> None:
        if self.file_min_s > self.file_max_s:
            raise ValueError("field `attr_cache.file_max_s`: must be at least `file_min_s`")
        if self.dir_min_s > self.dir_max_s:
            raise ValueError("field `attr_cache.dir_max_s`: must be at least `dir_min_s`")


class DelayLayer(_Layer, tag="delay", kw_only=True):
    """Delay matching ops.

    Give either ``delay_s`` (a fixed delay, as before distributions existed) or
    ``distribution``. Every draw is capped at ``max_s``.

    Attributes:
        delay_s: fixed delay in seconds, 0..60.
        distribution: a delay distribution, e.g.
            ``{"type": "lognormal", "median_s": 0.001, "sigma": 0.5}``.
        probability: chance, 0..1, that a matching op is delayed.
        max_s: cap of every drawn delay, seconds (default and most: 60).
        seed: seed of this layer's own random source, for reproducible runs;
            ``None`` = the worker's shared random source.
        mode: what the draw means. ``add`` (default): sleep the draw, then pass
            the op on, so the op takes the draw *plus* its own service time.
            ``floor``: the draw is a latency target; pass the op on first, then
            sleep ``max(0, draw - time the layers below and the backend took)``,
            so the op takes ``max(draw, own service time)`` (an emulated device
            with that latency). A failed op is held the same way.
        skip_sequential: leave out a ``read`` or ``write`` that starts where the
            previous one of the same file (among the ops this layer matches)
            ended: a disk pays seek and rotation only when its head has to move,
            a request continuing the last one is served at the transfer rate
            (C. Ruemmler, J. Wilkes, "An introduction to disk drive modeling",
            IEEE Computer 27(3), 1994). The first request of a file and every
            other op are delayed. Needs ``read`` or ``write`` among ``ops``.
            ``"buffered"``: only requests of files the application opened without
            ``O_DIRECT``, as a network file system client's readahead serves
            buffered reads and sends each direct one to the server.
        write_behind: hold no ``write``; hold instead the next ``flush``
            (``close(2)``) or ``fsync`` (also ``fdatasync(2)``) of a file written
            since its last one, once for all those writes, as an NFS client whose
            page cache takes ``write(2)`` and sends the data when the file is
            closed or synced (Linux ``nfs_file_flush``; NFSv4.1 WRITE and COMMIT,
            RFC 8881 sections 18.32 and 18.3), or as Mountpoint for Amazon S3,
            which uploads in the background and completes the upload on
            ``fsync`` or close. ``"buffered"``: writes through a file the
            application opened with ``O_SYNC``, ``O_DSYNC`` or ``O_DIRECT`` are
            held each (an NFS client sends them at once); ``True`` defers those
            too. Needs ``write`` among ``ops``; the layer then acts on ``flush``
            and ``fsync`` too.
        lookup_cache_s: hold a ``lookup`` of a path at most once in this many
            seconds (0 ≤ x ≤ 86,400; 0, the default: every time): a later lookup
            of the same path within it passes unheld, found or not, as a client
            answers from its stat cache (Cloud Storage FUSE caches stat results,
            positive and negative, for 60 s by default: gcsfuse
            ``metadata-cache.ttl-secs``). Unlike the kernel's entry timeout, which
            is fixed when the volume is mounted, it changes with the policy. At most
            :data:`LOOKUP_CACHE_ENTRIES` paths are remembered (the oldest go first).
            Needs ``lookup`` among ``ops`` (or no ``ops``).
        attr_cache: hold a ``getattr`` only when the inode's attributes are older
            than a client's attribute cache would keep them (:class:`AttrCache`;
            ``{}`` = the Linux NFS client's defaults): the kernel's own attribute
            timeout of this mount (1 s) sends a ``getattr`` per inode each second
            that a stat-heavy workload asks, which an NFS client answers from its
            cache for 3 to 60 s. ``None`` (default): every one is held. At most
            :data:`ATTR_CACHE_ENTRIES` inodes are remembered. Needs ``getattr``
            among ``ops`` (or no ``ops``).
        one_floor_per_call: ``floor`` mode: the requests FUSE sends for one system
            call share one floor (True, default), counted from the first: the
            GETATTR of the parent, LOOKUP and CREATE of an ``open(O_CREAT)`` (also
            ``mkdir``, ``mknod``, ``symlink``), the LOOKUP and OPEN of an ``open`` of
            a name the kernel has no entry for, as an NFSv4 client sends one OPEN for
            either (RFC 8881 section 18.16). False: each request pays its own floor,
            as an NFSv3 client (RFC 1813) sends LOOKUP, ACCESS and CREATE apart.
            ``add`` mode ignores it.
        list_page_entries: ``floor`` mode: a directory listing is one request per
            this many entries, as an object-store client lists a prefix in pages
            (Amazon S3 ListObjectsV2: at most 1,000 keys; Cloud Storage as gcsfuse
            lists, and Azure List Blobs: 5,000). Only the ``readdir`` that starts a
            listing (offset 0) and one that reaches into a page not fetched yet are
            held; the kernel asks for a listing in requests of about 200 entries
            (its 32 KiB buffer). ``None`` (default): every ``readdir`` that returns
            entries is held, as an NFS client's READDIRPLUS fills a buffer much like
            FUSE's. Either way, in ``floor`` mode the ``readdir`` that finds the
            listing's end (no entries, past its start) is not held: the last reply
            said so. Needs ``readdir`` among ``ops`` (or no ``ops``).
    """

    delay_s: DelaySeconds | None = None
    distribution: Distribution | None = None
    probability: Probability = 1.0
    max_s: DelaySeconds = MAX_DELAY_S
    seed: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)] | None = None
    mode: DelayMode = "add"
    skip_sequential: bool | Literal["buffered"] = False
    write_behind: bool | Literal["buffered"] = False
    lookup_cache_s: CacheSeconds = 0.0
    attr_cache: AttrCache | None = None
    one_floor_per_call: bool = True
    list_page_entries: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIST_PAGE_ENTRIES)] | None = None

    def fields_not_in_effect(self) -> frozenset[str]:
        """See :meth:`_Layer.fields_not_in_effect`: ``one_floor_per_call`` outside ``floor`` mode."""
        return frozenset() if self.mode == "floor" else frozenset({"one_floor_per_call"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.delay_s is None) == (self.distribution is None):
            raise ValueError("fields `delay_s` and `distribution`: give exactly one of them")
        if self.skip_sequential and self.ops and not self.ops & {"read", "write"}:
            raise ValueError("field `skip_sequential`: only reads and writes are sequential, and `ops` has neither")
        if self.write_behind and self.ops and "write" not in self.ops:
            raise ValueError("field `write_behind`: it defers the latency of writes, and `ops` has no `write`")
        if self.lookup_cache_s and self.ops and "lookup" not in self.ops:
            raise ValueError("field `lookup_cache_s`: it caches lookups, and `ops` has no `lookup`")
        if self.attr_cache is not None and self.ops and "getattr" not in self.ops:
            raise ValueError("field `attr_cache`: it caches attributes, and `ops` has no `getattr`")
        if self.list_page_entries is not None and self.ops and "readdir" not in self.ops:
            raise ValueError("field `list_page_entries`: it pages directory listings, and `ops` has no `readdir`")
        if self.list_page_entries is not None and self.mode != "floor":
            raise ValueError("field `list_page_entries`: listings are paged in `floor` mode only; `mode` is "
                             f"{self.mode!r}")

    @property
    def resolved_distribution(self) -> Distribution:
        """The distribution in force (``delay_s`` as a fixed one)."""
        if self.distribution is not None:
            return self.distribution
        assert self.delay_s is not None
        return FixedDistribution(delay_s=self.delay_s)


class ThrottleLayer(_Layer, tag="throttle", kw_only=True):
    """Limit the bandwidth and/or the operation rate of reads and writes.

    Matching reads and writes share the layer's buckets; for separate read and
    write limits use two layers with ``ops: ["read"]`` and ``ops: ["write"]``. An
    op waits until every bucket has credit for it, in arrival order (FIFO); it is
    never shortened (a FUSE reply must be whole).

    Attributes:
        rate_bytes_per_s: sustained bandwidth, bytes per second; ``None`` = no
            bandwidth limit.
        burst_bytes: bandwidth bucket size in bytes; 0 = ``DEFAULT_BURST_S`` of the
            rate, at least one 1 MiB request.
        iops: sustained operations per second; ``None`` = no IOPS limit.
        burst_ops: IOPS bucket size in ops; 0 = ``DEFAULT_BURST_S`` of the rate, at
            least 1.
        max_io_bytes: the largest op counted as one against ``iops``, bytes; a
            larger one counts ``ceil(bytes / max_io_bytes)``, as cloud disks count
            I/O (AWS EBS: 256 KiB units on SSD volumes, 1 MiB on HDD ones; a 1 MiB
            read of a gp3 volume uses 4 of its IOPS); contiguous requests of a
            file merge into units as EBS merges contiguous I/Os (docs/layers.md).
            ``None`` = every op counts one.
            Needs ``iops`` or ``charge_units``.
        charge_units: the bandwidth bucket charges every ``max_io_bytes`` unit an
            op counts as a whole unit, whatever moved: EBS HDD volumes spend a
            1 MiB throughput credit on an I/O of 1 MiB or less, and one on
            sequential I/Os merged into 1 MiB (AWS EBS User Guide, "Inefficiency
            of small read/writes on HDD"), so 4 KiB random reads of a 40 MiB/s
            volume run at 40 IOPS. Needs ``rate_bytes_per_s`` and ``max_io_bytes``.
        burst_balance: how full the buckets are, 0..1, when the layer charges its
            first op (1, the default: full, as a new EBS volume; 0: empty, as after
            a long run above the rate; named after the CloudWatch ``BurstBalance``
            metric). Refilling starts then.
        read_charge: the share of a read's bytes the bandwidth bucket is charged,
            (0, 1] (1, the default: every byte). Amazon EFS meters reads at
            one-third the rate of writes in its Bursting and Provisioned throughput
            modes (EFS User Guide, "Understanding metered throughput"): 1/3 reads
            three times as fast as the ``rate_bytes_per_s`` a write gets. Needs
            ``rate_bytes_per_s``.
        read_iops_charge: how many of the ``iops`` bucket's ops a read counts as,
            (0, 64] (1, the default). Google's standard Persistent Disk gives 0.75
            read and 1.5 write IOPS per GiB from resources reads and writes share
            (Compute Engine, "Optimize Persistent Disk performance", simultaneous
            reads and writes): one bucket at the write rate with 2 here lets reads
            alone reach half of it and a mix trade one read for two writes. Needs
            ``iops``.
        ops: ``read`` and/or ``write``; empty = both.

    Ops are charged for the bytes they moved (a read's reply, a write's count),
    once served: a read at the end of a file costs nothing.
    """

    rate_bytes_per_s: PositiveLimit | None = None
    burst_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_LIMIT)] = 0
    iops: PositiveLimit | None = None
    burst_ops: Annotated[int, msgspec.Meta(ge=0, le=MAX_LIMIT)] = 0
    max_io_bytes: PositiveLimit | None = None
    charge_units: bool = False
    burst_balance: Probability = 1.0
    read_charge: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    read_iops_charge: Annotated[float, msgspec.Meta(gt=0.0, le=64.0)] = 1.0
    ops: frozenset[DataOpName] = frozenset()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rate_bytes_per_s is None and self.iops is None:
            raise ValueError("fields `rate_bytes_per_s` and `iops`: give at least one of them")
        if self.read_charge != 1.0 and self.rate_bytes_per_s is None:
            raise ValueError("field `read_charge`: it scales what reads are charged to the `rate_bytes_per_s` "
                             "bucket, and `rate_bytes_per_s` is not given")
        if self.read_iops_charge != 1.0 and self.iops is None:
            raise ValueError("field `read_iops_charge`: it sets what a read counts against the `iops` bucket, "
                             "and `iops` is not given")
        if self.charge_units and (self.rate_bytes_per_s is None or self.max_io_bytes is None):
            raise ValueError("field `charge_units`: it charges `max_io_bytes` units to the `rate_bytes_per_s` "
                             "bucket; give both")
        if self.max_io_bytes is not None and self.iops is None and not self.charge_units:
            raise ValueError("field `max_io_bytes`: it sizes the ops counted against `iops` (or charged whole "
                             "with `charge_units`), and neither is given")


class QuotaLayer(_Layer, tag="quota", kw_only=True):
    """Limit the bytes and inodes of the volume.

    Usage is taken from the backing store when the layer comes into force and kept
    up to date by the layer. Writes that would grow usage past ``bytes`` and
    creates (create, mkdir, mknod, symlink) past ``inodes`` fail with ``errno``;
    ``statfs`` reports the quota as the file system's size, so ``df`` shows it.
    ``ops`` and ``path_glob`` are not used: a quota is volume-wide.

    Attributes:
        bytes: most bytes of file data (apparent sizes); ``None`` = no limit.
        inodes: most files, directories and links; ``None`` = no limit.
        errno: ``ENOSPC`` (a full file system) or ``EDQUOT`` (a user's quota).
    """

    bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_LIMIT)] | None = None
    inodes: Annotated[int, msgspec.Meta(ge=0, le=MAX_LIMIT)] | None = None
    errno: Literal["ENOSPC", "EDQUOT"] = "ENOSPC"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bytes is None and self.inodes is None:
            raise ValueError("fields `bytes` and `inodes`: give at least one of them")
        if self.ops or self.path_glob != "*":
            raise ValueError("fields `ops`/`path_glob`: a quota applies to the whole volume")
        _check_no_page_cache_choice(self, "quota")

    def fields_not_in_effect(self) -> frozenset[str]:
        """See :meth:`_Layer.fields_not_in_effect`: a quota is volume-wide and leaves the page cache alone."""
        return frozenset({"ops", "path_glob", "page_cache"})


#: Order of directory listings under a metadata layer: see :class:`MetadataLayer`.
ReaddirOrder = Literal["backend", "shuffle", "hash"]


class MetadataLayer(_Layer, tag="metadata", kw_only=True):
    """Override and jitter the attributes lookup/getattr/setattr/create/mkdir/… return,
    and reorder directory listings.

    Attributes:
        size: ``st_size`` reported, bytes.
        mode: permission bits reported (``0o644`` as 420); the file type is kept.
        nlink: ``st_nlink`` reported.
        uid: ``st_uid`` reported.
        gid: ``st_gid`` reported.
        atime: ``st_atime`` reported, seconds since the Unix epoch.
        mtime: ``st_mtime`` reported, seconds since the Unix epoch.
        ctime: ``st_ctime`` reported, seconds since the Unix epoch.
        time_jitter_s: add a uniform random offset in ``[-j, +j]`` seconds to each
            timestamp (after overrides); 0 = none.
        readdir_order: order of the entries a directory listing returns:
            ``backend`` (default: as the backend lists them), ``shuffle`` (a new
            random permutation for every opendir; one handle keeps its order, so
            several readdir calls, rewinddir and seekdir stay consistent) or
            ``hash`` (sorted by a hash of the name keyed by ``seed``: the same
            order for every opendir while the seed stays, as in a hash-indexed
            directory such as ext4's ``dir_index``). ``.`` and ``..`` stay first.
            Acts at ``opendir`` on directories whose path matches ``path_glob``.
        seed: seed of this layer's own random source; ``None`` = shared source.
    """

    size: Annotated[int, msgspec.Meta(ge=0, le=MAX_LIMIT)] | None = None
    mode: Annotated[int, msgspec.Meta(ge=0, le=0o7777)] | None = None
    nlink: Annotated[int, msgspec.Meta(ge=0, le=1 << 32)] | None = None
    uid: Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)] | None = None
    gid: Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)] | None = None
    atime: Annotated[float, msgspec.Meta(ge=0.0, le=1e11)] | None = None
    mtime: Annotated[float, msgspec.Meta(ge=0.0, le=1e11)] | None = None
    ctime: Annotated[float, msgspec.Meta(ge=0.0, le=1e11)] | None = None
    time_jitter_s: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_EXPIRES_AFTER_S)] = 0.0
    readdir_order: ReaddirOrder = "backend"
    seed: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        allowed = METADATA_OPS | READDIR_ORDER_OPS
        extra = sorted(set(self.ops) - allowed)
        if extra:
            raise ValueError(f"field `ops`: metadata layers act only on {sorted(allowed)}, not {extra}")
        if self.ops and self.readdir_order != "backend" and not self.ops & READDIR_ORDER_OPS:
            raise ValueError("fields `ops` and `readdir_order`: the order is chosen at opendir; "
                             "add \"opendir\" to `ops` or leave `ops` empty")
        if self.readdir_order == "backend" and self.ops & READDIR_ORDER_OPS:
            raise ValueError("fields `ops` and `readdir_order`: \"opendir\" only serves `readdir_order`, "
                             "which is \"backend\" (set it to \"shuffle\" or \"hash\")")
        _check_no_page_cache_choice(self, "metadata")

    def fields_not_in_effect(self) -> frozenset[str]:
        """See :meth:`_Layer.fields_not_in_effect`: attributes and listings never bypass the page cache."""
        return frozenset({"page_cache"})

    @property
    def alters_attributes(self) -> bool:
        """True if the layer changes attributes (an override or a timestamp jitter is set)."""
        return self.time_jitter_s > 0.0 or any(
            value is not None
            for value in (self.size, self.mode, self.nlink, self.uid, self.gid, self.atime, self.mtime, self.ctime)
        )

    @property
    def default_ops(self) -> frozenset[str]:
        """The ops the layer acts on when ``ops`` is empty: the attribute replies if it
        alters attributes, ``opendir`` if it reorders listings, else the attribute replies."""
        reorders = self.readdir_order != "backend"
        if reorders and not self.alters_attributes:
            return READDIR_ORDER_OPS
        return METADATA_OPS | READDIR_ORDER_OPS if reorders else METADATA_OPS


#: Ops whose reply carries attributes a metadata layer can alter.
METADATA_OPS: frozenset[str] = frozenset({"lookup", "getattr", "setattr", "create", "mkdir", "mknod", "symlink", "link"})
#: The op at which a metadata layer fixes the order of a directory listing.
READDIR_ORDER_OPS: frozenset[str] = frozenset({"opendir"})


#: Ops an ``s3_semantics`` layer acts on: those Mountpoint for Amazon S3 refuses in some case,
#: and those that tell it a file is being written or was uploaded.
S3_SEMANTICS_OPS: frozenset[str] = frozenset({
    "open", "create", "write", "flush", "fsync", "mknod", "mkdir", "unlink", "rmdir", "rename", "link",
    "symlink", "setattr", "setxattr", "removexattr", "fallocate",
})


class S3SemanticsLayer(_Layer, tag="s3_semantics", kw_only=True):
    """Refuse what Mountpoint for Amazon S3 refuses, with the errno it gives.

    Mountpoint (github.com/awslabs/mountpoint-s3, doc/SEMANTICS.md) is not POSIX:
    files are written once, sequentially, and uploaded on close; renames (on
    general purpose buckets), links, attribute changes and extended attributes
    are not supported; deletes and overwrites must be allowed at mount time. An
    application that works on a local disk may fail there; this layer makes it fail
    here the same way, on top of whatever the backing store is (with the ``s3`` or
    ``s3-express`` profile for its timing). What it refuses is listed in
    docs/layers.md; each refusal is reported as a fault record.

    Attributes:
        allow_delete: Mountpoint's ``--allow-delete``: ``unlink`` is allowed
            (else EPERM).
        allow_overwrite: Mountpoint's ``--allow-overwrite``: an existing file may
            be opened for writing with ``O_TRUNC`` (else EPERM).

    ``ops`` is not used (the layer acts on what Mountpoint refuses); ``path_glob``
    limits it to part of the volume. Modelled on a general purpose bucket
    (``rename`` fails with ENOSYS); directory buckets (S3 Express One Zone),
    where Mountpoint can rename files, are not modelled.
    """

    allow_delete: bool = False
    allow_overwrite: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ops:
            raise ValueError("field `ops`: an s3_semantics layer acts on the ops Mountpoint refuses; leave it empty")
        _check_no_page_cache_choice(self, "s3_semantics")

    def fields_not_in_effect(self) -> frozenset[str]:
        """See :meth:`_Layer.fields_not_in_effect`: it acts on the ops Mountpoint refuses, whatever the cache."""
        return frozenset({"ops", "page_cache"})


#: Ops a ``staged_writes`` layer acts on: the opens that tell it an object's size (and may download
#: it), the writes and truncations that modify it, the reads it serves from a local copy, and the close
#: or fsync that uploads it; a rename finalizes a file being streamed.
STAGED_WRITES_OPS: frozenset[str] = frozenset({"open", "create", "read", "write", "setattr", "flush", "fsync",
                                              "rename"})
#: Most requests one transfer of a staged_writes layer may take, one after the other.
MAX_REQUESTS_PER_TRANSFER = 16
#: Most blocks of one transfer a staged_writes layer keeps in flight (blobfuse2's default
#: ``max-concurrency`` is 32).
MAX_TRANSFER_PARALLELISM = 64
#: What an object-store client does with a new file: upload it as it is written (gcsfuse's
#: streaming writes), or stage it locally and upload it whole at the close (blobfuse2, s3fs).
NewFiles = Literal["streamed", "staged"]


class StagedWritesLayer(_Layer, tag="staged_writes", kw_only=True):
    """Charge what an object-store client pays to modify an existing object: download it whole, upload it whole.

    Cloud Storage FUSE (gcsfuse, docs/semantics.md, "Staged Writes"), s3fs-fuse and
    blobfuse2's file cache cannot change part of an object: at the first write or
    truncation of an existing, non-empty file they download the whole object to a
    local file, and the close or fsync after it uploads the whole file again as a
    new object ("modifying even a single bit of an object results in the full
    re-upload of the object"); until then the local file serves every read and write
    of it. A truncation, to 0 too (an ``O_TRUNC`` open), downloads it as well
    (gcsfuse truncates its local copy; with ``download_on_open`` an ``O_TRUNC`` open
    downloads nothing). This layer holds that first write (or truncation) for
    ``download_requests`` requests one after the other (``distribution``) plus the
    object's size at ``rate_bytes_per_s``, and the next ``flush`` of a descriptor
    opened for writing (``close(2)``) or ``fsync`` for ``upload_requests`` requests
    plus the whole file (one request for a file not stored yet). gcsfuse's one
    exception: an object of at least ``append_upload_min_bytes`` changed only by
    appends is still downloaded, but only what was appended goes up, as a temporary
    object composed onto it (``append_upload_requests``). The reads and writes in
    between are served locally: the layer marks them (``Op.charged_by_client``) and
    the throttle and delay layers after it in the stack, which stand for the remote
    store, pass them unheld (fault, quota and metadata layers still act on them).
    After the upload the local copy is gone (``keep_local_s`` 0): the next
    modification downloads again, and reads go to the store again.

    New files (``new_files``): gcsfuse 3 streams a new file written in order from
    its start (the throttle and ``write_behind`` delay after this layer charge its
    bytes and the close that finalizes it), and falls back to staging
    (docs/semantics.md, "Streaming Writes"): the first write out of order finalizes
    what was streamed (one request) and downloads it (as above); a read of the file
    while it is streamed, a truncation below its size or a rename of it finalizes it
    (one request), and later writes change an existing object. A truncation above
    its size does not: a write at the new size is still in order. gcsfuse streams at
    most ``max_streamed_files`` files at once (its ``write-global-max-blocks``: one
    block per file): a file created while that many stream is staged from the start.
    blobfuse2 and s3fs stage new files from the start (``staged``): local until
    uploaded whole at the close.

    blobfuse2's caching mode (the Azure Blob CSI driver's, "Configure BlobFuse for
    caching mode") also downloads every existing object at its open, for reading too
    (``download_on_open``), and keeps the local copy after the last close
    (``keep_local_s``: its ``file_cache.timeout-sec``, 120 s), so a reopen within it
    downloads nothing. Transfers share one link: they queue for ``rate_bytes_per_s``
    in the order they start (FIFO), so two 1 GiB opens at once take twice as long as
    one.

    Attributes:
        rate_bytes_per_s: the client's transfer rate for downloads and uploads,
            bytes per second.
        distribution: latency of the request that starts a transfer (a
            download's GET, an upload's PUT or compose), seconds; ``None`` = none.
        append_upload_min_bytes: gcsfuse's exception: an object at least this
            large changed only by appends uploads only what was appended (a
            compose), bytes; ``None`` = no such exception (every modification is a
            rewrite).
        download_requests: requests one after the other before a download's bytes,
            1..16 (gcsfuse 3: 2, a stat of the object, then the read).
        upload_requests: requests one after the other for the upload of a changed
            object that is stored, 1..16 (gcsfuse: 2, a stat of the object, then the
            upload); a file not stored yet (a staged new file) takes one.
        append_upload_requests: the same for an upload of what was appended, 1..16
            (gcsfuse: 4, a stat, the appended bytes as a temporary object, the
            compose, the temporary object's deletion); only with
            ``append_upload_min_bytes``.
        seed: seed of this layer's own random source; ``None`` = the worker's shared one.
        download_on_open: download an existing, non-empty object at every open
            (reading or writing) that finds no local copy, before the open returns
            (blobfuse2's caching mode); False: at the first change (gcsfuse).
        keep_local_s: how long a local copy outlives the last close of its file
            (and its upload), seconds, 0..86,400; 0: it goes with the upload
            (gcsfuse's temporary file).
        new_files: ``streamed`` (default, gcsfuse 3): files created through the
            mount are uploaded as written, in order, until a write out of order or
            a read makes the client stage them (above); ``staged`` (blobfuse2,
            s3fs): written to a local copy and uploaded whole at their close.
        max_streamed_files: with ``streamed``, how many new files may stream at
            once; a file created beyond that is staged; ``None`` = no limit.
        transfer_block_bytes: download in ranged requests of this many bytes,
            ``transfer_parallelism`` at a time, each block's bytes on the link after
            its request (the last of ``download_requests`` becomes one request per
            block), and upload a file larger than ``single_upload_max_bytes`` the same
            way in blocks (at most 50,000 of them: Azure's limit per block blob)
            followed by one request that commits them (blobfuse2 through the Azure
            SDK: 4 MiB blocks, 32 at a time, Put Blob up to 256 MiB, else Put Block
            and Put Block List), bytes; ``None`` = one stream per transfer (gcsfuse).
        transfer_parallelism: blocks in flight at once, 1..64 (default 1); only with
            ``transfer_block_bytes``.
        single_upload_max_bytes: the largest upload sent as one request, bytes;
            ``None`` = every upload; only with ``transfer_block_bytes``.
        upload_at_fsync: ``fsync`` uploads a changed file, as the close does (True,
            gcsfuse: "Staged Writes"); False: it sends nothing, the next close of a
            descriptor opened for writing uploads, and the local copy goes with the
            file's last close instead of being kept ``keep_local_s`` (blobfuse2's
            file cache: ``SyncFile`` only marks the handle, unless ``sync-to-flush``).

    ``ops`` is not used (the layer acts on :data:`STAGED_WRITES_OPS`); ``path_glob``
    limits it to part of the volume. Put it before the throttle and delay layers
    that emulate the store (the profiles do): layers before it see no mark. An
    object's size is read when a file is opened: a file opened before the policy
    arrived is not charged until it is reopened.
    """

    rate_bytes_per_s: PositiveLimit
    distribution: Distribution | None = None
    append_upload_min_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_LIMIT)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)] | None = None
    download_on_open: bool = False
    keep_local_s: CacheSeconds = 0.0
    new_files: NewFiles = "streamed"
    max_streamed_files: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)] | None = None
    download_requests: Annotated[int, msgspec.Meta(ge=1, le=MAX_REQUESTS_PER_TRANSFER)] = 1
    upload_requests: Annotated[int, msgspec.Meta(ge=1, le=MAX_REQUESTS_PER_TRANSFER)] = 1
    append_upload_requests: Annotated[int, msgspec.Meta(ge=1, le=MAX_REQUESTS_PER_TRANSFER)] = 1
    upload_at_fsync: bool = True
    transfer_block_bytes: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)] | None = None
    transfer_parallelism: Annotated[int, msgspec.Meta(ge=1, le=MAX_TRANSFER_PARALLELISM)] = 1
    single_upload_max_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_LIMIT)] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.append_upload_requests != 1 and self.append_upload_min_bytes is None:
            raise ValueError("field `append_upload_requests`: appends are uploaded apart only with "
                             "`append_upload_min_bytes`")
        if self.transfer_block_bytes is None:
            for name, default in (("transfer_parallelism", 1), ("single_upload_max_bytes", None)):
                if getattr(self, name) != default:
                    raise ValueError(f"field `{name}`: transfers are split in blocks only with "
                                     "`transfer_block_bytes`")
        if self.max_streamed_files is not None and self.new_files != "streamed":
            raise ValueError("field `max_streamed_files`: only streamed new files are limited; `new_files` is "
                             f"{self.new_files!r}")
        if self.ops:
            raise ValueError("field `ops`: a staged_writes layer acts on the opens, writes, truncations and closes "
                             "of existing files; leave it empty")
        _check_no_page_cache_choice(self, "staged_writes")

    def fields_not_in_effect(self) -> frozenset[str]:
        """See :meth:`_Layer.fields_not_in_effect`: it acts on its own ops, whatever the cache."""
        return frozenset({"ops", "page_cache"})


class ProfileLayer(_Layer, tag="profile", kw_only=True):
    """A named storage profile, expanded by the worker into throttle and delay layers (``gcs``, ``azure-blob``: and staged_writes).

    See :mod:`interposer.proto.profiles` for the profiles and their sources. The
    layer's ``ops``, ``path_glob`` and expiry apply to every expanded layer.

    Attributes:
        name: profile name (``gp3``, ``gp2``, ``io2``, ``st1``, ``pd-standard``, ``pd-balanced``,
            ``pd-ssd``, ``premium-ssd``, ``premium-ssd-v2``, ``azure-blob``, ``efs``, ``filestore-basic-hdd``,
            ``filestore-basic-ssd``, ``filestore-zonal``, ``wan-nfs``, ``s3``, ``s3-express``, ``gcs``,
            ``hdd-7200``).
        size_gib: volume size, GiB, for profiles whose limits scale with it (``gp2``,
            ``st1``, ``pd-standard``, ``pd-balanced``, ``pd-ssd``, ``premium-ssd``, the ``filestore-*``
            instances' capacity; ``premium-ssd-v2``: bounds
            its IOPS; ``efs``: the data stored, which selects Bursting throughput);
            ``None`` = the profile's default.
        iops: provisioned IOPS (``gp3``, ``io2``, ``premium-ssd-v2``); ``None`` = the profile's default.
        rate_bytes_per_s: provisioned throughput (``gp3``, ``premium-ssd-v2``; ``efs``: selects
            Provisioned throughput) or link bandwidth (``wan-nfs``, ``s3``, ``s3-express``, ``gcs``,
            ``azure-blob``), bytes/s;
            ``None`` = the profile's default.
        burst_balance: how full the burst bucket is, 0..1, at the first I/O
            (``gp2``, ``st1``, ``premium-ssd`` up to P20, ``efs`` with ``size_gib``); ``None`` = full, as a
            new volume.
        max_streamed_files: how many new files the client streams at once (``gcs``: gcsfuse's
            ``write-global-max-blocks``, 4 by default, 1,600 on the machine types it optimizes for);
            ``None`` = the profile's default.

    A sizing field the profile does not take, or a value outside its published
    range (``interposer profiles`` lists both), is an error naming the field.
    """

    name: ProfileName
    size_gib: PositiveLimit | None = None
    iops: PositiveLimit | None = None
    rate_bytes_per_s: PositiveLimit | None = None
    burst_balance: Probability | None = None
    max_streamed_files: PositiveLimit | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        from .profiles import expand_profile  # profiles builds on this module's layer types

        expand_profile(self)  # what the worker will compile must be valid now, narrowed by `ops` as it will be


Layer = Union[FaultLayer, DelayLayer, ThrottleLayer, QuotaLayer, MetadataLayer, S3SemanticsLayer, StagedWritesLayer,
              ProfileLayer]


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """The desired behaviour of one volume.

    Attributes:
        layers: layers, outermost first (the first sees each op first).
        description: free text shown by ``interposer policy get``.
        expires_after_s: make this policy an experiment: the policy service
            reverts the volume to the revision that was in force before it this
            many seconds after accepting it (0 < x ≤ 30 days). ``None`` = no expiry.
        expires_at_s: the same as an absolute deadline, seconds since the Unix
            epoch (must be in the future when the policy is accepted). At most one
            of ``expires_after_s`` and ``expires_at_s`` may be set.
    """

    layers: Annotated[list[Layer], msgspec.Meta(max_length=MAX_LAYERS)] = []
    description: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    expires_after_s: Annotated[float, msgspec.Meta(gt=0.0, le=MAX_EXPIRES_AFTER_S)] | None = None
    expires_at_s: Annotated[float, msgspec.Meta(gt=0.0, le=1e11)] | None = None

    def __post_init__(self) -> None:
        if self.expires_after_s is not None and self.expires_at_s is not None:
            raise ValueError("fields `expires_after_s` and `expires_at_s`: set at most one of them")


#: Longest pod, namespace, node or volume glob in a selector, characters.
MAX_SELECTOR_FIELD_LENGTH = 253
#: Selector priorities: higher is applied first (outermost), ties by name.
MAX_SELECTOR_PRIORITY = 1000
SelectorGlob = Annotated[str, msgspec.Meta(max_length=MAX_SELECTOR_FIELD_LENGTH)]
#: Most labels a selector may require.
MAX_SELECTOR_LABELS = 64
#: A Kubernetes label key: an optional DNS-subdomain prefix and ``/``, then a name of
#: at most 63 alphanumerics, ``-``, ``_``, ``.`` (starting and ending alphanumeric).
LABEL_KEY_PATTERN = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                     r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
#: A Kubernetes label value: empty, or at most 63 characters as a key's name.
LABEL_VALUE_PATTERN = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
LabelKey = Annotated[str, msgspec.Meta(pattern=LABEL_KEY_PATTERN, max_length=317)]
LabelValue = Annotated[str, msgspec.Meta(pattern=LABEL_VALUE_PATTERN)]


class Selector(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Which volumes a selector policy applies to ("fleet push"), matched by each worker.

    Every non-empty field must match (``fnmatch`` globs, case-sensitive); a worker
    that does not know a field's value (no pod namespace, no node) does not match
    a selector that sets it.

    Attributes:
        all: select every volume; may not be combined with other fields.
        namespace: glob on the namespace of the pod using the volume.
        pod: glob on the name of that pod.
        node: glob on the node the worker runs on (the csi-node's node id).
        volume: glob on the volume id.
        labels: label key → value the pod using the volume must carry, each exactly
            (a label selector's ``matchLabels``); the worker knows its pod's labels
            only when the csi-node read them (the Kubernetes launcher).
    """

    all: bool = False
    namespace: SelectorGlob = ""
    pod: SelectorGlob = ""
    node: SelectorGlob = ""
    volume: SelectorGlob = ""
    labels: Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=MAX_SELECTOR_LABELS)] = {}

    def __post_init__(self) -> None:
        narrowed = any((self.namespace, self.pod, self.node, self.volume, self.labels))
        if self.all and narrowed:
            raise ValueError("field `all`: `all: true` selects every volume; leave the other fields out")
        if not self.all and not narrowed:
            raise ValueError("an empty selector would select every volume: set `all: true` for a fleet push, "
                             "or one of `namespace`, `pod`, `node`, `volume`, `labels`")

    def matches(self, *, volume: str, namespace: str, pod: str, node: str,
                labels: Mapping[str, str] | None = None) -> bool:
        """True if a volume with these attributes is selected (an unknown ``""`` value never matches).

        Args:
            volume, namespace, pod, node: what the worker knows (``""`` = unknown).
            labels: the labels of the pod using the volume (None or empty = unknown).
        """
        if self.all:
            return True
        for pattern, value in ((self.namespace, namespace), (self.pod, pod), (self.node, node),
                               (self.volume, volume)):
            if pattern and not (value and fnmatch.fnmatchcase(value, pattern)):
                return False
        known = labels or {}
        return all(key in known and known[key] == value for key, value in self.labels.items())


class SelectorRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of ``interposer.policy.select.<name>``: a policy for every volume a selector matches.

    Attributes:
        selector: which volumes.
        policy: the policy merged into theirs (see ``selector.effective_policy``).
        priority: order among selectors, −1000..1000; higher is applied first.
    """

    selector: Selector
    policy: Policy = Policy()
    priority: Annotated[int, msgspec.Meta(ge=-MAX_SELECTOR_PRIORITY, le=MAX_SELECTOR_PRIORITY)] = 0


class PolicyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What the policy service stores in the KV bucket under the volume id.

    The KV revision of the entry is the policy revision. Fields after
    ``updated_at_s`` were added later and have defaults, so older records decode.

    Attributes:
        policy: the accepted policy.
        updated_at_s: when it was accepted, seconds since the Unix epoch.
        author: who asked for it (the request's ``Interposer-Author`` header; the
            CLI sends ``user@host``); ``""`` when the request did not say.
        action: ``set``, ``clear``, ``rollback`` (re-stored an older revision) or
            ``expire`` (the policy service reverted an experiment).
        source_revision: for ``rollback`` and ``expire``: the revision whose
            policy was re-stored (0 = the empty policy); 0 otherwise.
        expires_at_s: when the policy service reverts this revision, seconds since
            the Unix epoch; ``None`` = never.
        revert_to: the revision in force before this one, restored at
            ``expires_at_s`` (0 = the empty policy).
        selector: for a selector key (``_sel.<name>``): the volumes ``policy``
            applies to; None = inactive (deleted) or a volume key.
        priority: for a selector key: its ``SelectorRequest.priority``.
    """

    policy: Policy
    updated_at_s: float
    author: str = ""
    action: str = "set"  # a str, not a Literal: readers must accept actions added later
    source_revision: int = 0
    expires_at_s: float | None = None
    revert_to: int = 0
    selector: Selector | None = None
    priority: int = 0


class PolicyReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Reply of the policy service to set/get/clear requests.

    ``{"ok": true, "revision": 7}`` or ``{"ok": false, "error": "..."}``; ``get``
    adds ``policy``.
    """

    ok: bool
    revision: int | None = None
    error: str | None = None
    policy: Policy | None = None


#: errno name → number, for every name the platform knows.
ERRNO_BY_NAME: dict[str, int] = {name: num for num, name in _errno.errorcode.items()}

_policy_json_decoder = msgspec.json.Decoder(Policy)
_record_json_decoder = msgspec.json.Decoder(PolicyRecord)
_selector_json_decoder = msgspec.json.Decoder(SelectorRequest)
_reply_json_decoder = msgspec.json.Decoder(PolicyReply)


class PolicyError(ValueError):
    """A policy was rejected; ``str(error)`` says which field and why."""


def decode_policy(data: bytes | str) -> Policy:
    """Decode and validate a JSON policy.

    Args:
        data: JSON text, at most ``MAX_POLICY_BYTES`` bytes.

    Returns:
        The validated, immutable ``Policy``.

    Raises:
        PolicyError: malformed JSON (also invalid UTF-8, and nesting deep enough
            to exhaust the decoder's recursion), unknown fields, wrong types,
            out-of-range values, unknown op or errno names. The message is
            printable, at most ``MAX_ERROR_CHARS`` long, and names the field
            (`` - at `$.layers[0].probability` ``) or the byte offset.
    """
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy is {len(data)} bytes, more than the {MAX_POLICY_BYTES} allowed - at `$`")
    if not data.strip():
        raise PolicyError('empty policy: expected a JSON object such as {"layers": []} - at `$`')
    try:
        return _policy_json_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise PolicyError(_with_location(_with_hint(str(exc), data))) from None
    except msgspec.DecodeError as exc:
        raise PolicyError(_with_location(f"malformed JSON: {exc}")) from None
    except UnicodeDecodeError as exc:
        # A string with invalid UTF-8 (found by the fuzz test): msgspec lets Python's codec error through.
        raise PolicyError(f"malformed JSON: invalid UTF-8 in a string (byte {exc.start})") from None
    except RecursionError:
        # msgspec decodes recursively; ``[[[[…`` thousands deep exhausts the stack
        # (found by tests/proto/test_policy_fuzz.py). No valid policy nests past 5.
        raise PolicyError("malformed JSON: nested too deeply - at `$`") from None


#: Longest rejection message, characters; longer ones (an echoed 60 KiB field name)
#: keep their head and their tail, where the location is.
MAX_ERROR_CHARS = 1024


#: A layer field's location in a decoder message: layer index, field, (item index).
_LAYER_FIELD_AT = re.compile(r" - at `\$(?:\.policy)?\.layers\[(\d+)\]\.(\w+)(?:\[\d+\])?`$")
#: Layer classes by their ``type`` tag.
_LAYER_KINDS: dict[str, type[msgspec.Struct]] = {cls.__struct_config__.tag: cls for cls in Layer.__args__}
#: Longest list of allowed values a hint spells out.
_MAX_HINT_VALUES = 40


def _with_hint(message: str, data: bytes | str) -> str:
    """Add what would have been valid to a decoder message about a layer field (the allowed
    values of an enumerated field, the layer types), or the name a policy or a layer uses for
    its deadline; ``message`` unchanged otherwise."""
    if "unknown field `expires_at_s`" in message and ".layers[" in message:
        return f"{message} (a layer's deadline is `expires_at`; `expires_at_s` is a whole policy's)"
    if "unknown field `expires_at`" in message and ".layers[" not in message:
        return f"{message} (a policy's deadline is `expires_at_s`; `expires_at` is a layer's)"
    found = _LAYER_FIELD_AT.search(message)
    if found is None or not message.startswith("Invalid"):
        return message
    index, name = int(found.group(1)), found.group(2)
    if name == "type":
        return f"{message} (layer types: {', '.join(_LAYER_KINDS)})"
    try:
        document = msgspec.json.decode(data)
        layers = (document.get("policy", document) if isinstance(document, dict) else {}).get("layers")
        kind = _LAYER_KINDS.get(layers[index].get("type"))
    except (msgspec.DecodeError, UnicodeDecodeError, AttributeError, IndexError, KeyError, TypeError):
        # The typed decoder stops at the first bad value; bytes after it may not even be UTF-8.
        return message
    if kind is None:
        return message
    field = next((f for f in msgspec.inspect.type_info(kind).fields if f.encode_name == name), None)
    values = _literal_values(field.type) if field is not None else []
    if not values or len(values) > _MAX_HINT_VALUES:
        return message
    return f"{message} (one of: {', '.join(map(str, values))})"


def _literal_values(info: msgspec.inspect.Type) -> list[object]:
    """The values a ``Literal`` field (or a collection or union of one) may take; [] if none."""
    if isinstance(info, msgspec.inspect.LiteralType):
        return list(info.values)
    if isinstance(info, (msgspec.inspect.FrozenSetType, msgspec.inspect.ListType, msgspec.inspect.SetType)):
        return _literal_values(info.item_type)
    if isinstance(info, msgspec.inspect.UnionType):
        return [value for member in info.types for value in _literal_values(member)]
    return []


def _with_location(message: str) -> str:
    """Make a decoder message readable: printable, bounded, and naming a location.

    msgspec names the location of every error below the root (`` - at `$.layers[0]` ``)
    and of JSON syntax errors (``(byte 12)``); errors about the document itself
    ("Expected `object`, got `int`", "Input data was truncated") get `` `$` ``.
    Messages echo user input (unknown field names), so control characters are
    escaped (``\\x7f``) and the length is capped at ``MAX_ERROR_CHARS``.
    """
    if " - at `" not in message and "(byte " not in message:  # `$…`, or `key` in `$…` for a dict key
        message = f"{message} - at `$`"
    if not message.isprintable():
        message = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)
    if len(message) > MAX_ERROR_CHARS:
        tail = MAX_ERROR_CHARS // 4
        message = f"{message[:MAX_ERROR_CHARS - tail - 1]}…{message[-tail:]}"
    return message


def decode_selector_request(data: bytes | str) -> SelectorRequest:
    """Decode and validate the JSON body of ``interposer.policy.select.<name>``.

    Raises:
        PolicyError: as :func:`decode_policy` (locations are under
            `` `$.policy` `` / `` `$.selector` ``).
    """
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"request is {len(data)} bytes, more than the {MAX_POLICY_BYTES} allowed - at `$`")
    try:
        return _selector_json_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise PolicyError(_with_location(_with_hint(str(exc), data))) from None
    except msgspec.DecodeError as exc:
        raise PolicyError(_with_location(f"malformed JSON: {exc}")) from None
    except UnicodeDecodeError as exc:
        raise PolicyError(f"malformed JSON: invalid UTF-8 in a string (byte {exc.start})") from None
    except RecursionError:
        raise PolicyError("malformed JSON: nested too deeply - at `$`") from None


def encode_policy(policy: Policy) -> bytes:
    """Encode a policy as canonical JSON (sets sorted, so equal policies encode equally)."""
    return msgspec.json.encode(policy, order="deterministic")


def decode_record(data: bytes) -> PolicyRecord:
    """Decode a KV value written by the policy service.

    Raises:
        msgspec.ValidationError, msgspec.DecodeError: the value is not a ``PolicyRecord``.
    """
    return _record_json_decoder.decode(data)


def encode_record(record: PolicyRecord) -> bytes:
    """Encode a ``PolicyRecord`` as JSON for the KV bucket."""
    return msgspec.json.encode(record, order="deterministic")


def encode_reply(reply: PolicyReply) -> bytes:
    """Encode a ``PolicyReply`` as JSON."""
    return msgspec.json.encode(reply, order="deterministic")


def decode_reply(data: bytes) -> PolicyReply:
    """Decode a ``PolicyReply``.

    Raises:
        msgspec.ValidationError, msgspec.DecodeError: not a reply of the policy service.
    """
    return _reply_json_decoder.decode(data)
