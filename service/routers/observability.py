"""`/metrics` for Prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from service.metrics import ServiceMetrics

router = APIRouter(tags=["Observability"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    service_metrics: ServiceMetrics = request.app.state.metrics
    # Collecting reads the labeling queue from Redis (and, with several worker processes, every
    # process's metric files): keep that off the event loop.
    body = await run_in_threadpool(generate_latest, service_metrics.scrape_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
