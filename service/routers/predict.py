"""`/v1`: a simple JSON prediction endpoint for clients that do not speak the OIP."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.dataplane import DataPlane
from service.events import new_event_id
from service.http_body import read_body
from service.openapi_schemas import PREDICT_REQUEST_SCHEMA
from service.predict_protocol import encode_predict_response, parse_predict_request

router = APIRouter(prefix="/v1", tags=["Simple JSON"])

_PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PREDICT_REQUEST_SCHEMA}},
    }
}


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


@router.post(
    "/models/{name}/predict", summary="Predict (latest version)", openapi_extra=_PREDICT_OPENAPI
)
@router.post(
    "/models/{name}/versions/{version}/predict", summary="Predict", openapi_extra=_PREDICT_OPENAPI
)
async def predict(request: Request, name: str, version: str | None = None) -> Response:
    dataplane: DataPlane = request.app.state.dataplane
    model = dataplane.model(name, version)
    body = await read_body(request, dataplane.settings.max_body_bytes)
    batch, return_probabilities = parse_predict_request(
        body, model, dataplane.settings.max_batch_size
    )
    request_id = request.headers.get("x-request-id") or new_event_id()
    result = await dataplane.predict(model, batch, request_id)
    content = encode_predict_response(model, result.prediction, result.scored, return_probabilities)
    return Response(content=content, media_type="application/json")
