"""Open Inference Protocol (KServe V2 / Triton) REST endpoints; the logic lives in DataPlane."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service.dataplane import DataPlane
from service.http_body import read_limited_body
from service.openapi_schemas import INFER_REQUEST_SCHEMA
from service.prediction_handlers import handle_infer

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])


def _dataplane(request: Request) -> DataPlane:
    dataplane: DataPlane = request.app.state.dataplane
    return dataplane


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
    # Documents the endpoint in OpenAPI. `fast_routes.py`, in front of the app, answers every
    # request to this path with the same handler, so this body only runs if that is removed.
    dataplane = _dataplane(request)
    body = await read_limited_body(
        request.stream(), request.headers, dataplane.settings.max_body_bytes
    )
    content, headers = await handle_infer(dataplane, name, version, body, request.headers)
    return Response(content=content, headers=headers)


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
