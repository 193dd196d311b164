"""Propose a manifest for an existing ONNX classifier by reading its graph and running it once.

Heuristics, in order, so a user reviews a proposal instead of writing one:
- a ZipMap node (scikit-learn converters) marks the probability output, its class labels the
  class names, and the other output is the label;
- otherwise a float output of shape [batch, classes] is `probabilities` when a test run gives
  non-negative rows that sum to 1, else `logits`;
- the embedding is another 2-D float output if there is one, else the input of the last
  MatMul/Gemm on the path to the scores (the penultimate layer), exposed at load time.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from service.datatypes import OIP_TO_NUMPY, ONNX_TO_OIP
from service.errors import ManifestError
from service.manifest import InputLayout, Manifest, OutputRoles, TensorSpec, file_sha256

_PASS_THROUGH = {"Softmax", "Identity", "Add", "Relu", "Cast", "Reshape", "Flatten", "Squeeze"}


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
        for d in value.type.tensor_type.shape.dim
    ]


def _safe_name(stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).strip("-.") or "model"
    return name[:64]


def _penultimate(graph: onnx.GraphProto, scores: str, feed: str) -> str | None:
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {i.name for i in graph.initializer}
    tensor = scores
    for _ in range(len(graph.node)):
        node = producers.get(tensor)
        if node is None:
            return None
        data_inputs = [i for i in node.input if i and i not in initializers]
        if node.op_type in ("MatMul", "Gemm"):
            candidate = data_inputs[0] if data_inputs else None
            return None if candidate in (None, feed) else candidate
        if node.op_type not in _PASS_THROUGH or not data_inputs:
            return None
        tensor = data_inputs[0]
    return None


def propose_manifest(path: Path, name: str | None = None, version: str = "1") -> Manifest:
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ManifestError(f"cannot parse {path}: {exc}") from exc
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    feeds = [i for i in graph.input if i.name not in initializers]
    if len(feeds) != 1:
        raise ManifestError(
            f"{path} has {len(feeds)} inputs {[f.name for f in feeds]}; only single-input "
            "classifiers can be served"
        )
    feed = feeds[0]
    datatype = ONNX_TO_OIP.get(feed.type.tensor_type.elem_type)
    if datatype is None:
        raise ManifestError(f"input {feed.name!r} of {path} has an unsupported element type")
    shape = _dims(feed)
    shape[0] = -1

    producers = {out: node for node in graph.node for out in node.output}
    zipmaps = [node for node in graph.node if node.op_type == "ZipMap"]
    class_names: list[str] | None = None
    label = None
    embedding = None
    if zipmaps:
        zipmap = zipmaps[0]
        for attribute in zipmap.attribute:
            if attribute.name == "classlabels_int64s":
                class_names = [str(v) for v in attribute.ints]
            elif attribute.name == "classlabels_strings":
                class_names = [v.decode() for v in attribute.strings]
        others = [o.name for o in graph.output if o.name != zipmap.output[0]]
        label = others[0] if others else None
        scores_role = OutputRoles(probabilities=zipmap.output[0], label=label)
    else:
        float_2d = [
            o
            for o in graph.output
            if o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
            and len(o.type.tensor_type.shape.dim) == 2
        ]
        if not float_2d:
            raise ManifestError(
                f"{path} has no float output of shape [batch, classes]; cannot tell which output "
                "holds the class scores"
            )
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        sample_shape = [2 if d == -1 else d for d in shape]
        sample = rng.random(sample_shape).astype(OIP_TO_NUMPY[datatype])
        results = dict(
            zip(
                [o.name for o in float_2d],
                session.run([o.name for o in float_2d], {feed.name: sample}),
                strict=True,
            )
        )
        # The scores are the narrowest 2-D output; a wider one is an embedding.
        ordered = sorted(float_2d, key=lambda o: results[o.name].shape[1])
        scores_name = ordered[0].name
        values = results[scores_name]
        is_probability = bool(
            (values >= 0).all() and np.allclose(values.sum(axis=1), 1.0, atol=1e-3)
        )
        scores_role = (
            OutputRoles(probabilities=scores_name)
            if is_probability
            else OutputRoles(logits=scores_name)
        )
        class_names = [str(i) for i in range(values.shape[1])]
        if len(ordered) > 1:
            embedding = ordered[-1].name
        else:
            source = scores_name
            node = producers.get(scores_name)
            if node is not None and node.op_type == "Softmax":
                source = node.input[0]
            embedding = _penultimate(graph, source, feed.name)
    if class_names is None:
        raise ManifestError(f"cannot tell the class names of {path}")
    roles = scores_role.model_copy(update={"embedding": embedding})
    layout = (
        InputLayout(kind="tabular", feature_names=[f"f{i}" for i in range(shape[1])])
        if (len(shape) == 2 and shape[1] != -1 and shape[1] <= 256)
        else InputLayout()
    )
    return Manifest(
        name=_safe_name(name or path.stem),
        version=version,
        model_file=path.name,
        sha256=file_sha256(path),
        input=TensorSpec(name=feed.name, datatype=datatype, shape=shape),
        outputs=roles,
        class_names=class_names,
        input_layout=layout,
        description=f"proposed from {path.name}; review the roles and class names",
    )
