"""The batch histogram exposes exactly what prometheus_client's Histogram would."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from service.batch_histogram import BatchHistogram

BUCKETS = (0.1, 0.5, 1.0)


def test_same_series_as_a_plain_histogram() -> None:
    values = np.array([0.05, 0.1, 0.3, 0.5, 0.7, 1.0, 2.0, np.nan])
    batch_registry, plain_registry = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("h", "doc", ["model"], BUCKETS, batch_registry)
    plain = Histogram("h", "doc", ["model"], buckets=BUCKETS, registry=plain_registry)
    batch.labels("m").observe_many(values[:3])  # the small-batch loop
    batch.labels("m").observe_many(values[3:])
    batch.labels("m").observe_many(np.tile(values, 3))  # the vectorised path
    for value in np.tile(values[np.isfinite(values)], 4):
        plain.labels("m").observe(float(value))
    for suffix, labels in [
        ("_bucket", {"le": "0.1"}),
        ("_bucket", {"le": "0.5"}),
        ("_bucket", {"le": "1.0"}),
        ("_bucket", {"le": "+Inf"}),
        ("_count", {}),
        ("_sum", {}),
    ]:
        expected = plain_registry.get_sample_value(f"h{suffix}", {"model": "m", **labels})
        got = batch_registry.get_sample_value(f"h{suffix}", {"model": "m", **labels})
        assert got == expected, (suffix, labels)
    assert batch_registry.get_sample_value("h_bucket", {"model": "m", "le": "0.1"}) == 8
    assert b'h_bucket{le="+Inf",model="m"} 28.0' in generate_latest(batch_registry)
