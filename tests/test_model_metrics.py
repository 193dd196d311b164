"""The prediction series of a model (per class, confidence, novelty percentile, flags, batch
size): counted from kept batches, and a scrape still sees every prediction made before it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from service.metrics import ModelMetrics, ServiceMetrics
from service.scores import ScoredBatch
from tests.support import REPO_ROOT

MODEL = {"model": "m", "version": "1"}
CLASSES = ["cat", "dog", "emu"]


def scored(predicted: list[int], confidence: list[float], novelty: list[float]) -> ScoredBatch:
    percentiles = np.array(novelty, dtype=np.float32)
    return ScoredBatch(
        predicted=np.array(predicted),
        scores={"max_probability": np.array(confidence, dtype=np.float32)},
        percentiles={"novelty": percentiles},
        low_confidence=np.array(confidence, dtype=np.float32) <= 0.3,
        novel=percentiles >= 99.0,
    )


def service_metrics() -> tuple[CollectorRegistry, ServiceMetrics]:
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry)
    metrics.register_model("m", "1", "sha", "onnxruntime_onnx", CLASSES, True)
    return registry, metrics


def test_a_scrape_counts_every_prediction_observed_before_it() -> None:
    registry, metrics = service_metrics()
    model = metrics.for_model("m", "1")
    model.observe_batch(scored([0, 1, 1], [0.95, 0.25, 0.55], [10.0, 99.5, 50.0]))
    model.observe_batch(scored([2], [0.999], [99.95]))
    get = registry.get_sample_value
    assert get("edgeharvest_predictions_total", {**MODEL, "class": "cat"}) == 1
    assert get("edgeharvest_predictions_total", {**MODEL, "class": "dog"}) == 2
    assert get("edgeharvest_predictions_total", {**MODEL, "class": "emu"}) == 1
    assert get("edgeharvest_batch_size_count", MODEL) == 2
    assert get("edgeharvest_batch_size_sum", MODEL) == 4
    assert get("edgeharvest_batch_size_bucket", {**MODEL, "le": "1.0"}) == 1
    assert get("edgeharvest_batch_size_bucket", {**MODEL, "le": "4.0"}) == 2
    assert get("edgeharvest_prediction_confidence_count", MODEL) == 4
    assert get("edgeharvest_prediction_confidence_bucket", {**MODEL, "le": "0.3"}) == 1
    assert get("edgeharvest_prediction_confidence_bucket", {**MODEL, "le": "0.6"}) == 2
    assert get("edgeharvest_prediction_novelty_percentile_bucket", {**MODEL, "le": "99.0"}) == 2
    assert get("edgeharvest_prediction_novelty_percentile_count", MODEL) == 4
    assert get("edgeharvest_predictions_flagged_total", {**MODEL, "reason": "low_confidence"}) == 1
    assert get("edgeharvest_predictions_flagged_total", {**MODEL, "reason": "novel"}) == 2
    # Counted once: the next scrape shows the same, and later predictions add to it.
    assert get("edgeharvest_prediction_confidence_count", MODEL) == 4
    model.observe_batch(scored([0], [0.5], [20.0]))
    assert get("edgeharvest_predictions_total", {**MODEL, "class": "cat"}) == 2
    assert get("edgeharvest_prediction_confidence_count", MODEL) == 5


def test_kept_batches_are_counted_once_they_hold_the_fold_size() -> None:
    _, metrics = service_metrics()
    model = metrics.for_model("m", "1")
    batch = scored([1] * 16, [0.9] * 16, [50.0] * 16)
    for _ in range(ModelMetrics.FOLD_PREDICTIONS // 16 - 1):
        model.observe_batch(batch)
    # No scrape: nothing counted yet.
    assert model.confidence.counts.sum() == 0
    model.observe_batch(batch)
    assert model.confidence.counts.sum() == ModelMetrics.FOLD_PREDICTIONS
    assert model.batch_size.counts.sum() == ModelMetrics.FOLD_PREDICTIONS // 16


def test_a_model_registered_again_keeps_what_its_predecessor_kept() -> None:
    registry, metrics = service_metrics()
    metrics.for_model("m", "1").observe_batch(scored([0, 0], [0.9, 0.9], [1.0, 2.0]))
    metrics.register_model("m", "1", "sha", "onnxruntime_onnx", CLASSES, True)
    metrics.for_model("m", "1").observe_batch(scored([0], [0.9], [1.0]))
    assert (
        registry.get_sample_value("edgeharvest_predictions_total", {**MODEL, "class": "cat"}) == 3
    )


def test_scrapes_while_batches_are_observed_count_each_prediction_once() -> None:
    registry, metrics = service_metrics()
    model = metrics.for_model("m", "1")
    batch = scored([0, 1, 2], [0.9, 0.5, 0.2], [10.0, 50.0, 99.9])
    batches = 3000
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            registry.get_sample_value("edgeharvest_prediction_confidence_count", MODEL)

    scrapers = [threading.Thread(target=scrape) for _ in range(2)]
    for thread in scrapers:
        thread.start()
    try:
        for _ in range(batches):
            model.observe_batch(batch)
    finally:
        done.set()
        for thread in scrapers:
            thread.join()
    get = registry.get_sample_value
    assert get("edgeharvest_prediction_confidence_count", MODEL) == 3 * batches
    assert get("edgeharvest_batch_size_count", MODEL) == batches
    for name in CLASSES:
        assert get("edgeharvest_predictions_total", {**MODEL, "class": name}) == batches
    assert get("edgeharvest_predictions_flagged_total", {**MODEL, "reason": "novel"}) == batches


OBSERVE_IN_PROCESS = """
import numpy as np
from prometheus_client import CollectorRegistry
from service.metrics import ServiceMetrics
from service.scores import ScoredBatch

metrics = ServiceMetrics(CollectorRegistry())
metrics.register_model("m", "1", "sha", "onnxruntime_onnx", ["cat", "dog"], True)
metrics.for_model("m", "1").observe_batch(ScoredBatch(
    np.array([0, 1, 1]),
    {"max_probability": np.float32([0.9, 0.8, 0.2])},
    {"novelty": np.float32([1.0, 2.0, 99.5])},
    np.array([False, False, True]),
    np.array([False, False, True]),
))
# No scrape and no fold: the process leaves at once, as a worker that is killed would.
import os
os._exit(0)
"""


def test_with_several_processes_each_batch_is_counted_at_once(tmp_path: Path) -> None:
    """A scrape merges the other processes' files and cannot fold what they keep: in
    multiprocess mode nothing is kept."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run(
        [sys.executable, "-c", OBSERVE_IN_PROCESS], env=env, cwd=REPO_ROOT, check=True, timeout=60
    )
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    get = registry.get_sample_value
    assert get("edgeharvest_predictions_total", {**MODEL, "class": "dog"}) == 2
    assert get("edgeharvest_prediction_confidence_count", MODEL) == 3
    assert get("edgeharvest_batch_size_count", MODEL) == 1
    assert get("edgeharvest_predictions_flagged_total", {**MODEL, "reason": "novel"}) == 1
