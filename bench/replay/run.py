"""Replay fidelity: does replaying a recording on other storage take as long as running the job there?

The question `interposer replay` answers for an ML researcher is "how long would my
job's I/O take on that storage?". This benchmark checks the answer against the truth:

1. a training-like input pipeline (``loader.py``: threads reading files whole with
   think time between them, and checkpoints) runs on a plain mount whose I/O a real
   collector records (``--record-dir``);
2. the same job runs for real on each storage below, from a cold page cache;
3. the recording is replayed (``interposer replay``, closed timing, the defaults) on
   each storage, prepared in the backing directory beforehand and from a cold page
   cache too.

Storages: the backing directory itself (native), a plain mount, and mounts with the
``gp3`` and ``st1`` profiles (``{"type": "profile", "name": …}``). Reported per
storage: the job's wall time, the replay's, and their ratio (1.00 = the replay
predicts the job); medians of ``--repeat`` rounds, the storages taking turns. Every
number comes from this one run.

Second, the replayer's own cost: ``--timing asap`` replay of single-threaded ``lstat``
ops (recorded getattrs of 1,000 files) in the native directory, against a Python loop
calling ``os.lstat`` on the same paths: µs per op of each, and their ratio.

Usage: ``.venv/bin/python bench/replay/run.py [--quick] [--json]`` (root: FUSE and
``drop_caches``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _host import HostMeter, machine  # noqa: E402
from _mounts import unmount  # noqa: E402

from interposer.cli._metrics import scrape, total  # noqa: E402
from interposer.cli._procs import Child, start_nats_server  # noqa: E402

HERE = Path(__file__).resolve().parent
INTERPOSER = Path(sys.executable).parent / "interposer"
READY_TIMEOUT_S = 30.0
#: The recorded volume.
VOLUME = "train"
#: Storages the job and its replay run on: name → policy (None: the native directory).
STORAGES: dict[str, dict | None] = {
    "native": None,
    "plain mount": {"layers": []},
    "gp3": {"layers": [{"type": "profile", "name": "gp3"}]},
    "st1": {"layers": [{"type": "profile", "name": "st1"}]},
}


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _dataset(root: Path, files: int, file_mib: int) -> None:
    (root / "data").mkdir(parents=True)
    block = os.urandom(file_mib << 20)
    for index in range(files):
        (root / "data" / f"sample-{index:05d}.bin").write_bytes(block)


class _Mount:
    """``interposer mount BACKING MOUNTPOINT`` as a user runs it; unmounted on exit."""

    def __init__(self, work: Path, backing: Path, name: str, policy: dict, nats_url: str = "") -> None:
        self.mountpoint = work / f"mnt-{name.replace(' ', '-')}"
        self.mountpoint.mkdir(exist_ok=True)
        policy_file = work / f"policy-{name.replace(' ', '-')}.json"
        policy_file.write_text(json.dumps(policy))
        argv = [str(INTERPOSER), "mount", str(backing), str(self.mountpoint), "--volume-id", VOLUME if nats_url
                else name.replace(" ", "-"), "--policy-file", str(policy_file)]
        if nats_url:
            argv += ["--nats-url", nats_url]
        self.log = work / f"mount-{name.replace(' ', '-')}.log"
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))

    def __enter__(self) -> Path:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mount failed: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        return self.mountpoint

    def __exit__(self, *exc: object) -> None:
        unmount(self.proc, self.mountpoint)


def _job(root: Path, options: list[str]) -> float:
    _drop_caches()
    out = subprocess.run([sys.executable, str(HERE / "loader.py"), str(root), *options], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)["wall_s"]


def _on(storage: str, work: Path, backing: Path, run) -> float:  # noqa: ANN001
    policy = STORAGES[storage]
    if policy is None:
        return run(backing)
    with _Mount(work, backing, storage, policy) as mountpoint:
        return run(mountpoint)


def _record(work: Path, dataset: Path, options: list[str]) -> tuple[Path, str, float]:
    nats, nats_url = start_nats_server(work / "nats")
    record_dir = work / "recordings"
    port_file = work / "collector.port"
    collector = Child("collector", [sys.executable, "-m", "interposer.collector", "--listen", "127.0.0.1:0",
                                    "--port-file", str(port_file), "--nats-url", nats_url, "--record-dir",
                                    str(record_dir)], work / "collector.log").start()
    try:
        collector.wait_ready(port_file.exists)
        url = f"http://127.0.0.1:{port_file.read_text().strip()}/metrics"
        collector.wait_ready(lambda: total(scrape(url), "interposer_collector_nats_connected") == 1)
        backing = work / "recorded"
        shutil.copytree(dataset, backing)
        with _Mount(work, backing, "recorded", {"layers": []}, nats_url) as mountpoint:
            # Replays start here (--since): the mount's own first requests, seconds before, are not the job's.
            since = dt.datetime.now(dt.UTC).isoformat()
            wall = _job(mountpoint, options)

            def counted() -> bool:
                samples = scrape(url)
                served = total(samples, "interposer_worker_ops_total", {"volume": VOLUME})
                return served > 0 and served == total(samples, "interposer_ops_total", {"volume": VOLUME})

            collector.wait_ready(counted, READY_TIMEOUT_S)
    finally:
        collector.stop()
        nats.stop()
    return record_dir, since, wall


def _replay(recordings: Path, since: str, work: Path, storage: str, round_: int) -> float:
    backing = work / f"replay-{storage.replace(' ', '-')}-{round_}"
    subprocess.run([str(INTERPOSER), "replay", str(recordings), "--since", since, "--target", str(backing),
                    "--prepare-only"], check=True, capture_output=True)

    def replay(target: Path) -> float:
        _drop_caches()
        out = subprocess.run([str(INTERPOSER), "replay", str(recordings), "--since", since, "--target", str(target),
                              "--no-prepare", "--json"], capture_output=True, text=True, check=True).stdout
        return json.loads(out)["replayed_wall_s"]

    try:
        return _on(storage, work, backing, replay)
    finally:
        shutil.rmtree(backing)


def _overhead(work: Path, ops: int) -> dict:
    """µs per op: an asap replay of ``ops`` recorded getattrs against ``os.lstat`` in a loop."""
    import datetime as dt_

    import msgspec

    from interposer.proto import EventBatch, OpEvent
    from interposer.proto.recording import recording_name, write_frame

    root = work / "overhead"
    (root / "data").mkdir(parents=True)
    for index in range(1000):
        (root / "data" / f"f{index:04d}").write_bytes(b"")
    (root / ".interposer-replay").write_bytes(b"")
    paths = [f"/data/f{index % 1000:04d}" for index in range(ops)]
    start = time.time_ns()
    events = [OpEvent("getattr", 2, path, 0, 0, 0, 0, start + index * 1000, 1000, pid=1)
              for index, path in enumerate(paths)]
    recordings = work / "overhead-rec"
    recordings.mkdir()
    with open(recordings / recording_name(dt_.datetime.now(dt_.UTC), "bench"), "wb") as out:
        for first in range(0, ops, 5000):
            write_frame(out, msgspec.msgpack.encode(EventBatch(volume="o", worker_id="w", seq=first // 5000 + 1,
                                                               events=events[first:first + 5000])))
    out = subprocess.run([str(INTERPOSER), "replay", str(recordings), "--target", str(root), "--timing", "asap",
                          "--json"], capture_output=True, text=True, check=True).stdout
    replayed_us = json.loads(out)["replayed_wall_s"] / ops * 1e6
    absolute = [str(root) + path for path in paths]
    begin = time.perf_counter()
    for path in absolute:
        os.lstat(path)
    loop_us = (time.perf_counter() - begin) / ops * 1e6
    return {"ops": ops, "replay_us_per_op": replayed_us, "lstat_loop_us_per_op": loop_us,
            "ratio": replayed_us / loop_us}


@click.command()
@click.option("--quick", is_flag=True, help="A smoke run (small dataset, one round).")
@click.option("--repeat", default=3, show_default=True, help="Rounds (medians are reported).")
@click.option("--json", "as_json", is_flag=True)
def main(quick: bool, repeat: int, as_json: bool) -> None:
    """Time a job and its replay on native, plain-mount, gp3 and st1 storage."""
    files, file_mib, threads = (32, 1, 2) if quick else (256, 1, 4)
    options = ["--threads", str(threads), "--checkpoint-every", "16" if quick else "32",
               "--checkpoint-mib", "4" if quick else "16"]
    repeat = 1 if quick else repeat
    host = HostMeter()
    with tempfile.TemporaryDirectory(prefix="interposer-bench-replay-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        dataset = work / "dataset"
        _dataset(dataset, files, file_mib)
        recordings, since, recorded_wall = _record(work, dataset, options)
        jobs: dict[str, list[float]] = {name: [] for name in STORAGES}
        replays: dict[str, list[float]] = {name: [] for name in STORAGES}
        overhead = _overhead(work, 20_000 if quick else 200_000)
        for round_ in range(repeat):
            names = list(STORAGES)
            names = names[round_ % len(names):] + names[:round_ % len(names)]  # rotate: drift hits all alike
            for name in names:
                backing = work / f"job-{round_}"
                shutil.copytree(dataset, backing)
                try:
                    jobs[name].append(_on(name, work, backing, lambda root: _job(root, options)))
                finally:
                    shutil.rmtree(backing)
                replays[name].append(_replay(recordings, since, work, name, round_))
    results = {
        "machine": machine(), "host": host.report(), "dataset": f"{files} × {file_mib} MiB",
        "job": options, "recorded_run_s": recorded_wall, "replayer_overhead": overhead,
        "storages": {name: {"job_s": statistics.median(jobs[name]), "replay_s": statistics.median(replays[name]),
                            "ratio": statistics.median(replays[name]) / statistics.median(jobs[name]),
                            "job_runs_s": jobs[name], "replay_runs_s": replays[name]} for name in STORAGES},
    }
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    click.echo(f"{results['machine']}; dataset {results['dataset']}; loader {' '.join(options)}; "
               f"recorded on a plain mount in {recorded_wall:.2f} s")
    click.echo(f"{'storage':<14}{'job (s)':>10}{'replay (s)':>12}{'replay / job':>14}   runs (job | replay)")
    for name, row in results["storages"].items():
        runs = " ".join(f"{v:.2f}" for v in row["job_runs_s"]) + " | " + " ".join(
            f"{v:.2f}" for v in row["replay_runs_s"])
        click.echo(f"{name:<14}{row['job_s']:>10.2f}{row['replay_s']:>12.2f}{row['ratio']:>14.2f}   {runs}")
    click.echo(f"replayer cost: {overhead['replay_us_per_op']:.1f} µs per op (asap, {overhead['ops']:,} lstat ops) "
               f"against {overhead['lstat_loop_us_per_op']:.1f} µs for os.lstat in a loop: "
               f"{overhead['ratio']:.1f}×")
    click.echo(results["host"])


if __name__ == "__main__":
    main()
