"""The demo's "collector caught up" check (``_demo._Collector.settled``), on hand-made scrapes.

The e2e test runs the whole demo; this pins the one rule it cannot force: a worker
heartbeat older than the end of the measured window does not settle it, even when the
collector has counted every op that heartbeat reports (later events may still be on
their way, and the phase would lose its last ops).
"""

from __future__ import annotations

from interposer.cli._demo import _Collector

VOLUME = frozenset({("volume", "demo")})


def _scrape(served: float, counted: float, heartbeat_s: float) -> dict:
    return {("interposer_worker_ops_total", VOLUME): served, ("interposer_ops_total", VOLUME): counted,
            ("interposer_events_dropped_total", VOLUME): 0.0,
            ("interposer_worker_last_heartbeat_timestamp_seconds", VOLUME): heartbeat_s}


def _collector(scrape: dict) -> _Collector:
    collector = _Collector("http://unused", "demo")
    collector.samples = lambda: scrape  # type: ignore[method-assign]
    return collector


def test_a_fresh_heartbeat_with_every_op_counted_settles() -> None:
    assert _collector(_scrape(1000, 1000, heartbeat_s=105.0)).settled(not_before_s=100.0) is not None


def test_a_heartbeat_from_before_the_window_ended_does_not_settle() -> None:
    assert _collector(_scrape(1000, 1000, heartbeat_s=99.5)).settled(not_before_s=100.0) is None


def test_ops_not_yet_counted_do_not_settle() -> None:
    assert _collector(_scrape(1000, 990, heartbeat_s=105.0)).settled(not_before_s=100.0) is None
