"""The data plane: what every transport (OIP REST, /v1 JSON, later the workers) asks of the models.

Routers take care of HTTP and delegate here, so the logic has one home.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from service import __version__
from service.batch_plan import RequestSpan
from service.batcher import AdaptiveBatcher, BatchingPolicy
from service.datatypes import OIP_TO_NUMPY
from service.errors import ManifestError, ModelNotReady
from service.inference_protocol import BINARY_EXTENSION
from service.metrics import ServiceMetrics
from service.model_repository import ModelRepository
from service.monitoring import PredictionMonitor
from service.onnx_classifier import OnnxClassifier, Prediction
from service.scores import ScoredBatch, score_output_names
from service.settings import Settings

logger = logging.getLogger("edgeharvest")

SERVER_NAME = "edgeharvest"


class MonitoredPrediction:
    """One request's share of a batch: its rows of the model's outputs and, when monitoring is
    on, of the batch's scores. The scores are sliced only if read: an OIP response takes its
    rows' JSON straight from the batch's (`scores_json_string`)."""

    __slots__ = ("_batch_scored", "_rows", "_scored", "prediction")

    def __init__(
        self, prediction: Prediction, batch_scored: ScoredBatch | None, rows: slice | None = None
    ) -> None:
        self.prediction = prediction
        self._batch_scored = batch_scored
        # None: the request is the whole batch.
        self._rows = rows
        self._scored: ScoredBatch | None = None

    @property
    def scored(self) -> ScoredBatch | None:
        """This request's scores; None when monitoring is off."""
        if self._rows is None or self._batch_scored is None:
            return self._batch_scored
        if self._scored is None:
            self._scored = self._batch_scored.slice(self._rows.start, self._rows.stop)
        return self._scored

    def scores_json_string(self) -> bytes | None:
        """This request's scored rows as a JSON string literal (see `RowsJson.string`)."""
        if self._batch_scored is None:
            return None
        return self._batch_scored.rows_json().string(self._rows)


def batching_policy(model: OnnxClassifier, settings: Settings) -> BatchingPolicy | None:
    """The model's batching, from its manifest and the settings; None when it is off.

    `EDGEHARVEST_BATCHING=on|off` decides for every model; `auto` follows the manifest's
    `batching.enabled` and batches models whose manifest is silent. Sizes come from the
    manifest, else from the settings.
    """
    config = model.manifest.batching
    if settings.batching == "auto":
        enabled = config is None or config.enabled is None or config.enabled
    else:
        enabled = settings.batching == "on"
    if not enabled:
        return None
    reason = model.unbatchable_reason()
    if reason is not None:
        where = f"model '{model.name}' version '{model.version}'"
        if config is not None and config.enabled and settings.batching == "auto":
            raise ManifestError(f"{where}: its manifest enables batching, but {reason}")
        logger.warning("%s is served without batching: %s", where, reason)
        return None
    max_batch_size = settings.batching_max_batch_size
    max_delay = settings.batching_max_queue_delay_seconds
    if config is not None:
        max_batch_size = config.max_batch_size or max_batch_size
        if config.max_queue_delay_seconds is not None:
            max_delay = config.max_queue_delay_seconds
    return BatchingPolicy(max_batch_size, max_delay)


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        metrics: ServiceMetrics,
        monitor: PredictionMonitor | None,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self.monitor = monitor
        # Fixed per model version; every inference request asks for them.
        self._score_outputs = {
            (m.name, m.version): []
            if monitor is None
            else score_output_names(
                m.manifest.outputs.logits is not None,
                (m.name, m.version) in repository.references,
            )
            for m in repository
        }
        for model in repository:
            metrics.register_model(
                model.name,
                model.version,
                model.manifest.sha256,
                model.manifest.platform,
                model.class_names,
                (model.name, model.version) in repository.references,
            )
        self.batchers: dict[tuple[str, str], AdaptiveBatcher[MonitoredPrediction]] = {}
        for model in repository:
            policy = batching_policy(model, settings)
            if policy is not None:
                self.batchers[(model.name, model.version)] = self._batcher(model, policy)

    def _batcher(
        self, model: OnnxClassifier, policy: BatchingPolicy
    ) -> AdaptiveBatcher[MonitoredPrediction]:
        def finish(
            batch: np.ndarray, prediction: Prediction, spans: Sequence[RequestSpan]
        ) -> list[MonitoredPrediction]:
            return self._finish(model, batch, prediction, spans)

        return AdaptiveBatcher(
            f"{model.name}:{model.version}",
            policy,
            model.predict,
            finish,
            offload_min_values=self.settings.threadpool_min_elements,
            metrics=self.metrics.for_model(model.name, model.version),
        )

    def _offload(self, values: int) -> bool:
        return values >= self.settings.threadpool_min_elements

    @staticmethod
    def _full_batch(model: OnnxClassifier, policy: BatchingPolicy) -> np.ndarray:
        spec = model.manifest.input
        shape = [policy.max_batch_size, *(2 if d == -1 else d for d in spec.shape[1:])]
        return np.zeros(shape, dtype=OIP_TO_NUMPY[spec.datatype])

    async def start(self) -> None:
        """Start the batchers, each warmed up on a full batch; then serve."""
        for (name, version), batcher in self.batchers.items():
            model = self.repository.get(name, version)
            await batcher.start(warm_up=self._full_batch(model, batcher.policy))
        # Everything loaded so far (libraries, models, routes: ~140k objects) lives as long as
        # the process. Frozen, the garbage collector stops scanning it: a full collection had
        # paused the event loop for ~90 ms under load (a p99 of 40 ms at 8 instances per
        # request). Unfrozen at stop, so a process that builds many apps (tests) frees them.
        gc.collect()
        gc.freeze()
        self.mark_ready()

    async def swap_in(
        self,
        name: str,
        models: list[OnnxClassifier],
        references: dict[tuple[str, str], Any],
        scorers: dict[tuple[str, str], Any],
    ) -> None:
        """Serve freshly loaded (and warmed-up) versions of `name` instead of the current ones.

        Their batchers are started and warmed up first; then one synchronous swap (no request
        sees half of it); then the replaced batchers drain what they had queued. Requests that
        already hold a replaced model finish on it.
        """
        # Metrics and score outputs first: additive, and the batchers report to them.
        for model in models:
            key = (model.name, model.version)
            self._score_outputs[key] = (
                []
                if self.monitor is None
                else score_output_names(
                    model.manifest.outputs.logits is not None, key in references
                )
            )
            self.metrics.register_model(
                model.name,
                model.version,
                model.manifest.sha256,
                model.manifest.platform,
                model.class_names,
                key in references,
            )
        started = {}
        for model in models:
            policy = batching_policy(model, self.settings)
            if policy is not None:
                batcher = self._batcher(model, policy)
                await batcher.start(warm_up=self._full_batch(model, policy))
                started[(model.name, model.version)] = batcher
        # From here to the drain nothing awaits: the swap is atomic on the event loop.
        replaced = self.repository.replace(name, models, references)
        loaded = {(m.name, m.version, m.manifest.sha256) for m in models}
        for model in replaced:
            if (model.name, model.version, model.manifest.sha256) not in loaded:
                self.metrics.unregister_model(
                    model.name, model.version, model.manifest.sha256, model.manifest.platform
                )
        if self.monitor is not None:
            for model in replaced:
                self.monitor.scorers.pop((model.name, model.version), None)
            self.monitor.scorers.update(scorers)
        drained = [
            self.batchers.pop(key)
            for key in ((m.name, m.version) for m in replaced)
            if key in self.batchers
        ]
        self.batchers.update(started)
        for model in models:
            model.ready = True
        for batcher in drained:
            await batcher.stop()

    async def stop(self) -> None:
        """Refuse new predictions and finish those already queued or running."""
        for model in self.repository:
            model.ready = False
        for batcher in self.batchers.values():
            await batcher.stop()
        gc.unfreeze()

    def mark_ready(self) -> None:
        for model in self.repository:
            model.ready = True

    def ready(self) -> bool:
        return all(model.ready for model in self.repository)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": [BINARY_EXTENSION]}

    def model(self, name: str, version: str | None = None) -> OnnxClassifier:
        return self.repository.get(name, version)

    def model_metadata(self, model: OnnxClassifier) -> dict[str, Any]:
        spec = model.manifest.input
        return {
            "name": model.name,
            "versions": self.repository.versions(model.name),
            "platform": model.manifest.platform,
            "inputs": [{"name": spec.name, "datatype": spec.datatype, "shape": spec.shape}],
            "outputs": [
                {"name": o.name, "datatype": o.datatype, "shape": o.shape} for o in model.outputs
            ],
            "parameters": {
                "version": model.version,
                "class_names": model.class_names,
                "score_outputs": self.score_outputs(model),
            },
        }

    def score_outputs(self, model: OnnxClassifier) -> list[str]:
        """Extra OIP outputs (scores, percentiles, flags) served when asked for by name."""
        return self._score_outputs[(model.name, model.version)]

    async def predict(
        self, model: OnnxClassifier, batch: np.ndarray, request_id: str
    ) -> MonitoredPrediction:
        if not model.ready:
            raise ModelNotReady(
                f"model '{model.name}' version '{model.version}' is not ready yet; retry shortly"
            )
        batcher = self.batchers.get((model.name, model.version))
        if batcher is not None:
            return await batcher.submit(batch, request_id)
        start = time.perf_counter()
        if self._offload(batch.size):
            prediction = await run_in_threadpool(model.predict, batch)
        else:
            prediction = model.predict(batch)
        self.metrics.for_model(model.name, model.version).batch_ran(time.perf_counter() - start)
        return self._finish(model, batch, prediction, [RequestSpan(request_id, 0, len(batch))])[0]

    def _finish(
        self,
        model: OnnxClassifier,
        batch: np.ndarray,
        prediction: Prediction,
        spans: Sequence[RequestSpan],
    ) -> list[MonitoredPrediction]:
        """Monitor a batch once, then give each request its rows."""
        scored = None
        if self.monitor is not None:
            try:
                scored = self.monitor.observe(model, batch, prediction, spans)
            except Exception:
                # Monitoring must never fail a prediction; the error is logged and counted.
                logger.exception("monitoring failed for model %s v%s", model.name, model.version)
                self.metrics.for_model(model.name, model.version).monitoring_errors.inc()
        if len(spans) == 1:
            return [MonitoredPrediction(prediction, scored)]
        return [
            MonitoredPrediction(
                prediction.slice(span.start, span.stop), scored, slice(span.start, span.stop)
            )
            for span in spans
        ]
