"""REST for labeling teams: claim under a lease, heartbeat, label, skip, discard, stats, export.

Every path exists for the latest version (`/v1/models/{name}/queue/...`) and for a given one
(`/v1/models/{name}/versions/{version}/queue/...`). Redis calls run in worker threads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Body, Header, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from service.errors import ServiceUnavailable
from service.label_desk import LabelDesk
from service.labeling import jsonl, label_studio_config

router = APIRouter(prefix="/v1", tags=["Labeling"])

LATEST = "/models/{name}/queue"
VERSIONED = "/models/{name}/versions/{version}/queue"

Text = Field(min_length=1, max_length=256)


class ClaimRequest(BaseModel):
    labeler: str = Text
    count: int = Field(default=1, ge=1, le=100)
    lease_seconds: float | None = Field(default=None, gt=0, le=86400)


class LeaseRequest(BaseModel):
    token: str = Text
    lease_seconds: float | None = Field(default=None, gt=0, le=86400)


class LabelRequest(BaseModel):
    token: str = Text
    labeler: str = Text
    label: str = Text
    # Also accepted as the Idempotency-Key header; default: token and label.
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=256)


class SkipRequest(BaseModel):
    token: str = Text
    labeler: str = Text


class DiscardRequest(BaseModel):
    token: str = Text
    labeler: str = Text
    reason: str = Field(default="", max_length=1024)


def _desk(request: Request) -> LabelDesk:
    desk: LabelDesk | None = request.app.state.label_desk
    if desk is None:
        raise ServiceUnavailable(
            "the labeling queue needs Redis, which is not connected (monitoring is off or "
            "the service is starting)"
        )
    return desk


Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def _both(
    method: Callable[..., Any], suffix: str, summary: str, **kwargs: Any
) -> Callable[[Endpoint], Endpoint]:
    def register(endpoint: Endpoint) -> Endpoint:
        method(LATEST + suffix, summary=f"{summary} (latest version)", **kwargs)(endpoint)
        method(VERSIONED + suffix, summary=summary, **kwargs)(endpoint)
        return endpoint

    return register


@_both(router.post, "/claim", "Claim items under a lease")
async def claim(
    request: Request, body: ClaimRequest, name: str, version: str | None = None
) -> dict[str, Any]:
    items = await run_in_threadpool(
        _desk(request).claim, name, version, body.labeler, body.count, body.lease_seconds
    )
    return {"items": items}


@_both(router.post, "/items/{item_id}/heartbeat", "Extend a lease")
async def heartbeat(
    request: Request, body: LeaseRequest, name: str, item_id: str, version: str | None = None
) -> dict[str, float]:
    expires_at = await run_in_threadpool(
        _desk(request).heartbeat, name, version, item_id, body.token, body.lease_seconds
    )
    return {"expires_at": expires_at}


@_both(router.post, "/items/{item_id}/label", "Label a leased item")
async def label(
    request: Request,
    body: LabelRequest,
    name: str,
    item_id: str,
    version: str | None = None,
    idempotency_key: str | None = Header(default=None, max_length=256),
) -> dict[str, Any]:
    result = await run_in_threadpool(
        _desk(request).label,
        name,
        version,
        item_id,
        body.token,
        body.label,
        body.labeler,
        body.idempotency_key or idempotency_key,
    )
    return {
        "item_id": result.item_id,
        "label": result.label,
        "labeler": result.labeler,
        "labeled_at": result.labeled_at,
        "replayed": result.replayed,
    }


@_both(router.post, "/items/{item_id}/skip", "Give a leased item back for someone else")
async def skip(
    request: Request, body: SkipRequest, name: str, item_id: str, version: str | None = None
) -> dict[str, str]:
    await run_in_threadpool(_desk(request).skip, name, version, item_id, body.token, body.labeler)
    return {"item_id": item_id, "state": "queued"}


@_both(router.post, "/items/{item_id}/discard", "Discard a leased item for good")
async def discard(
    request: Request, body: DiscardRequest, name: str, item_id: str, version: str | None = None
) -> dict[str, str]:
    await run_in_threadpool(
        _desk(request).discard, name, version, item_id, body.token, body.labeler, body.reason
    )
    return {"item_id": item_id, "state": "discarded"}


@_both(router.get, "/items/{item_id}", "An item, its state and its history")
async def item(
    request: Request, name: str, item_id: str, version: str | None = None
) -> dict[str, Any]:
    return await run_in_threadpool(_desk(request).item, name, version, item_id)


@_both(
    router.get,
    "/items/{item_id}/input.png",
    "The item's input as an image",
    response_class=Response,
)
async def item_png(
    request: Request, name: str, item_id: str, version: str | None = None
) -> Response:
    png = await run_in_threadpool(_desk(request).png, name, version, item_id)
    return Response(png, media_type="image/png")


@_both(router.get, "/stats", "Queue depth by lane and class, oldest item, labels")
async def stats(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    result = await run_in_threadpool(_desk(request).stats, name, version)
    return {
        "queued": result.queued,
        "leased": result.leased,
        "expired_leases": result.expired_leases,
        "labeled": result.labeled,
        "discarded": result.discarded,
        "queued_by_lane": result.queued_by_lane,
        "queued_by_class": result.queued_by_class,
        "oldest_queued_age_seconds": result.oldest_queued_age_seconds,
        "labeled_last_hour": result.labeled_last_hour,
    }


@_both(router.get, "/export.jsonl", "Labeled items as JSON lines", response_class=Response)
async def export_jsonl(
    request: Request, name: str, version: str | None = None, since: float | None = None
) -> StreamingResponse:
    desk = _desk(request)
    desk.manifest(name, version)  # 404 before the stream starts
    records = desk.export_labeled(name, version, since)
    return StreamingResponse(
        iterate_in_threadpool(jsonl(records)), media_type="application/x-ndjson"
    )


@_both(
    router.get,
    "/export/label-studio",
    "Queued items as Label Studio tasks",
    response_class=Response,
)
async def export_label_studio(request: Request, name: str, version: str | None = None) -> Response:
    desk = _desk(request)
    tasks = await run_in_threadpool(lambda: list(desk.export_label_studio(name, version)))
    return Response(orjson.dumps(tasks), media_type="application/json")


@_both(
    router.get,
    "/export/label-studio/config.xml",
    "The matching Label Studio config",
    response_class=Response,
)
async def export_label_studio_config(
    request: Request, name: str, version: str | None = None
) -> Response:
    manifest = _desk(request).manifest(name, version)
    return Response(label_studio_config(manifest), media_type="application/xml")


@_both(router.post, "/import/label-studio", "Label Studio annotations back as labels")
async def import_label_studio(
    request: Request,
    name: str,
    version: str | None = None,
    tasks: list[dict[str, Any]] = Body(...),  # noqa: B008 (FastAPI's declaration style)
) -> dict[str, Any]:
    return await run_in_threadpool(_desk(request).import_label_studio, name, version, tasks)
