"""The worker finds its cgroup's memory limit (what its heartbeat reports beside its RSS).

The layouts are the kernel's: ``/proc/self/cgroup`` as cgroups(7) prints it and the
limit files of cgroup v1 and v2, written to a temporary tree (a test cannot move
itself between real hierarchies); the worker's end-to-end report, from a real cgroup,
is in ``tests/telemetry/test_telemetry_worker_status.py``.
"""

from __future__ import annotations

from pathlib import Path

from interposer.fuse_worker._cgroup import memory_limit_bytes

V1_NO_LIMIT = "9223372036854771712"  # what cgroup v1 prints for no limit with 4 KiB pages


def _tree(tmp_path: Path, membership: str, limits: dict[str, str]) -> tuple[str, str]:
    tmp_path.mkdir(exist_ok=True)
    proc = tmp_path / "cgroup"
    proc.write_text(membership)
    root = tmp_path / "sys-fs-cgroup"
    for relative, value in limits.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(value + "\n")
    return str(proc), str(root)


def test_cgroup_v2_limit_and_no_limit(tmp_path: Path) -> None:
    proc, root = _tree(tmp_path, "0::/kubepods/pod1/worker\n", {"kubepods/pod1/worker/memory.max": "1073741824"})
    assert memory_limit_bytes(proc, root) == 1 << 30
    proc, root = _tree(tmp_path / "max", "0::/kubepods/pod1/worker\n", {"kubepods/pod1/worker/memory.max": "max"})
    assert memory_limit_bytes(proc, root) is None


def test_the_tightest_limit_on_the_way_to_the_root_applies(tmp_path: Path) -> None:
    # The pod's limit is on its parent cgroup, the container's is unlimited: the pod's applies.
    proc, root = _tree(tmp_path, "0::/kubepods/pod1/worker\n", {
        "kubepods/memory.max": "8589934592",
        "kubepods/pod1/memory.max": "536870912",
        "kubepods/pod1/worker/memory.max": "max",
    })
    assert memory_limit_bytes(proc, root) == 512 << 20


def test_in_a_cgroup_namespace_only_its_own_cgroup_is_visible(tmp_path: Path) -> None:
    proc, root = _tree(tmp_path, "0::/\n", {"memory.max": "268435456"})
    assert memory_limit_bytes(proc, root) == 256 << 20


def test_cgroup_v1_memory_controller(tmp_path: Path) -> None:
    membership = "5:devices:/\n4:memory:/process_api/abc\n3:cpu,cpuacct:/\n0::/\n"
    proc, root = _tree(tmp_path, membership, {
        "memory/memory.limit_in_bytes": V1_NO_LIMIT,
        "memory/process_api/abc/memory.limit_in_bytes": "805306368",
    })
    assert memory_limit_bytes(proc, root) == 768 << 20  # v1's memory controller wins over the v2 line
    proc, root = _tree(tmp_path / "none", membership, {
        "memory/memory.limit_in_bytes": V1_NO_LIMIT,
        "memory/process_api/abc/memory.limit_in_bytes": V1_NO_LIMIT,
    })
    assert memory_limit_bytes(proc, root) is None


def test_unknown_when_nothing_can_be_read(tmp_path: Path) -> None:
    assert memory_limit_bytes(str(tmp_path / "missing"), str(tmp_path)) is None
    proc, root = _tree(tmp_path, "0::/a\n", {})
    assert memory_limit_bytes(proc, root) is None
