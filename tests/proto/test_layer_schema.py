"""Schema of the layer kinds: faults, delay distributions, IOPS, quota, metadata, profiles, expiry."""

from __future__ import annotations

import json
import typing

import msgspec
import pytest

from interposer.proto import PolicyError, ProfileLayer, StagedWritesLayer, ThrottleLayer, decode_policy, encode_policy
from interposer.proto.policy import LognormalDistribution, check_glob
from interposer.proto.profiles import PROFILES, expand_profile


def _one(layer: dict) -> object:
    return decode_policy(json.dumps({"layers": [layer]})).layers[0]


def test_every_layer_kind_round_trips() -> None:
    text = json.dumps({"layers": [
        {"type": "fault", "errnos": {"EIO": 3, "ENOSPC": 1}, "every_nth": 3, "after_bytes": 4096, "on": "every_op"},
        {"type": "fault", "kind": "short_write", "short_ratio": 0.25, "expires_after_s": 30},
        {"type": "fault", "kind": "corrupt", "corrupt_bytes": 8, "corrupt_mode": "zero", "path_glob": "/d/[ab]*"},
        {"type": "delay", "distribution": {"type": "lognormal", "median_s": 0.001, "sigma": 0.5}, "seed": 7},
        {"type": "delay", "distribution": {"type": "pareto", "scale_s": 0.001, "alpha": 1.5}, "probability": 0.1},
        {"type": "throttle", "iops": 3000, "rate_bytes_per_s": 1 << 27, "burst_ops": 10},
        {"type": "quota", "bytes": 1 << 20, "inodes": 100, "errno": "EDQUOT", "expires_at": 4102444800},
        {"type": "metadata", "mode": 0o600, "uid": 1000, "time_jitter_s": 5, "ops": ["getattr"]},
        {"type": "metadata", "readdir_order": "shuffle", "seed": 3, "path_glob": "/big"},
        {"type": "delay", "delay_s": 0.002, "mode": "floor"},
        {"type": "profile", "name": "gp3", "path_glob": "/data/*"},
        {"type": "staged_writes", "rate_bytes_per_s": 1 << 27, "append_upload_min_bytes": 1 << 21,
         "distribution": {"type": "lognormal", "median_s": 0.02, "sigma": 0.5}, "seed": 1},
    ]})
    policy = decode_policy(text)
    assert decode_policy(encode_policy(policy)) == policy
    assert policy.layers[3].resolved_distribution == LognormalDistribution(median_s=0.001, sigma=0.5)
    assert policy.layers[3].mode == "add" and policy.layers[9].mode == "floor"
    assert policy.layers[7].readdir_order == "backend" and policy.layers[8].readdir_order == "shuffle"


def test_delay_s_still_means_a_fixed_delay() -> None:
    layer = _one({"type": "delay", "delay_s": 0.25})
    assert layer.resolved_distribution.delay_s == 0.25


@pytest.mark.parametrize(("layer", "expected"), [
    ({"type": "fault", "errnos": {"EIO": 1, "EBOGUS": 1}}, "field `errnos`: unknown errno name 'EBOGUS'"),
    ({"type": "fault", "errnos": {"EIO": 0}}, "$.layers[0].errnos"),
    ({"type": "fault", "every_nth": -1}, "$.layers[0].every_nth"),
    ({"type": "fault", "after_bytes": -5}, "$.layers[0].after_bytes"),
    ({"type": "fault", "on": "close"}, "$.layers[0].on"),
    ({"type": "fault", "kind": "explode"}, "$.layers[0].kind"),
    ({"type": "fault", "kind": "short_read", "ops": ["write"]}, "field `ops`: kind 'short_read' acts only on ['read']"),
    ({"type": "fault", "kind": "corrupt", "on": "open"}, "field `on`"),
    ({"type": "fault", "kind": "short_write", "short_ratio": 1.0}, "$.layers[0].short_ratio"),
    ({"type": "fault", "kind": "corrupt", "corrupt_bytes": 0}, "$.layers[0].corrupt_bytes"),
    ({"type": "fault", "path_glob": "/data/[ab*"}, "field `path_glob`: unbalanced '['"),
    ({"type": "fault", "expires_after_s": 0}, "$.layers[0].expires_after_s"),
    ({"type": "fault", "expires_after_s": 5, "expires_at": 4102444800}, "give at most one of them"),
    ({"type": "delay", "delay_s": 0.1, "distribution": {"type": "fixed", "delay_s": 0.1}}, "give exactly one"),
    ({"type": "delay", "distribution": {"type": "uniform", "min_s": 0.2, "max_s": 0.1}}, "field `max_s`"),
    ({"type": "delay", "distribution": {"type": "normal", "mean_s": 0.1, "stddev_s": -1}}, "$.layers[0].distribution.stddev_s"),
    ({"type": "delay", "distribution": {"type": "lognormal", "median_s": 0, "sigma": 1}}, "$.layers[0].distribution.median_s"),
    ({"type": "delay", "distribution": {"type": "pareto", "scale_s": 0.001, "alpha": 0}}, "$.layers[0].distribution.alpha"),
    ({"type": "delay", "distribution": {"type": "gamma"}}, "$.layers[0].distribution.type"),
    ({"type": "delay", "delay_s": 0.1, "seed": -1}, "$.layers[0].seed"),
    ({"type": "throttle"}, "give at least one of them"),
    ({"type": "throttle", "iops": 0}, "$.layers[0].iops"),
    ({"type": "throttle", "rate_bytes_per_s": 10, "max_io_bytes": 4096}, "field `max_io_bytes`"),
    ({"type": "throttle", "iops": 10, "max_io_bytes": 0}, "$.layers[0].max_io_bytes"),
    ({"type": "throttle", "iops": 10, "max_io_bytes": 4096, "charge_units": True}, "field `charge_units`"),
    ({"type": "throttle", "rate_bytes_per_s": 10, "charge_units": True}, "field `charge_units`"),
    ({"type": "throttle", "rate_bytes_per_s": 10, "burst_balance": 1.5}, "$.layers[0].burst_balance"),
    ({"type": "delay", "delay_s": 0.1, "ops": ["lookup", "getattr"], "skip_sequential": True},
     "field `skip_sequential`: only reads and writes are sequential"),
    ({"type": "delay", "delay_s": 0.1, "skip_sequential": "direct"}, "$.layers[0].skip_sequential"),
    ({"type": "delay", "delay_s": 0.1, "ops": ["read"], "write_behind": True},
     "field `write_behind`: it defers the latency of writes, and `ops` has no `write`"),
    ({"type": "delay", "delay_s": 0.1, "write_behind": 1}, "$.layers[0].write_behind"),
    ({"type": "profile", "name": "gp3", "burst_balance": 0.5}, "field `burst_balance`: profile 'gp3' takes"),
    ({"type": "profile", "name": "st1", "burst_balance": -0.1}, "$.layers[0].burst_balance"),
    ({"type": "fault", "path_glob": "data/*"}, "field `path_glob`: 'data/*' can never match: every path inside "
                                               "the volume starts with '/' (did you mean '/data/*'?)"),
    ({"type": "delay", "delay_s": 0.1, "path_glob": "[!/]*"}, "field `path_glob`: '[!/]*' can never match"),
    ({"type": "quota"}, "give at least one of them"),
    ({"type": "quota", "bytes": 10, "errno": "EIO"}, "$.layers[0].errno"),
    ({"type": "quota", "bytes": 10, "path_glob": "/a"}, "whole volume"),
    ({"type": "metadata", "mode": 0o17777}, "$.layers[0].mode"),
    ({"type": "metadata", "ops": ["read"]}, "metadata layers act only on"),
    ({"type": "delay", "delay_s": 0.1, "mode": "ceiling"}, "$.layers[0].mode"),
    ({"type": "delay", "delay_s": 0.1, "mode": 1}, "$.layers[0].mode"),
    ({"type": "metadata", "readdir_order": "random"}, "$.layers[0].readdir_order"),
    ({"type": "metadata", "readdir_order": "shuffle", "ops": ["getattr"]}, "fields `ops` and `readdir_order`"),
    ({"type": "metadata", "ops": ["opendir"]}, "fields `ops` and `readdir_order`"),
    ({"type": "metadata", "ops": ["readdir"], "readdir_order": "shuffle"}, "metadata layers act only on"),
    ({"type": "profile", "name": "floppy"}, "$.layers[0].name"),
    ({"type": "profile", "name": "gp3", "iops": 100}, "field `iops`: 100 is below 3,000 (gp3 includes"),
    ({"type": "profile", "name": "gp3", "size_gib": 100}, "field `size_gib`: profile 'gp3' takes `iops`, "
                                                           "`rate_bytes_per_s`"),
    ({"type": "profile", "name": "st1", "size_gib": 100}, "field `size_gib`: 100 is outside 125..16,384"),
    ({"type": "profile", "name": "gp2", "size_gib": 20000}, "field `size_gib`: 20,000 is outside 1..16,384"),
    ({"type": "profile", "name": "gp2", "iops": 6000}, "field `iops`: profile 'gp2' takes `size_gib`, `burst_balance`"),
    ({"type": "profile", "name": "hdd-7200", "iops": 10}, "profile 'hdd-7200' takes no sizing field"),
    ({"type": "profile", "name": "io2", "iops": 300000}, "field `iops`: 300,000 is outside 100..256,000"),
    ({"type": "profile", "name": "efs", "iops": 100},
     "field `iops`: profile 'efs' takes `size_gib`, `burst_balance`, `rate_bytes_per_s`"),
    ({"type": "profile", "name": "efs", "size_gib": 100, "rate_bytes_per_s": 1 << 20},
     "fields `size_gib` and `rate_bytes_per_s`: give at most one of them"),
    ({"type": "profile", "name": "efs", "burst_balance": 0.5}, "field `burst_balance`: only Bursting throughput"),
    ({"type": "profile", "name": "efs", "rate_bytes_per_s": 5 << 30}, "field `rate_bytes_per_s`: 5,368,709,120 is "
                                                                     "outside 1,048,576..3,579,838,464"),
    ({"type": "throttle", "iops": 10, "read_charge": 0.5}, "field `read_charge`: it scales what reads are charged"),
    ({"type": "throttle", "rate_bytes_per_s": 10, "read_charge": 0}, "$.layers[0].read_charge"),
    ({"type": "throttle", "rate_bytes_per_s": 10, "read_iops_charge": 2}, "field `read_iops_charge`: it sets what a "
                                                                          "read counts against the `iops` bucket"),
    ({"type": "throttle", "iops": 10, "read_iops_charge": 65}, "$.layers[0].read_iops_charge"),
    ({"type": "delay", "delay_s": 0.02, "ops": ["read"], "lookup_cache_s": 60},
     "field `lookup_cache_s`: it caches lookups, and `ops` has no `lookup`"),
    ({"type": "delay", "delay_s": 0.02, "lookup_cache_s": -1}, "$.layers[0].lookup_cache_s"),
    ({"type": "delay", "delay_s": 0.02, "ops": ["read"], "attr_cache": {}},
     "field `attr_cache`: it caches attributes, and `ops` has no `getattr`"),
    ({"type": "delay", "delay_s": 0.02, "attr_cache": {"file_min_s": 90}},
     "field `attr_cache.file_max_s`: must be at least `file_min_s`"),
    ({"type": "delay", "delay_s": 0.02, "attr_cache": {"dir_min_s": 5, "dir_max_s": 1}},
     "field `attr_cache.dir_max_s`: must be at least `dir_min_s`"),
    ({"type": "delay", "delay_s": 0.02, "attr_cache": {"acregmin": 3}}, "unknown field `acregmin`"),
    ({"type": "delay", "delay_s": 0.02, "attr_cache": {"file_min_s": -1}}, "$.layers[0].attr_cache.file_min_s"),
    ({"type": "profile", "name": "pd-standard", "size_gib": 0}, "$.layers[0].size_gib"),
    ({"type": "profile", "name": "s3", "iops": 5500}, "field `iops`: profile 's3' takes `rate_bytes_per_s`"),
    ({"type": "profile", "name": "pd-balanced", "size_gib": 5}, "field `size_gib`: 5 is outside 10..65,536"),
    ({"type": "profile", "name": "premium-ssd", "size_gib": 4096}, "field `size_gib`: 4,096 is outside 1..2,048"),
    ({"type": "profile", "name": "premium-ssd", "size_gib": 1000, "burst_balance": 0},
     "field `burst_balance`: a 1,000 GiB disk is a P30, and credit bursting is for P20 (512 GiB) and smaller"),
    ({"type": "profile", "name": "pd-ssd", "iops": 10000}, "field `iops`: profile 'pd-ssd' takes `size_gib`"),
    ({"type": "profile", "name": "filestore-basic-ssd", "size_gib": 1024},
     "field `size_gib`: 1,024 is outside 2,560..65,433 (Basic SSD instances are 2.5 TiB to 63.9 TiB)"),
    ({"type": "profile", "name": "filestore-zonal", "size_gib": 204800}, "field `size_gib`: 204,800 is outside "
                                                                         "1,024..102,400"),
    ({"type": "profile", "name": "filestore-basic-hdd", "iops": 600},
     "field `iops`: profile 'filestore-basic-hdd' takes `size_gib`"),
    ({"type": "profile", "name": "premium-ssd-v2", "iops": 100000}, "field `iops`: 100,000 is outside 3,000..80,000"),
    ({"type": "profile", "name": "premium-ssd-v2", "iops": 20000, "size_gib": 20},
     "field `iops`: 20,000 is outside 3,000..10,000 (a 20 GiB Premium SSD v2 takes at most 500 IOPS per GiB"),
    ({"type": "profile", "name": "premium-ssd-v2", "rate_bytes_per_s": 800_000_000},
     "field `rate_bytes_per_s`: 800,000,000 is outside 125,000,000..750,000,000"),
    ({"type": "delay", "delay_s": 0.1, "page_cache": "warm"}, "$.layers[0].page_cache` (one of: bypass, keep)"),
    # what would have been valid, for enumerated fields and the layer's type
    ({"type": "throttle", "iops": 5, "ops": ["open"]}, "at `$.layers[0].ops[0]` (one of: read, write)"),
    ({"type": "quota", "bytes": 5, "errno": "EIO"}, "(one of: EDQUOT, ENOSPC)"),
    ({"type": "nope"}, "(layer types: fault, delay, throttle, quota, metadata, s3_semantics, staged_writes, profile)"),
    ({"type": "delay", "delay_s": 1, "expires_at_s": 5}, "(a layer's deadline is `expires_at`;"),
    ({"type": "fault", "kind": "short_read", "page_cache": "keep"}, "field `page_cache`: kind 'short_read'"),
    ({"type": "fault", "kind": "short_write", "page_cache": "keep"}, "field `page_cache`: kind 'short_write'"),
    ({"type": "fault", "kind": "corrupt", "page_cache": "keep"}, "field `page_cache`: kind 'corrupt'"),
    ({"type": "quota", "bytes": 10, "page_cache": "keep"}, "field `page_cache`: a quota layer"),
    ({"type": "metadata", "mode": 0o644, "page_cache": "keep"}, "field `page_cache`: a metadata layer"),
    ({"type": "staged_writes"}, "Object missing required field `rate_bytes_per_s` - at `$.layers[0]`"),
    ({"type": "staged_writes", "rate_bytes_per_s": 0}, "$.layers[0].rate_bytes_per_s"),
    ({"type": "staged_writes", "rate_bytes_per_s": 1, "ops": ["write"]}, "field `ops`: a staged_writes layer"),
    ({"type": "staged_writes", "rate_bytes_per_s": 1, "append_upload_min_bytes": -1},
     "$.layers[0].append_upload_min_bytes"),
    ({"type": "staged_writes", "rate_bytes_per_s": 1, "page_cache": "keep"},
     "field `page_cache`: a staged_writes layer"),
    ({"type": "staged_writes", "rate_bytes_per_s": 1, "append_upload_requests": 4},
     "field `append_upload_requests`: appends are uploaded apart only with `append_upload_min_bytes`"),
    ({"type": "staged_writes", "rate_bytes_per_s": 1, "download_requests": 0}, "$.layers[0].download_requests"),
    ({"type": "staged_writes", "rate_bytes_per_s": 1, "upload_requests": 17}, "$.layers[0].upload_requests"),
    ({"type": "staged_writes", "rate_bytes_per_s": 1, "new_files": "staged", "max_streamed_files": 4},
     "field `max_streamed_files`: only streamed new files are limited"),
    ({"type": "staged_writes", "rate_bytes_per_s": 1, "max_streamed_files": 0}, "$.layers[0].max_streamed_files"),
    ({"type": "profile", "name": "gp3", "max_streamed_files": 4}, "field `max_streamed_files`: profile 'gp3' takes"),
    ({"type": "staged_writes", "rate_bytes_per_s": 1, "new_files": "cached"}, "$.layers[0].new_files"),
    ({"type": "staged_writes", "rate_bytes_per_s": 1, "keep_local_s": -1}, "$.layers[0].keep_local_s"),
    ({"type": "staged_writes", "rate_bytes_per_s": 1, "transfer_parallelism": 32},
     "field `transfer_parallelism`: transfers are split in blocks only with `transfer_block_bytes`"),
    ({"type": "staged_writes", "rate_bytes_per_s": 1, "single_upload_max_bytes": 1},
     "field `single_upload_max_bytes`: transfers are split in blocks only with `transfer_block_bytes`"),
    ({"type": "staged_writes", "rate_bytes_per_s": 1, "transfer_block_bytes": 1, "transfer_parallelism": 65},
     "$.layers[0].transfer_parallelism"),
    ({"type": "staged_writes", "rate_bytes_per_s": 1, "transfer_block_bytes": 0}, "$.layers[0].transfer_block_bytes"),
    ({"type": "delay", "delay_s": 1, "ops": ["readdir"], "list_page_entries": 5000},
     "field `list_page_entries`: listings are paged in `floor` mode only"),
    ({"type": "delay", "delay_s": 1, "mode": "floor", "ops": ["lookup"], "list_page_entries": 5000},
     "field `list_page_entries`: it pages directory listings, and `ops` has no `readdir`"),
])
def test_bad_layers_are_rejected_with_the_field(layer: dict, expected: str) -> None:
    with pytest.raises(PolicyError) as info:
        _one(layer)
    assert expected in str(info.value)


def test_a_bad_value_before_bytes_that_are_not_utf8_is_still_a_policy_error() -> None:
    # The typed decoder stops at the enum; the hint's second look at the document must not trip on the rest
    # (found by tests/proto/test_policy_fuzz.py: a UnicodeDecodeError escaped decode_policy).
    data = b'{"layers": [{"type": "delay", "delay_s": 1, "ops": ["x"]}, {"type": "delay", "pat\xcd_glob": "/a"}]}'
    with pytest.raises(PolicyError, match=r"\$\.layers\[0\]\.ops\[0\]"):
        decode_policy(data)


@pytest.mark.parametrize("pattern", ["*", "/a/[bc]", "/[!x]*", "/[]]", "/[!]]x", "/a]b", "?data*", "[/x]d*", "*.log"])
def test_balanced_globs_pass(pattern: str) -> None:
    check_glob(pattern)


@pytest.mark.parametrize("pattern", ["/[", "/a[b", "/[!", "/[]"])
def test_unbalanced_globs_fail(pattern: str) -> None:
    with pytest.raises(ValueError, match="unbalanced"):
        check_glob(pattern)


def test_every_profile_has_a_source_and_expands_to_throttle_and_delay() -> None:
    assert set(PROFILES) == set(typing.get_args(typing.get_type_hints(ProfileLayer)["name"]))
    for name, profile in PROFILES.items():
        assert profile.source and profile.summary
        layers = expand_profile(ProfileLayer(name=name))
        kinds = {type(layer).__name__ for layer in layers}
        # gcsfuse stages changes to existing objects (Mountpoint refuses them: s3_semantics); blobfuse2's
        # caching mode moves whole files at open and close, over a link the staged layer meters itself
        expected = {"gcs": {"ThrottleLayer", "DelayLayer", "StagedWritesLayer"},
                    "azure-blob": {"DelayLayer", "StagedWritesLayer"}}.get(name, {"ThrottleLayer", "DelayLayer"})
        assert kinds == expected, name


@pytest.mark.parametrize("name", sorted(PROFILES))
@pytest.mark.parametrize("op", ["read", "write", "lookup", "getattr", "fsync"])
def test_every_profile_narrowed_to_one_op_expands_to_valid_layers(name: str, op: str) -> None:
    # e.g. gcs on reads only: its read delay's lookup cache must not outlive the lookups it caches
    for layer in expand_profile(ProfileLayer(name=name, ops=frozenset({op}))):
        assert _one(msgspec.to_builtins(layer)) == layer


def test_a_profile_applied_to_reads_only_leaves_its_staged_writes_out() -> None:
    kinds = [type(layer).__name__ for layer in expand_profile(ProfileLayer(name="gcs", ops=frozenset({"read"})))]
    assert "StagedWritesLayer" not in kinds and "ThrottleLayer" in kinds
    [staged] = [layer for layer in expand_profile(ProfileLayer(name="gcs", ops=frozenset({"write"}), path_glob="/c/*"))
                if isinstance(layer, StagedWritesLayer)]
    assert staged.ops == frozenset() and staged.path_glob == "/c/*"


def test_profile_expansion_carries_glob_ops_and_expiry() -> None:
    layers = expand_profile(ProfileLayer(name="pd-standard", ops=frozenset({"read"}), path_glob="/d/*",
                                         expires_after_s=10))
    assert all(layer.path_glob == "/d/*" and layer.expires_after_s == 10 for layer in layers)
    assert all(layer.ops == frozenset({"read"}) for layer in layers)
    # pd-standard's one IOPS budget, narrowed to reads, still charges a read two of its 1,536 ops
    assert [(layer.iops, layer.read_iops_charge) for layer in layers if isinstance(layer, ThrottleLayer)] == [
        (1536, 2.0), (None, 1.0)]


def test_profile_expansion_carries_page_cache() -> None:
    assert {layer.page_cache for layer in expand_profile(ProfileLayer(name="gp3"))} == {"bypass"}
    layers = expand_profile(ProfileLayer(name="gp3", page_cache="keep"))
    assert layers and {layer.page_cache for layer in layers} == {"keep"}


def _limits(layer: dict) -> list[tuple[frozenset, int | None, int | None, int | None]]:
    return [(t.ops, t.iops, t.rate_bytes_per_s, t.burst_bytes) for t in expand_profile(_one(layer))
            if isinstance(t, ThrottleLayer)]


def test_a_profile_is_sized_by_its_published_rules() -> None:
    mib, both, reads, writes = 1 << 20, frozenset(), frozenset({"read"}), frozenset({"write"})
    assert _limits({"type": "profile", "name": "gp3", "iops": 6000, "rate_bytes_per_s": 500 * mib}) == [
        (both, 6000, 500 * mib, 0)]
    # gp2: 3 IOPS per GiB (100..16,000) from 5.4 million credits, bursting to 3,000 below 1,000 GiB
    assert _limits({"type": "profile", "name": "gp2"}) == [(both, 3000, 128 * mib, 0), (both, 300, None, 0)]
    assert _limits({"type": "profile", "name": "gp2", "size_gib": 10}) == [
        (both, 3000, 128 * mib, 0), (both, 100, None, 0)]
    assert _limits({"type": "profile", "name": "gp2", "size_gib": 500}) == [
        (both, 3000, 250 * mib, 0), (both, 1500, None, 0)]
    assert _limits({"type": "profile", "name": "gp2", "size_gib": 8000}) == [(both, 16000, 250 * mib, 0)]
    gp2_credits = [t for t in expand_profile(_one({"type": "profile", "name": "gp2", "burst_balance": 0}))
                   if isinstance(t, ThrottleLayer)][1]
    assert (gp2_credits.burst_ops, gp2_credits.burst_balance) == (5_400_000, 0.0)
    # st1, per TiB: 250 MiB/s burst throughput, 40 MiB/s baseline (each at most 500 MiB/s), 1 TiB of credits
    gib = 1 << 30
    assert _limits({"type": "profile", "name": "st1", "size_gib": 512}) == [
        (both, 500, 125 * mib, 0), (both, None, 20 * mib, 512 * gib)]
    assert _limits({"type": "profile", "name": "st1", "size_gib": 16384}) == [
        (both, 500, 500 * mib, 0), (both, None, 500 * mib, 16384 * gib)]
    credits = [t for t in expand_profile(_one({"type": "profile", "name": "st1", "burst_balance": 0.25}))
               if isinstance(t, ThrottleLayer)][1]
    assert (credits.burst_balance, credits.charge_units, credits.max_io_bytes) == (0.25, True, mib)
    # io2 Block Express: 100..256,000 provisioned IOPS in 256 KiB units, at most 4,000 MiB/s
    assert _limits({"type": "profile", "name": "io2", "iops": 64000}) == [(both, 64000, 4000 * mib, 0)]
    # pd-standard: 0.75 read and 1.5 write IOPS and 0.12 MiB/s per GiB, from resources reads and writes share
    pd_standard = {"type": "profile", "name": "pd-standard", "size_gib": 200}
    assert _limits(pd_standard) == [(both, 300, None, 0), (both, None, int(0.12 * mib * 200), 0)]
    assert [t.read_iops_charge for t in expand_profile(_one(pd_standard)) if isinstance(t, ThrottleLayer)] == [2.0, 1.0]
    assert _limits({"type": "profile", "name": "wan-nfs", "rate_bytes_per_s": 125_000_000}) == [
        (both, None, 125_000_000, 0)]
    # EFS Bursting, 2 TiB stored: 500 MiB/s per client, 200 MiB/s while credits last, 4.2 TiB of
    # credits earned at 50 KiB/s per GiB; Provisioned: the rate set (reads metered at a third)
    assert _limits({"type": "profile", "name": "efs", "size_gib": 2048}) == [
        (both, None, 500 * mib, 0), (both, None, 200 * mib, 0), (both, None, 100 * mib, int(4.2 * 1024 * gib))]
    assert _limits({"type": "profile", "name": "efs", "rate_bytes_per_s": 64 * mib}) == [
        (both, None, 500 * mib, 0), (both, None, 64 * mib, 0)]
    # Filestore: read and write limits apart; Basic HDD steps up at 10 TiB, Basic SSD is flat, Zonal scales per TiB
    assert _limits({"type": "profile", "name": "filestore-basic-hdd"}) == [
        (reads, 600, 100 * mib, 0), (writes, 1000, 100 * mib, 0)]
    assert _limits({"type": "profile", "name": "filestore-basic-hdd", "size_gib": 10240}) == [
        (reads, 1000, 180 * mib, 0), (writes, 5000, 120 * mib, 0)]
    assert _limits({"type": "profile", "name": "filestore-basic-ssd", "size_gib": 40000}) == [
        (reads, 60000, 1200 * mib, 0), (writes, 25000, 350 * mib, 0)]
    assert _limits({"type": "profile", "name": "filestore-zonal", "size_gib": 10240}) == [
        (reads, 92000, 2600 * mib, 0), (writes, 26000, 880 * mib, 0)]
    # pd-balanced / pd-ssd: a baseline plus a share per GiB; one IOPS budget, the throughput limit each way
    assert _limits({"type": "profile", "name": "pd-balanced", "size_gib": 100}) == [
        (both, 3600, None, 0), (reads, None, 168 * mib, 0), (writes, None, 168 * mib, 0)]
    assert _limits({"type": "profile", "name": "pd-ssd", "size_gib": 500}) == [
        (both, 21000, None, 0), (reads, None, 480 * mib, 0), (writes, None, 480 * mib, 0)]
    # Premium SSD: the tier holding the disk; P20 and smaller burst on credits for 30 minutes (256 KiB units)
    assert _limits({"type": "profile", "name": "premium-ssd", "size_gib": 300}) == [  # a P20
        (both, 3500, 170_000_000, 0), (both, 2300, None, 0), (both, None, 150_000_000, 20 * 10**6 * 1800)]
    p20_credits = [t for t in expand_profile(_one({"type": "profile", "name": "premium-ssd", "size_gib": 300,
                                                   "burst_balance": 0.5})) if isinstance(t, ThrottleLayer)][1]
    assert (p20_credits.burst_ops, p20_credits.burst_balance, p20_credits.max_io_bytes) == (1200 * 1800, 0.5, 256 << 10)
    assert _limits({"type": "profile", "name": "premium-ssd", "size_gib": 1024}) == [(both, 5000, 200_000_000, 0)]
    # Premium SSD v2: 3,000 IOPS and 125 MB/s included; up to 0.25 MB/s per provisioned IOPS
    assert _limits({"type": "profile", "name": "premium-ssd-v2"}) == [(both, 3000, 125_000_000, 0)]
    assert _limits({"type": "profile", "name": "premium-ssd-v2", "iops": 12000, "size_gib": 24,
                    "rate_bytes_per_s": 2_000_000_000}) == [(both, 12000, 2_000_000_000, 0)]
    # S3 through Mountpoint: the client's network throughput (10 Gbit/s unless given)
    assert _limits({"type": "profile", "name": "s3"}) == [(both, None, 1_250_000_000, 0)]
    assert _limits({"type": "profile", "name": "s3-express", "rate_bytes_per_s": 25 * 10**8 // 8}) == [
        (both, None, 312_500_000, 0)]
    # the defaults are what `interposer profiles` lists
    for name, profile in PROFILES.items():
        assert tuple(expand_profile(ProfileLayer(name=name))) == profile.layers


def test_a_sized_profile_round_trips_in_the_stored_policy() -> None:
    policy = decode_policy('{"layers": [{"type": "profile", "name": "st1", "size_gib": 2048}]}')
    assert json.loads(encode_policy(policy))["layers"][0]["size_gib"] == 2048


def test_an_empty_policy_and_a_policy_deadline_under_a_layers_name_are_explained() -> None:
    with pytest.raises(PolicyError, match="empty policy: expected a JSON object"):
        decode_policy(b" \n")
    with pytest.raises(PolicyError, match="a policy's deadline is `expires_at_s`"):
        decode_policy(b'{"expires_at": 5, "layers": []}')
