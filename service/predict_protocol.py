"""The simple JSON protocol of `POST /v1/models/{name}/predict`: pure parsing and encoding.

Request: `{"instances": [[...], ...], "return_probabilities": false}`; each instance is the model
input without its batch dimension, nested or flat. Response: one prediction per instance.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from service.datatypes import FLOAT_DATATYPES, OIP_TO_NUMPY, all_finite, request_array
from service.errors import InvalidInput
from service.inference_protocol import parse_json_document
from service.onnx_classifier import OnnxClassifier, Prediction
from service.scores import ScoredBatch

EXPECTED = 'an object {"instances": [instance, ...]}'


def parse_predict_request(
    body: bytes, model: OnnxClassifier, max_batch_size: int
) -> tuple[np.ndarray, bool]:
    """The input batch and whether all class probabilities were asked for."""
    document = parse_json_document(body, EXPECTED)
    instances = document.get("instances")
    spec = model.manifest.input
    instance_shape = spec.shape[1:]
    if not isinstance(instances, list):
        raise InvalidInput(f"'instances' is missing or not a list; expected {EXPECTED}")
    if not instances:
        raise InvalidInput("'instances' is empty; expected at least one instance")
    if len(instances) > max_batch_size:
        raise InvalidInput(
            f"'instances' holds {len(instances)} instances; the maximum batch size is "
            f"{max_batch_size} (EDGEHARVEST_MAX_BATCH_SIZE)"
        )
    return_probabilities = document.get("return_probabilities", False)
    if not isinstance(return_probabilities, bool):
        raise InvalidInput("'return_probabilities' must be true or false")
    dtype = OIP_TO_NUMPY[spec.datatype]
    try:
        batch = request_array(instances, dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(
            f"'instances' cannot be read as {spec.datatype} ({exc}); expected every instance to "
            f"hold numbers in the shape {instance_shape}"
        ) from None
    per_instance = batch[0].size if batch.ndim > 1 else 1
    fixed = all(d != -1 for d in instance_shape)
    if fixed and per_instance == math.prod(instance_shape) and batch.ndim >= 2:
        # Flat instances of an image-shaped model are reshaped: the values, not the nesting, count.
        batch = batch.reshape(len(instances), *instance_shape)
    if batch.ndim != len(spec.shape) or any(
        m != -1 and d != m for d, m in zip(batch.shape[1:], instance_shape, strict=True)
    ):
        raise InvalidInput(
            f"each instance has shape {list(batch.shape[1:])}; model '{model.name}' expects "
            f"instances of shape {instance_shape} (-1 = any)"
        )
    if spec.datatype in FLOAT_DATATYPES and not all_finite(batch):
        row = int(np.flatnonzero(~np.isfinite(batch.reshape(len(batch), -1)).all(axis=1))[0])
        raise InvalidInput(
            f"instance {row} holds NaN, infinity or a number outside the {spec.datatype} range; "
            "expected finite numbers"
        )
    return batch, return_probabilities


def encode_predict_response(
    model: OnnxClassifier,
    prediction: Prediction,
    scored: ScoredBatch | None,
    return_probabilities: bool,
) -> bytes:
    names = model.class_names
    probabilities = prediction.probabilities.tolist() if return_probabilities else None
    rows: list[dict[str, Any]]
    if scored is None:
        indices = prediction.probabilities.argmax(axis=1)
        top = prediction.probabilities[np.arange(len(indices)), indices]
        rows = [
            {"class_index": i, "class_name": names[i], "probability": p}
            for i, p in zip(indices.tolist(), top.tolist(), strict=True)
        ]
        if probabilities is not None:
            for row, probs in zip(rows, probabilities, strict=True):
                row["probabilities"] = probs
    else:
        # The scored rows already hold the predicted class and its probability (the max
        # probability score): no array work per request.
        rows = []
        for i, details in enumerate(scored.rows()):
            scores = details["scores"]
            row = {
                "class_index": details["predicted"],
                "class_name": names[details["predicted"]],
                "probability": scores["max_probability"],
            }
            if probabilities is not None:
                row["probabilities"] = probabilities[i]
            row["scores"] = scores
            row["percentiles"] = details["percentiles"]
            row["flags"] = details["flags"]
            rows.append(row)
    document = {"model_name": model.name, "model_version": model.version, "predictions": rows}
    return orjson.dumps(document)
