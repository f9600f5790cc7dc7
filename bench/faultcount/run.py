"""Does every EIO fio counts have an injected fault behind it?  (diagnostic, not a benchmark)

The demo's fault phase compares fio's error count with the faults the collector
counted; with the lean request loop the lead once saw fio count 9-20 more (3 of 9
demos). This script looks for such a mismatch in two settings and prints one line per
run, so a rate can be measured for each request loop:

* ``bare`` (default): one worker, no bus, the fault layer of the demo (EIO on 1 % of
  reads) on a temp dir; the demo's fio job (``FioSpec``) plus ``--error_dump=1``, so
  every failed I/O fio saw is printed (fio also counts a read that returns 0 bytes as
  EIO, "full resid", which is *not* dumped). Compared with the worker's own count of
  injected faults (its exit log line). Columns: fio ``total_err``, dumped I/O errors,
  short reads, injected.
* ``demo``: the embedded stack as the demo starts it; the fault phase (then "cleared")
  ``--runs`` times on one volume, with the demo's own counting, plus the window's
  dropped events and fault records and how long before fio's end the heartbeat that
  "settled" the window was sent (> 0 means the window may miss the phase's last ops).
  The worker runs with its default ``--session-loop`` there.

Usage: ``.venv/bin/python bench/faultcount/run.py [bare|demo] [--runs N] [--seconds S]
[--session-loop lean|pyfuse3]``. Exit status 1 if any run mismatched.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from interposer.cli import _demo
from interposer.cli._fio import FioSpec, parse_report
from interposer.cli._metrics import total

#: The demo's fault phase policy (``_demo.PHASES``), as a worker policy file.
FAULT_POLICY = '{"layers": [{"type": "fault", "errno": "EIO", "probability": 0.01, "ops": ["read"]}]}'


def _wait_mounted(mountpoint: Path, proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not mountpoint.is_mount():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not mount {mountpoint}")
        time.sleep(0.05)


def bare_run(root: Path, session_loop: str, seconds: float) -> bool:
    """One worker + one fio run; print the counts; True if fio's errors equal the injected faults."""
    backing, mnt = root / "backing", root / "mnt"
    backing.mkdir()
    mnt.mkdir()
    (root / "policy.json").write_text(FAULT_POLICY)
    log_path = root / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "interposer.fuse_worker", "--backing-dir", str(backing), "--mountpoint", str(mnt),
             "--volume-id", "faultcount", "--policy-file", str(root / "policy.json"),
             "--session-loop", session_loop], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_mounted(mnt, worker)
        spec = FioSpec(directory=mnt)
        subprocess.run(spec.argv(None), check=True, capture_output=True)
        proc = subprocess.run([*spec.argv(seconds), "--error_dump=1"], capture_output=True, text=True)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        worker.wait(30)
    report = json.loads(proc.stdout[proc.stdout.find("{"):])
    errors = parse_report(report).errors
    dumped = proc.stderr.count("io_u error")
    short = report["jobs"][0]["read"].get("short_ios", 0)
    found = re.search(r"(\d+) faults injected", log_path.read_text())
    injected = int(found.group(1)) if found else -1
    ok = errors == injected
    print(f"{session_loop}: fio total_err {errors}, dumped {dumped}, short reads {short}, injected {injected}"
          f"{'' if ok else '  MISMATCH'}", flush=True)
    return ok


def demo_runs(runs: int, seconds: float) -> bool:
    """The fault phase ``runs`` times on one demo stack; print each; True if all matched."""
    fio_end = [0.0]
    stale: list[float] = []
    run_fio, wait_settled, counts = _demo.run_fio, _demo._Collector.wait_settled, _demo._Collector.counts

    def timed_run_fio(spec, runtime_s):  # noqa: ANN001, ANN202 - wraps _demo.run_fio
        result = run_fio(spec, runtime_s)
        fio_end[0] = time.time()
        return result

    def noted_wait_settled(self):  # noqa: ANN001, ANN202
        samples = wait_settled(self)
        stale.append(fio_end[0] - total(samples, "interposer_worker_last_heartbeat_timestamp_seconds", self.where))
        return samples

    extra: list[dict] = []

    def noted_counts(self, before, after):  # noqa: ANN001, ANN202
        def delta(name: str) -> int:
            return round(total(after, name, self.where) - total(before, name, self.where))
        extra.append({"dropped": delta("interposer_events_dropped_total"),
                      "records": delta("interposer_fault_records_total"), "stale_s": round(stale[-1], 3)})
        return counts(self, before, after)

    _demo.run_fio, _demo._Collector.wait_settled, _demo._Collector.counts = (
        timed_run_fio, noted_wait_settled, noted_counts)
    by_name = {phase.name: phase for phase in _demo.PHASES}
    mismatches = 0

    def on_phase(result: _demo.PhaseResult) -> None:
        nonlocal mismatches
        if result.name != "fault":
            return
        ok = result.fio.errors == result.collector.injected_faults
        mismatches += not ok
        print(f"fault: fio errors {result.fio.errors}, injected {result.collector.injected_faults}, {extra[-1]}"
              f"{'' if ok else '  MISMATCH'}", flush=True)

    run_phases = _demo.run_phases

    def repeated(metrics_url, nats_url, volume, spec, phase_seconds, **kwargs):  # noqa: ANN001, ANN202
        kwargs.update(phases=(by_name["fault"], by_name["cleared"]) * runs, on_phase=on_phase)
        return run_phases(metrics_url, nats_url, volume, spec, phase_seconds, **kwargs)

    _demo.run_phases = repeated
    _demo.run_demo(seconds)
    return mismatches == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("mode", nargs="?", choices=("bare", "demo"), default="bare")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0, help="fio runtime per run, seconds")
    parser.add_argument("--session-loop", choices=("lean", "pyfuse3"), default="lean", help="bare mode only")
    args = parser.parse_args()
    if args.mode == "demo":
        sys.exit(0 if demo_runs(args.runs, args.seconds) else 1)
    ok = True
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="faultcount-") as tmp:
            ok &= bare_run(Path(tmp), args.session_loop, args.seconds)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
