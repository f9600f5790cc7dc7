"""Telemetry benchmark: collector ingest rate, and what per-op events cost the data path.

1. **Ingest**: a real collector (``python -m interposer.collector``, pinned to one core
   with ``os.sched_setaffinity`` when the machine has more than one) subscribes to a
   real nats-server; this script publishes synthetic ``EventBatch`` es (5,000 events,
   the worker's largest batch) as fast as NATS takes them and reads
   ``interposer_collector_events_total`` until every event is counted. Reported:
   events per second from the first publish to the last event counted, and the
   messages NATS dropped because the collector fell behind (slow consumer).
2. **Data-path cost**: fio (random 4 KiB reads, O_DIRECT, psync, 1 job: the op rate is
   what events cost per op) on a real mount with a collector running, once with
   events on and once with ``--no-events``; reported: IOPS of each, the loss in
   percent, and the events the worker dropped.

Usage: ``.venv/bin/python bench/telemetry/run.py [--quick] [--json]`` (root: FUSE).
``--quick`` is a smoke run of a few seconds that only proves the script works.
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
from interposer.cli._procs import Child, start_nats_server
from interposer.proto import EventBatch, OpEvent, subjects

#: Events per published batch (the worker's ``batch_max_events`` default).
BATCH_EVENTS = 5_000
#: Longest wait for a collector or a mount to come up, seconds.
READY_TIMEOUT_S = 30.0
#: Longest wait for the collector to count what was published, seconds.
DRAIN_TIMEOUT_S = 300.0


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


def bench_ingest(nats_url: str, work: Path, batches: int) -> dict:
    """Publish ``batches`` batches; time until the collector has counted every event."""
    import asyncio

    import nats

    cpu = 0 if (os.cpu_count() or 1) > 1 else None
    child, url = _collector(nats_url, work, "collector-ingest", cpu)
    try:
        payloads = [_batch(seq) for seq in range(1, min(batches, 20) + 1)]  # reuse: encoding is not measured
        expected = batches * BATCH_EVENTS

        async def publish() -> float:
            nc = await nats.connect(nats_url, name="bench-telemetry")
            start = time.perf_counter()
            for i in range(batches):
                await nc.publish(subjects.events("bench"), payloads[i % len(payloads)])
            await nc.flush()
            await nc.close()
            return start

        start = asyncio.run(publish())
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while True:
            samples = scrape(url)
            counted = total(samples, "interposer_collector_events_total")
            dropped = total(samples, "interposer_collector_slow_consumer_drops_total")
            if counted + dropped * BATCH_EVENTS >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - start
        return {"events": int(counted), "published": expected, "seconds": round(elapsed, 3),
                "events_per_s": round(counted / elapsed), "slow_consumer_drops": int(dropped),
                "collector_cpu": cpu}
    finally:
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


def _unmount(proc: subprocess.Popen, mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, capture_output=True)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False, capture_output=True)


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
                _unmount(proc, mountpoint)
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
    batches, runtime_s, size = (20, 1.0, "4M") if quick else (400, 20.0, "256M")
    with tempfile.TemporaryDirectory(prefix="interposer-bench-telemetry-") as tmp:
        work = Path(tmp)
        nats, nats_url = start_nats_server(work / "nats")
        try:
            results = {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "kernel": platform.release()},
                "quick": quick,
                "ingest": bench_ingest(nats_url, work, batches),
                "datapath": bench_datapath(nats_url, work, runtime_s, size),
            }
        finally:
            nats.stop()
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    ingest, data = results["ingest"], results["datapath"]
    click.echo(f"ingest: {ingest['events']:,} of {ingest['published']:,} events in {ingest['seconds']} s = "
               f"{ingest['events_per_s']:,} events/s (collector on CPU {ingest['collector_cpu']}), "
               f"{ingest['slow_consumer_drops']} batches dropped by NATS")
    click.echo(f"data path (fio randread 4 KiB O_DIRECT): events on {data['events-on']['iops']:,} IOPS "
               f"({data['events-on']['events_dropped']} events dropped), events off "
               f"{data['events-off']['iops']:,} IOPS: {data['loss_percent']} % loss")


if __name__ == "__main__":
    main()
