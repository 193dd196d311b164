"""The browser console: its static files under `/console`, and the one JSON document it reads
first, `/v1/console/models`.

The files are served by name from the package's `console/static` folder (no sub-folders), so
nothing outside it can be reached. They hold no data and need no API key; the catalog and
everything else the console shows come from API endpoints, which do when keys are configured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse
from starlette.exceptions import HTTPException

from service.console.catalog import console_catalog
from service.dataplane import DataPlane

router = APIRouter(tags=["Console"])

STATIC_DIR = Path(__file__).resolve().parent.parent / "console" / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Browsers revalidate (cheap, ETag) instead of keeping an old console after an upgrade.
NO_CACHE = {"Cache-Control": "no-cache"}


@router.get(
    "/v1/console/models", summary="Served models with class names, layout and reference ranges"
)
async def models(request: Request) -> dict[str, Any]:
    dataplane: DataPlane = request.app.state.dataplane
    return console_catalog(dataplane.repository, dataplane.settings.label_lease_seconds)


@router.get("/console", include_in_schema=False)
async def console_root() -> RedirectResponse:
    # Relative, so the redirect also works behind a proxy that serves the app under a prefix.
    return RedirectResponse("console/")


@router.get("/console/", include_in_schema=False)
@router.get("/console/{asset}", include_in_schema=False)
async def console_asset(asset: str = "index.html") -> FileResponse:
    path = STATIC_DIR / asset
    media_type = MEDIA_TYPES.get(path.suffix)
    if media_type is None or path.parent != STATIC_DIR or not path.is_file():
        raise HTTPException(status_code=404)
    return FileResponse(path, media_type=media_type, headers=NO_CACHE)
