"""The data plane: what every transport (OIP REST, /v1 JSON, later the workers) asks of the models.

Routers take care of HTTP and delegate here, so the logic has one home.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from service import __version__
from service.errors import ModelNotReady
from service.inference_protocol import BINARY_EXTENSION
from service.metrics import ServiceMetrics
from service.model_repository import ModelRepository
from service.monitoring import PredictionMonitor
from service.onnx_classifier import OnnxClassifier, Prediction
from service.scores import ScoredBatch, score_output_names
from service.settings import Settings

logger = logging.getLogger("edgeharvest")

SERVER_NAME = "edgeharvest"


@dataclass
class MonitoredPrediction:
    prediction: Prediction
    # None when monitoring is off.
    scored: ScoredBatch | None


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
        start = time.perf_counter()
        if batch.size >= self.settings.threadpool_min_elements:
            prediction = await run_in_threadpool(model.predict, batch)
        else:
            prediction = model.predict(batch)
        model_metrics = self.metrics.for_model(model.name, model.version)
        model_metrics.inference_duration.observe(time.perf_counter() - start)
        if self.monitor is None:
            return MonitoredPrediction(prediction, None)
        try:
            scored = self.monitor.observe(model, batch, prediction, request_id)
        except Exception:
            # Monitoring must never fail a prediction; the error is logged and counted.
            logger.exception("monitoring failed for model %s v%s", model.name, model.version)
            model_metrics.monitoring_errors.inc()
            return MonitoredPrediction(prediction, None)
        return MonitoredPrediction(prediction, scored)
