"""Open Inference Protocol (KServe V2 / Triton) REST endpoints; the logic lives in DataPlane."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from service.dataplane import DataPlane
from service.errors import MalformedRequest
from service.events import new_event_id
from service.http_body import read_body
from service.inference_protocol import HEADER_LENGTH, encode_infer_response, parse_infer_request
from service.openapi_schemas import INFER_REQUEST_SCHEMA

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])


def _dataplane(request: Request) -> DataPlane:
    dataplane: DataPlane = request.app.state.dataplane
    return dataplane


@router.get("/health/live", summary="Server liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server readiness: every model loaded and warmed up")
async def ready(request: Request, response: Response) -> dict[str, bool]:
    is_ready = _dataplane(request).ready()
    if not is_ready:
        response.status_code = 503
    return {"ready": is_ready}


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return _dataplane(request).server_metadata()


@router.get("/models/{name}", summary="Model metadata (latest version)")
@router.get("/models/{name}/versions/{version}", summary="Model metadata")
async def model_metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    dataplane = _dataplane(request)
    return dataplane.model_metadata(dataplane.model(name, version))


@router.get("/models/{name}/ready", summary="Model readiness (latest version)")
@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness")
async def model_ready(
    request: Request, response: Response, name: str, version: str | None = None
) -> dict[str, Any]:
    model = _dataplane(request).model(name, version)
    if not model.ready:
        response.status_code = 503
    return {"name": model.name, "version": model.version, "ready": model.ready}


_INFER_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": INFER_REQUEST_SCHEMA},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "JSON header followed by raw tensors (binary tensor extension)",
            },
        },
    }
}


@router.post(
    "/models/{name}/infer", summary="Inference (latest version)", openapi_extra=_INFER_OPENAPI
)
@router.post(
    "/models/{name}/versions/{version}/infer", summary="Inference", openapi_extra=_INFER_OPENAPI
)
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    dataplane = _dataplane(request)
    model = dataplane.model(name, version)
    body = await read_body(request, dataplane.settings.max_body_bytes)
    header_length = _header_length(request)
    parsed = parse_infer_request(
        body,
        header_length,
        model,
        dataplane.settings.max_batch_size,
        dataplane.score_outputs(model),
    )
    request_id = parsed.id or request.headers.get("x-request-id") or new_event_id()
    result = await dataplane.predict(model, parsed.batch, request_id)
    tensors = result.prediction.tensors
    parameters = None
    if result.scored is not None:
        scored = result.scored
        tensors = {**tensors, **scored.tensors()}
        # Parameter values must be scalars in the protocol: the per-instance scores travel as
        # one JSON string, and as typed tensors for clients that ask for them by name.
        rows = [scored.row(i) for i in range(len(scored.predicted))]
        parameters = {"scores": orjson.dumps(rows).decode()}
    content, headers = encode_infer_response(model, parsed, tensors, parameters)
    return Response(content=content, headers=headers)


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise MalformedRequest(
            f"Inference-Header-Content-Length is {value[:40]!r}; expected the byte length of "
            "the JSON header as a non-negative integer"
        )
    return int(value)
