"""Named storage profiles: throttle + delay layers (and gcsfuse's staged writes) that emulate real storage.

A policy layer ``{"type": "profile", "name": "gp3"}`` is expanded by the worker
when it compiles the policy (not when the policy is validated), so the stored
policy keeps saying what the user asked for, and the layers a profile expands to
inherit the profile layer's ``path_glob`` and expiry. Every number comes with the
published source it was taken from; where a source gives a range, the value used
and the reason are written beside it.

Where the published figure is a device's latency (the disks), the delay layer
uses ``mode="floor"``: the figure is a target the op's total latency is raised
to, not an amount added to the backing store's own service time. Where it is a
network round trip that adds to the server's work (``wan-nfs``), the delay is
added (``mode="add"``). A network file system's published latency (``efs``) is
what its clients measure, so it is a floor too, on metadata ops as on reads and
writes (an NFS client sends each as one request).

IOPS count the provider's I/O units where it publishes them (``max_io_bytes``:
EBS counts a 1 MiB I/O as four on SSD volumes), applied to FUSE requests (up to
1 MiB); the provider also merges small sequential I/Os, which the kernel's
readahead does here for cached files only. The disk profiles (``st1``,
``hdd-7200``) hold a read or write to a random I/O's positioning latency unless
it continues the previous one of its file (``skip_sequential``): a disk streams
sequential data at its transfer rate.
"""

from __future__ import annotations

import typing

import msgspec

from ._profile_names import ProfileName
from .policy import (
    AttrCache,
    DelayLayer,
    Distribution,
    Layer,
    LognormalDistribution,
    OpName,
    NormalDistribution,
    ProfileLayer,
    StagedWritesLayer,
    ThrottleLayer,
    UniformDistribution,
    WRITE_BEHIND_OPS,
)

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40
MB = 1_000_000


class Sizing(msgspec.Struct, frozen=True, kw_only=True):
    """What a profile layer may set to size the emulated volume (``None`` = the profile's default).

    Attributes:
        size_gib: volume size, GiB, for profiles whose limits scale with it.
        iops: provisioned IOPS, for profiles where IOPS are provisioned.
        rate_bytes_per_s: provisioned throughput or link bandwidth, bytes/s.
        burst_balance: how full a burst bucket is at the first I/O, 0..1.
        max_streamed_files: how many new files an object-store client streams at once.
    """

    size_gib: int | None = None
    iops: int | None = None
    rate_bytes_per_s: int | None = None
    burst_balance: float | None = None
    max_streamed_files: int | None = None

    @property
    def balance(self) -> float:
        """``burst_balance``, full (1.0) when not given, as a new volume."""
        return 1.0 if self.burst_balance is None else self.burst_balance


class Profile(msgspec.Struct, frozen=True, kw_only=True):
    """A named preset.

    Attributes:
        name: the name used in policies.
        summary: one line: what is emulated.
        source: where the numbers come from (URL or document, and the figures used).
        parameters: the profile layer fields that size it (``size_gib``, ``iops``,
            ``rate_bytes_per_s``, ``burst_balance``, ``max_streamed_files``), each with its
            range and how it scales the limits; empty = none.
        layers: the layers it expands into at its defaults, outermost first
            (``ops``/``path_glob`` of the profile layer are applied on expansion).
    """

    name: str
    summary: str
    source: str
    parameters: dict[str, str]
    layers: tuple[Layer, ...]


_Builder = typing.Callable[[Sizing], tuple[Layer, ...]]


def _in_range(field: str, value: int, low: int, high: int | None, why: str) -> int:
    if high is None and value < low:
        raise ValueError(f"field `{field}`: {value:,} is below {low:,} ({why})")
    if high is not None and not low <= value <= high:
        raise ValueError(f"field `{field}`: {value:,} is outside {low:,}..{high:,} ({why})")
    return value


def _gp3(sizing: Sizing) -> tuple[Layer, ...]:
    iops = _in_range("iops", sizing.iops or 3000, 3000, None,
                     "gp3 includes 3,000 IOPS at any size; more are provisioned")
    rate = _in_range("rate_bytes_per_s", sizing.rate_bytes_per_s or 125 * MIB, 125 * MIB, None,
                     "gp3 includes 125 MiB/s at any size; more is provisioned")
    return (ThrottleLayer(iops=iops, rate_bytes_per_s=rate, max_io_bytes=256 * KIB), _ssd_latency())


def _gp2(sizing: Sizing) -> tuple[Layer, ...]:
    size = _in_range("size_gib", sizing.size_gib or 100, 1, 16384, "gp2 volumes are 1 GiB to 16 TiB")
    baseline = min(max(3 * size, 100), 16000)
    rate = 128 * MIB if size <= 170 else 250 * MIB
    if baseline >= 3000:  # 1,000 GiB and up: the baseline is the burst, credits are never spent
        throttles: tuple[Layer, ...] = (ThrottleLayer(iops=baseline, rate_bytes_per_s=rate, max_io_bytes=256 * KIB),)
    else:
        throttles = (
            # while credits last: 3,000 IOPS
            ThrottleLayer(iops=3000, rate_bytes_per_s=rate, max_io_bytes=256 * KIB),
            # the credits: 5.4 million I/O credits, earned at the baseline
            ThrottleLayer(iops=baseline, burst_ops=5_400_000, burst_balance=sizing.balance,
                          max_io_bytes=256 * KIB),
        )
    return (*throttles, _ssd_latency())


def _ssd_latency() -> DelayLayer:
    """A network SSD's 'single-digit millisecond' latency (EBS gp2/gp3, Azure Premium SSD): log-normal, median 1 ms,
    sigma 0.3, a floor."""
    return DelayLayer(ops=frozenset({"read", "write"}), mode="floor",
                      distribution=LognormalDistribution(median_s=0.001, sigma=0.3))


def _io2(sizing: Sizing) -> tuple[Layer, ...]:
    iops = _in_range("iops", sizing.iops or 16000, 100, 256000, "io2 volumes are provisioned with 100 to 256,000 IOPS")
    return (
        # 256 KiB per I/O unit bounds the throughput below 4,000 MiB/s (N IOPS move at most N x 256 KiB/s)
        ThrottleLayer(iops=iops, rate_bytes_per_s=4000 * MIB, max_io_bytes=256 * KIB),
        DelayLayer(ops=frozenset({"read", "write"}), mode="floor",
                   distribution=LognormalDistribution(median_s=0.00045, sigma=0.3)),
    )


#: Metadata operations that only read the server's state (one NFS request each), modelled at the read latency.
_NFS_METADATA_READS = frozenset({"lookup", "getattr", "open", "opendir", "readdir", "readlink", "access",
                                 "statfs", "getxattr", "listxattr"})
#: Metadata operations that change the namespace or attributes, modelled at the write latency.
_NFS_METADATA_WRITES = frozenset({"setattr", "create", "mknod", "mkdir", "symlink", "link", "unlink", "rmdir",
                                  "rename", "setxattr", "removexattr"})


#: EFS Bursting and Provisioned throughput meter a read at a third of its bytes ("metered throughput").
_EFS_READ_CHARGE = 1 / 3


def _efs_throughput(sizing: Sizing) -> tuple[Layer, ...]:
    """The throttles of an EFS file system: Elastic (default), Provisioned (``rate_bytes_per_s``) or
    Bursting (``size_gib`` of data stored, ``burst_balance`` of its credits)."""
    if sizing.size_gib is not None and sizing.rate_bytes_per_s is not None:
        raise ValueError("fields `size_gib` and `rate_bytes_per_s`: give at most one of them (Bursting "
                         "throughput scales with the data stored, Provisioned throughput is set)")
    if sizing.burst_balance is not None and sizing.size_gib is None:
        raise ValueError("field `burst_balance`: only Bursting throughput (`size_gib`) has burst credits")
    if sizing.rate_bytes_per_s is not None:
        rate = _in_range("rate_bytes_per_s", sizing.rate_bytes_per_s, MIB, 3414 * MIB,
                         "EFS Provisioned throughput is 1 to 3,414 MiB/s, the upper limit by Region")
        return (ThrottleLayer(rate_bytes_per_s=500 * MIB),  # per client
                ThrottleLayer(rate_bytes_per_s=rate, read_charge=_EFS_READ_CHARGE))
    if sizing.size_gib is not None:
        size = _in_range("size_gib", sizing.size_gib, 1, 8 * 1024 * 1024, "the data an EFS file system stores, GiB")
        tib = size / 1024
        return (
            ThrottleLayer(rate_bytes_per_s=500 * MIB),  # per client
            # while credits last: 100 MiB/s, 100 MiB/s per TiB stored above 1 TiB
            ThrottleLayer(rate_bytes_per_s=int(100 * MIB * max(1.0, tib)), read_charge=_EFS_READ_CHARGE),
            # the credits: 2.1 TiB, 2.1 TiB per TiB stored above 1 TiB, earned at the baseline of
            # 50 KiB/s per GiB stored (at least 1 MiB/s)
            ThrottleLayer(rate_bytes_per_s=max(MIB, 50 * KIB * size), burst_bytes=int(2.1 * TIB * max(1.0, tib)),
                          burst_balance=sizing.balance, read_charge=_EFS_READ_CHARGE),
        )
    return (ThrottleLayer(rate_bytes_per_s=1500 * MIB),)  # Elastic: per client, reads and writes together


#: How long a Linux NFS client trusts a name it looked up: until its directory's cached attributes
#: expire, at least ``acdirmin``, 30 s by default (nfs(5)); a lookup within it sends no LOOKUP.
_NFS_NAME_CACHE_S = 30.0


def _nfs_latency(read: LognormalDistribution, write: LognormalDistribution,
                 metadata: LognormalDistribution | None = None, nfs_version: int = 4) -> tuple[DelayLayer, ...]:
    """The latency floors a Linux NFS client's application sees: reads and metadata lookups at ``read``,
    writes and namespace/attribute changes at ``write``, or every metadata op at ``metadata`` if given
    (a server whose data sits on disks but whose metadata requests are answered from memory); a name
    looked up is trusted for ``_NFS_NAME_CACHE_S``, attributes as the client's attribute cache keeps
    them (``AttrCache()``: nfs(5)'s defaults). ``nfs_version`` 4: one OPEN per ``open``/``create`` call
    (one floor for the FUSE requests of the call); 3: no OPEN in the protocol, a LOOKUP, ACCESS and CREATE
    apart (``DelayLayer.one_floor_per_call``)."""
    read_ops, write_ops = frozenset({"read"}), frozenset({"write"})
    one_floor_per_call = nfs_version >= 4
    layers = () if metadata is None else (
        DelayLayer(ops=_NFS_METADATA_READS | _NFS_METADATA_WRITES, mode="floor", distribution=metadata,
                   lookup_cache_s=_NFS_NAME_CACHE_S, attr_cache=AttrCache(), one_floor_per_call=one_floor_per_call),)
    return (
        # the client's readahead has the next READs of a sequential stream in flight: only a jump waits
        DelayLayer(ops=read_ops | (_NFS_METADATA_READS if metadata is None else frozenset()), mode="floor",
                   distribution=read, skip_sequential="buffered",
                   lookup_cache_s=_NFS_NAME_CACHE_S if metadata is None else 0.0,
                   attr_cache=AttrCache() if metadata is None else None, one_floor_per_call=one_floor_per_call),
        # the client's page cache takes write(2); close and fsync wait for the WRITEs (and COMMIT) it sends
        DelayLayer(ops=write_ops | (_NFS_METADATA_WRITES if metadata is None else frozenset()), mode="floor",
                   distribution=write, write_behind="buffered", one_floor_per_call=one_floor_per_call),
        *layers,
    )


def _efs(sizing: Sizing) -> tuple[Layer, ...]:
    return (
        *_efs_throughput(sizing),
        *_nfs_latency(LognormalDistribution(median_s=0.001, sigma=0.3), LognormalDistribution(median_s=0.0027,
                                                                                              sigma=0.3)),
    )


#: Largest Filestore Basic instance, GiB: 63.9 TiB.
_FILESTORE_BASIC_MAX_GIB = 65_433
#: Filestore publishes no latency: an NFS round trip within a zone to an SSD-backed server, assumed as EFS's
#: published read latency (log-normal, median 1 ms, sigma 0.3).
_FILESTORE_SSD_LATENCY = LognormalDistribution(median_s=0.001, sigma=0.3)
#: Basic HDD's reads and writes reach disks: assumed as pd-standard's HDD-backed latency (median 5 ms, sigma 0.5).
_FILESTORE_HDD_LATENCY = LognormalDistribution(median_s=0.005, sigma=0.5)


def _filestore(read_iops: int, write_iops: int, read_mib_s: float, write_mib_s: float, *,
               hdd: bool = False) -> tuple[Layer, ...]:
    """A Filestore instance's published read and write limits (apart: Google gives each its own) over NFSv3,
    Filestore's protocol (Basic tiers: the only one; the others: the default)."""
    latency = _FILESTORE_HDD_LATENCY if hdd else _FILESTORE_SSD_LATENCY
    return (
        ThrottleLayer(ops=frozenset({"read"}), iops=read_iops, rate_bytes_per_s=int(read_mib_s * MIB)),
        ThrottleLayer(ops=frozenset({"write"}), iops=write_iops, rate_bytes_per_s=int(write_mib_s * MIB)),
        *_nfs_latency(latency, latency, _FILESTORE_SSD_LATENCY if hdd else None, nfs_version=3),
    )


def _filestore_basic_hdd(sizing: Sizing) -> tuple[Layer, ...]:
    size = _in_range("size_gib", sizing.size_gib or 1024, 1024, _FILESTORE_BASIC_MAX_GIB,
                     "Basic HDD instances are 1 TiB to 63.9 TiB")
    return _filestore(600, 1000, 100, 100, hdd=True) if size < 10 * 1024 else _filestore(1000, 5000, 180, 120, hdd=True)


def _filestore_basic_ssd(sizing: Sizing) -> tuple[Layer, ...]:
    _in_range("size_gib", sizing.size_gib or 2560, 2560, _FILESTORE_BASIC_MAX_GIB,
              "Basic SSD instances are 2.5 TiB to 63.9 TiB")
    return _filestore(60_000, 25_000, 1200, 350)


def _filestore_zonal(sizing: Sizing) -> tuple[Layer, ...]:
    tib = _in_range("size_gib", sizing.size_gib or 1024, 1024, 100 * 1024,
                    "zonal instances are 1 TiB to 100 TiB") / 1024
    return _filestore(round(9200 * tib), round(2600 * tib), 260 * tib, 88 * tib)


#: Ops Mountpoint for Amazon S3 serves with one S3 request each: lookup (HeadObject and ListObjectsV2, sent
#: together), getattr once its 1 s metadata TTL has passed (HeadObject), open (revalidates: HeadObject),
#: readdir (a ListObjectsV2 page). mkdir and create are local until data is uploaded.
_S3_METADATA_REQUESTS = frozenset({"lookup", "getattr", "open", "readdir"})
#: Keys a ListObjectsV2 request returns at most (Amazon S3 API Reference, ListObjectsV2, MaxKeys): a listing
#: is one request per 1,000 entries.
_S3_LIST_PAGE_ENTRIES = 1_000
#: Mountpoint's default ceiling away from EC2 instance-type detection (``--maximum-throughput-gbps``): 10 Gbit/s.
_MOUNTPOINT_THROUGHPUT = 10_000_000_000 // 8


#: Ops Cloud Storage FUSE serves with Cloud Storage requests: lookup (object metadata; a miss also lists the
#: prefix), readdir (a list page), mkdir (the directory's placeholder object), rmdir (a list to check that it is
#: empty, then the placeholder's deletion: docs/semantics.md, "Unlinking"), rename of a file (a copy, then the
#: source's deletion: CloneToChildFile, DeleteChildFile in internal/fs; a bucket with hierarchical namespace
#: moves it in one). Its metadata cache (60 s) answers getattr and open after a lookup.
_GCSFUSE_METADATA_REQUESTS = frozenset({"lookup", "readdir", "mkdir", "rmdir", "rename"})
#: Those of them that take more than one request, one after the other: op → requests.
_GCSFUSE_REQUESTS_PER_OP: dict[OpName, int] = {"rmdir": 2, "rename": 2}
#: Objects per list request of gcsfuse (internal/fs/inode/dir.go, ``MaxResultsForListObjectsCall``): its
#: directory handle fetches every page at a listing's first readdir, one after the other.
_GCSFUSE_LIST_PAGE_ENTRIES = 5_000


#: gcsfuse's staged writes (``staged_writes`` fields; the link's rate and the request latency come from the
#: profile): appends to objects of 2 MiB or more upload only what was appended (docs/semantics.md); a transfer
#: is a stat of the object (fetchLatestGcsObject: at the first write, checking whether the file could be
#: streamed, and before an upload) then the read or the upload (internal/fs/inode/file.go), an append's upload
#: a temporary object, its compose onto the object and its deletion (internal/gcsx/append_object_creator.go);
#: it streams as many new files at once as ``write-global-max-blocks``, one block per file ("Streaming
#: Writes"): 4 by default, 1,600 on the "high-performance" machine types it detects from the metadata server
#: (A2 mega/ultra, A3, A4 and A4X GPU machines, TPU v5e, v5p, v6e and 7x hosts: cfg/config.go,
#: machineTypeToGroupMap); the profile's ``max_streamed_files`` sets it.
_GCSFUSE_STAGED_WRITES = {"append_upload_min_bytes": 2 * MIB, "download_requests": 2, "upload_requests": 2,
                          "append_upload_requests": 4, "max_streamed_files": 4}


def _more_requests(latency: Distribution, requests_per_op: dict[OpName, int]) -> tuple[DelayLayer, ...]:
    """``add`` delays for the requests past the first of each op in ``requests_per_op`` (op → requests, sent
    one after the other): the k-th layer acts on the ops of more than k requests, one draw each. Put them
    before the floor that holds every op's first request."""
    most = max(requests_per_op.values(), default=1)
    return tuple(
        DelayLayer(ops=frozenset(op for op, count in requests_per_op.items() if count > k), mode="add",
                   distribution=latency, one_floor_per_call=False)
        for k in range(1, most))


def _object_store_builder(median_s: float, sigma: float,
                          metadata_requests: frozenset[OpName] = _S3_METADATA_REQUESTS,
                          lookup_cache_s: float = 0.0, staged_writes: dict[str, typing.Any] | None = None,
                          requests_per_op: dict[OpName, int] | None = None,
                          list_page_entries: int = _S3_LIST_PAGE_ENTRIES) -> _Builder:
    """An object store through a FUSE client (Mountpoint for Amazon S3; Cloud Storage FUSE with
    ``_GCSFUSE_METADATA_REQUESTS``, its stat cache's ``lookup_cache_s``, the ``staged_writes`` fields of
    its writes (a sizing's ``max_streamed_files`` in place of theirs), its ``requests_per_op`` beyond
    one and its ``list_page_entries``): first-byte latency log-normal(``median_s``, ``sigma``) per
    request, one after the other; a listing one request per ``list_page_entries`` entries. Each request
    is its own round trip (``one_floor_per_call`` false): Mountpoint's ``open`` right after a ``lookup``
    sends a HeadObject of its own (it revalidates on open unless its metadata cache is enabled)."""

    def build(sizing: Sizing) -> tuple[Layer, ...]:
        latency = LognormalDistribution(median_s=median_s, sigma=sigma)
        rate = sizing.rate_bytes_per_s or _MOUNTPOINT_THROUGHPUT
        # gcsfuse: an existing object is downloaded whole before it is changed, and uploaded whole after
        staged = () if staged_writes is None else (StagedWritesLayer(
            rate_bytes_per_s=rate, distribution=latency,
            **{**staged_writes, **({"max_streamed_files": sizing.max_streamed_files}
                                   if sizing.max_streamed_files is not None else {})}),)
        return (
            # first: the reads and writes it serves from a staged file's local copy pass the layers below unheld
            *staged,
            ThrottleLayer(rate_bytes_per_s=rate),
            *_more_requests(latency, requests_per_op or {}),  # added to the floor below: one after the other
            # a ranged GET per random read; the client streams a sequential reader (direct or not)
            DelayLayer(ops=frozenset({"read"}) | metadata_requests, mode="floor", distribution=latency,
                       skip_sequential=True, lookup_cache_s=lookup_cache_s, one_floor_per_call=False,
                       list_page_entries=list_page_entries),
            # writes go out as multipart parts in the background, O_SYNC/O_DIRECT or not; close and fsync
            # wait for the upload to complete (CompleteMultipartUpload); unlink is a DeleteObject
            DelayLayer(ops=frozenset({"write", "unlink"}), mode="floor", distribution=latency, write_behind=True,
                       one_floor_per_call=False),
        )

    return build


#: The requests of blobfuse2 that reach Azure: a name's properties (once per attribute-cache
#: timeout), a listing, and the namespace changes.
_BLOBFUSE2_METADATA_REQUESTS: frozenset[OpName] = frozenset({"lookup", "readdir", "unlink", "rename", "mkdir", "rmdir"})
#: Those of them that take more than one, one after the other: a rename is a copy and the source's deletion
#: (component/azstorage/block_blob.go, RenameFile as of 2025; its caller checks the source in the attribute
#: cache); rmdir a listing to check that it is empty, then the marker blob's deletion (libfuse_rmdir,
#: DeleteDirectory); mkdir the marker blob, then the listing of the getattr libfuse's high-level API sends
#: after it (CreateDirectory drops the name from the attribute cache). A hierarchical-namespace account
#: renames in one: not applied.
_BLOBFUSE2_REQUESTS_PER_OP: dict[OpName, int] = {"rename": 2, "rmdir": 2, "mkdir": 2}
#: Blobs a List Blobs request returns at most (Azure REST API, List Blobs, ``maxresults``; blobfuse2's
#: ``MaxDirListCount``): a listing is one request per 5,000 entries.
_BLOBFUSE2_LIST_PAGE_ENTRIES = 5_000
#: How blobfuse2 moves a blob through the Azure SDK (component/azstorage: ``block-size-mb`` unset,
#: ``max-concurrency`` 32): downloads as ranged GETs of 4 MiB (the SDK's ``DefaultDownloadBlockSize``), 32
#: at a time; uploads up to 256 MiB as one Put Blob (``MaxUploadBlobBytes``), larger ones as Put Block
#: requests, 32 at a time, then one Put Block List.
_BLOBFUSE2_TRANSFERS = {"transfer_block_bytes": 4 * MIB, "transfer_parallelism": 32,
                        "single_upload_max_bytes": 256 * MIB}
#: blobfuse2's file-cache and attribute-cache timeouts as the Azure Blob CSI driver mounts it, seconds.
_BLOBFUSE2_CACHE_S = 120.0


def _blobfuse2_caching(sizing: Sizing) -> tuple[Layer, ...]:
    """Azure Blob Storage through blobfuse2 in caching mode: whole blobs down at open, up at close."""
    latency = LognormalDistribution(median_s=0.020, sigma=0.5)
    return (
        StagedWritesLayer(rate_bytes_per_s=sizing.rate_bytes_per_s or _MOUNTPOINT_THROUGHPUT, distribution=latency,
                          download_on_open=True, keep_local_s=_BLOBFUSE2_CACHE_S, new_files="staged",
                          upload_at_fsync=False, **_BLOBFUSE2_TRANSFERS),
        *_more_requests(latency, _BLOBFUSE2_REQUESTS_PER_OP),
        DelayLayer(ops=_BLOBFUSE2_METADATA_REQUESTS, mode="floor", distribution=latency,
                   lookup_cache_s=_BLOBFUSE2_CACHE_S, one_floor_per_call=False,
                   list_page_entries=_BLOBFUSE2_LIST_PAGE_ENTRIES),
    )


def _st1(sizing: Sizing) -> tuple[Layer, ...]:
    size = _in_range("size_gib", sizing.size_gib or 1024, 125, 16384, "st1 volumes are 125 GiB to 16 TiB")
    baseline = min(40 * MIB * size // 1024, 500 * MIB)
    burst = min(250 * MIB * size // 1024, 500 * MIB)
    return (
        # while credits last: the burst throughput, each I/O spending a 1 MiB credit
        ThrottleLayer(iops=500, rate_bytes_per_s=burst, max_io_bytes=MIB, charge_units=True),
        # the credits: a bucket of 1 TiB per TiB of volume, refilled at the baseline
        ThrottleLayer(rate_bytes_per_s=baseline, burst_bytes=size * GIB, burst_balance=sizing.balance,
                      max_io_bytes=MIB, charge_units=True),
        _disk_positioning(),
    )


def _disk_positioning() -> DelayLayer:
    """A 7200 rpm disk's seek + rotation as a floor of each random read/write; none for a sequential one."""
    return DelayLayer(ops=frozenset({"read", "write"}), mode="floor", skip_sequential=True,
                      distribution=UniformDistribution(min_s=0.0085, max_s=0.0085 + 60 / 7200))


def _pd_standard(sizing: Sizing) -> tuple[Layer, ...]:
    size = _in_range("size_gib", sizing.size_gib or 1024, 10, 65536,
                     "pd-standard disks are 10 GiB to 64 TiB")
    return (
        # reads and writes draw on one budget: a read takes the share of two writes (0.75 vs 1.5 per GiB)
        ThrottleLayer(iops=max(1, size * 3 // 2), read_iops_charge=2.0),
        ThrottleLayer(rate_bytes_per_s=max(1, int(0.12 * MIB * size))),
        DelayLayer(ops=frozenset({"read", "write"}), mode="floor",
                   distribution=LognormalDistribution(median_s=0.005, sigma=0.5)),
    )


def _gcp_ssd_builder(baseline_iops: int, baseline_mib_s: int, iops_per_gib: int, mib_s_per_gib: float) -> _Builder:
    """A GCP SSD-backed Persistent Disk: a baseline plus a share per GiB (Compute Engine, Persistent Disk performance)."""

    def build(sizing: Sizing) -> tuple[Layer, ...]:
        size = _in_range("size_gib", sizing.size_gib or 1024, 10, 65536, "SSD persistent disks are 10 GiB to 64 TiB")
        rate = int((baseline_mib_s + mib_s_per_gib * size) * MIB)
        return (
            # reads and writes draw on one IOPS budget, but each may reach the throughput limit at once
            ThrottleLayer(iops=baseline_iops + iops_per_gib * size),
            ThrottleLayer(ops=frozenset({"read"}), rate_bytes_per_s=rate),
            ThrottleLayer(ops=frozenset({"write"}), rate_bytes_per_s=rate),
            _sub_millisecond_latency(),
        )

    return build


def _sub_millisecond_latency() -> DelayLayer:
    """A network SSD 'designed for sub-millisecond latencies': log-normal, median 0.8 ms, sigma 0.3, a floor."""
    return DelayLayer(ops=frozenset({"read", "write"}), mode="floor",
                      distribution=LognormalDistribution(median_s=0.0008, sigma=0.3))


def _premium_ssd_v2(sizing: Sizing) -> tuple[Layer, ...]:
    iops = _in_range("iops", sizing.iops or 3000, 3000, 80000,
                     "Premium SSD v2 includes 3,000 IOPS; up to 80,000 may be provisioned")
    if sizing.size_gib is not None:
        size = _in_range("size_gib", sizing.size_gib, 1, 65536, "Premium SSD v2 disks are 1 GiB to 64 TiB")
        most = 3000 if size <= 6 else min(500 * size, 80000)
        _in_range("iops", iops, 3000, most, f"a {size:,} GiB Premium SSD v2 takes at most 500 IOPS per GiB above 6 GiB")
    most_rate = min(max(125, iops // 4), 2000) * MB  # 0.25 MB/s per provisioned IOPS, 2,000 MB/s at most
    rate = _in_range("rate_bytes_per_s", sizing.rate_bytes_per_s or 125 * MB, 125 * MB, most_rate,
                     f"Premium SSD v2 includes 125 MB/s; {iops:,} IOPS allow up to 0.25 MB/s each")
    return (ThrottleLayer(iops=iops, rate_bytes_per_s=rate), _sub_millisecond_latency())


class _PremiumSsdTier(typing.NamedTuple):
    name: str
    size_gib: int
    iops: int
    mb_per_s: int
    burst_iops: int  # with credit bursting (P20 and smaller); = iops above
    burst_mb_per_s: int


#: Azure Premium SSD (v1) performance tiers up to P40: a disk gets the smallest tier that holds it.
_PREMIUM_SSD_TIERS = (
    _PremiumSsdTier("P1", 4, 120, 25, 3500, 170), _PremiumSsdTier("P2", 8, 120, 25, 3500, 170),
    _PremiumSsdTier("P3", 16, 120, 25, 3500, 170), _PremiumSsdTier("P4", 32, 120, 25, 3500, 170),
    _PremiumSsdTier("P6", 64, 240, 50, 3500, 170), _PremiumSsdTier("P10", 128, 500, 100, 3500, 170),
    _PremiumSsdTier("P15", 256, 1100, 125, 3500, 170), _PremiumSsdTier("P20", 512, 2300, 150, 3500, 170),
    _PremiumSsdTier("P30", 1024, 5000, 200, 5000, 200), _PremiumSsdTier("P40", 2048, 7500, 250, 7500, 250),
)
#: Azure's credit bursting: a full bucket sustains the burst rate for 30 minutes.
_AZURE_BURST_S = 30 * 60


def _premium_ssd(sizing: Sizing) -> tuple[Layer, ...]:
    size = _in_range("size_gib", sizing.size_gib or 128, 1, 2048,
                     "Premium SSD tiers P1 to P40 are modelled (the tiers above 2 TiB are not)")
    tier = next(t for t in _PREMIUM_SSD_TIERS if size <= t.size_gib)
    if tier.burst_iops == tier.iops:
        if sizing.burst_balance is not None:
            raise ValueError(f"field `burst_balance`: a {size:,} GiB disk is a {tier.name}, and credit bursting "
                             "is for P20 (512 GiB) and smaller")
        return (ThrottleLayer(iops=tier.iops, rate_bytes_per_s=tier.mb_per_s * MB, max_io_bytes=256 * KIB),
                _ssd_latency())
    return (
        # while credits last: the burst rate
        ThrottleLayer(iops=tier.burst_iops, rate_bytes_per_s=tier.burst_mb_per_s * MB, max_io_bytes=256 * KIB),
        # the credits, I/Os and bytes apart: 30 minutes at the burst rate, earned below the provisioned rate
        ThrottleLayer(iops=tier.iops, burst_ops=(tier.burst_iops - tier.iops) * _AZURE_BURST_S,
                      burst_balance=sizing.balance, max_io_bytes=256 * KIB),
        ThrottleLayer(rate_bytes_per_s=tier.mb_per_s * MB,
                      burst_bytes=(tier.burst_mb_per_s - tier.mb_per_s) * MB * _AZURE_BURST_S,
                      burst_balance=sizing.balance),
        _ssd_latency(),
    )


def _wan_nfs(sizing: Sizing) -> tuple[Layer, ...]:
    return (
        ThrottleLayer(rate_bytes_per_s=sizing.rate_bytes_per_s or 100_000_000 // 8),
        # writes wait in the client's page cache; close and fsync send them (one round trip)
        DelayLayer(ops=frozenset(typing.get_args(OpName)) - WRITE_BEHIND_OPS, write_behind="buffered",
                   distribution=NormalDistribution(mean_s=0.040, stddev_s=0.002)),
    )


def _hdd_7200(sizing: Sizing) -> tuple[Layer, ...]:
    return (ThrottleLayer(rate_bytes_per_s=160 * MB), _disk_positioning())


def _profile(builder: _Builder, **fields: typing.Any) -> tuple[Profile, _Builder]:
    return Profile(layers=builder(Sizing()), **fields), builder


_PROFILES_AND_BUILDERS = (
    _profile(
        _gp3,
        name="gp3",
        summary="AWS EBS gp3 SSD at its baseline: 3000 IOPS, 125 MiB/s, ~1 ms latency",
        source=(
            "AWS EBS User Guide, 'General Purpose SSD volumes': gp3 baseline 3,000 IOPS and 125 MiB/s "
            "throughput at any size, 'single-digit millisecond latency' "
            "(https://docs.aws.amazon.com/ebs/latest/userguide/general-purpose.html); an I/O counts in "
            "256 KiB units, a 1,024 KiB one as 4 IOPS (Amazon CloudWatch metrics for EBS, "
            "'VolumeConsumedReadWriteOps'); latency modelled as log-normal, median 1 ms, sigma 0.3, the "
            "total latency of an op (floor)"
        ),
        parameters={
            "iops": "provisioned IOPS, >= 3000 (default 3000; AWS caps what may be provisioned per volume "
                    "and per GiB: check the current limits)",
            "rate_bytes_per_s": "provisioned throughput, >= 125 MiB/s (default 125 MiB/s)",
        },
    ),
    _profile(
        _gp2,
        name="gp2",
        summary="AWS EBS gp2 SSD, 100 GiB: 3000 IOPS while 5.4 million I/O credits last, then 300; 128 MiB/s; "
                "~1 ms latency",
        source=(
            "AWS EBS User Guide, 'General Purpose SSD volumes', gp2: baseline 3 IOPS per GiB (at least 100, at "
            "most 16,000), burst to 3,000 IOPS from a bucket of 5.4 million I/O credits, full when the volume "
            "is new and earned at the baseline (a 100 GiB volume bursts for 2,000 s); throughput at most "
            "128 MiB/s up to 170 GiB, 250 MiB/s above (from 170 to 334 GiB while credits last: after, the "
            "baseline IOPS bound it near 128 MiB/s); 1 GiB to 16 TiB "
            "(https://docs.aws.amazon.com/ebs/latest/userguide/general-purpose.html); I/O counted in "
            "256 KiB units as gp3; latency as gp3's"
        ),
        parameters={
            "size_gib": "volume size, 1..16384 GiB (default 100): baseline 3 IOPS per GiB, 100..16,000; "
                        "burst to 3,000 below 1,000 GiB; 128 MiB/s up to 170 GiB, 250 above",
            "burst_balance": "how full the I/O credit bucket is at the first I/O, 0..1 (default 1: a new "
                             "volume; 0: drained, the volume runs at its baseline)",
        },
    ),
    _profile(
        _io2,
        name="io2",
        summary="AWS EBS io2 Block Express SSD, 16,000 provisioned IOPS: sub-millisecond latency (mean 0.47 ms)",
        source=(
            "AWS EBS User Guide, 'Provisioned IOPS SSD volumes': io2 Block Express, 100 to 256,000 provisioned "
            "IOPS (1,000 per GiB), up to 4,000 MiB/s, 4 GiB to 64 TiB; 'Amazon EBS optimization': an average "
            "latency under 500 microseconds for 16 KiB I/O, and I/Os above 800 microseconds over 10 times "
            "rarer than on General Purpose volumes (https://docs.aws.amazon.com/ebs/latest/userguide/"
            "provisioned-iops.html); an I/O counts in 256 KiB units (CloudWatch 'VolumeConsumedReadWriteOps', "
            "Provisioned IOPS volumes), so N IOPS move at most N x 256 KiB/s; latency modelled as log-normal, "
            "median 0.45 ms, sigma 0.3 (gp3's spread): mean 0.47 ms, 2.8 % of I/Os above 0.8 ms against 77 % "
            "in gp3's model, a floor"
        ),
        parameters={
            "iops": "provisioned IOPS, 100..256000 (default 16000); throughput up to 4,000 MiB/s, "
                    "at most 256 KiB per IOPS",
        },
    ),
    _profile(
        _st1,
        name="st1",
        summary="AWS EBS st1 throughput-optimised HDD, 1 TiB: 250 MiB/s while burst credits last, then "
                "40 MiB/s; 500 IOPS; a 1 MiB credit per small I/O",
        source=(
            "AWS EBS User Guide, 'Throughput Optimized HDD volumes': for 1 TiB, burst throughput 250 MiB/s, "
            "the bucket fills with credits at 40 MiB/s (the baseline) and holds 1 TiB of them, both rates "
            "scaling with size up to 500 MiB/s; new volumes get their full performance at once (a full "
            "bucket); max 500 IOPS (1 MiB I/O); 125 GiB to 16 TiB; 'Inefficiency of small read/writes on "
            "HDD': an I/O of 1 MiB or less spends a 1 MiB credit, sequential I/Os merged into 1 MiB count "
            "once (https://docs.aws.amazon.com/ebs/latest/userguide/hdd-vols.html); latency: a 7200 rpm "
            "disk's positioning (below) as a floor of each random I/O, none for a sequential one"
        ),
        parameters={
            "size_gib": "volume size, 125..16384 GiB (default 1024): per TiB, a burst rate of 250 MiB/s, a "
                        "baseline of 40 MiB/s (each at most 500 MiB/s) and a bucket of 1 TiB of credits",
            "burst_balance": "how full the credit bucket is at the first I/O, 0..1 (default 1: a new volume; "
                             "0: drained, the volume runs at its baseline)",
        },
    ),
    _profile(
        _pd_standard,
        name="pd-standard",
        summary="GCP pd-standard, 1 TiB: 768 read / 1536 write IOPS from one budget, 120 MiB/s",
        source=(
            "Google Cloud, 'Configure disks to meet performance requirements' (Persistent Disk "
            "performance): pd-standard 0.75 read IOPS/GiB, 1.5 write IOPS/GiB, 0.12 MiB/s per GiB "
            "(https://cloud.google.com/compute/docs/disks/performance); reads and writes share the "
            "disk's resources, more of one leaving less of the other ('Optimize Persistent Disk "
            "performance', simultaneous reads and writes): one IOPS budget, a read counting as two "
            "writes; a 1024 GiB disk; latency log-normal, median 5 ms, sigma 0.5 (HDD-backed network "
            "disk), a floor"
        ),
        parameters={
            "size_gib": "disk size, 10..65536 GiB (default 1024): 0.75 read or 1.5 write IOPS and 0.12 MiB/s "
                        "per GiB; the per-VM caps (by machine type and vCPUs) are not applied",
        },
    ),
    _profile(
        _gcp_ssd_builder(3000, 140, 6, 0.28),
        name="pd-balanced",
        summary="GCP pd-balanced (the console's default disk), 1 TiB: 9,144 IOPS, 427 MiB/s; sub-millisecond latency",
        source=(
            "Google Cloud, 'About Persistent Disk performance' (https://cloud.google.com/compute/docs/disks/"
            "performance): Balanced PD 6 read and 6 write IOPS per GiB, 0.28 MiB/s per GiB, a baseline of "
            "3,000 IOPS and 140 MiB/s that the per-GiB share adds to (as Google's gcpdiag computes it: "
            "github.com/GoogleCloudPlatform/gcpdiag, runbook gce/disk_performance_benchmark), 'designed for "
            "sub-millisecond latencies'; 'Optimize Persistent Disk performance', 'Simultaneous reads and "
            "writes': SSD persistent disks reach their throughput limit for reads and writes at once, not "
            "their IOPS limit (one IOPS budget, a throughput limit each way); a 1024 GiB disk; latency "
            "modelled as log-normal, median 0.8 ms, sigma 0.3 (an assumption within 'sub-millisecond'), a "
            "floor; no I/O unit is published, so a request counts as one I/O whatever its size"
        ),
        parameters={
            "size_gib": "disk size, 10..65536 GiB (default 1024): 3,000 IOPS and 140 MiB/s plus 6 IOPS and "
                        "0.28 MiB/s per GiB; the per-VM caps (by machine type and vCPUs) are not applied",
        },
    ),
    _profile(
        _gcp_ssd_builder(6000, 240, 30, 0.48),
        name="pd-ssd",
        summary="GCP pd-ssd (performance SSD), 1 TiB: 36,720 IOPS, 732 MiB/s; sub-millisecond latency",
        source=(
            "Google Cloud, 'About Persistent Disk performance' (https://cloud.google.com/compute/docs/disks/"
            "performance): SSD PD 30 read and 30 write IOPS per GiB, 0.48 MiB/s per GiB, on top of a baseline "
            "of 6,000 IOPS and 240 MiB/s, 'designed for sub-millisecond latencies'; reads and writes as in "
            "pd-balanced; a 1024 GiB disk; latency as pd-balanced's"
        ),
        parameters={
            "size_gib": "disk size, 10..65536 GiB (default 1024): 6,000 IOPS and 240 MiB/s plus 30 IOPS and "
                        "0.48 MiB/s per GiB; the per-VM caps (by machine type and vCPUs) are not applied",
        },
    ),
    _profile(
        _premium_ssd,
        name="premium-ssd",
        summary="Azure Premium SSD P10 (128 GiB): 500 IOPS, 100 MB/s, bursting to 3,500 IOPS and 170 MB/s for "
                "30 minutes on credits; ~1 ms latency",
        source=(
            "Microsoft Learn, 'Azure managed disk types', Premium SSD sizes (https://learn.microsoft.com/azure/"
            "virtual-machines/disks-types#premium-ssds): per tier, provisioned IOPS and MB/s, P1-P4 (4-32 GiB) "
            "120 and 25, P6 (64) 240 and 50, P10 (128) 500 and 100, P15 (256) 1,100 and 125, P20 (512) 2,300 "
            "and 150, P30 (1 TiB) 5,000 and 200, P40 (2 TiB) 7,500 and 250; a disk gets the smallest tier that "
            "holds it; 'single-digit millisecond latencies'; an I/O of up to 256 KiB counts once, a larger one "
            "as several of 256 KiB. 'Managed disk bursting' (https://learn.microsoft.com/azure/virtual-machines/"
            "disk-bursting): P20 and smaller burst on credits to 3,500 IOPS and 170 MB/s, a new disk starting "
            "with a full bucket that lasts up to 30 minutes at the burst rate, credits earned while below the "
            "provisioned rate, IOPS and throughput credits apart (the bucket size, 30 minutes of burst above "
            "the provisioned rate, is inferred); on-demand bursting (P30 and up, paid) is not modelled. MB = "
            "10^6 bytes. Latency as gp3's"
        ),
        parameters={
            "size_gib": "disk size, 1..2048 GiB (default 128: P10), rounded up to its tier P1..P40",
            "burst_balance": "P20 and smaller: how full the credit buckets are at the first I/O, 0..1 (default 1: "
                             "a new disk; 0: drained, the disk runs at its provisioned rate)",
        },
    ),
    _profile(
        _premium_ssd_v2,
        name="premium-ssd-v2",
        summary="Azure Premium SSD v2 at its included performance: 3,000 IOPS, 125 MB/s; sub-millisecond latency",
        source=(
            "Microsoft Learn, 'Azure managed disk types', Premium SSD v2 (https://learn.microsoft.com/azure/"
            "virtual-machines/disks-types#premium-ssd-v2): a baseline of 3,000 IOPS and 125 MB/s at any size, "
            "free of charge; up to 500 IOPS per GiB above 6 GiB, at most 80,000; throughput up to 0.25 MB/s "
            "per provisioned IOPS, at most 2,000 MB/s; 1 GiB to 64 TiB; 'designed to provide submillisecond "
            "latency', provisioned performance met 99.9 % of the time; no bursting. MB = 10^6 bytes. Latency "
            "as pd-balanced's (an assumption within 'submillisecond'), a floor"
        ),
        parameters={
            "iops": "provisioned IOPS, 3000..80000 (default 3000); with size_gib, at most 500 per GiB above 6 GiB",
            "rate_bytes_per_s": "provisioned throughput, 125 MB/s up to 0.25 MB/s per provisioned IOPS and "
                                "2,000 MB/s (default 125,000,000)",
            "size_gib": "disk size, 1..65536 GiB: only checks the IOPS asked for (default: not checked)",
        },
    ),
    _profile(
        _wan_nfs,
        name="wan-nfs",
        summary="NFS share across a WAN: 40 ms RTT on every op (writes: on the close/fsync after them), "
                "100 Mbit/s",
        source=(
            "NFSv3 (RFC 1813) serves each file-system op as one RPC, so every op pays one round trip; "
            "40 ms RTT is a typical cross-region figure (e.g. AWS us-east-1 to us-west-2 is 60-70 ms, "
            "intra-continent 20-40 ms: https://www.cloudping.co); 100 Mbit/s = 12.5 MB/s link; "
            "RTT jitter normal, sd 2 ms, added to the server's own time; writes are buffered by the client "
            "(UNSTABLE WRITEs, RFC 1813 section 3.3.7) and the close or fsync after them waits one round trip "
            "for them and the COMMIT, while the link's bandwidth paces the writes themselves; O_SYNC, O_DSYNC "
            "and O_DIRECT writes pay their round trip each"
        ),
        parameters={"rate_bytes_per_s": "link bandwidth, bytes/s (default 12,500,000: 100 Mbit/s)"},
    ),
    _profile(
        _efs,
        name="efs",
        summary="AWS EFS, Regional, Elastic throughput: ~1 ms random reads and metadata lookups, ~2.7 ms "
                "namespace changes and closes/fsyncs after writes (write-behind); 1,500 MiB/s per client",
        source=(
            "Amazon EFS User Guide, 'Amazon EFS performance specifications', General Purpose mode, Regional "
            "file system, Elastic throughput: latency ~1 ms for reads and ~2.7 ms for writes, at most "
            "1,500 MiB/s per client (the per-file-system limits, 900,000+ read and 500,000 write IOPS and "
            "GiB/s of throughput, are beyond one client: not applied) "
            "(https://docs.aws.amazon.com/efs/latest/ug/performance.html); an NFSv4.1 client (RFC 8881) sends "
            "each metadata operation as one COMPOUND request, one round trip: lookups, getattr, open (close-to-open consistency revalidates "
            "every open), readdir and the like at the read latency, creates, renames, unlinks, setattr and "
            "the like at the write latency (AWS publishes no metadata latency: an assumption); latencies "
            "modelled as log-normal, sigma 0.3, floors. As the Linux NFS client does: a buffered read continuing "
            "the previous one of its file is not held (readahead has it in flight; an O_DIRECT one is), writes are not held but the "
            "next close or fsync of the file is, once (the client's page cache sends them then, "
            "nfs_file_flush); O_SYNC, O_DSYNC and O_DIRECT writes are held each; a name looked up is "
            "trusted for 30 s, as the client trusts its cached names until their directory's attributes "
            "expire (acdirmin, 30 s by default: nfs(5); lookup_cache_s), and a getattr is held only where the "
            "client's attribute cache has expired (3 s at first for files, 30 s for directories, doubling while "
            "unchanged up to 60 s: nfs(5), fs/nfs/inode.c; attr_cache). Bursting and Provisioned "
            "throughput (same guide, 'Throughput modes'): at most 500 MiB/s per client; reads metered at "
            "one-third of their bytes; Bursting: 100 MiB/s (100 MiB/s per TiB stored above 1 TiB) while burst "
            "credits last, a credit balance of up to 2.1 TiB (2.1 TiB per TiB above 1 TiB), new file systems "
            "starting full, earned at the 50 KiB/s-per-GiB baseline (at least 1 MiB/s)"
        ),
        parameters={
            "size_gib": "Bursting throughput: the data stored, 1..8,388,608 GiB (baseline 50 KiB/s per GiB; "
                        "default: Elastic throughput)",
            "burst_balance": "Bursting throughput: how full the burst credit balance is, 0..1 (default 1)",
            "rate_bytes_per_s": "Provisioned throughput, 1..3,414 MiB/s (default: Elastic throughput)",
        },
    ),
    _profile(
        _filestore_basic_hdd,
        name="filestore-basic-hdd",
        summary="GCP Filestore Basic HDD, 1 TiB: 600 read / 1,000 write IOPS, 100 MiB/s each way; NFSv3",
        source=(
            "Google Cloud, Filestore 'Performance' (https://cloud.google.com/filestore/docs/performance), "
            "expected limits per instance: Basic HDD 1-10 TiB 600 read and 1,000 write IOPS, 100 MiB/s read "
            "and write; 10-63.9 TiB 1,000 and 5,000 IOPS, 180 and 120 MiB/s (no per-client limit; reads and "
            "writes limited apart, as published); Google publishes no latency: assumed log-normal, median "
            "5 ms, sigma 0.5 on reads and writes (disks, as pd-standard's) and 1 ms, sigma 0.3 on metadata "
            "ops (answered from the server's memory), floors; the client is Linux's NFS client as in the efs "
            "profile (readahead streams a sequential reader, writes wait in its page cache for the close or "
            "fsync) but over NFSv3 (RFC 1813), the only protocol of Basic instances: no OPEN, so an open of an "
            "unseen name is a LOOKUP and an ACCESS, a create a LOOKUP and a CREATE, each a round trip "
            "(one_floor_per_call false)"
        ),
        parameters={
            "size_gib": "instance capacity, 1024..65433 GiB (default 1024): below 10 TiB the first limits, "
                        "from 10 TiB the second",
        },
    ),
    _profile(
        _filestore_basic_ssd,
        name="filestore-basic-ssd",
        summary="GCP Filestore Basic SSD: 60,000 read / 25,000 write IOPS, 1,200 / 350 MiB/s; NFSv3",
        source=(
            "Google Cloud, Filestore 'Performance' (https://cloud.google.com/filestore/docs/performance): "
            "Basic SSD, 2.5-63.9 TiB, 60,000 read and 25,000 write IOPS, 1,200 MiB/s read and 350 MiB/s "
            "write at any capacity; no latency published: assumed log-normal, median 1 ms, sigma 0.3 (an "
            "NFS round trip within a zone to an SSD server; EFS's published read latency), a floor on every "
            "op; the NFS client as in filestore-basic-hdd (NFSv3)"
        ),
        parameters={"size_gib": "instance capacity, 2560..65433 GiB (default 2560): the limits do not change"},
    ),
    _profile(
        _filestore_zonal,
        name="filestore-zonal",
        summary="GCP Filestore Zonal, 1 TiB: 9,200 read / 2,600 write IOPS, 260 / 88 MiB/s, per TiB; NFSv3",
        source=(
            "Google Cloud, Filestore 'Performance' (https://cloud.google.com/filestore/docs/performance): "
            "Zonal, 1-100 TiB, limits linear in capacity: per TiB 9,200 read and 2,600 write IOPS, 260 MiB/s "
            "read and 88 MiB/s write (1 TiB: 9,200 / 2,600 / 260 / 88; 100 TiB: 920,000 / 260,000 / 26,000 / "
            "8,800); the single-client limits and custom performance are not applied; latency as "
            "filestore-basic-ssd's (assumed); NFSv3, the default protocol (NFSv4.1 is an option of zonal "
            "instances: not modelled)"
        ),
        parameters={"size_gib": "instance capacity, 1024..102400 GiB (default 1024): the limits scale with it"},
    ),
    _profile(
        _object_store_builder(0.020, 0.5),
        name="s3",
        summary="Amazon S3 Standard through Mountpoint for Amazon S3: ~20 ms per request (random read, lookup, "
                "open, close after writing); sequential reads streamed; 10 Gbit/s",
        source=(
            "AWS whitepaper 'Best Practices Design Patterns: Optimizing Amazon S3 Performance', 'Timeouts and "
            "Retries for Latency-Sensitive Applications': for requests under 512 KB 'median latencies are often "
            "in the tens of milliseconds' (https://docs.aws.amazon.com/whitepapers/latest/"
            "s3-optimizing-performance-best-practices/timeouts-and-retries-for-latency-sensitive-applications."
            "html); S3 Express One Zone is 'up to 10x faster than S3 Standard' (Amazon S3 User Guide, "
            "'Optimizing S3 Express One Zone performance'); modelled as log-normal, median 20 ms, sigma 0.5 "
            "(p99 64 ms; AWS suggests retrying a small request after 2 s: the tail is long), the total "
            "latency of each request (floor), an assumption within 'tens of milliseconds'. Mountpoint for "
            "Amazon S3 (github.com/awslabs/mountpoint-s3, doc/SEMANTICS.md): sequential reads are served by "
            "concurrent prefetching GETs (only a stream's first read waits), random reads are ranged GETs, "
            "new files are uploaded in the background and fsync (and close) wait for the upload; lookup, "
            "getattr after the 1 s metadata TTL, open and unlink are one request each, a listing one per 1,000 "
            "entries (ListObjectsV2's most keys per request: Amazon S3 API Reference); "
            "--maximum-throughput-gbps defaults to 10 Gbps off EC2. Not emulated by the profile: Mountpoint's "
            "refusals (renames, overwrites without O_TRUNC, non-sequential writes, links; add an s3_semantics "
            "layer for them); the per-prefix "
            "request rates (at least 5,500 GET and 3,500 PUT per second, growing as S3 partitions) are not "
            "applied"
        ),
        parameters={
            "rate_bytes_per_s": "the client's network throughput to S3, bytes/s (default 1,250,000,000: 10 Gbit/s)",
        },
    ),
    _profile(
        _object_store_builder(0.002, 0.3),
        name="s3-express",
        summary="Amazon S3 Express One Zone through Mountpoint for Amazon S3: ~2 ms per request, otherwise as s3",
        source=(
            "Amazon S3 User Guide, 'Optimizing S3 Express One Zone performance': 'consistent single-digit "
            "millisecond first-byte read and write request latencies', 'up to 10x faster than S3 Standard' "
            "(https://docs.aws.amazon.com/AmazonS3/latest/userguide/s3-express-performance.html); modelled as "
            "log-normal, median 2 ms (a tenth of the s3 profile's), sigma 0.3 ('consistent'), a floor; "
            "Mountpoint's behaviour and what is not emulated as in the s3 profile (directory buckets serve "
            "200,000 reads and 100,000 writes per second by default: not applied)"
        ),
        parameters={
            "rate_bytes_per_s": "the client's network throughput to S3, bytes/s (default 1,250,000,000: 10 Gbit/s)",
        },
    ),
    _profile(
        _object_store_builder(0.020, 0.5, _GCSFUSE_METADATA_REQUESTS, lookup_cache_s=60.0,
                              staged_writes=_GCSFUSE_STAGED_WRITES, requests_per_op=_GCSFUSE_REQUESTS_PER_OP,
                              list_page_entries=_GCSFUSE_LIST_PAGE_ENTRIES),
        name="gcs",
        summary="Google Cloud Storage through Cloud Storage FUSE (the GKE CSI driver's): ~20 ms per request "
                "(random read, lookup, listing, mkdir, close after writing; two for rename and rmdir); a changed "
                "object downloaded and uploaded whole; sequential reads streamed; 10 Gbit/s",
        source=(
            "Google Cloud Storage, 'Storage classes': time to first byte typically tens of milliseconds "
            "(https://cloud.google.com/storage/docs/storage-classes); modelled as the s3 profile's "
            "log-normal, median 20 ms, sigma 0.5, a floor, an assumption within 'tens of milliseconds'. "
            "Cloud Storage FUSE (github.com/GoogleCloudPlatform/gcsfuse, docs/semantics.md, cfg/params.yaml; "
            "https://cloud.google.com/storage/docs/gcsfuse-performance-and-best-practices): a reader found "
            "sequential is served by fewer, larger reads (only its first read waits here), others by ranged "
            "reads; a new file written in order is uploaded as it is written (streaming writes, the "
            "default since gcsfuse 3.0) and finalized when closed, but a write out of order, a read, a "
            "truncation below its size or a rename of it first finalizes what was streamed (one request) and "
            "makes it a staged file, and at most 4 new files stream at once (write-global-max-blocks; "
            "max_streamed_files), a file created beyond that being staged from the start; a change to an "
            "existing object is staged "
            "(docs/semantics.md, 'Staged Writes'): the whole object is downloaded at the first write (two "
            "requests, a stat and the read: internal/fs/inode/file.go, then its size at the throughput), or at "
            "a truncation, to 0 too (an O_TRUNC open: gcsfuse truncates its local copy), the local copy serves "
            "the file's reads and writes until the "
            "close or fsync, and the file is uploaded whole then (a stat and the upload, then its size), except "
            "an object of at least 2 MiB changed only by appends, of which only what was appended goes up (four "
            "requests: a stat, the appended bytes as a temporary object, a compose, its deletion: "
            "internal/gcsx/append_object_creator.go) (a staged_writes layer); a streamed new file's close waits "
            "for one request; a lookup is "
            "a stat-object "
            "request, its result, found or not, cached for 60 s "
            "by default (metadata-cache.ttl-secs): a lookup of the same path within 60 s of the last one it "
            "paid for costs nothing (lookup_cache_s), nor do getattr and open; a listing is one request per "
            "5,000 entries (internal/fs/inode/dir.go, MaxResultsForListObjectsCall); "
            "unlink is a delete request; mkdir creates a placeholder object (one request); rmdir lists, then "
            "deletes (two, docs/semantics.md, 'Unlinking'); renaming a file copies it, then deletes the "
            "source (two; a bucket with hierarchical namespace: one, not applied). Not applied: the local disk staged files are written to, "
            "the file cache (off unless a cache directory is given), "
            "parallel downloads, the request rates of a bucket (about 5,000 reads and 1,000 writes per "
            "second to start: https://cloud.google.com/storage/docs/request-rate), and gcsfuse's semantics "
            "(non-atomic renames, no hard links)"
        ),
        parameters={
            "rate_bytes_per_s": "the client's network throughput to Cloud Storage, bytes/s (default 1,250,000,000: "
                                "10 Gbit/s)",
            "max_streamed_files": "new files streamed at once, >= 1 (default 4, gcsfuse's write-global-max-blocks; "
                                  "1600 on A2/A3/A4 GPU and TPU v5+ machines); a file created beyond it is staged",
        },
    ),
    _profile(
        _blobfuse2_caching,
        name="azure-blob",
        summary="Azure Blob Storage through blobfuse2 in caching mode (the Azure Blob CSI driver's): a file is "
                "downloaded whole at open and uploaded whole at close after a change; ~20 ms per request; 10 Gbit/s",
        source=(
            "Microsoft Learn, 'Configure BlobFuse for caching mode' (https://learn.microsoft.com/azure/storage/blobs/"
            "blobfuse2-configure-caching): 'BlobFuse downloads the entire file from Azure Blob Storage into a local "
            "cache directory before making it available to the application'; the Azure Blob CSI driver's example "
            "StorageClass (github.com/kubernetes-sigs/blob-csi-driver, deploy/example/"
            "storageclass-blobfuse-existing-container.yaml) mounts with --file-cache-timeout-in-seconds=120 and "
            "--use-attr-cache=true, and 120 s entry and attribute timeouts: a file closed less than 120 s ago is "
            "reopened from the local cache, and a name's properties are asked once per 120 s; a changed or new file "
            "is uploaded whole when closed (blobfuse2 file_cache, FlushFile; fsync sends nothing, SyncFile, and "
            "the local copy of a file fsync'd is dropped at its close). Microsoft publishes no latency figure "
            "for standard block blobs ('Latency in Blob storage' takes 50 ms per request as its example; premium "
            "accounts are 'significantly lower'): modelled as the s3 profile's log-normal, median 20 ms, sigma 0.5, "
            "a floor, an assumption; the link as 10 Gbit/s (a VM's network, below an account's egress target), "
            "shared by transfers in order; a download is ranged GETs of 4 MiB, 32 at a time, an upload one Put "
            "Blob up to 256 MiB, else Put Block requests of 4 MiB or more, 32 at a time, and a Put Block List "
            "(the Azure SDK as blobfuse2 calls it: max-concurrency 32, block-size-mb unset). Reads and writes "
            "go to the local copy: not held. A lookup or unlink is "
            "one request, a listing one per 5,000 entries (List Blobs' maxresults); a rename two (a copy, the "
            "source's deletion), rmdir two (a listing, the marker blob's deletion) and mkdir two (the marker "
            "blob, the listing of the getattr libfuse sends after it), one after the other "
            "(component/azstorage/block_blob.go, 2025; a hierarchical-namespace account renames in one, not "
            "applied). "
            "Not applied: the local "
            "disk's speed and size, block-cache (streaming) mode, preload, and a storage account's request targets"
        ),
        parameters={
            "rate_bytes_per_s": "the client's network throughput to Azure Storage, bytes/s (default 1,250,000,000: "
                                "10 Gbit/s)",
        },
    ),
    _profile(
        _hdd_7200,
        name="hdd-7200",
        summary="7200 rpm SATA disk: random I/O 8.5 ms seek + 0-8.3 ms rotation; 160 MB/s sequential",
        source=(
            "7200 rpm = 8.33 ms per revolution (60/7200 s), rotational latency uniform on 0-8.33 ms; "
            "average seek 8.5 ms and sustained transfer 160 MB/s as in Seagate BarraCuda 3.5\" "
            "(ST1000DM010) data sheet; seek + rotation as a floor of the latency of each read/write that "
            "does not continue the previous one of its file (about 80 random IOPS at queue depth 1), none "
            "for one that does (Ruemmler & Wilkes, 'An introduction to disk drive modeling', IEEE "
            "Computer 1994: positioning is paid when the head moves)"
        ),
        parameters={},
    ),
)

PROFILES: dict[str, Profile] = {profile.name: profile for profile, _ in _PROFILES_AND_BUILDERS}
_BUILDERS: dict[str, _Builder] = {profile.name: builder for profile, builder in _PROFILES_AND_BUILDERS}

assert set(PROFILES) == set(typing.get_args(ProfileName)), "profile names out of sync"


def sized_layers(layer: ProfileLayer) -> tuple[Layer, ...]:
    """The layers of ``layer``'s profile at the size it gives (its ``ops``/``path_glob`` not yet applied).

    Raises:
        ValueError: ``layer`` sets a sizing field the profile does not take, or a
            value outside the profile's range (the message names the field).
    """
    sizing = Sizing(size_gib=layer.size_gib, iops=layer.iops, rate_bytes_per_s=layer.rate_bytes_per_s,
                    burst_balance=layer.burst_balance, max_streamed_files=layer.max_streamed_files)
    accepted = PROFILES[layer.name].parameters
    for field in msgspec.structs.asdict(sizing):
        if getattr(sizing, field) is not None and field not in accepted:
            takes = ", ".join(f"`{name}`" for name in accepted) or "no sizing field"
            raise ValueError(f"field `{field}`: profile {layer.name!r} takes {takes}")
    return _BUILDERS[layer.name](sizing)


def expand_profile(layer: ProfileLayer) -> list[Layer]:
    """The layers ``layer`` stands for, with its ``path_glob``, ``ops``, ``page_cache`` and expiry applied.

    ``ops`` of the profile layer narrows each expanded layer's ops (an expanded
    layer whose ops do not intersect is left out).

    Raises:
        KeyError: unknown profile name (cannot happen for a validated layer).
    """
    out: list[Layer] = []
    for inner in sized_layers(layer):
        ops, page_cache = inner.ops, layer.page_cache
        if isinstance(inner, StagedWritesLayer):
            # it acts on its own ops, as a whole: kept while the profile applies to writes (and reads,
            # where it downloads at every open)
            if layer.ops and not layer.ops & ({"read", "write"} if inner.download_on_open else {"write"}):
                continue
            page_cache = inner.page_cache
        elif layer.ops:
            ops = (ops & layer.ops) if ops else layer.ops & _kind_ops(inner)
            if not ops:
                continue
            if isinstance(inner, DelayLayer):
                inner = _without_options_of_other_ops(inner, ops)
        out.append(msgspec.structs.replace(
            inner, ops=ops, path_glob=layer.path_glob, page_cache=page_cache,
            expires_after_s=layer.expires_after_s, expires_at=layer.expires_at,
        ))
    return out


def _without_options_of_other_ops(layer: DelayLayer, ops: frozenset[str]) -> DelayLayer:
    """``layer`` narrowed to ``ops``, without the options of the ops it no longer acts on (the ``gcs``
    profile's lookup cache when applied to reads only), which its validation would refuse."""
    return msgspec.structs.replace(
        layer,
        lookup_cache_s=layer.lookup_cache_s if "lookup" in ops else 0.0,
        attr_cache=layer.attr_cache if "getattr" in ops else None,
        skip_sequential=layer.skip_sequential if ops & {"read", "write"} else False,
        write_behind=layer.write_behind if "write" in ops else False,
        list_page_entries=layer.list_page_entries if "readdir" in ops else None,
    )


def _kind_ops(layer: Layer) -> frozenset[str]:
    if isinstance(layer, ThrottleLayer):
        return frozenset({"read", "write"})
    return frozenset(layer.ops) or frozenset(typing.get_args(OpName))
