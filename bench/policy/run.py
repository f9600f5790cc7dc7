"""Policy-plane benchmark: propagation latency to real workers, and accepted changes per second.

Starts its own nats-server (JetStream) and policy service, then for each worker
count N starts N real fuse-workers (passthrough over temp dirs, so memory stays
small) and measures, per round, the time from sending ``interposer.policy.set.<vol>``
to each worker's ``WorkerStatus`` heartbeat reporting the new revision (workers
publish one at once when they apply a revision). All N volumes get their change
in the same round, concurrently (the harsher case: N service writes and N applies
at once); then *one at a time*: one volume's change per round, round-robin, with
all N workers running (what one user's change costs on a busy node). Then a *fleet push*: one selector policy
(``interposer.policy.select.bench-all``, ``{"all": true}``) that every worker picks up
from its ``_sel.>`` watch — latency from that one request to each worker's
heartbeat. Beside each it reports the CPU (``/proc/<pid>/stat``, idle subtracted)
the workers spend per applied revision and the policy service per request — the
figure to compare on a busy machine (CPU times count whole clock ticks, 10 ms, so
they need the full run's hundreds of changes; ``--quick``'s are noise). Then it measures how many changes per second
the policy service accepts (validated, stored in KV, answered) with
``--concurrency`` requests in flight.

Usage: ``.venv/bin/python bench/policy/run.py [--quick] [--json]``
(``--quick``: 1 and 3 workers, few rounds — a smoke run that proves the script works).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import msgspec
import nats

from interposer.cli._procs import Child, cpu_seconds, start_nats_server
from interposer.proto import WorkerStatus, decode_reply, subjects


def is_fuse_mount(path: Path) -> bool:
    """True if ``path`` is a FUSE mount point (per /proc/self/mountinfo)."""
    target = str(path.resolve())
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == target and fields[fields.index("-") + 1].startswith("fuse"):
            return True
    return False


DELAYS_S = [0.0001, 0.0002]  # alternate between two policies so every round is a real change


#: Single changes measured per round of concurrent ones (one at a time is cheap).
SINGLE_CHANGES_PER_ROUND = 5


def policy(round_no: int) -> bytes:
    return b'{"layers": [{"type": "delay", "delay_s": %g, "ops": ["read"]}]}' % DELAYS_S[round_no % 2]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def start_workers(root: Path, nats_url: str, count: int) -> list[tuple[subprocess.Popen, Path]]:
    workers = []
    for i in range(count):
        backing, mnt = root / f"b{i}", root / f"m{i}"
        backing.mkdir(parents=True)
        mnt.mkdir(parents=True)
        log = open(root / f"w{i}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "interposer.fuse_worker", "--backing-dir", str(backing),
                                 "--mountpoint", str(mnt), "--volume-id", f"bench-{i}", "--nats-url", nats_url,
                                 "--log-level", "WARNING"], stdout=log, stderr=subprocess.STDOUT)
        workers.append((proc, mnt))
    deadline = time.monotonic() + 60
    for proc, mnt in workers:
        while not is_fuse_mount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker for {mnt} did not mount")
            time.sleep(0.05)
    return workers


def stop_workers(workers: list[tuple[subprocess.Popen, Path]]) -> None:
    for proc, mnt in workers:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    for proc, _ in workers:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


class CpuMeter:
    """CPU the workers and the policy service spend per change, idle CPU subtracted.

    CPU times come from ``/proc/<pid>/stat`` (user + system, every thread): on a
    shared machine they are steadier than latency. Idle CPU (heartbeats, flush
    timers) is measured first for ``idle_s`` and subtracted pro rata.

    Args:
        worker_pids: the fuse-workers' pids.
        service_pid: the policy service's pid.
    """

    def __init__(self, worker_pids: list[int], service_pid: int) -> None:
        self.worker_pids = worker_pids
        self.service_pid = service_pid
        self._idle_per_s = (0.0, 0.0)
        self._begun: dict[str, tuple[float, float, float]] = {}
        #: phase → ``{"worker_cpu_ms_per_apply": …, "service_cpu_ms_per_change": …}``.
        self.results: dict[str, dict[str, float]] = {}

    def _now(self) -> tuple[float, float, float]:
        return (time.perf_counter(), sum(cpu_seconds(pid) for pid in self.worker_pids),
                cpu_seconds(self.service_pid))

    def measure_idle(self, idle_s: float) -> None:
        """Measure idle CPU per second for ``idle_s`` seconds (blocks)."""
        t0, w0, s0 = self._now()
        time.sleep(idle_s)
        t1, w1, s1 = self._now()
        self._idle_per_s = ((w1 - w0) / (t1 - t0), (s1 - s0) / (t1 - t0))

    def begin(self, phase: str) -> None:
        """Start measuring ``phase``."""
        self._begun[phase] = self._now()

    def end(self, phase: str, changes: int, applies: int | None = None) -> None:
        """End ``phase``: ``changes`` requests the service handled, ``applies`` revisions the
        workers applied (default ``changes``)."""
        t0, w0, s0 = self._begun.pop(phase)
        t1, w1, s1 = self._now()
        idle_w, idle_s = self._idle_per_s
        worker_s = max(0.0, w1 - w0 - idle_w * (t1 - t0))
        service_s = max(0.0, s1 - s0 - idle_s * (t1 - t0))
        self.results[phase] = {"worker_cpu_ms_per_apply": worker_s / (applies or changes) * 1e3,
                               "service_cpu_ms_per_change": service_s / changes * 1e3}


class Heartbeats:
    """The newest applied revision each worker reported, from its ``WorkerStatus`` heartbeats.

    Args:
        nc: connected client; :meth:`start` subscribes to ``interposer.status.*``.
    """

    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc
        #: volume → (applied revision, ``time.perf_counter()`` when its heartbeat arrived, s).
        self.applied: dict[str, tuple[int, float]] = {}
        #: volume → ``time.perf_counter()`` when its first heartbeat showing a revision ≥ the awaited one arrived.
        self._reached: dict[str, float] = {}
        self._awaited: dict[str, int] = {}
        self._event = asyncio.Event()
        self._decoder = msgspec.msgpack.Decoder(WorkerStatus)

    async def start(self, volumes: list[str], timeout_s: float = 30.0) -> None:
        """Subscribe and wait until every volume in ``volumes`` has sent a heartbeat."""
        await self.nc.subscribe(f"{subjects.STATUS_PREFIX}.*", cb=self._on_status)
        deadline = time.monotonic() + timeout_s
        while any(v not in self.applied for v in volumes):
            assert time.monotonic() < deadline, "workers never sent a heartbeat"
            await asyncio.sleep(0.05)

    async def _on_status(self, msg) -> None:  # noqa: ANN001
        status = self._decoder.decode(msg.data)
        now = time.perf_counter()
        self.applied[status.volume] = (status.policy_revision, now)
        awaited = self._awaited.get(status.volume)
        if awaited is not None and status.policy_revision >= awaited and status.volume not in self._reached:
            self._reached[status.volume] = now
            self._event.set()

    def expect(self, volumes: list[str]) -> None:
        """Start recording, for each of ``volumes``, the first heartbeat showing the revision it awaits.

        Call before sending the change (a heartbeat may beat the reply); the
        revision each must reach is set by :meth:`set_revision` once known.
        """
        self._awaited = dict.fromkeys(volumes, 1 << 62)
        self._reached = {}

    def set_revision(self, volume: str, revision: int) -> None:
        """The revision ``volume`` must reach (from the policy service's reply)."""
        self._awaited[volume] = revision
        if self.applied[volume][0] >= revision:  # its heartbeat came before the reply
            self._reached.setdefault(volume, self.applied[volume][1])

    async def wait(self, timeout_s: float = 10.0) -> dict[str, float]:
        """Wait until every expected volume reported applying its revision.

        Returns:
            volume → ``time.perf_counter()`` of the first heartbeat that showed it.

        Raises:
            AssertionError: a worker did not get there within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while any(v not in self._reached for v in self._awaited):
            assert time.monotonic() < deadline, f"a worker did not apply a revision within {timeout_s:g} s"
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        reached, self._awaited, self._reached = self._reached, {}, {}
        return reached


async def propagation(nats_url: str, count: int, rounds: int, fleet_rounds: int,
                      cpu: CpuMeter) -> tuple[list[float], list[float], list[float]]:
    """Latency samples, seconds: a change sent → the worker's heartbeat showing its revision.

    First ``rounds`` rounds of per-volume changes (``count`` concurrent
    ``interposer.policy.set.<vol>`` requests per round), then 5 × ``rounds`` single
    changes (one volume per round, round-robin), then ``fleet_rounds`` fleet
    pushes (one ``interposer.policy.select.bench-all`` request selecting every
    volume; one sample per worker). ``cpu`` is read around the first and last phase.

    Returns:
        ``(per-volume samples, one-at-a-time samples, fleet-push samples)``.
    """
    nc = await nats.connect(nats_url)
    volumes = [f"bench-{i}" for i in range(count)]
    beats = Heartbeats(nc)
    await beats.start(volumes)
    per_volume: list[float] = []
    cpu.begin("per-volume")
    for r in range(rounds):
        sent: dict[str, float] = {}
        beats.expect(volumes)

        async def push(volume: str) -> None:
            sent[volume] = time.perf_counter()
            reply = decode_reply((await nc.request(subjects.policy_set(volume), policy(r), timeout=10)).data)
            assert reply.ok, reply.error
            beats.set_revision(volume, reply.revision or 0)

        await asyncio.gather(*(push(v) for v in volumes))
        reached = await beats.wait()
        per_volume += [reached[v] - sent[v] for v in volumes]
        await asyncio.sleep(0.05)
    cpu.end("per-volume", count * rounds)
    single: list[float] = []
    for r in range(SINGLE_CHANGES_PER_ROUND * rounds):  # enough samples for a p99
        volume = volumes[r % count]
        beats.expect([volume])
        sent_s = time.perf_counter()
        reply = decode_reply((await nc.request(subjects.policy_set(volume), policy(rounds + r), timeout=10)).data)
        assert reply.ok, reply.error
        beats.set_revision(volume, reply.revision or 0)
        single.append((await beats.wait())[volume] - sent_s)
        await asyncio.sleep(0.02)
    fleet: list[float] = []
    cpu.begin("fleet")
    for r in range(fleet_rounds):
        beats.expect(volumes)
        body = b'{"selector": {"all": true}, "policy": %s}' % policy(r)
        sent_s = time.perf_counter()
        reply = decode_reply((await nc.request(subjects.policy_select("bench-all"), body, timeout=10)).data)
        assert reply.ok, reply.error
        for volume in volumes:
            beats.set_revision(volume, reply.revision or 0)
        reached = await beats.wait()
        fleet += [reached[v] - sent_s for v in volumes]
        await asyncio.sleep(0.05)
    cpu.end("fleet", fleet_rounds, applies=count * fleet_rounds)
    if fleet_rounds:  # the next worker count starts without the selector
        reply = decode_reply((await nc.request(subjects.policy_unselect("bench-all"), b"", timeout=10)).data)
        assert reply.ok, reply.error
    await nc.close()
    return per_volume, single, fleet


async def accept_rate(nats_url: str, changes: int, concurrency: int) -> float:
    """Changes per second the policy service accepted (``ok`` replies), no workers attached."""
    nc = await nats.connect(nats_url)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with semaphore:
            reply = decode_reply((await nc.request(subjects.policy_set(f"rate-{i % 16}"), policy(i), timeout=10)).data)
            assert reply.ok, reply.error

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(changes)))
    elapsed = time.perf_counter() - start
    await nc.close()
    return changes / elapsed


def _row(samples: list[float]) -> dict:
    return {"samples": len(samples), "p50_ms": statistics.median(samples) * 1e3,
            "p99_ms": percentile(samples, 99) * 1e3, "max_ms": max(samples) * 1e3}


@click.command()
@click.option("--quick", is_flag=True, help="Smoke run: 1 and 3 workers, 5 rounds, 100 changes.")
@click.option("--workers", "worker_counts", default="1,10,50", show_default=True, help="Worker counts.")
@click.option("--rounds", default=40, show_default=True, help="Changes per volume per worker count.")
@click.option("--fleet-rounds", default=20, show_default=True,
              help="Fleet pushes (one selector selecting every volume) per worker count.")
@click.option("--changes", default=2000, show_default=True, help="Requests for the accepted-changes/s figure.")
@click.option("--concurrency", default=32, show_default=True, help="Requests in flight for changes/s.")
@click.option("--json", "as_json", is_flag=True)
def main(quick: bool, worker_counts: str, rounds: int, fleet_rounds: int, changes: int, concurrency: int,
         as_json: bool) -> None:
    """Measure publish → applied latency (p50/p99) per volume and for a fleet push, CPU per
    change, and accepted changes/s."""
    counts = [1, 3] if quick else [int(c) for c in worker_counts.split(",")]
    if quick:
        rounds, fleet_rounds, changes = 5, 5, 100
    results: dict = {"machine": platform.node(), "cpus": os.cpu_count(), "propagation": []}
    with tempfile.TemporaryDirectory(prefix="interposer-bench-policy-") as tmp:
        root = Path(tmp)
        nats_child, url = start_nats_server(root / "nats")
        service = Child("policy", [sys.executable, "-m", "interposer.policy", "--nats-url", url,
                                   "--log-level", "WARNING"], root / "policy.log").start()
        try:
            service.wait_ready(lambda: (root / "policy.log").exists())
            time.sleep(1.0)  # subscriptions in place
            for count in counts:
                workers = start_workers(root / f"n{count}", url, count)
                cpu = CpuMeter([proc.pid for proc, _ in workers], service.proc.pid)
                try:
                    time.sleep(1.0)  # past start-up
                    cpu.measure_idle(2.0)
                    per_volume, single, fleet = asyncio.run(propagation(url, count, rounds, fleet_rounds, cpu))
                finally:
                    stop_workers(workers)
                row = {"workers": count, **_row(per_volume), "one_at_a_time": _row(single), "fleet": _row(fleet),
                       "cpu": cpu.results}
                results["propagation"].append(row)
                if not as_json:
                    per, push = cpu.results["per-volume"], cpu.results["fleet"]
                    click.echo(f"{count:>3} workers: publish → applied p50 {row['p50_ms']:.1f} ms, "
                               f"p99 {row['p99_ms']:.1f} ms, max {row['max_ms']:.1f} ms ({len(per_volume)} samples) "
                               f"| fleet push p50 {row['fleet']['p50_ms']:.1f} ms, "
                               f"p99 {row['fleet']['p99_ms']:.1f} ms, max {row['fleet']['max_ms']:.1f} ms "
                               f"({len(fleet)} samples)")
                    click.echo(f"             one change at a time: p50 {row['one_at_a_time']['p50_ms']:.1f} ms, "
                               f"p99 {row['one_at_a_time']['p99_ms']:.1f} ms, max "
                               f"{row['one_at_a_time']['max_ms']:.1f} ms ({len(single)} samples)")
                    click.echo(f"             CPU per applied revision: worker {per['worker_cpu_ms_per_apply']:.2f} ms "
                               f"(fleet push {push['worker_cpu_ms_per_apply']:.2f} ms); policy service per set "
                               f"{per['service_cpu_ms_per_change']:.2f} ms, per push "
                               f"{push['service_cpu_ms_per_change']:.2f} ms")
            results["accepted_changes_per_s"] = asyncio.run(accept_rate(url, changes, concurrency))
            if not as_json:
                click.echo(f"policy service: {results['accepted_changes_per_s']:.0f} accepted changes/s "
                           f"({changes} requests, {concurrency} in flight)")
        finally:
            service.stop()
            nats_child.stop()
    if as_json:
        click.echo(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
