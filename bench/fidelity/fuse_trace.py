"""FUSE request latency as the kernel sees it: from a request's send to its answer.

fio's latency is what the application experiences; it includes being woken and
scheduled after the worker replied, which no worker-side change reaches. The
kernel's FUSE tracepoints (``fuse:fuse_request_send`` when a request is queued
on the device, ``fuse:fuse_request_end`` when its reply arrived; in
``fs/fuse/fuse_trace.h`` of recent kernels, 6.18 here) bound the worker's share:
queueing on ``/dev/fuse``, serving, the delay, replying. :class:`FuseRequestTrace`
records both with ``perf record -a`` (root) for one measurement and returns
every send→end time of one opcode on one mount.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

EVENTS = "fuse:fuse_request_send,fuse:fuse_request_end"
_LINE = re.compile(r"\s*(?P<t>\d+\.\d+):\s+fuse:(?P<ev>fuse_request_\w+):\s+connection (?P<conn>\d+) req (?P<req>\d+)"
                   r"(?: opcode \d+ \((?P<op>\w+)\))?")


def available() -> str | None:
    """None if FUSE requests can be traced here, else why not (no perf, not root, no tracepoints)."""
    if shutil.which("perf") is None:
        return "perf is not installed"
    if os.geteuid() != 0:
        return "tracing needs root"
    if not Path("/sys/kernel/tracing/events/fuse/fuse_request_send").exists():
        return "this kernel has no fuse:fuse_request_send tracepoint"
    return None


def request_latencies(perf_script: str, connection: int, opcode: str) -> list[float]:
    """Send→end seconds of every ``opcode`` request of ``connection`` in ``perf script`` text, ascending.

    Args:
        perf_script: output of ``perf script -F time,event,trace`` over the two events.
        connection: the FUSE connection (the mount's ``st_dev``).
        opcode: the kernel's name of the opcode, e.g. ``FUSE_READ``.
    """
    sent: dict[str, float] = {}
    latencies = []
    for line in perf_script.splitlines():
        m = _LINE.match(line)
        if m is None or int(m["conn"]) != connection:
            continue
        if m["ev"] == "fuse_request_send":
            if m["op"] == opcode:
                sent[m["req"]] = float(m["t"])
        elif m["req"] in sent:
            latencies.append(float(m["t"]) - sent.pop(m["req"]))
    return sorted(latencies)


class FuseRequestTrace:
    """Context manager: trace FUSE requests system-wide while the block runs.

    Args:
        mountpoint: the FUSE mount whose requests count (its ``st_dev`` is the
            tracepoints' ``connection``; FUSE superblocks have major 0, so the
            kernel's and user space's encodings agree).

    Raises:
        RuntimeError: on entry, when :func:`available` says tracing cannot work here.
    """

    def __init__(self, mountpoint: Path) -> None:
        self.connection = os.stat(mountpoint).st_dev
        self._dir = tempfile.TemporaryDirectory(prefix="fuse-trace-")
        self._data = Path(self._dir.name) / "perf.data"
        self._script = ""

    def __enter__(self) -> FuseRequestTrace:
        reason = available()
        if reason is not None:
            raise RuntimeError(f"cannot trace FUSE requests: {reason}")
        self._perf = subprocess.Popen(["perf", "record", "-q", "-a", "-e", EVENTS, "-o", str(self._data)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        self._perf.send_signal(signal.SIGINT)  # perf writes its file out on SIGINT
        self._perf.wait(60)
        self._script = subprocess.run(["perf", "script", "-i", str(self._data), "-F", "time,event,trace"],
                                      capture_output=True, text=True, check=False).stdout
        self._dir.cleanup()

    def latencies(self, opcode: str = "FUSE_READ") -> list[float]:
        """Send→end seconds of the traced ``opcode`` requests of this mount, ascending (after the block)."""
        return request_latencies(self._script, self.connection, opcode)
