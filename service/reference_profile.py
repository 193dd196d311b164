"""The reference profile of one model version: what "normal" looks like, measured on training data.

Stored as `reference.npz` next to the model (plain arrays, no pickle) with a JSON header. It
holds the kNN bank of L2-normalised embeddings, the sorted distribution of every score on a
held-out part of the reference (for percentiles), the class prior, and held-out samples of
probabilities, embeddings and inputs that the drift tests compare windows against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import ManifestError

REFERENCE_FILE = "reference.npz"
FORMAT_VERSION = 1


class ReferenceMismatch(ManifestError):
    """The profile was built with a different model file than the one being served."""


@dataclass
class ReferenceProfile:
    model_name: str
    model_version: str
    model_sha256: str
    k: int
    # kNN bank: L2-normalised embeddings and the class of each (label if known, else predicted).
    embeddings: np.ndarray
    embedding_classes: np.ndarray
    # Sorted held-out distribution of each score, for percentiles.
    score_distributions: dict[str, np.ndarray]
    class_prior: np.ndarray
    # Held-out samples for the drift tests.
    holdout_probabilities: np.ndarray
    holdout_embeddings: np.ndarray
    holdout_inputs: np.ndarray
    # Per-feature mean and standard deviation of the flattened input; the embedding of models
    # that name none is the standardised input.
    input_mean: np.ndarray
    input_std: np.ndarray
    embedding_source: str = "embedding"  # or "standardised_input"
    metadata: dict[str, Any] = field(default_factory=dict)

    def check_model(self, name: str, version: str, sha256: str) -> None:
        if self.model_sha256 != sha256:
            raise ReferenceMismatch(
                f"reference profile of model '{name}' version '{version}' was built with a "
                f"model whose sha256 is {self.model_sha256}, but the served model.onnx has "
                f"{sha256}; rebuild it with `edgeharvest reference build --model {name}`"
            )

    def save(self, path: Path) -> None:
        header = {
            "format_version": FORMAT_VERSION,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "model_sha256": self.model_sha256,
            "k": self.k,
            "embedding_source": self.embedding_source,
            "scores": sorted(self.score_distributions),
            "metadata": self.metadata,
        }
        arrays = {
            "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            "embeddings": self.embeddings.astype(np.float32),
            "embedding_classes": self.embedding_classes.astype(np.int64),
            "class_prior": self.class_prior.astype(np.float64),
            "holdout_probabilities": self.holdout_probabilities.astype(np.float32),
            "holdout_embeddings": self.holdout_embeddings.astype(np.float32),
            "holdout_inputs": self.holdout_inputs.astype(np.float32),
            "input_mean": self.input_mean.astype(np.float32),
            "input_std": self.input_std.astype(np.float32),
            **{f"score/{k}": v.astype(np.float32) for k, v in self.score_distributions.items()},
        }
        # np.savez appends .npz to names without it; write through a handle to keep the name.
        with path.open("wb") as f:
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> ReferenceProfile:
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(bytes(data["header"]).decode())
                if header.get("format_version") != FORMAT_VERSION:
                    raise ManifestError(
                        f"reference profile {path} has format version "
                        f"{header.get('format_version')}; this service reads {FORMAT_VERSION}"
                    )
                return cls(
                    model_name=header["model_name"],
                    model_version=header["model_version"],
                    model_sha256=header["model_sha256"],
                    k=int(header["k"]),
                    embeddings=data["embeddings"],
                    embedding_classes=data["embedding_classes"],
                    score_distributions={s: data[f"score/{s}"] for s in header["scores"]},
                    class_prior=data["class_prior"],
                    holdout_probabilities=data["holdout_probabilities"],
                    holdout_embeddings=data["holdout_embeddings"],
                    holdout_inputs=data["holdout_inputs"],
                    input_mean=data["input_mean"],
                    input_std=data["input_std"],
                    embedding_source=header["embedding_source"],
                    metadata=header.get("metadata", {}),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ManifestError(f"cannot read reference profile {path}: {exc}") from exc
