"""The model manifest: what a model folder serves, and which tensor plays which role.

A manifest is `manifest.json` next to the ONNX file. It is validated here without the graph;
`onnx_classifier.py` checks it against the graph when the model loads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.datatypes import OIP_TO_NUMPY
from service.errors import ManifestError

MANIFEST_FILE = "manifest.json"

# Model names and versions appear in URLs, Redis keys and metric labels: keep them path-safe.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    datatype: str
    # -1 marks a dynamic dimension; the first dimension is the batch.
    shape: list[int] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> TensorSpec:
        if self.datatype not in OIP_TO_NUMPY:
            raise ValueError(
                f"datatype {self.datatype!r} is not an Open Inference Protocol datatype; "
                f"expected one of {sorted(OIP_TO_NUMPY)}"
            )
        if any(d < -1 or d == 0 for d in self.shape):
            raise ValueError(f"shape {self.shape} may only hold positive sizes or -1 (dynamic)")
        return self


class OutputRoles(BaseModel):
    """Which graph tensor holds what. Exactly one of `probabilities` and `logits` is set."""

    model_config = ConfigDict(extra="forbid")

    probabilities: str | None = None
    logits: str | None = None
    # Any tensor of the graph, output or intermediate: intermediates are exposed at load time.
    embedding: str | None = None
    # The label output of converters such as skl2onnx; served as-is, never used for scoring.
    label: str | None = None

    @model_validator(mode="after")
    def _one_score_source(self) -> OutputRoles:
        if (self.probabilities is None) == (self.logits is None):
            raise ValueError(
                "outputs must name exactly one of 'probabilities' or 'logits' "
                f"(got probabilities={self.probabilities!r}, logits={self.logits!r})"
            )
        return self

    @property
    def scores(self) -> str:
        """The tensor the class scores come from."""
        return self.probabilities if self.probabilities is not None else str(self.logits)


class InputLayout(BaseModel):
    """How a person reads one instance: used to render samples for labelers."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["image", "tabular", "vector"] = "vector"
    # For images: height, width (and optionally channels) of one instance.
    image_shape: list[int] | None = None
    feature_names: list[str] | None = None
    value_range: tuple[float, float] | None = None


class BatchingConfig(BaseModel):
    """Adaptive batching for this model; unset fields take the service's settings."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    # Instances per onnxruntime call.
    max_batch_size: int | None = Field(default=None, ge=1)
    # The longest a request may expect to queue before it is refused with 503.
    max_queue_delay_seconds: float | None = Field(default=None, ge=0)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(default="1", pattern=NAME_PATTERN)
    model_file: str = "model.onnx"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    platform: str = "onnxruntime_onnx"
    description: str = ""
    input: TensorSpec
    outputs: OutputRoles
    class_names: list[str] = Field(min_length=1)
    input_layout: InputLayout = Field(default_factory=InputLayout)
    batching: BatchingConfig | None = None

    @model_validator(mode="after")
    def _check_file_name(self) -> Manifest:
        if Path(self.model_file).name != self.model_file:
            raise ValueError(
                f"model_file {self.model_file!r} must be a file name inside the model folder"
            )
        return self

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                for e in exc.errors()
            )
            raise ManifestError(f"manifest {path} is invalid: {problems}") from exc

    def save(self, path: Path) -> None:
        text = json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2)
        path.write_text(text + "\n", encoding="utf-8")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
