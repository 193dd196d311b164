"""Train the `digits` demo classifier and write it as a hand-built ONNX graph plus its manifest.

Run from the repository root: `.venv/bin/python models/digits/build.py [--out DIR]`.

The graph is written with `onnx.helper` rather than skl2onnx so its tensor names, the in-graph
/16 scaling and the `embedding` output are exactly what the service and benchmarks expect.
Training and export are deterministic: rebuilding yields a byte-identical `model.onnx` in the same
environment (numpy, scikit-learn and BLAS versions can change the trained weights).

`--holdout-classes 8 9` removes those digits from training entirely, so a benchmark can check
that novelty scores rise on classes the model has never seen.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

# Run as a plain script, Python only puts models/digits/ on sys.path; the repository root is
# needed to import the `service` package, whose Manifest is the single definition of the format.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from service.manifest import (  # noqa: E402 (needs the sys.path entry above)
    InputLayout,
    Manifest,
    OutputRoles,
    TensorSpec,
    file_sha256,
)
from service.onnx_classifier import OnnxClassifier, SessionConfig  # noqa: E402
from service.reference_builder import build_reference_profile  # noqa: E402
from service.reference_profile import REFERENCE_FILE  # noqa: E402

HIDDEN_LAYER_SIZES = (64,)
# One hidden layer: it is the penultimate layer, whose kNN distances separate unseen classes
# best (measured against (64, 32), (128,), (128, 64) with digits 8 and 9 held out).
# Converges (no ConvergenceWarning) well before this on the 75% training split.
MAX_ITER = 2000
SEED = 0
TEST_SIZE = 0.25
PIXEL_MAX = 16.0
MIN_ACCURACY = 0.95
OPSET = 17
# IR 8 is the version paired with opset 17; pinned so the bytes do not follow the onnx default.
IR_VERSION = 8
INPUT_NAME = "pixels"
EMBEDDING_NAME = "embedding"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class DigitsSplit:
    """Raw 0-16 pixels; the training part excludes held-out classes, the test part keeps all."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class BuildResult:
    directory: Path
    accuracy: float
    sha256: str
    class_names: list[str]


def load_split(holdout_classes: Sequence[int] = ()) -> DigitsSplit:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SEED, stratify=y
    )
    keep = ~np.isin(y_train, list(holdout_classes))
    return DigitsSplit(x_train[keep], y_train[keep], x_test, y_test)


def train_mlp(x_train: np.ndarray, y_train: np.ndarray) -> MLPClassifier:
    """Fit on pixels scaled to [0, 1]; the exported graph applies the same scaling itself."""
    mlp = MLPClassifier(hidden_layer_sizes=HIDDEN_LAYER_SIZES, random_state=SEED, max_iter=MAX_ITER)
    mlp.fit(x_train / PIXEL_MAX, y_train)
    # With two classes scikit-learn switches to one logistic output, which this export lacks.
    if mlp.out_activation_ != "softmax":
        raise ValueError(
            f"need at least 3 trained classes for a softmax output, got {mlp.classes_.tolist()}"
        )
    return mlp


def mlp_to_onnx(mlp: MLPClassifier) -> onnx.ModelProto:
    """pixels -> Mul(1/16) -> [MatMul, Add, Relu] per hidden layer -> MatMul, Add -> Softmax."""
    initializers = [numpy_helper.from_array(np.array(1.0 / PIXEL_MAX, np.float32), "pixel_scale")]
    nodes = [helper.make_node("Mul", [INPUT_NAME, "pixel_scale"], ["scaled"], name="scale")]
    previous = "scaled"
    layers = list(zip(mlp.coefs_, mlp.intercepts_, strict=True))
    for i, (weight, bias) in enumerate(layers[:-1]):
        out = EMBEDDING_NAME if i == len(layers) - 2 else f"hidden{i}"
        initializers += [
            numpy_helper.from_array(weight.astype(np.float32), f"hidden{i}_weight"),
            numpy_helper.from_array(bias.astype(np.float32), f"hidden{i}_bias"),
        ]
        nodes += [
            helper.make_node(
                "MatMul", [previous, f"hidden{i}_weight"], [f"hidden{i}_matmul"], name=f"h{i}_mm"
            ),
            helper.make_node(
                "Add",
                [f"hidden{i}_matmul", f"hidden{i}_bias"],
                [f"hidden{i}_pre"],
                name=f"h{i}_add",
            ),
            helper.make_node("Relu", [f"hidden{i}_pre"], [out], name=f"h{i}_relu"),
        ]
        previous = out
    weight, bias = layers[-1]
    initializers += [
        numpy_helper.from_array(weight.astype(np.float32), "output_weight"),
        numpy_helper.from_array(bias.astype(np.float32), "output_bias"),
    ]
    nodes += [
        helper.make_node("MatMul", [previous, "output_weight"], ["output_matmul"], name="out_mm"),
        helper.make_node("Add", ["output_matmul", "output_bias"], [LOGITS_NAME], name="out_add"),
        helper.make_node("Softmax", [LOGITS_NAME], [PROBABILITIES_NAME], name="softmax", axis=1),
    ]
    n_features = mlp.coefs_[0].shape[0]
    n_classes = len(mlp.classes_)
    embedding_dim = mlp.coefs_[-1].shape[0]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        inputs=[
            helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", n_features])
        ],
        outputs=[
            helper.make_tensor_value_info(
                EMBEDDING_NAME, TensorProto.FLOAT, ["batch", embedding_dim]
            ),
            helper.make_tensor_value_info(
                PROBABILITIES_NAME, TensorProto.FLOAT, ["batch", n_classes]
            ),
        ],
        initializer=initializers,
        value_info=[
            helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, ["batch", n_classes])
        ],
    )
    model = helper.make_model(
        graph,
        producer_name="edgeharvest",
        doc_string=(
            f"MLP {HIDDEN_LAYER_SIZES} on scikit-learn's 8x8 handwritten digits; input: raw "
            f"0-16 pixel values, scaled by 1/16 in the graph; classes {mlp.classes_.tolist()}."
        ),
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def run_onnx(model_bytes: bytes, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (probabilities, embedding) for raw 0-16 pixels."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    probabilities, embedding = session.run(
        [PROBABILITIES_NAME, EMBEDDING_NAME], {INPUT_NAME: pixels.astype(np.float32)}
    )
    return probabilities, embedding


def verify(model_bytes: bytes, mlp: MLPClassifier, split: DigitsSplit) -> float:
    """Checks the graph against scikit-learn and returns its accuracy on the trained classes."""
    probabilities, _ = run_onnx(model_bytes, split.x_test)
    expected = mlp.predict_proba(split.x_test / PIXEL_MAX)
    if not np.allclose(probabilities, expected, atol=1e-5):
        worst = float(np.abs(probabilities - expected).max())
        raise RuntimeError(f"ONNX probabilities differ from scikit-learn by up to {worst:.2e}")
    # Held-out classes cannot be predicted by construction; accuracy covers the known ones.
    known = np.isin(split.y_test, mlp.classes_)
    predicted = mlp.classes_[probabilities[known].argmax(axis=1)]
    accuracy = float((predicted == split.y_test[known]).mean())
    if accuracy < MIN_ACCURACY:
        raise RuntimeError(f"held-out accuracy {accuracy:.4f} is below {MIN_ACCURACY}")
    return accuracy


def build(out_dir: Path, holdout_classes: Sequence[int] = ()) -> BuildResult:
    split = load_split(holdout_classes)
    mlp = train_mlp(split.x_train, split.y_train)
    model_bytes = mlp_to_onnx(mlp).SerializeToString()
    accuracy = verify(model_bytes, mlp, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILE
    model_path.write_bytes(model_bytes)
    class_names = [str(c) for c in mlp.classes_]
    n_known = int(np.isin(split.y_test, mlp.classes_).sum())
    withheld = (
        f"; digits {sorted(holdout_classes)} withheld from training" if holdout_classes else ""
    )
    sha256 = file_sha256(model_path)
    Manifest(
        name="digits-holdout" if holdout_classes else "digits",
        version="1",
        model_file=MODEL_FILE,
        sha256=sha256,
        description=(
            f"MLP {HIDDEN_LAYER_SIZES} trained on scikit-learn's bundled handwritten digits "
            f"(load_digits, 8x8 pixels valued 0-16){withheld}. Held-out accuracy {accuracy:.4f} "
            f"on {n_known} stratified test samples (25%, random_state={SEED})."
        ),
        input=TensorSpec(name=INPUT_NAME, datatype="FP32", shape=[-1, 64]),
        outputs=OutputRoles(probabilities=PROBABILITIES_NAME, embedding=EMBEDDING_NAME),
        class_names=class_names,
        input_layout=InputLayout(kind="image", image_shape=[8, 8], value_range=(0.0, PIXEL_MAX)),
    ).save(out_dir / "manifest.json")
    write_reference(out_dir, split, mlp)
    return BuildResult(out_dir, accuracy, sha256, class_names)


def write_reference(out_dir: Path, split: DigitsSplit, mlp: MLPClassifier) -> None:
    """The reference profile, as `edgeharvest reference build --validation-data` would: the
    training split is the kNN bank, the held-out test split (of the trained classes) gives the
    score distributions, since a model is over-confident on the data it was trained on."""
    manifest = Manifest.load(out_dir / "manifest.json")
    classifier = OnnxClassifier(manifest, out_dir, SessionConfig())
    class_index = {c: i for i, c in enumerate(mlp.classes_)}
    labels = np.asarray([class_index[c] for c in split.y_train], dtype=np.int64)
    known = np.isin(split.y_test, mlp.classes_)
    test_labels = np.asarray([class_index[c] for c in split.y_test[known]], dtype=np.int64)
    profile = build_reference_profile(
        classifier,
        split.x_train.astype(np.float32),
        labels,
        seed=SEED,
        source="load_digits",
        validation_inputs=split.x_test[known].astype(np.float32),
        validation_labels=test_labels,
    )
    profile.save(out_dir / REFERENCE_FILE)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Train the digits classifier and write model.onnx + manifest.json."
    )
    parser.add_argument("--out", type=Path, help="output folder (default: this script's folder)")
    parser.add_argument(
        "--holdout-classes",
        type=int,
        nargs="+",
        default=[],
        choices=range(10),
        metavar="DIGIT",
        help="digits to leave out of training entirely (for novelty benchmarks)",
    )
    args = parser.parse_args(argv)
    if args.holdout_classes and args.out is None:
        # The default folder holds the served `digits` model; never overwrite it with a variant.
        parser.error("--holdout-classes needs --out DIR")
    out_dir = args.out if args.out is not None else Path(__file__).resolve().parent
    result = build(out_dir, sorted(set(args.holdout_classes)))
    print(f"held-out accuracy: {result.accuracy:.4f}")
    print(f"classes: {result.class_names}")
    print(f"wrote {result.directory / MODEL_FILE} (sha256 {result.sha256})")


if __name__ == "__main__":
    main()
