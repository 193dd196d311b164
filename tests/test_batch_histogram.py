"""The batch histogram exposes exactly what prometheus_client's Histogram would, in one
process and merged over processes (multiprocess mode)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from service.batch_histogram import BatchHistogram
from tests.support import REPO_ROOT

BUCKETS = (0.1, 0.5, 1.0)
# Every series of a histogram with BUCKETS: name suffix and labels beside `model`.
SERIES = [
    ("_bucket", {"le": "0.1"}),
    ("_bucket", {"le": "0.5"}),
    ("_bucket", {"le": "1.0"}),
    ("_bucket", {"le": "+Inf"}),
    ("_count", {}),
    ("_sum", {}),
]


def assert_same_series(
    expected: tuple[CollectorRegistry, str], got: tuple[CollectorRegistry, str]
) -> None:
    """The histogram `got` (registry, name) has every series of `expected`, value for value."""
    for suffix, labels in SERIES:
        want = expected[0].get_sample_value(f"{expected[1]}{suffix}", {"model": "m", **labels})
        have = got[0].get_sample_value(f"{got[1]}{suffix}", {"model": "m", **labels})
        assert have == want, (suffix, labels)


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
    assert_same_series((plain_registry, "h"), (batch_registry, "h"))
    assert batch_registry.get_sample_value("h_bucket", {"model": "m", "le": "0.1"}) == 8
    assert b'h_bucket{le="+Inf",model="m"} 28.0' in generate_latest(batch_registry)


# Run in a fresh interpreter: prometheus_client picks its multiprocess mode at import.
OBSERVE_IN_PROCESS = """
import sys
import numpy as np
from prometheus_client import CollectorRegistry, Histogram
from service.batch_histogram import BatchHistogram
values = np.array([float(v) for v in sys.argv[1:]])
registry = CollectorRegistry()
batch = BatchHistogram("batch", "doc", ["model"], (0.1, 0.5, 1.0), registry)
batch.labels("m").observe_many(values)
plain = Histogram("plain", "doc", ["model"], buckets=(0.1, 0.5, 1.0), registry=registry)
for value in values[np.isfinite(values)]:
    plain.labels("m").observe(float(value))
"""


def test_processes_merge_like_plain_histograms(tmp_path: Path) -> None:
    """In multiprocess mode two processes' batch histograms merge into the same series as two
    processes' plain histograms (the small-batch loop and the vectorised path, one each)."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for values in (["0.05", "0.3", "nan"], ["0.1", "0.5", "0.7", "1.0", "2.0"] * 3):
        subprocess.run(
            [sys.executable, "-c", OBSERVE_IN_PROCESS, *values],
            env=env,
            cwd=REPO_ROOT,
            check=True,
            timeout=60,
        )
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    assert_same_series((registry, "plain"), (registry, "batch"))
    assert registry.get_sample_value("batch_count", {"model": "m"}) == 17
    assert registry.get_sample_value("batch_bucket", {"model": "m", "le": "0.5"}) == 8
