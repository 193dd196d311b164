"""ASGI middleware counting requests and timing them, with bounded label values.

A pure ASGI middleware (not BaseHTTPMiddleware, which costs a task and a stream per request).
The router records the matched route in the scope, so after the call the middleware knows the
route template and the path parameters; unknown models are labelled "unknown".
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import EdgeharvestError
from service.metrics import ServiceMetrics
from service.model_repository import ModelRepository

UNKNOWN = "unknown"


def model_labels(
    repository: ModelRepository, name: str | None, version: str | None
) -> tuple[str, str]:
    """Model and version labels of a request: unknown names never become new label values."""
    if name is None:
        return "", ""
    try:
        model = repository.get(name, version)
    except EdgeharvestError:
        return UNKNOWN, UNKNOWN
    return model.name, model.version


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, repository: ModelRepository) -> None:
        self.app = app
        self.metrics = metrics
        self.repository = repository

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        responded = False

        async def send_and_record(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start" and not responded:
                responded = True
                status = message["status"]
                self._record(scope, status, time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            if not responded:
                self._record(scope, status, time.perf_counter() - start)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        endpoint = getattr(scope.get("route"), "path", None) or "unmatched"
        params = scope.get("path_params") or {}
        labels = model_labels(self.repository, params.get("name"), params.get("version"))
        self.metrics.record_request(*labels, endpoint, status, seconds)
