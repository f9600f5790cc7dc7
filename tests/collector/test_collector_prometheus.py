"""A real Prometheus scrapes two collector replicas; PromQL sees what the workers published."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable

import pytest
from collector_helpers import CollectorProcess, PrometheusServer, batch_message, event, publish, wait_for

pytestmark = [pytest.mark.nats, pytest.mark.prometheus]

#: How long Prometheus may take to show published events (scrapes every 1 s), seconds.
PROMQL_TIMEOUT_S = 30.0
#: Every op in this test takes 3 ms: inside the (2.5 ms, 5 ms] bucket.
OP_DURATION_NS = 3_000_000


def test_prometheus_scrapes_the_collectors(nats_url: str, start_collector: Callable[..., CollectorProcess],
                                           start_prometheus: Callable[[list[int]], PrometheusServer]) -> None:
    replicas = [start_collector(), start_collector()]
    prometheus = start_prometheus([replica.port for replica in replicas])
    volume = f"prom-{uuid.uuid4().hex[:8]}"
    sum_ops = f'sum(interposer_ops_total{{volume="{volume}"}})'

    def publish_wave(first_seq: int, n_batches: int) -> None:
        publish(nats_url, [
            batch_message(volume, [event("read", result=4096, duration_ns=OP_DURATION_NS)] * 5
                          + [event("write", result=512, duration_ns=OP_DURATION_NS)] * 5, seq=seq)
            for seq in range(first_seq, first_seq + n_batches)
        ])

    wait_for(lambda: prometheus.scalar('count(up{job="interposer-collector"} == 1)') == 2,
             timeout_s=PROMQL_TIMEOUT_S, what="Prometheus scraping both collectors")

    # Two waves, so rate() over the window sees an increase (the first sample of a new
    # series is not one).
    publish_wave(1, 20)
    wait_for(lambda: prometheus.scalar(sum_ops) == 200, timeout_s=PROMQL_TIMEOUT_S, interval_s=0.5,
             what=f"{sum_ops} == 200")
    publish_wave(21, 20)
    wait_for(lambda: prometheus.scalar(sum_ops) == 400, timeout_s=PROMQL_TIMEOUT_S, interval_s=0.5,
             what=f"{sum_ops} == 400")
    read_bytes = f'sum(interposer_bytes_total{{volume="{volume}",direction="read"}})'
    assert prometheus.scalar(read_bytes) == 200 * 4096

    p99 = ('histogram_quantile(0.99, sum by (le, op) '
           f'(rate(interposer_op_duration_seconds_bucket{{volume="{volume}"}}[1m])))')

    def p99_by_op() -> dict[str, float] | None:
        result = {series["metric"]["op"]: float(series["value"][1]) for series in prometheus.query(p99)}
        return result if len(result) == 2 and not any(math.isnan(v) for v in result.values()) else None

    quantiles = wait_for(p99_by_op, timeout_s=PROMQL_TIMEOUT_S, interval_s=0.5, what=p99)
    for op, seconds in quantiles.items():
        assert 0.0025 < seconds <= 0.005, (op, seconds)
