"""``interposer demo``: fio on an interposed volume while the policy changes live.

The demo starts the embedded stack, publishes a volume through the csi-node over
gRPC (as kubelet would), and runs fio through timed phases. Before each phase it
publishes the phase's policy on NATS and waits until the worker reports that
revision applied; after each phase it waits until the collector has counted every
op the worker served, so the collector's numbers for a phase are exact.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from interposer.proto import DelayLayer, FaultLayer, Policy, ThrottleLayer, encode_policy

from ._csi_client import POD_NAME_KEY, POD_NAMESPACE_KEY, NodeClient
from ._fio import FioResult, FioSpec, run_fio
from ._metrics import Samples, scrape, total
from ._policy_client import set_policy
from ._stack import EmbeddedStack

MIB = 1024 * 1024
DEMO_VOLUME = "demo"
#: Longest wait for the worker to apply a policy, or the collector to catch up, seconds.
DEFAULT_SETTLE_TIMEOUT_S = 15.0
#: Shortest unreported fio run before the first phase, seconds.
MIN_WARMUP_S = 2.0
#: Pause between polls of the collector, seconds.
POLL_INTERVAL_S = 0.1


class Phase(msgspec.Struct, frozen=True):
    """A named step of the demo and the policy in force during it."""

    name: str
    policy: Policy


PHASES: tuple[Phase, ...] = (
    Phase("baseline", Policy(description="no layers: plain passthrough")),
    Phase("delay", Policy(description="2 ms on every read and write",
                          layers=[DelayLayer(delay_s=0.002, ops=frozenset({"read", "write"}))])),
    Phase("throttle", Policy(description="20 MiB/s shared by reads and writes",
                             layers=[ThrottleLayer(rate_bytes_per_s=20 * MIB)])),
    Phase("fault", Policy(description="EIO on 1 % of reads",
                          layers=[FaultLayer(errno="EIO", probability=0.01, ops=frozenset({"read"}))])),
    Phase("cleared", Policy(description="layers removed")),
)


class CollectorCounts(msgspec.Struct, frozen=True):
    """What the collector counted for the demo volume during one phase.

    Attributes:
        ops: FUSE ops (every op, metadata included).
        bytes: bytes read plus bytes written.
        injected_faults: faults the fault layer injected.
    """

    ops: int
    bytes: int
    injected_faults: int


class PhaseResult(msgspec.Struct, frozen=True):
    """One row of the demo's report."""

    name: str
    policy: Policy
    fio: FioResult
    collector: CollectorCounts


class DemoReport(msgspec.Struct, frozen=True):
    """The whole demo: phases in the order they ran."""

    phases: list[PhaseResult]


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = DEFAULT_SETTLE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(POLL_INTERVAL_S)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class _Collector:
    """The collector's view of the demo volume."""

    def __init__(self, metrics_url: str, volume: str) -> None:
        self.url = metrics_url
        self.where = {"volume": volume}

    def samples(self) -> Samples:
        return scrape(self.url)

    def applied_revision(self) -> float:
        return total(self.samples(), "interposer_worker_policy_revision", self.where)

    def settled(self, not_before_s: float) -> Samples | None:
        """Samples once the collector counted every op the worker reports, else None.

        The worker's count comes from its heartbeat; one sent before ``not_before_s``
        (seconds since the epoch, e.g. when fio ended) may miss the last ops, and the
        collector can catch up with it while newer events are still on their way, so
        it does not count.
        """
        samples = self.samples()
        served = total(samples, "interposer_worker_ops_total", self.where)
        counted = total(samples, "interposer_ops_total", self.where)
        dropped = total(samples, "interposer_events_dropped_total", self.where)
        heartbeat_s = total(samples, "interposer_worker_last_heartbeat_timestamp_seconds", self.where)
        fresh = heartbeat_s >= not_before_s
        return samples if fresh and served > 0 and counted + dropped == served else None

    def wait_settled(self) -> Samples:
        """Samples once the collector counted every op the worker served until now."""
        result: list[Samples] = []
        now_s = time.time()

        def check() -> bool:
            samples = self.settled(now_s)
            if samples is not None:
                result.append(samples)
            return samples is not None

        _wait_for(check, "the collector to count every op of the worker")
        return result[-1]

    def counts(self, before: Samples, after: Samples) -> CollectorCounts:
        def delta(name: str) -> int:
            return round(total(after, name, self.where) - total(before, name, self.where))

        return CollectorCounts(ops=delta("interposer_ops_total"), bytes=delta("interposer_bytes_total"),
                               injected_faults=delta("interposer_injected_faults_total"))


def run_phases(metrics_url: str, nats_url: str, volume: str, spec: FioSpec, phase_seconds: float,
               phases: tuple[Phase, ...] = PHASES, on_phase: Callable[[PhaseResult], None] | None = None,
               nats_creds: str = "") -> DemoReport:
    """Run fio through ``phases`` on an already published volume.

    ``nats_creds`` is the ``--nats-creds`` file policies are set with (the stack's
    ``user`` role); ``""`` = anonymous.

    Raises:
        TimeoutError: the worker did not apply a policy, or the collector did not
            catch up, in time.
        FioError: fio failed.
        PolicyClientError: the policy service did not answer.
    """
    collector = _Collector(metrics_url, volume)
    run_fio(spec, None)  # lay the files out before the first phase is timed
    # An unreported run as long as a phase: the first seconds of I/O after start-up also
    # grow the worker's and the collector's heaps, which made the baseline the slowest
    # unlayered phase in most runs (measured: 10-20 % below "cleared" with a 2 s warm-up).
    run_fio(spec, max(MIN_WARMUP_S, phase_seconds))
    results = []
    for phase in phases:
        reply = asyncio.run(set_policy(nats_url, volume, encode_policy(phase.policy), creds_file=nats_creds))
        if not reply.ok:
            raise RuntimeError(f"policy of phase {phase.name} rejected: {reply.error}")
        revision = reply.revision or 0
        _wait_for(lambda: collector.applied_revision() >= revision,
                  f"the worker to apply policy revision {revision}")
        os.sync()  # every phase starts with no dirty pages of the last one still being written back
        before = collector.wait_settled()
        fio = run_fio(spec, phase_seconds)
        assert fio is not None
        after = collector.wait_settled()
        result = PhaseResult(phase.name, phase.policy, fio, collector.counts(before, after))
        results.append(result)
        if on_phase is not None:
            on_phase(result)
    return DemoReport(results)


def run_demo(phase_seconds: float, on_phase: Callable[[PhaseResult], None] | None = None,
             work_dir: Path | None = None, log: Callable[[str], None] = lambda _msg: None) -> DemoReport:
    """Start the embedded stack, publish a volume over CSI, run the phases, clean up.

    Everything (processes, mount, temp files) is gone when this returns or raises,
    KeyboardInterrupt included.
    """
    with tempfile.TemporaryDirectory(prefix="interposer-demo-", dir=work_dir) as tmp:
        root = Path(tmp)
        backing, target = root / "backing", root / "pods" / "fio" / "volume"
        backing.mkdir()
        stack = EmbeddedStack(root / "state")
        try:
            log("starting nats-server, policy service, collector and csi-node …")
            endpoints = stack.start()
            client = NodeClient(endpoints.csi_endpoint)
            try:
                log(f"NodePublishVolume {DEMO_VOLUME} → {target}")
                client.publish(DEMO_VOLUME, str(target), {
                    "backingPath": str(backing), POD_NAMESPACE_KEY: "demo", POD_NAME_KEY: "fio",
                })
                try:
                    log(f"running fio for {len(PHASES)} phases of {phase_seconds:g} s …")
                    return run_phases(endpoints.metrics_url, endpoints.nats_url, DEMO_VOLUME,
                                      FioSpec(directory=target), phase_seconds, on_phase=on_phase,
                                      nats_creds=endpoints.user_creds)
                finally:
                    client.unpublish(DEMO_VOLUME, str(target))
            finally:
                client.close()
        finally:
            stack.stop()


def report_json(report: DemoReport) -> bytes:
    """The report as the documented JSON object (``{"phases": [...]}``)."""
    return msgspec.json.encode(report)
