"""The model repository over HTTP, as Triton's repository extension: index and (re)load."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service.errors import BadRequest, ModelLoadError
from service.model_lifecycle import ModelLifecycle, describe

router = APIRouter(prefix="/v2/repository", tags=["Model repository"])


def _lifecycle(request: Request) -> ModelLifecycle:
    lifecycle: ModelLifecycle = request.app.state.lifecycle
    return lifecycle


@router.post("/index", summary="Every model version on disk and whether it is served")
async def index(request: Request) -> list[dict[str, str]]:
    return _lifecycle(request).index()


@router.post(
    "/models/{name}/load",
    summary="Load every version of a model from the repository again, without downtime",
)
async def load(request: Request, name: str) -> dict[str, Any]:
    try:
        models = await _lifecycle(request).load(name)
    except ModelLoadError as exc:
        raise BadRequest(
            f"model '{name}' was not loaded; the versions served before keep serving: {exc.message}"
        ) from None
    return {"name": name, "versions": describe(models)}
