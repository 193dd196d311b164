"""Small test models written into a folder with their manifests; conftest wraps them in fixtures.

Each `build_*` function creates `<directory>/<model name>/` holding `model.onnx` and
`manifest.json`, and returns that folder. Everything is seeded, so the files and the values they
produce are the same on every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from service.manifest import (
    MANIFEST_FILE,
    InputLayout,
    Manifest,
    OutputRoles,
    TensorSpec,
    file_sha256,
)

MODEL_FILE = "model.onnx"

IRIS_MODEL_NAME = "iris-sklearn"
IRIS_CLASS_NAMES = ["setosa", "versicolor", "virginica"]

TINY_MODEL_NAME = "tiny-logits"
TINY_INPUTS = 4
TINY_HIDDEN = 8
TINY_CLASS_NAMES = ["a", "b", "c"]
TINY_SEED = 7


def _write_onnx(folder: Path, model: onnx.ModelProto) -> str:
    """Writes `folder/model.onnx` and returns its sha256 for the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / MODEL_FILE
    model_path.write_bytes(model.SerializeToString())
    return file_sha256(model_path)


# ---- scikit-learn through skl2onnx: ZipMap probabilities plus a label output ------------------


def fit_iris_logistic_regression() -> tuple[LogisticRegression, np.ndarray]:
    """The fitted classifier behind `iris-sklearn` and the float32 iris features it was fit on."""
    features, labels = load_iris(return_X_y=True)
    features = features.astype(np.float32)
    # lbfgs has no randomness; max_iter is raised only to avoid a ConvergenceWarning.
    return LogisticRegression(max_iter=1000).fit(features, labels), features


def build_sklearn_zipmap_model(directory: Path) -> Path:
    """skl2onnx's default export: `output_label` (int64) and `output_probability` as a ZipMap."""
    classifier, _ = fit_iris_logistic_regression()
    # Default options (so the ZipMap stays); the graph name is fixed because skl2onnx otherwise
    # picks a random uuid, which would change the file's sha256 on every build.
    model = convert_sklearn(
        classifier,
        name="iris_logistic_regression",
        initial_types=[("input", FloatTensorType([None, 4]))],
    )
    folder = directory / IRIS_MODEL_NAME
    Manifest(
        name=IRIS_MODEL_NAME,
        version="1",
        model_file=MODEL_FILE,
        sha256=_write_onnx(folder, model),
        description="LogisticRegression on iris, exported by skl2onnx with its default ZipMap",
        input=TensorSpec(name="input", datatype="FP32", shape=[-1, 4]),
        outputs=OutputRoles(probabilities="output_probability", label="output_label"),
        class_names=IRIS_CLASS_NAMES,
        input_layout=InputLayout(kind="tabular", feature_names=list(load_iris().feature_names)),
    ).save(folder / MANIFEST_FILE)
    return folder


# ---- hand-built MLP whose embedding is an intermediate tensor ---------------------------------


@dataclass(frozen=True)
class TinyMlpWeights:
    hidden_weight: np.ndarray  # [4, 8]
    hidden_bias: np.ndarray  # [8]
    logits_weight: np.ndarray  # [8, 3]
    logits_bias: np.ndarray  # [3]


def tiny_mlp_weights() -> TinyMlpWeights:
    """Seeded weights that are multiples of 1/8.

    With inputs that are also multiples of 1/8 (and of moderate size), every product and sum is
    exact in float32, so onnxruntime and numpy agree bit for bit whatever the summation order.
    """
    rng = np.random.default_rng(TINY_SEED)

    def eighths(*shape: int) -> np.ndarray:
        return (rng.integers(-8, 9, size=shape) / 8).astype(np.float32)

    return TinyMlpWeights(
        hidden_weight=eighths(TINY_INPUTS, TINY_HIDDEN),
        hidden_bias=eighths(TINY_HIDDEN),
        logits_weight=eighths(TINY_HIDDEN, len(TINY_CLASS_NAMES)),
        logits_bias=eighths(len(TINY_CLASS_NAMES)),
    )


def tiny_mlp_forward(inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expected (hidden_relu [batch, 8], logits [batch, 3]) of `tiny-logits`, in float32."""
    weights = tiny_mlp_weights()
    x = np.asarray(inputs, dtype=np.float32)
    hidden = np.maximum(x @ weights.hidden_weight + weights.hidden_bias, np.float32(0))
    logits = hidden @ weights.logits_weight + weights.logits_bias
    return hidden, logits


def build_intermediate_embedding_model(directory: Path) -> Path:
    """4 -> 8 (Relu, `hidden_relu`) -> 3 `logits`; the only graph output is `logits`.

    The manifest names `hidden_relu` as the embedding, so the loader must expose an intermediate
    tensor. The graph carries no value_info for it, like most exported graphs.
    """
    weights = tiny_mlp_weights()
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "hidden_weight"], ["hidden_matmul"]),
            helper.make_node("Add", ["hidden_matmul", "hidden_bias"], ["hidden_pre"]),
            helper.make_node("Relu", ["hidden_pre"], ["hidden_relu"]),
            helper.make_node("MatMul", ["hidden_relu", "logits_weight"], ["logits_matmul"]),
            helper.make_node("Add", ["logits_matmul", "logits_bias"], ["logits"]),
        ],
        "tiny_mlp",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", TINY_INPUTS])],
        outputs=[
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, ["batch", len(TINY_CLASS_NAMES)]
            )
        ],
        initializer=[
            numpy_helper.from_array(weights.hidden_weight, "hidden_weight"),
            numpy_helper.from_array(weights.hidden_bias, "hidden_bias"),
            numpy_helper.from_array(weights.logits_weight, "logits_weight"),
            numpy_helper.from_array(weights.logits_bias, "logits_bias"),
        ],
    )
    model = helper.make_model(
        graph,
        producer_name="edgeharvest-tests",
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    onnx.checker.check_model(model, full_check=True)
    folder = directory / TINY_MODEL_NAME
    Manifest(
        name=TINY_MODEL_NAME,
        version="1",
        model_file=MODEL_FILE,
        sha256=_write_onnx(folder, model),
        description="seeded 4-8-3 MLP whose embedding is an intermediate tensor",
        input=TensorSpec(name="input", datatype="FP32", shape=[-1, TINY_INPUTS]),
        outputs=OutputRoles(logits="logits", embedding="hidden_relu"),
        class_names=TINY_CLASS_NAMES,
        input_layout=InputLayout(kind="vector"),
    ).save(folder / MANIFEST_FILE)
    return folder
