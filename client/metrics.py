"""Reading Triton's Prometheus /metrics endpoint (with prometheus_client's parser): the gate's own
counters, and any other sample by name and labels."""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from littlebig.contract import GateConfig


def read_samples(metrics_url: str, prefix: str = "", settle: bool = False) -> list[tuple[str, dict[str, str], float]]:
    """Every sample whose name starts with ``prefix``: (name, labels, value). ``settle``: first wait
    until the gate has handed the counts of its last answers to Triton (it does so once per
    metrics interval, not per answer)."""
    if settle:
        time.sleep(3 * GateConfig.metrics_interval_ms / 1000.0)
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith(prefix)
    ]


def sample_sum(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(value for n, have, value in samples if n == name and all(have.get(k) == v for k, v in labels.items()))


def gate_rows(metrics_url: str) -> dict[str, float]:
    """The gate's littlebig_rows_total, summed over gate models, by route label."""
    rows: dict[str, float] = {"little": 0.0, "big": 0.0}
    for name, labels, value in read_samples(metrics_url, "littlebig_rows", settle=True):
        if name == "littlebig_rows_total":
            rows[labels["route"]] = rows.get(labels["route"], 0.0) + value
    return rows
