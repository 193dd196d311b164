"""Open Inference Protocol datatypes and their numpy and ONNX counterparts."""

from __future__ import annotations

import math
import warnings

import numpy as np
from onnx import TensorProto

# OIP datatype -> numpy dtype. BYTES is carried as numpy object arrays of bytes/str.
OIP_TO_NUMPY: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

NUMPY_TO_OIP: dict[np.dtype[np.generic], str] = {v: k for k, v in OIP_TO_NUMPY.items()}

ONNX_TO_OIP: dict[int, str] = {
    TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.STRING: "BYTES",
}

FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64"})


def oip_datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of a numpy array; unicode strings count as BYTES."""
    if array.dtype.kind in ("U", "S", "O"):
        return "BYTES"
    return NUMPY_TO_OIP[array.dtype]


# Overflows this module lets happen on purpose; numpy would warn each time. Filters, not
# `np.errstate`: a filter costs nothing until a warning is raised, errstate costs about as much
# on every request as the conversion it guards.
warnings.filterwarnings(
    "ignore",
    message="overflow encountered in (cast|dot)",
    category=RuntimeWarning,
    module=__name__,
)


def request_array(data: object, dtype: np.dtype[np.generic]) -> np.ndarray:
    """`np.asarray(data, dtype)` of a request's (nested) list of numbers, where a number beyond
    the dtype's range becomes infinity without a warning: `all_finite` refuses it afterwards,
    with the message for NaN and infinity. Raises what `np.asarray` raises for data that are
    not numbers or not rectangular."""
    return np.asarray(data, dtype=dtype)


def all_finite(array: np.ndarray) -> bool:
    """Whether every value of a float array is finite (no NaN, no infinity).

    The sum of the squares, one BLAS dot product, is finite only if every value is; when it is
    not, a value may merely be large enough for its square to overflow, and the element-wise
    test decides. On a request's input it costs a third of `np.isfinite(array).all()`.
    """
    flat = array.ravel()
    return math.isfinite(flat.dot(flat)) or bool(np.isfinite(flat).all())
