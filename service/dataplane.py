"""The data plane: what every transport (OIP REST, /v1 JSON, later the workers) asks of the models.

Routers take care of HTTP and delegate here, so the logic has one home.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from service import __version__
from service.errors import ModelNotReady
from service.inference_protocol import BINARY_EXTENSION
from service.model_repository import ModelRepository
from service.onnx_classifier import OnnxClassifier, Prediction
from service.settings import Settings

SERVER_NAME = "edgeharvest"


class DataPlane:
    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository = repository
        self.settings = settings

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
            "parameters": {"version": model.version, "class_names": model.class_names},
        }

    async def predict(self, model: OnnxClassifier, batch: np.ndarray) -> Prediction:
        if not model.ready:
            raise ModelNotReady(
                f"model '{model.name}' version '{model.version}' is not ready yet; retry shortly"
            )
        if batch.size >= self.settings.threadpool_min_elements:
            return await run_in_threadpool(model.predict, batch)
        return model.predict(batch)
