"""The fidelity bench's sampling ranges: an exact emulation's ratios fall inside them 95 % of the time.

``bench/fidelity`` prints, beside each latency and IOPS ratio, the range a perfect
emulation would show from the number of ops measured; a deviation inside it means
the run was too short to tell. Here the "runs" are draws from the target
distribution itself, so the only error is sampling: about 95 % of them must land
inside the range the bench prints for their size.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

from interposer.fuse_worker.layers import quantile
from interposer.proto.policy import FixedDistribution, LognormalDistribution

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "fidelity"))
from fidelity import Tally, Target, meta_target, sampling_range, with_think_time  # noqa: E402 - bench/fidelity/fidelity.py

RUNS = 2000


def _nearest_rank(sorted_draws: list[float], level: float) -> float:
    return sorted_draws[max(0, math.ceil(level * len(sorted_draws)) - 1)]


@pytest.mark.parametrize(("metric", "n"), [("p50", 441), ("p99", 441), ("p99", 5000), ("iops", 441)])
def test_exact_runs_fall_inside_the_printed_range_95_percent_of_the_time(metric: str, n: int) -> None:
    """s3's latency (log-normal, median 20 ms, σ 0.5) at queue depth 1 for 10 s: ~441 ops."""
    dist = LognormalDistribution(median_s=0.020, sigma=0.5)
    low, high = sampling_range(lambda level: quantile(dist, level), metric, n)
    rng = random.Random(11)
    target_p = {"p50": quantile(dist, 0.5), "p99": quantile(dist, 0.99)}
    target_mean = 0.020 * math.exp(0.5 ** 2 / 2)
    inside = 0
    for _ in range(RUNS):
        draws = sorted(rng.lognormvariate(math.log(0.020), 0.5) for _ in range(n))
        if metric == "iops":  # IOPS = qd / mean latency: achieved / target = target mean / sample mean
            ratio = target_mean / (sum(draws) / n)
        else:
            ratio = _nearest_rank(draws, 0.5 if metric == "p50" else 0.99) / target_p[metric]
        inside += low <= ratio <= high
    # 95 % nominal; the binomial spread of 2,000 runs is ±1.5 % (3 sigma), order statistics add a little
    assert 0.925 <= inside / RUNS <= 0.975, (metric, n, low, high, inside / RUNS)


def test_the_range_narrows_with_more_ops_and_vanishes_for_a_fixed_delay() -> None:
    lognormal = LognormalDistribution(median_s=0.020, sigma=0.5)
    short = sampling_range(lambda q: quantile(lognormal, q), "p99", 441)
    long = sampling_range(lambda q: quantile(lognormal, q), "p99", 44_100)
    assert short is not None and long is not None
    assert short[0] < long[0] < 1.0 < long[1] < short[1]
    fixed = FixedDistribution(delay_s=0.002)
    assert sampling_range(lambda q: quantile(fixed, q), "p99", 441) == (1.0, 1.0)
    assert sampling_range(lambda q: quantile(fixed, q), "p99", 0) is None  # nothing measured
    assert sampling_range(lambda q: quantile(fixed, q), "bw", 441) is None  # not a latency quantile


def test_the_summary_tells_a_miss_from_a_run_too_short_to_tell() -> None:
    tally = Tally()
    tally.add("on target", 1.04, None)
    tally.add("off target", 1.14, (1.0, 1.0))
    tally.add("too few ops", 0.86, (0.82, 1.19))
    tally.add("no target", None, None)
    report = tally.report()
    assert report.splitlines()[0] == ("# 3 cells with a target: 1 within ±10%, 1 outside, 1 outside but within "
                                      "what sampling alone gives (too few ops to tell)")
    assert "#   outside: off target" in report and "#   too few ops: too few ops" in report


def test_a_delay_bound_rate_target_counts_the_jobs_own_time_between_ops() -> None:
    """16 jobs, 1 ms per op, 50 µs of their own between ops: at most 16 / 1.05 ms, whatever the storage."""
    dist = FixedDistribution(delay_s=0.001)
    target = Target(iops=16_000.0, bw_bytes_per_s=16_000.0 * 4096, latency_quantile=lambda q: quantile(dist, q))
    got = {"iops": 16 / 0.00105, "mean": 0.001}
    adjusted = with_think_time(target, 16, got)
    assert adjusted.iops == pytest.approx(16 / 0.00105)
    assert adjusted.bw_bytes_per_s == pytest.approx(16 / 0.00105 * 4096)
    # a slower worker shows in the latency, not in the think time: the target stays, the ratio drops
    slow = {"iops": 16 / 0.00125, "mean": 0.0012}
    assert with_think_time(target, 16, slow).iops == pytest.approx(16 / 0.00105)
    # a throttle's rate is its own
    throttled = Target(iops=500.0, lat_mean_s=0.032)
    assert with_think_time(throttled, 16, got) is throttled


def test_a_gcs_rename_target_is_two_requests_and_one_rename_at_a_time_in_a_directory() -> None:
    """gcsfuse renames a file with a copy, then a delete: its target is the sum of two request draws, and a
    directory's lock lets one rename through at a time, so 16 jobs get the rate of one."""
    layers = [{"type": "profile", "name": "gcs"}]
    one = meta_target(layers, ("lookup",), 1)
    two = meta_target(layers, ("rename",), 1)
    draws = random.Random(3)
    sums = sorted(draws.lognormvariate(math.log(0.020), 0.5) + draws.lognormvariate(math.log(0.020), 0.5)
                  for _ in range(100_000))
    assert two.lat_p50_s == pytest.approx(_nearest_rank(sums, 0.5), rel=0.02)
    assert two.lat_p99_s == pytest.approx(_nearest_rank(sums, 0.99), rel=0.03)
    assert two.iops == pytest.approx(one.iops / 2)
    queued = meta_target(layers, ("rename",), 16)
    assert queued.iops == pytest.approx(two.iops) and queued.lat_p50_s is None
