"""NodeGetVolumeStats: capacity and usage of a published volume, and its condition.

Usage comes from ``statvfs(2)`` of the target path, i.e. through the FUSE mount:
the worker answers ``statfs`` with the backing file system's numbers, so a pod
sees the same figures ``df`` shows it. Bytes are ``f_blocks``/``f_bavail`` ×
``f_frsize`` (the fragment size is the unit statvfs counts blocks in, POSIX
``<sys/statvfs.h>``); ``used`` is ``total - f_bfree`` (reserved blocks count as
used, as in ``df``). Inodes are ``f_files``/``f_ffree``/``f_favail`` likewise.

The condition (CSI ``VOLUME_CONDITION``) is abnormal when the worker process is
gone or the mount does not answer ``statvfs`` within the timeout; it is what
kubelet turns into a ``VolumeConditionAbnormal`` event on the pod.
"""

from __future__ import annotations

import os

from interposer.proto.csi import csi_pb2

#: How long ``statvfs`` of a mount may take before it counts as not answering, seconds.
DEFAULT_STATS_TIMEOUT_S = 2.0

_Usage = csi_pb2.VolumeUsage


def usage_of(stats: os.statvfs_result) -> list[csi_pb2.VolumeUsage]:
    """Return the BYTES and INODES usage entries of a ``statvfs`` result.

    Args:
        stats: ``os.statvfs`` of the volume's target path.

    Returns:
        ``[bytes usage, inodes usage]``; every number is >= 0.
    """
    unit = stats.f_frsize or stats.f_bsize
    total_bytes = stats.f_blocks * unit
    return [
        _Usage(
            unit=_Usage.BYTES,
            total=total_bytes,
            available=stats.f_bavail * unit,
            used=max(0, total_bytes - stats.f_bfree * unit),
        ),
        _Usage(
            unit=_Usage.INODES,
            total=stats.f_files,
            available=stats.f_favail,
            used=max(0, stats.f_files - stats.f_ffree),
        ),
    ]


def volume_stats_response(
    *, worker_running: bool, worker_pid: int, stats: os.statvfs_result | None, target_path: str
) -> csi_pb2.NodeGetVolumeStatsResponse:
    """Build the NodeGetVolumeStats answer for a published volume.

    Args:
        worker_running: whether the volume's fuse-worker process is alive.
        worker_pid: its pid (for the condition message).
        stats: ``statvfs`` of the target, or None if it failed or timed out.
        target_path: the published path (for the condition message).

    Returns:
        Usage when ``stats`` is known, and a condition: abnormal with the reason
        when the worker is gone or the mount does not answer.
    """
    if not worker_running:
        message = f"fuse-worker pid {worker_pid} is not running: {target_path} answers ENOTCONN until it is restored"
        abnormal = True
    elif stats is None:
        message = f"the FUSE mount at {target_path} does not answer statfs (worker pid {worker_pid} hung?)"
        abnormal = True
    else:
        message = f"fuse-worker pid {worker_pid} serving"
        abnormal = False
    return csi_pb2.NodeGetVolumeStatsResponse(
        usage=usage_of(stats) if stats is not None and not abnormal else [],
        volume_condition=csi_pb2.VolumeCondition(abnormal=abnormal, message=message),
    )
