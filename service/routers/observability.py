"""`/metrics` for Prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.metrics import ServiceMetrics

router = APIRouter(tags=["Observability"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    service_metrics: ServiceMetrics = request.app.state.metrics
    return Response(generate_latest(service_metrics.registry), media_type=CONTENT_TYPE_LATEST)
