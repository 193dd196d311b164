"""`/v1`: a simple JSON prediction endpoint for clients that do not speak the OIP."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.dataplane import DataPlane
from service.http_body import read_limited_body
from service.openapi_schemas import PREDICT_REQUEST_SCHEMA
from service.prediction_handlers import handle_predict

router = APIRouter(prefix="/v1", tags=["Simple JSON"])

_PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PREDICT_REQUEST_SCHEMA}},
    }
}


@router.post(
    "/models/{name}/predict", summary="Predict (latest version)", openapi_extra=_PREDICT_OPENAPI
)
@router.post(
    "/models/{name}/versions/{version}/predict", summary="Predict", openapi_extra=_PREDICT_OPENAPI
)
async def predict(request: Request, name: str, version: str | None = None) -> Response:
    # Documents the endpoint in OpenAPI. `fast_routes.py`, in front of the app, answers every
    # request to this path with the same handler, so this body only runs if that is removed.
    dataplane: DataPlane = request.app.state.dataplane
    body = await read_limited_body(
        request.stream(), request.headers, dataplane.settings.max_body_bytes
    )
    content, headers = await handle_predict(dataplane, name, version, body, request.headers)
    return Response(content=content, headers=headers)


@router.get("/models", summary="Served models and their versions")
async def list_models(request: Request) -> dict[str, list[dict[str, object]]]:
    dataplane: DataPlane = request.app.state.dataplane
    repository = dataplane.repository
    return {
        "models": [
            {
                "name": name,
                "versions": repository.versions(name),
                "default_version": repository.get(name).version,
            }
            for name in repository.names
        ]
    }
