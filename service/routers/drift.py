"""Drift results as JSON: the latest window and the history, per model version."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from service.drift_desk import DriftDesk
from service.errors import ServiceUnavailable

router = APIRouter(prefix="/v1", tags=["Drift"])

Limit = Query(default=20, ge=0, le=1000, description="How many past windows to return")


def _desk(request: Request) -> DriftDesk:
    desk: DriftDesk | None = request.app.state.drift_desk
    if desk is None:
        raise ServiceUnavailable(
            "drift results live in Redis, which is not connected (monitoring is off or the "
            "service is starting)"
        )
    return desk


@router.get("/models/{name}/drift", summary="Drift of the latest version: latest window, history")
async def drift_latest(request: Request, name: str, limit: int = Limit) -> dict[str, Any]:
    return await run_in_threadpool(_desk(request).summary, name, None, limit)


@router.get("/models/{name}/versions/{version}/drift", summary="Drift of one model version")
async def drift_version(
    request: Request, name: str, version: str, limit: int = Limit
) -> dict[str, Any]:
    return await run_in_threadpool(_desk(request).summary, name, version, limit)
