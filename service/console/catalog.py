"""What the browser console needs to know about the served models, as one JSON document.

No IO: built from the loaded model repository (manifests and reference profiles).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from service.model_repository import ModelRepository
from service.onnx_classifier import OnnxClassifier
from service.reference_profile import ReferenceProfile

# The reference range shown next to a tabular value: the middle 98 % of the reference's
# held-out inputs, so one outlier in the training data does not widen it.
RANGE_PERCENTILES = (1.0, 99.0)
# A table row per feature is readable up to a few hundred features; wider inputs get no ranges.
MAX_RANGED_FEATURES = 256


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def feature_ranges(model: OnnxClassifier, profile: ReferenceProfile | None) -> list[dict[str, Any]]:
    """Per input feature of a tabular or vector model: its name, the reference's 1st and 99th
    percentile and mean. Empty for images, models without a profile, or very wide inputs."""
    layout = model.manifest.input_layout
    if layout.kind == "image" or profile is None:
        return []
    inputs = profile.holdout_inputs
    if inputs.ndim != 2 or len(inputs) == 0 or inputs.shape[1] > MAX_RANGED_FEATURES:
        return []
    values = inputs.astype(np.float64)
    low, high = np.nanpercentile(values, RANGE_PERCENTILES, axis=0)
    mean = np.nanmean(values, axis=0)
    names = layout.feature_names or []
    return [
        {
            "name": names[i] if i < len(names) else f"x{i}",
            "p1": _finite(low[i]),
            "p99": _finite(high[i]),
            "mean": _finite(mean[i]),
        }
        for i in range(values.shape[1])
    ]


def _version_view(model: OnnxClassifier, profile: ReferenceProfile | None) -> dict[str, Any]:
    manifest = model.manifest
    return {
        "version": model.version,
        "description": manifest.description,
        "class_names": manifest.class_names,
        "input_layout": manifest.input_layout.model_dump(mode="json", exclude_none=True),
        "has_reference": profile is not None,
        "feature_ranges": feature_ranges(model, profile),
    }


def console_catalog(repository: ModelRepository, label_lease_seconds: float) -> dict[str, Any]:
    """Every served model with its versions, class names, input layout and reference ranges,
    plus the lease length the console paces its heartbeats by."""
    return {
        "label_lease_seconds": label_lease_seconds,
        "range_percentiles": list(RANGE_PERCENTILES),
        "models": [
            {
                "name": name,
                "default_version": repository.get(name).version,
                "versions": [
                    _version_view(
                        repository.get(name, version),
                        repository.references.get((name, version)),
                    )
                    for version in repository.versions(name)
                ],
            }
            for name in repository.names
        ],
    }
