"""Reading the collector's Prometheus endpoint (text exposition format)."""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

#: ``{(sample_name, frozenset(labels.items())): value}``
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, timeout_s: float = 5.0) -> Samples:
    """Fetch and parse ``url``.

    Raises:
        OSError: the endpoint did not answer.
    """
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, name: str, where: Mapping[str, str] | None = None) -> float:
    """Sum of the samples called ``name`` whose labels include ``where``."""
    want = set((where or {}).items())
    return sum(value for (sample, labels), value in samples.items() if sample == name and want <= labels)
