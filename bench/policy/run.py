"""Policy-plane benchmark: propagation latency to real workers, and accepted changes per second.

Starts its own nats-server (JetStream) and policy service, then for each worker
count N starts N real fuse-workers (passthrough over temp dirs, so memory stays
small) and measures, per round, the time from sending ``interposer.policy.set.<vol>``
to each worker's ``WorkerStatus`` heartbeat reporting the new revision (workers
publish one at once when they apply a revision). All N volumes get their change
in the same round, concurrently, as a fleet push would. Then it measures how many
changes per second the policy service accepts (validated, stored in KV, answered)
with ``--concurrency`` requests in flight.

Usage: ``.venv/bin/python bench/policy/run.py [--quick] [--json]``
(``--quick``: 1 and 3 workers, few rounds — a smoke run that proves the script works).
"""

from __future__ import annotations

import asyncio
import json
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

from interposer.cli._procs import Child, start_nats_server
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


async def propagation(nats_url: str, count: int, rounds: int) -> list[float]:
    """Latency samples, seconds: set sent → heartbeat with that revision, per volume and round."""
    nc = await nats.connect(nats_url)
    decoder = msgspec.msgpack.Decoder(WorkerStatus)
    applied: dict[str, tuple[int, float]] = {}
    event = asyncio.Event()

    async def on_status(msg) -> None:  # noqa: ANN001
        status = decoder.decode(msg.data)
        applied[status.volume] = (status.policy_revision, time.perf_counter())
        event.set()

    await nc.subscribe(f"{subjects.STATUS_PREFIX}.*", cb=on_status)
    volumes = [f"bench-{i}" for i in range(count)]
    deadline = time.monotonic() + 30
    while len([v for v in volumes if v in applied]) < count:  # every worker heartbeats
        assert time.monotonic() < deadline, "workers never sent a heartbeat"
        await asyncio.sleep(0.05)
    samples: list[float] = []
    for r in range(rounds):
        sent: dict[str, float] = {}

        async def push(volume: str) -> tuple[str, int]:
            sent[volume] = time.perf_counter()
            reply = decode_reply((await nc.request(subjects.policy_set(volume), policy(r), timeout=10)).data)
            assert reply.ok, reply.error
            return volume, reply.revision or 0

        revisions = dict(await asyncio.gather(*(push(v) for v in volumes)))
        deadline = time.monotonic() + 10
        while any(applied[v][0] < revisions[v] for v in volumes):
            assert time.monotonic() < deadline, "a worker did not apply a revision within 10 s"
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        samples += [applied[v][1] - sent[v] for v in volumes]
        await asyncio.sleep(0.05)
    await nc.close()
    return samples


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


@click.command()
@click.option("--quick", is_flag=True, help="Smoke run: 1 and 3 workers, 5 rounds, 100 changes.")
@click.option("--workers", "worker_counts", default="1,10,50", show_default=True, help="Worker counts.")
@click.option("--rounds", default=40, show_default=True, help="Changes per volume per worker count.")
@click.option("--changes", default=2000, show_default=True, help="Requests for the accepted-changes/s figure.")
@click.option("--concurrency", default=32, show_default=True, help="Requests in flight for changes/s.")
@click.option("--json", "as_json", is_flag=True)
def main(quick: bool, worker_counts: str, rounds: int, changes: int, concurrency: int, as_json: bool) -> None:
    """Measure publish → applied latency (p50/p99) and accepted changes/s."""
    counts = [1, 3] if quick else [int(c) for c in worker_counts.split(",")]
    if quick:
        rounds, changes = 5, 100
    results: dict = {"machine": platform.node(), "cpus": __import__("os").cpu_count(), "propagation": []}
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
                try:
                    samples = asyncio.run(propagation(url, count, rounds))
                finally:
                    stop_workers(workers)
                row = {"workers": count, "samples": len(samples),
                       "p50_ms": statistics.median(samples) * 1e3, "p99_ms": percentile(samples, 99) * 1e3,
                       "max_ms": max(samples) * 1e3}
                results["propagation"].append(row)
                if not as_json:
                    click.echo(f"{count:>3} workers: publish → applied p50 {row['p50_ms']:.1f} ms, "
                               f"p99 {row['p99_ms']:.1f} ms, max {row['max_ms']:.1f} ms ({len(samples)} samples)")
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
