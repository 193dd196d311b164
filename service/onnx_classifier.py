"""Load one classifier from the model repository and run it.

The manifest says which tensor holds the class scores and which the embedding. Real-world graphs
need two rewrites, both done at load time so no model has to be re-exported:
- an embedding that is an intermediate tensor is added to the graph outputs;
- a scikit-learn ZipMap output (a sequence of per-class maps, slow to read back in Python) is
  replaced by the dense probability tensor that feeds the ZipMap node.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from service.datatypes import OIP_TO_NUMPY, ONNX_TO_OIP
from service.errors import ManifestError
from service.manifest import Manifest, file_sha256

ORT_TYPE_TO_OIP = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class SessionConfig:
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization_level: str = "all"

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.graph_optimization_level = _OPTIMIZATION_LEVELS[self.graph_optimization_level]
        return options


@dataclass(frozen=True)
class OutputSpec:
    """An output as the Open Inference Protocol describes it."""

    name: str
    datatype: str
    shape: list[int]


_UNREAD = object()


class Prediction:
    """A batch's model outputs: probabilities [batch, classes] float32, the embedding [batch,
    dim] float32 (or None), the logits (or None), and every served output by name, as the OIP
    endpoint returns them.

    `slice` gives one request's rows of a gathered batch as a view that slices each output only
    when it is read: a `/v1` response with scores reads none of them.
    """

    __slots__ = ("_embedding", "_logits", "_part", "_probabilities", "_tensors")

    def __init__(
        self,
        probabilities: np.ndarray,
        embedding: np.ndarray | None,
        logits: np.ndarray | None,
        tensors: dict[str, np.ndarray] | None = None,
    ) -> None:
        self._probabilities: Any = probabilities
        self._embedding: Any = embedding
        self._logits: Any = logits
        self._tensors: Any = {} if tensors is None else tensors
        self._part: tuple[Prediction, slice] | None = None

    def _read(self, name: str) -> Any:
        """The output `name`; in a slice, its rows, cut when first read."""
        value = getattr(self, "_" + name)
        if value is _UNREAD:
            assert self._part is not None
            whole, rows = self._part
            value = getattr(whole, name)
            if isinstance(value, dict):
                value = {key: tensor[rows] for key, tensor in value.items()}
            elif value is not None:
                value = value[rows]
            setattr(self, "_" + name, value)
        return value

    @property
    def probabilities(self) -> np.ndarray:
        result: np.ndarray = self._read("probabilities")
        return result

    @property
    def embedding(self) -> np.ndarray | None:
        result: np.ndarray | None = self._read("embedding")
        return result

    @property
    def logits(self) -> np.ndarray | None:
        result: np.ndarray | None = self._read("logits")
        return result

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        result: dict[str, np.ndarray] = self._read("tensors")
        return result

    def slice(self, start: int, stop: int) -> Prediction:
        """Instances [start, stop) as views; every tensor must have the batch first."""
        part = Prediction.__new__(Prediction)
        part._probabilities = part._embedding = part._logits = part._tensors = _UNREAD
        part._part = (self, slice(start, stop))
        return part


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: np.ndarray = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
    return probabilities


def _shape_of(value_type: onnx.TypeProto) -> list[int]:
    dims = value_type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in dims]


class OnnxClassifier:
    def __init__(self, manifest: Manifest, directory: Path, config: SessionConfig) -> None:
        self.manifest = manifest
        self.directory = directory
        self.name = manifest.name
        self.version = manifest.version
        self.class_names = manifest.class_names
        path = directory / manifest.model_file
        where = f"model '{manifest.name}' version '{manifest.version}' ({directory})"
        if not path.is_file():
            raise ManifestError(f"{where}: model file {manifest.model_file!r} does not exist")
        actual = file_sha256(path)
        if actual != manifest.sha256:
            raise ManifestError(
                f"{where}: {manifest.model_file} has sha256 {actual} but the manifest records "
                f"{manifest.sha256}; restore the file or regenerate the manifest "
                "(edgeharvest manifest propose)"
            )
        try:
            graph_model = onnx.load(str(path))
        except Exception as exc:  # onnx raises several unrelated types for corrupt files
            raise ManifestError(f"{where}: cannot parse {manifest.model_file}: {exc}") from exc
        self._fetch, self._served_from, self._scores_fetch, self._embedding_fetch = (
            self._plan_outputs(graph_model, where)
        )
        self._check_input(graph_model, where)
        try:
            self._session = ort.InferenceSession(
                graph_model.SerializeToString(),
                sess_options=config.session_options(),
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:
            raise ManifestError(f"{where}: onnxruntime cannot load the graph: {exc}") from exc
        # A logits model also serves the softmax under the name "probabilities".
        self._adds_probabilities = (
            self.manifest.outputs.logits is not None and "probabilities" not in self._served_from
        )
        self.outputs = self._describe_outputs()
        self.ready = False
        self._warm_up(where)

    # ---- load-time checks -------------------------------------------------------------------

    def _check_input(self, graph_model: onnx.ModelProto, where: str) -> None:
        spec = self.manifest.input
        initializers = {i.name for i in graph_model.graph.initializer}
        feeds = [i for i in graph_model.graph.input if i.name not in initializers]
        names = [i.name for i in feeds]
        if spec.name not in names:
            raise ManifestError(
                f"{where}: manifest input {spec.name!r} is not an input of the graph; "
                f"graph inputs are {names}"
            )
        if len(feeds) != 1:
            raise ManifestError(
                f"{where}: the graph has {len(feeds)} inputs {names}; "
                "only single-input classifiers can be served"
            )
        graph_input = feeds[0]
        datatype = ONNX_TO_OIP.get(graph_input.type.tensor_type.elem_type)
        if datatype != spec.datatype:
            raise ManifestError(
                f"{where}: input {spec.name!r} is {datatype} in the graph "
                f"but {spec.datatype} in the manifest"
            )
        graph_shape = _shape_of(graph_input.type)
        mismatch = len(graph_shape) != len(spec.shape) or any(
            g != -1 and g != m for g, m in zip(graph_shape, spec.shape, strict=False)
        )
        if mismatch:
            raise ManifestError(
                f"{where}: input {spec.name!r} has shape {graph_shape} in the graph "
                f"(-1 = dynamic) but {spec.shape} in the manifest"
            )
        if spec.shape[0] != -1 and spec.shape[0] != 1:
            raise ManifestError(
                f"{where}: the first dimension of input {spec.name!r} is the batch and must be "
                f"-1 (dynamic) or 1, got {spec.shape[0]}"
            )

    def _plan_outputs(
        self, graph_model: onnx.ModelProto, where: str
    ) -> tuple[list[str], dict[str, str], str, str | None]:
        """Decide which tensors to fetch; rewrite the graph outputs where the manifest needs it.

        Returns (names to fetch, served output name -> fetched name, scores tensor, embedding).
        """
        graph = graph_model.graph
        producers = {out: node for node in graph.node for out in node.output}
        graph_outputs = {o.name: o for o in graph.output}
        roles = self.manifest.outputs
        served_from: dict[str, str] = {}

        def dense_source(name: str) -> str:
            node = producers.get(name)
            if node is not None and node.op_type == "ZipMap":
                return str(node.input[0])
            return name

        for name, value in graph_outputs.items():
            if value.type.HasField("tensor_type"):
                served_from[name] = name
            else:
                source = dense_source(name)
                if source == name:
                    continue  # a non-tensor output we cannot express in the protocol
                served_from[name] = source

        scores = roles.scores
        if scores not in graph_outputs and scores not in producers:
            raise ManifestError(
                f"{where}: the manifest's scores tensor {scores!r} is not in the graph; "
                f"graph outputs are {sorted(graph_outputs)}"
            )
        scores_fetch = dense_source(scores)
        if roles.label is not None and roles.label not in graph_outputs:
            raise ManifestError(
                f"{where}: the manifest's label output {roles.label!r} is not a graph output; "
                f"graph outputs are {sorted(graph_outputs)}"
            )

        embedding = roles.embedding
        if embedding is not None:
            if embedding not in producers and embedding not in graph_outputs:
                raise ManifestError(
                    f"{where}: the manifest's embedding tensor {embedding!r} is produced by no "
                    "node of the graph; name an output or intermediate tensor"
                )
            served_from.setdefault(embedding, embedding)

        extra = {scores_fetch, *served_from.values()} - set(graph_outputs)
        if extra:
            inferred = onnx.shape_inference.infer_shapes(graph_model)
            known = {v.name: v for v in inferred.graph.value_info}
            for name in sorted(extra):
                value = known.get(name) or onnx.helper.make_tensor_value_info(
                    name, onnx.TensorProto.FLOAT, None
                )
                graph.output.append(value)

        fetch = sorted({scores_fetch, *served_from.values()})
        return fetch, served_from, scores_fetch, embedding

    def _describe_outputs(self) -> list[OutputSpec]:
        session_outputs = {o.name: o for o in self._session.get_outputs()}
        specs = []
        for served, fetched in self._served_from.items():
            out = session_outputs[fetched]
            shape = [d if isinstance(d, int) and d > 0 else -1 for d in out.shape]
            if fetched == self._scores_fetch and len(shape) != 2:
                # Converters often leave the dense probabilities without a declared shape.
                shape = [-1, len(self.class_names)]
            specs.append(OutputSpec(served, ORT_TYPE_TO_OIP.get(out.type, "BYTES"), shape))
        if self._adds_probabilities:
            specs.append(OutputSpec("probabilities", "FP32", [-1, len(self.class_names)]))
        return specs

    def _warm_up(self, where: str) -> None:
        spec = self.manifest.input
        shape = [2 if d == -1 else d for d in spec.shape]
        if spec.shape[0] == 1:
            shape[0] = 1
        sample = np.zeros(shape, dtype=OIP_TO_NUMPY[spec.datatype])
        try:
            prediction = self.predict(sample)
        except Exception as exc:
            raise ManifestError(f"{where}: warm-up inference failed: {exc}") from exc
        classes = prediction.probabilities.shape[-1]
        if prediction.probabilities.ndim != 2 or classes != len(self.class_names):
            raise ManifestError(
                f"{where}: the scores tensor has shape {list(prediction.probabilities.shape)} but "
                f"the manifest lists {len(self.class_names)} class names; expected "
                f"[batch, {len(self.class_names)}]"
            )

    def unbatchable_reason(self) -> str | None:
        """Why requests to this model cannot share one onnxruntime call, or None if they can.

        Gathered requests are split back by slicing every output along its first dimension,
        so each output must have the batch first; a test run at two sizes checks it.
        """
        spec = self.manifest.input
        if spec.shape[0] != -1:
            return f"input {spec.name!r} has a fixed batch dimension of {spec.shape[0]}"
        instance = [2 if d == -1 else d for d in spec.shape[1:]]
        for size in (1, 3):
            sample = np.zeros([size, *instance], dtype=OIP_TO_NUMPY[spec.datatype])
            for name, tensor in self.predict(sample).tensors.items():
                if tensor.ndim == 0 or tensor.shape[0] != size:
                    return (
                        f"output {name!r} has shape {list(tensor.shape)} for a batch of {size}; "
                        "every output must have the batch as its first dimension"
                    )
        return None

    # ---- serving ----------------------------------------------------------------------------

    @property
    def input_name(self) -> str:
        return self.manifest.input.name

    def predict(self, batch: np.ndarray) -> Prediction:
        raw = self._session.run(self._fetch, {self.input_name: batch})
        fetched = dict(zip(self._fetch, raw, strict=True))
        scores = np.asarray(fetched[self._scores_fetch], dtype=np.float32)
        if self.manifest.outputs.logits is not None:
            logits: np.ndarray | None = scores
            probabilities = softmax(scores)
        else:
            logits = None
            probabilities = scores
        embedding = None
        if self._embedding_fetch is not None:
            embedding = np.asarray(fetched[self._embedding_fetch], dtype=np.float32)
            embedding = embedding.reshape(embedding.shape[0], -1)
        tensors = {served: fetched[source] for served, source in self._served_from.items()}
        if self._adds_probabilities:
            tensors["probabilities"] = probabilities
        return Prediction(probabilities, embedding, logits, tensors)
