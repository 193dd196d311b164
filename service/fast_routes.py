"""The prediction endpoints as a plain ASGI path in front of the framework.

For a small model, FastAPI's routing, dependency solving and middleware cost more than the
inference itself. POSTs to the two prediction endpoints are matched here with one regular
expression and answered directly; everything else (and these endpoints' OpenAPI documentation)
goes through FastAPI. The handlers are shared (`prediction_handlers.py`), errors become the
same `{"error": ...}` bodies, and requests are counted in the same metrics.
"""

from __future__ import annotations

import logging
import re
import time

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from service.dataplane import DataPlane
from service.errors import EdgeharvestError
from service.http_body import receive_limited_body, send_body
from service.prediction_handlers import handle_infer, handle_predict
from service.request_metrics import model_labels

logger = logging.getLogger("edgeharvest")

_ROUTE = re.compile(
    r"^/(?:(?P<oip>v2)|v1)/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
    r"/(?P<action>infer|predict)$"
)
# Route templates as metric labels, the same strings FastAPI's routes carry.
_ENDPOINTS = {
    (True, False): "/v2/models/{name}/infer",
    (True, True): "/v2/models/{name}/versions/{version}/infer",
    (False, False): "/v1/models/{name}/predict",
    (False, True): "/v1/models/{name}/versions/{version}/predict",
}


class FastPredictionRoutes:
    def __init__(self, app: ASGIApp, dataplane: DataPlane) -> None:
        self.app = app
        self.dataplane = dataplane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        match = _ROUTE.match(scope["path"])
        if match is None or (match["oip"] is not None) != (match["action"] == "infer"):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        name, version = match["name"], match["version"]
        oip = match["oip"] is not None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        dataplane = self.dataplane
        try:
            body = await receive_limited_body(receive, headers, dataplane.settings.max_body_bytes)
            handler = handle_infer if oip else handle_predict
            content, response_headers = await handler(dataplane, name, version, body, headers)
            status = 200
        except EdgeharvestError as exc:
            status, content = exc.status_code, orjson.dumps({"error": exc.message})
            # E.g. Retry-After on a 503 from a saturated batcher.
            response_headers = {"content-type": "application/json", **getattr(exc, "headers", {})}
        except Exception as exc:
            logger.exception("unhandled error on POST %s", scope["path"])
            status = 500
            content = orjson.dumps(
                {"error": f"internal error ({type(exc).__name__}); the server log has details"}
            )
            response_headers = {"content-type": "application/json"}
        raw_headers = [(k.encode(), v.encode()) for k, v in response_headers.items()]
        await send_body(send, status, content, raw_headers)
        self._record(name, version, _ENDPOINTS[(oip, version is not None)], status, start)

    def _record(
        self, name: str, version: str | None, endpoint: str, status: int, start: float
    ) -> None:
        labels = model_labels(self.dataplane.repository, name, version)
        self.dataplane.metrics.record_request(
            *labels, endpoint, status, time.perf_counter() - start
        )
