"""Telemetry benchmark: collector ingest rate, and what per-op events cost the data path.

1. **Ingest**: a real collector (``python -m interposer.collector``) subscribes to a
   real nats-server; on a machine with more than one CPU the collector is pinned to
   CPU 0 and the publisher and nats-server to the others (``os.sched_setaffinity``),
   so the collector has one core to itself. This script publishes synthetic
   ``EventBatch`` es (5,000 events, the worker's largest batch) with at most
   :data:`WINDOW_BATCHES` published but not yet counted (read from
   ``interposer_collector_events_total``): enough to keep the collector busy, far less
   than NATS buffers for it. Publishing without such a window measures the buffers,
   not the collector: the backlog grows at the publisher's rate (hundreds of MB/s)
   until a buffer overflows. Reported: events per second from the first publish to
   the last event counted, events per CPU second of the collector (from
   ``/proc/<pid>/stat``; the number to trust on a busy machine), the ratio to the
   200k events/s goal, and every loss: batches the collector's NATS client dropped
   (slow consumer) and NATS disconnects. A run that stops making progress ends
   after :data:`STALL_TIMEOUT_S` and says so.
2. **Data-path cost**: fio (random 4 KiB reads, O_DIRECT, psync, 1 job: the op rate is
   what events cost per op) on a real mount with a collector running, once with
   events on and once with ``--no-events``; reported: IOPS of each, the loss in
   percent, and the events the worker dropped.

Usage: ``.venv/bin/python bench/telemetry/run.py [--quick] [--json]`` (root: FUSE).
The full run publishes 2,000 batches (10M events) and runs fio 20 s per case;
``--quick`` is a smoke run of a few seconds that only proves the script works. Exit
status 1 when the ingest lost events or stalled.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import msgspec

from interposer.cli._metrics import scrape, total
from interposer.cli._procs import Child, cpu_seconds, start_nats_server
from interposer.proto import EventBatch, OpEvent, subjects

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _mounts import unmount  # noqa: E402 - bench/_mounts.py

#: Events per published batch (the worker's ``batch_max_events`` default).
BATCH_EVENTS = 5_000
#: Longest wait for a collector or a mount to come up, seconds.
READY_TIMEOUT_S = 30.0
#: Most batches published but not yet counted by the collector (about 27 MB, 480k
#: events): covers :data:`POLL_INTERVAL_S` of ingest at several times the goal, and
#: stays well inside the collector's subscription buffer (4,096 messages, 64 MiB)
#: and the server's buffer per client (64 MiB).
WINDOW_BATCHES = 96
#: Gap between two reads of the collector's counters while the window is full,
#: seconds. Each read is a /metrics scrape that costs the collector ~2 ms of its core.
POLL_INTERVAL_S = 0.25
#: Gap between two reads once everything is published, seconds (times the end).
TAIL_POLL_INTERVAL_S = 0.02
#: A run whose counters (events counted plus batches dropped) do not move for this
#: long has lost events (the collector says how in its counters); seconds.
STALL_TIMEOUT_S = 30.0
#: The goal of issue #6, events per second one collector ingests on one core.
GOAL_EVENTS_PER_S = 200_000


def _connected(url: str) -> bool:
    try:
        return total(scrape(url), "interposer_collector_nats_connected") == 1
    except OSError:
        return False


def _collector(nats_url: str, work: Path, name: str, cpu: int | None) -> tuple[Child, str]:
    port_file = work / f"{name}.port"
    argv = [sys.executable, "-m", "interposer.collector", "--listen", "127.0.0.1:0", "--port-file",
            str(port_file), "--nats-url", nats_url, "--log-level", "WARNING"]
    child = Child(name, argv, work / f"{name}.log").start()
    if cpu is not None and child.proc is not None:
        os.sched_setaffinity(child.proc.pid, {cpu})
    child.wait_ready(port_file.exists, READY_TIMEOUT_S)
    url = f"http://127.0.0.1:{port_file.read_text().strip()}/metrics"
    child.wait_ready(lambda: _connected(url), READY_TIMEOUT_S)
    return child, url


def _batch(seq: int) -> bytes:
    now = time.time_ns()
    ops = ("read", "write", "getattr", "lookup", "open", "release")
    events = [OpEvent(ops[i % len(ops)], 2 + i % 50, f"/data/file{i % 50}", (i % 256) * 4096, 4096,
                      4096 if i % 6 < 2 else 0, 5 if i % 97 == 0 else 0, now, 20_000 + (i * 7919) % 2_000_000,
                      "EIO" if i % 97 == 0 else "", 0, 0, 1234, 1000, i % 50)
              for i in range(BATCH_EVENTS)]
    batch = EventBatch(volume="bench", worker_id="bench-worker", seq=seq, events=events, namespace="ns", pod="p")
    return msgspec.msgpack.encode(batch)


class _Progress:
    """The collector's loss-relevant counters, read from one /metrics scrape."""

    def __init__(self, url: str) -> None:
        samples = scrape(url)
        self.events = int(total(samples, "interposer_collector_events_total"))
        self.dropped_batches = int(total(samples, "interposer_collector_slow_consumer_drops_total"))
        self.disconnects = int(total(samples, "interposer_collector_nats_disconnects_total"))

    def batches_done(self) -> int:
        """Batches counted or dropped (every bench batch holds :data:`BATCH_EVENTS`)."""
        return self.events // BATCH_EVENTS + self.dropped_batches


def bench_ingest(nats_url: str, nats: Child, work: Path, batches: int) -> dict:
    """Publish ``batches`` batches, at most :data:`WINDOW_BATCHES` ahead of the collector.

    Returns:
        The result (see the module docstring); ``complete`` is False when events were
        lost or the run stalled.
    """
    import asyncio

    import nats as nats_client

    cpus = sorted(os.sched_getaffinity(0))
    collector_cpu = cpus[0] if len(cpus) > 1 else None
    child, url = _collector(nats_url, work, "collector-ingest", collector_cpu)
    assert child.proc is not None and nats.proc is not None
    others = set(cpus[1:]) if collector_cpu is not None else set(cpus)
    os.sched_setaffinity(nats.proc.pid, others)
    os.sched_setaffinity(0, others)
    try:
        payloads = [_batch(seq) for seq in range(1, min(batches, 20) + 1)]  # reuse: encoding is not measured
        expected = batches * BATCH_EVENTS

        async def publish() -> tuple[float, float, float, float, _Progress]:
            nc = await nats_client.connect(nats_url, name="bench-telemetry")
            cpu_start_s = cpu_seconds(child.proc.pid)
            start_s = time.perf_counter()
            progress = _Progress(url)
            published, moved_s = 0, time.monotonic()
            while True:
                while published < batches and published - progress.batches_done() < WINDOW_BATCHES:
                    await nc.publish(subjects.events("bench"), payloads[published % len(payloads)])
                    published += 1
                await nc.flush()
                await asyncio.sleep(POLL_INTERVAL_S if published < batches else TAIL_POLL_INTERVAL_S)
                before, progress = progress.batches_done(), _Progress(url)
                if progress.batches_done() != before:
                    moved_s = time.monotonic()
                if (progress.batches_done() >= batches or progress.disconnects  # a disconnect loses events
                        or time.monotonic() - moved_s > STALL_TIMEOUT_S):
                    break
            end_s = time.perf_counter()
            await nc.close()
            return start_s, end_s, cpu_start_s, cpu_seconds(child.proc.pid), progress

        start_s, end_s, cpu_start_s, cpu_end_s, progress = asyncio.run(publish())
        elapsed_s, cpu_s = end_s - start_s, cpu_end_s - cpu_start_s
        events_per_s = round(progress.events / elapsed_s)
        complete = progress.events == expected and progress.disconnects == 0
        result = {"events": progress.events, "published": expected, "seconds": round(elapsed_s, 3),
                  "events_per_s": events_per_s, "collector_cpu_seconds": round(cpu_s, 3),
                  "events_per_cpu_s": round(progress.events / cpu_s) if cpu_s else None,
                  "goal_events_per_s": GOAL_EVENTS_PER_S,
                  "goal_ratio": round(events_per_s / GOAL_EVENTS_PER_S, 2),
                  "slow_consumer_drops": progress.dropped_batches, "nats_disconnects": progress.disconnects,
                  "complete": complete, "collector_cpu": collector_cpu, "window_batches": WINDOW_BATCHES}
        if not complete:
            result["collector_log_tail"] = child.log_tail(10)
        return result
    finally:
        os.sched_setaffinity(0, cpus)
        os.sched_setaffinity(nats.proc.pid, cpus)
        child.stop()


def _mount(nats_url: str, work: Path, name: str, extra: list[str]) -> tuple[subprocess.Popen, Path]:
    backing, mountpoint = work / f"{name}-backing", work / f"{name}-mnt"
    backing.mkdir()
    mountpoint.mkdir()
    argv = [sys.executable, "-m", "interposer.fuse_worker", "--backing-dir", str(backing), "--mountpoint",
            str(mountpoint), "--volume-id", f"bench-{name}", "--nats-url", nats_url, "--log-level", "WARNING",
            *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.log", "wb"))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not os.path.ismount(mountpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker {name} did not mount: {(work / f'{name}.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, mountpoint


def _fio_iops(directory: Path, runtime_s: float, size: str) -> float:
    argv = ["fio", "--name=bench", f"--directory={directory}", "--ioengine=psync", "--direct=1", "--bs=4k",
            "--rw=randread", f"--size={size}", "--fallocate=truncate", "--time_based", f"--runtime={runtime_s:g}s",
            "--output-format=json"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"])


def bench_datapath(nats_url: str, work: Path, runtime_s: float, size: str) -> dict:
    """fio IOPS with events on and off, a collector consuming the events."""
    child, url = _collector(nats_url, work, "collector-datapath", None)
    result: dict = {}
    try:
        for name, extra in (("events-on", []), ("events-off", ["--no-events"])):
            proc, mountpoint = _mount(nats_url, work, name, extra)
            try:
                (mountpoint / "warm").write_bytes(b"")  # first op outside the measurement
                result[name] = {"iops": round(_fio_iops(mountpoint, runtime_s, size))}
                time.sleep(1.5)  # one heartbeat
                result[name]["events_dropped"] = int(total(scrape(url), "interposer_events_dropped_total",
                                                           {"volume": f"bench-{name}"}))
            finally:
                unmount(proc, mountpoint)
    finally:
        child.stop()
    on, off = result["events-on"]["iops"], result["events-off"]["iops"]
    result["loss_percent"] = round(100 * (off - on) / off, 1) if off else None
    return result


@click.command()
@click.option("--quick", is_flag=True, help="Smoke run of a few seconds (proves the script works).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
def main(quick: bool, as_json: bool) -> None:
    """Measure collector ingest (events/s on one core) and the data-path cost of events."""
    if shutil.which("fio") is None:
        raise click.ClickException("fio is missing: apt-get install fio")
    batches, runtime_s, size = (40, 1.0, "4M") if quick else (2000, 20.0, "256M")
    with tempfile.TemporaryDirectory(prefix="interposer-bench-telemetry-") as tmp:
        work = Path(tmp)
        nats, nats_url = start_nats_server(work / "nats")
        try:
            results = {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "kernel": platform.release()},
                "quick": quick,
                "ingest": bench_ingest(nats_url, nats, work, batches),
                "datapath": bench_datapath(nats_url, work, runtime_s, size),
            }
        finally:
            nats.stop()
    ingest, data = results["ingest"], results["datapath"]
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        _print(ingest, data)
    if not ingest["complete"]:
        raise click.ClickException("ingest lost events or stalled; the collector's log ends with:\n"
                                   + ingest["collector_log_tail"])


def _print(ingest: dict, data: dict) -> None:
    click.echo(f"ingest: {ingest['events']:,} of {ingest['published']:,} events in {ingest['seconds']} s = "
               f"{ingest['events_per_s']:,} events/s (collector on CPU {ingest['collector_cpu']}; "
               f"{ingest['events_per_cpu_s']:,} events per collector CPU second) = "
               f"{ingest['goal_ratio']} x the goal of {GOAL_EVENTS_PER_S:,} events/s; "
               f"{ingest['slow_consumer_drops']} batches dropped by the collector's NATS client, "
               f"{ingest['nats_disconnects']} NATS disconnects")
    click.echo(f"data path (fio randread 4 KiB O_DIRECT): events on {data['events-on']['iops']:,} IOPS "
               f"({data['events-on']['events_dropped']} events dropped), events off "
               f"{data['events-off']['iops']:,} IOPS: {data['loss_percent']} % loss")


if __name__ == "__main__":
    main()
