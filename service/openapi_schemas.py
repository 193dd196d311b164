"""JSON schemas of request bodies that the hot path parses itself (for the OpenAPI document).

The endpoints read raw bytes with orjson instead of declaring pydantic bodies, because per-request
model validation of nested float lists costs more than the inference; the schemas here keep the
OpenAPI document (and clients generated from it) accurate anyway.
"""

from __future__ import annotations

from typing import Any

_TENSOR_DATA: dict[str, Any] = {
    "description": "tensor values, flat in row-major order or nested as the shape",
    "type": "array",
    "items": {},
}

INFER_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "datatype": {"type": "string"},
                    "parameters": {"type": "object"},
                    "data": _TENSOR_DATA,
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
            },
        },
    },
}

PREDICT_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["instances"],
    "properties": {
        "instances": {
            "type": "array",
            "minItems": 1,
            "description": "one entry per instance: the model input without the batch dimension",
            "items": {"type": "array", "items": {}},
        },
        "return_probabilities": {"type": "boolean", "default": False},
    },
}
