"""Prometheus metrics, built on an injected registry (tests make a fresh one each).

Names follow Prometheus conventions: base units, `_total` for counters, histograms rather than
summaries. Label values are bounded: models and versions come from the repository, endpoints
from route templates, classes from manifests (capped), reasons and statuses from small sets.

With several API worker processes the values go to prometheus_client's multiprocess files
(shared_metrics.py); every gauge here therefore says how it merges over processes, and model
info is a gauge with the value 1 (the library's Info type has no multiprocess mode).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from service.batch_histogram import BatchHistogram
from service.scores import ScoredBatch
from service.shared_metrics import scrape_registry, shared_directory

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
PERCENTILE_BUCKETS = (10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 100.0)
# Above this many classes, per-class series are folded into "other" to bound cardinality.
MAX_CLASS_LABELS = 100


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._bound: dict[tuple[str, str], ModelMetrics] = {}
        # First in the registry, so a scrape folds in the predictions observed since the last
        # fold before it reads any series (see ModelMetrics.observe_batch).
        registry.register(_BeforeCollect(self.fold_observed))
        # What /metrics exposes, and where scrape-time collectors go: `registry` itself, or in
        # multiprocess mode a registry that merges every worker process's files.
        self.scrape_registry = scrape_registry(registry)
        self.shared_directory = shared_directory()
        model = ["model", "version"]
        self.requests = Counter(
            "edgeharvest_requests_total",
            "HTTP requests by model, version, endpoint (route template) and status code.",
            [*model, "endpoint", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "edgeharvest_request_duration_seconds",
            "Time from request start to response start, by endpoint.",
            [*model, "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "edgeharvest_inference_duration_seconds",
            "onnxruntime time per batch.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.scoring_duration = Histogram(
            "edgeharvest_scoring_duration_seconds",
            "Time to score a batch (confidence, kNN novelty, percentiles) and queue its events.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = BatchHistogram(
            "edgeharvest_batch_size",
            "Instances per inference call.",
            model,
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.predictions = Counter(
            "edgeharvest_predictions_total",
            "Predicted instances by predicted class.",
            [*model, "class"],
            registry=registry,
        )
        # Observed a batch at a time (see batch_histogram.py).
        self.confidence = BatchHistogram(
            "edgeharvest_prediction_confidence",
            "Max class probability of each prediction.",
            model,
            buckets=CONFIDENCE_BUCKETS,
            registry=registry,
        )
        self.novelty_percentile = BatchHistogram(
            "edgeharvest_prediction_novelty_percentile",
            "Novelty of each prediction as a percentile of the reference (0-100).",
            model,
            buckets=PERCENTILE_BUCKETS,
            registry=registry,
        )
        self.flagged = Counter(
            "edgeharvest_predictions_flagged_total",
            "Predictions flagged, by reason (low_confidence, novel).",
            [*model, "reason"],
            registry=registry,
        )
        self.monitoring_errors = Counter(
            "edgeharvest_monitoring_errors_total",
            "Batches whose scoring or event logging failed (the prediction was still served).",
            model,
            registry=registry,
        )
        # Adaptive batcher (batcher.py).
        self.batch_queue_duration = BatchHistogram(
            "edgeharvest_batch_queue_duration_seconds",
            "Time a request waited in the batcher's queue before its batch started.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_rejected = Counter(
            "edgeharvest_batch_rejected_total",
            "Requests refused with 503 because their expected queueing delay exceeded the bound.",
            model,
            registry=registry,
        )
        self.model_info = Gauge(
            "edgeharvest_model_info",
            "Served model versions (always 1).",
            [*model, "sha256", "platform"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.reference_loaded = Gauge(
            "edgeharvest_reference_profile_loaded",
            "1 when the model version has a reference profile (scores carry percentiles).",
            model,
            registry=registry,
            multiprocess_mode="livemax",
        )
        # Event log.
        self.event_buffer = Gauge(
            "edgeharvest_event_buffer_events",
            "Events waiting in the buffers of the API's worker processes.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.events_written = Counter(
            "edgeharvest_events_written_total",
            "Events written to Redis.",
            ["stream"],
            registry=registry,
        )
        self.events_dropped = Counter(
            "edgeharvest_events_dropped_total",
            "Events dropped before reaching Redis, by reason (buffer_full, shutdown, invalid).",
            ["reason"],
            registry=registry,
        )
        self.redis_write_errors = Counter(
            "edgeharvest_redis_write_errors_total",
            "Failed batch writes to Redis.",
            registry=registry,
        )
        self.redis_write_duration = Histogram(
            "edgeharvest_redis_write_duration_seconds",
            "Time to write one batch of events.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        for reason in ("buffer_full", "shutdown", "invalid"):
            self.events_dropped.labels(reason)
        self._request_series: dict[tuple[str, str, str, int], tuple[Counter, Histogram]] = {}
        self._event_buffer_depth: Callable[[], int] | None = None

    def register_model(
        self,
        name: str,
        version: str,
        sha256: str,
        platform: str,
        class_names: list[str],
        has_reference: bool,
    ) -> None:
        self.model_info.labels(name, version, sha256, platform).set(1)
        self.reference_loaded.labels(name, version).set(1 if has_reference else 0)
        replaced = self._bound.get((name, version))
        if replaced is not None:
            replaced.fold_observed()
        self._bound[(name, version)] = ModelMetrics(
            self, name, version, class_names, defer=self.shared_directory is None
        )

    def record_request(
        self, model: str, version: str, endpoint: str, status: int, seconds: float
    ) -> None:
        key = (model, version, endpoint, status)
        series = self._request_series.get(key)
        if series is None:
            # Bound once per label set: `labels()` costs a few us per call. The label values
            # are bounded (see the module docstring), so this cache is too.
            series = self._request_series[key] = (
                self.requests.labels(model, version, endpoint, str(status)),
                self.request_duration.labels(model, version, endpoint),
            )
        series[0].inc()
        series[1].observe(seconds)

    def unregister_model(self, name: str, version: str, sha256: str, platform: str) -> None:
        """A replaced model version's info series goes away (in multiprocess mode it reads 0:
        the files keep every series a process has written)."""
        self.model_info.labels(name, version, sha256, platform).set(0)
        self.model_info.remove(name, version, sha256, platform)

    def fold_observed(self) -> None:
        """Count every prediction observed so far into the series."""
        for model in list(self._bound.values()):
            model.fold_observed()

    def for_model(self, name: str, version: str) -> ModelMetrics:
        """The series of one model version, bound once: `labels()` costs a few us per call."""
        return self._bound[(name, version)]

    def watch_event_buffer(self, depth: Callable[[], int]) -> None:
        """Read the event buffer's depth at scrape time. The writer's own reports
        (`buffer_depth`) stop while it backs off from a dead Redis, just when the depth matters;
        once watched, they are ignored. In multiprocess mode a scrape cannot call into other
        processes: each one publishes its depth with `publish_event_buffer` instead."""
        self._event_buffer_depth = depth
        if self.shared_directory is None:
            self.event_buffer.set_function(depth)

    def publish_event_buffer(self) -> None:
        if self._event_buffer_depth is not None:
            self.event_buffer.set(self._event_buffer_depth())

    # EventLogMetrics protocol of the event writer.
    def buffer_depth(self, depth: int) -> None:
        self.event_buffer.set(depth)

    def written(self, stream_key: str, count: int) -> None:
        self.events_written.labels(stream_key).inc(count)

    def dropped(self, reason: str, count: int) -> None:
        self.events_dropped.labels(reason).inc(count)

    def write_error(self) -> None:
        self.redis_write_errors.inc()

    def write_latency(self, seconds: float) -> None:
        self.redis_write_duration.observe(seconds)


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


class _BeforeCollect(Collector):
    """Runs a function whenever the registry is collected; exposes nothing itself."""

    def __init__(self, before: Callable[[], None]) -> None:
        self._before = before

    def collect(self) -> Iterator[Metric]:
        self._before()
        return iter(())

    def describe(self) -> Iterator[Metric]:
        return iter(())


class ModelMetrics:
    """The per-model-version children of the service's metrics, bound at start-up."""

    # Scored batches wait until they hold this many predictions, then are counted at once.
    FOLD_PREDICTIONS = 512

    def __init__(
        self,
        metrics: ServiceMetrics,
        name: str,
        version: str,
        class_names: list[str],
        *,
        defer: bool = True,
    ) -> None:
        labels = (name, version)
        self.inference_duration = metrics.inference_duration.labels(*labels)
        self.scoring_duration = metrics.scoring_duration.labels(*labels)
        self.monitoring_errors = metrics.monitoring_errors.labels(*labels)
        self.batch_size = metrics.batch_size.labels(*labels)
        self.confidence = metrics.confidence.labels(*labels)
        self.novelty_percentile = metrics.novelty_percentile.labels(*labels)
        self.low_confidence = metrics.flagged.labels(*labels, "low_confidence")
        self.novel = metrics.flagged.labels(*labels, "novel")
        self._queue_duration = metrics.batch_queue_duration.labels(*labels)
        self._rejected = metrics.batch_rejected.labels(*labels)
        names = [
            *class_names[:MAX_CLASS_LABELS],
            *(["other"] if len(class_names) > MAX_CLASS_LABELS else []),
        ]
        self._per_class = [metrics.predictions.labels(*labels, n) for n in names]
        self._defer = defer
        self._observed: list[ScoredBatch] = []
        self._observed_predictions = 0
        self._observed_lock = threading.Lock()

    def observe_batch(self, scored: ScoredBatch) -> None:
        """Count a scored batch in the prediction series (batch size, per class, confidence,
        novelty percentile, flags).

        On the request path this keeps the batch, and the batches kept are counted together
        once they hold FOLD_PREDICTIONS predictions, or when the registry is collected
        (`_BeforeCollect`): one pass of a dozen array operations over hundreds of predictions
        instead of one per batch, and a scrape still sees every prediction made before it.
        With several worker processes (multiprocess mode) a scrape reads the other processes'
        files and cannot fold what they keep, so each batch is counted at once.
        """
        if not self._defer:
            self._count([scored])
            return
        with self._observed_lock:
            self._observed.append(scored)
            self._observed_predictions += len(scored)
            if self._observed_predictions >= self.FOLD_PREDICTIONS:
                self._count_observed()

    def fold_observed(self) -> None:
        """Count the batches kept so far."""
        with self._observed_lock:
            self._count_observed()

    def _count_observed(self) -> None:
        """Count the kept batches and keep none. The caller holds the lock, so a scrape never
        runs while kept batches are out of the list but not yet in the series."""
        if self._observed:
            self._count(self._observed)
            self._observed = []
            self._observed_predictions = 0

    def _count(self, batches: list[ScoredBatch]) -> None:
        sizes = np.array([len(b) for b in batches], dtype=np.float64)
        self.batch_size.observe_many(sizes)
        predicted = _joined([b.predicted for b in batches])
        classes = np.bincount(np.minimum(predicted, MAX_CLASS_LABELS), minlength=1)
        for index in np.flatnonzero(classes).tolist():
            self._per_class[index].inc(int(classes[index]))
        self.confidence.observe_many(_joined([b.scores["max_probability"] for b in batches]))
        novelty = [b.percentiles["novelty"] for b in batches if "novelty" in b.percentiles]
        if novelty:
            self.novelty_percentile.observe_many(_joined(novelty))
        low = int(np.count_nonzero(_joined([b.low_confidence for b in batches])))
        novel = int(np.count_nonzero(_joined([b.novel for b in batches])))
        if low:
            self.low_confidence.inc(low)
        if novel:
            self.novel.inc(novel)

    # BatcherMetrics protocol of the adaptive batcher.
    def batch_ran(self, seconds: float) -> None:
        self.inference_duration.observe(seconds)

    def queue_waits(self, seconds: np.ndarray) -> None:
        self._queue_duration.observe_many(seconds)

    def rejected(self) -> None:
        self._rejected.inc()
