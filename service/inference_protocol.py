"""Open Inference Protocol (KServe V2) request parsing and response encoding, JSON and binary.

Pure functions over bytes and arrays: no HTTP here. The binary tensor data extension puts raw
little-endian tensors after the JSON header; `Inference-Header-Content-Length` says where the
JSON ends. Tensor data is turned into numpy arrays in one call, never element by element.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.datatypes import (
    FLOAT_DATATYPES,
    OIP_TO_NUMPY,
    all_finite,
    oip_datatype_of,
    request_array,
)
from service.errors import InvalidInput, MalformedRequest
from service.onnx_classifier import OnnxClassifier

HEADER_LENGTH = "inference-header-content-length"
BINARY_EXTENSION = "binary_tensor_data"


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    batch: np.ndarray
    # None: every output the model serves, in binary when `binary_outputs` says so.
    outputs: list[RequestedOutput] | None
    binary_outputs: bool
    parameters: dict[str, Any]


def _describe(model: OnnxClassifier) -> str:
    spec = model.manifest.input
    return f"one input named '{spec.name}' ({spec.datatype}, shape {spec.shape}, -1 = any)"


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_json_document(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"request body is not valid JSON ({exc}); expected {what}") from None
    if not isinstance(document, dict):
        raise MalformedRequest(f"request body is a JSON {type(document).__name__}; expected {what}")
    return document


def parse_infer_request(
    body: bytes,
    header_length: int | None,
    model: OnnxClassifier,
    max_batch_size: int,
    extra_outputs: Sequence[str] = (),
) -> InferRequest:
    """Parse and validate; `extra_outputs` are outputs served on request beside the model's."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not 0 < header_length <= len(body):
            raise MalformedRequest(
                f"Inference-Header-Content-Length is {header_length} but the body has "
                f"{len(body)} bytes; expected the length of the JSON header in bytes"
            )
        header, binary = body[:header_length], body[header_length:]
    document = parse_json_document(header, "an inference request object with 'inputs'")

    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {_short(request_id)}")
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"'parameters' must be an object, got {_short(parameters)}")

    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInput(
            f"'inputs' must be a list holding {_describe(model)}; got {_short(inputs)}"
        )
    batch = _parse_input(inputs[0], binary, model, max_batch_size)
    outputs = _parse_outputs(document.get("outputs"), model, extra_outputs)
    binary_outputs = parameters.get("binary_data_output", False)
    if not isinstance(binary_outputs, bool):
        raise InvalidInput(
            f"parameter 'binary_data_output' must be true or false, got {_short(binary_outputs)}"
        )
    return InferRequest(request_id, batch, outputs, binary_outputs, parameters)


def _parse_input(
    tensor: dict[str, Any], binary: bytes, model: OnnxClassifier, max_batch_size: int
) -> np.ndarray:
    spec = model.manifest.input
    name = tensor.get("name")
    if name != spec.name:
        raise InvalidInput(
            f"unknown input {_short(name)}; model '{model.name}' expects {_describe(model)}"
        )
    datatype = tensor.get("datatype")
    if datatype != spec.datatype:
        raise InvalidInput(
            f"input '{name}' has datatype {_short(datatype)}; expected {spec.datatype}"
        )
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise InvalidInput(
            f"input '{name}' has shape {_short(shape)}; expected a list of non-negative "
            f"integers matching {spec.shape}"
        )
    if len(shape) != len(spec.shape) or any(
        m != -1 and d != m for d, m in zip(shape[1:], spec.shape[1:], strict=False)
    ):
        raise InvalidInput(f"input '{name}' has shape {shape}; expected {spec.shape} (-1 = any)")
    if shape[0] == 0:
        raise InvalidInput(
            f"input '{name}' is an empty batch (shape {shape}); expected at least one instance"
        )
    if shape[0] > max_batch_size:
        raise InvalidInput(
            f"input '{name}' holds a batch of {shape[0]}; the maximum batch size is "
            f"{max_batch_size} (EDGEHARVEST_MAX_BATCH_SIZE)"
        )
    dtype = OIP_TO_NUMPY[datatype]
    count = math.prod(shape)
    tensor_parameters = tensor.get("parameters") or {}
    binary_size = (
        tensor_parameters.get("binary_data_size") if isinstance(tensor_parameters, dict) else None
    )
    if binary_size is not None:
        expected = count * dtype.itemsize
        if binary_size != expected or len(binary) != expected:
            raise InvalidInput(
                f"input '{name}' declares binary_data_size {_short(binary_size)} and the body "
                f"carries {len(binary)} bytes after the JSON header; a {datatype} tensor of "
                f"shape {shape} needs exactly {expected} bytes"
            )
        array = np.frombuffer(binary, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
    else:
        if "data" not in tensor:
            raise InvalidInput(
                f"input '{name}' has no 'data' and no binary_data_size parameter; "
                "expected the tensor values in 'data' (flat or nested)"
            )
        try:
            # Overflow to infinity is reported below with the index.
            array = request_array(tensor["data"], dtype)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidInput(
                f"input '{name}' data cannot be read as {datatype} ({exc}); expected "
                f"{count} numbers, flat or nested as {shape}"
            ) from None
        if array.size != count:
            raise InvalidInput(
                f"input '{name}' carries {array.size} values; shape {shape} needs {count}"
            )
    array = array.reshape(shape)
    if datatype in FLOAT_DATATYPES and not all_finite(array):
        bad = int(np.flatnonzero(~np.isfinite(array.ravel()))[0])
        raise InvalidInput(
            f"input '{name}' holds NaN, infinity or a number outside the {datatype} range "
            f"(first at flat index {bad}); expected finite numbers"
        )
    return array


def _parse_outputs(
    outputs: object, model: OnnxClassifier, extra_outputs: Sequence[str]
) -> list[RequestedOutput] | None:
    if outputs is None:
        return None
    served = [*(o.name for o in model.outputs), *extra_outputs]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidInput(
            f"'outputs' must be a list of objects with a 'name'; got {_short(outputs)}"
        )
    requested = []
    for output in outputs:
        name = output.get("name")
        if name not in served:
            raise InvalidInput(
                f"unknown output {_short(name)}; model '{model.name}' serves {served}"
            )
        parameters = output.get("parameters") or {}
        binary = parameters.get("binary_data", False) if isinstance(parameters, dict) else False
        if not isinstance(binary, bool):
            raise InvalidInput(
                f"output '{name}' parameter 'binary_data' must be true or false, "
                f"got {_short(binary)}"
            )
        requested.append(RequestedOutput(name, binary))
    return requested


def _binary_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in array.ravel().tolist():
            raw = item if isinstance(item, bytes) else str(item).encode()
            parts.append(len(raw).to_bytes(4, "little") + raw)
        return b"".join(parts)
    dtype = OIP_TO_NUMPY[datatype]
    return np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()


def _json_data(array: np.ndarray, datatype: str) -> Any:
    flat = array.ravel()
    if datatype == "BYTES":
        return [v.decode() if isinstance(v, bytes) else str(v) for v in flat.tolist()]
    if datatype == "FP16":
        return flat.astype(np.float32)  # orjson does not serialise float16
    return np.ascontiguousarray(flat)


def encode_infer_response(
    model: OnnxClassifier,
    request: InferRequest,
    tensors: dict[str, np.ndarray],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (content type, and the header length when binary).

    `tensors` holds the model's outputs and any extra outputs; without an `outputs` selection
    the response carries the model's own outputs only.
    """
    datatypes = {o.name: o.datatype for o in model.outputs}
    if request.outputs is None:
        wanted = [RequestedOutput(o.name, request.binary_outputs) for o in model.outputs]
    else:
        wanted = request.outputs
    outputs = []
    blobs = []
    for output in wanted:
        array = tensors[output.name]
        datatype = datatypes.get(output.name) or oip_datatype_of(array)
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": datatype,
            "shape": list(array.shape),
        }
        if output.binary:
            blob = _binary_bytes(array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(array, datatype)
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if request.id is not None:
        document["id"] = request.id
    if parameters:
        document["parameters"] = parameters
    document["outputs"] = outputs
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }
