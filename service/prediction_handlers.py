"""The two prediction endpoints, independent of the HTTP framework.

Both the FastAPI routes (which document them in OpenAPI) and the fast ASGI path
(`fast_routes.py`, which serves the traffic) call these, so the behaviour has one home.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from service.dataplane import DataPlane
from service.errors import MalformedRequest
from service.events import new_event_id
from service.inference_protocol import HEADER_LENGTH, encode_infer_response, parse_infer_request
from service.predict_protocol import encode_predict_response, parse_predict_request

JSON_HEADERS = {"content-type": "application/json"}


def _header_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise MalformedRequest(
            f"Inference-Header-Content-Length is {value[:40]!r}; expected the byte length of "
            "the JSON header as a non-negative integer"
        )
    return int(value)


async def handle_predict(
    dataplane: DataPlane, name: str, version: str | None, body: bytes, headers: Mapping[str, str]
) -> tuple[bytes, dict[str, str]]:
    model = dataplane.model(name, version)
    batch, return_probabilities = parse_predict_request(
        body, model, dataplane.settings.max_batch_size
    )
    request_id = headers.get("x-request-id") or new_event_id()
    result = await dataplane.predict(model, batch, request_id)
    content = encode_predict_response(model, result.prediction, result.scored, return_probabilities)
    return content, JSON_HEADERS


async def handle_infer(
    dataplane: DataPlane, name: str, version: str | None, body: bytes, headers: Mapping[str, str]
) -> tuple[bytes, dict[str, str]]:
    model = dataplane.model(name, version)
    parsed = parse_infer_request(
        body,
        _header_length(headers),
        model,
        dataplane.settings.max_batch_size,
        dataplane.score_outputs(model),
    )
    request_id = parsed.id or headers.get("x-request-id") or new_event_id()
    result = await dataplane.predict(model, parsed.batch, request_id)
    tensors = result.prediction.tensors
    parameters = None
    scores = result.scores_json_string()
    if scores is not None:
        if parsed.outputs is not None and any(o.name not in tensors for o in parsed.outputs):
            # Score outputs asked for by name; slicing them for every request would cost more
            # than the rest of the response.
            assert result.scored is not None
            tensors = {**tensors, **result.scored.tensors()}
        # Parameter values must be scalars in the protocol: the per-instance scores travel as
        # one JSON string, and as typed tensors for clients that ask for them by name. The
        # string is this request's serialised rows, escaped by one orjson.dumps.
        parameters = {"scores": orjson.Fragment(scores)}
    return encode_infer_response(model, parsed, tensors, parameters)
