"""Loading a model's versions again from the repository while the service keeps serving.

`load` reads every version of one model from disk in a worker thread: parse, check against its
manifest, warm up, check the reference profile against the model's sha256, build the kNN index.
Only when all of that worked does the data plane swap the new versions in; until then, and if
anything fails, the current versions keep serving. One load at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from service.dataplane import DataPlane
from service.model_repository import ModelRepository
from service.onnx_classifier import OnnxClassifier, SessionConfig
from service.reference_profile import ReferenceProfile


class ModelLifecycle:
    def __init__(
        self,
        dataplane: DataPlane,
        config: SessionConfig,
        build_scorers: Callable[
            [dict[tuple[str, str], ReferenceProfile]], dict[tuple[str, str], Any]
        ],
    ) -> None:
        self.dataplane = dataplane
        self.config = config
        self.build_scorers = build_scorers
        self._lock = asyncio.Lock()

    def index(self) -> list[dict[str, str]]:
        """Every model version on disk and whether it is served (Triton's repository index)."""
        repository = self.dataplane.repository
        served = {(m.name, m.version) for m in repository}
        entries = []
        for manifest in ModelRepository.find_manifests(self.dataplane.settings.model_dir):
            key = (manifest.name, manifest.version)
            state = "READY" if key in served and repository.get(*key).ready else "UNAVAILABLE"
            entries.append({"name": manifest.name, "version": manifest.version, "state": state})
        for model in repository:  # served, but gone from disk since
            if not any(e["name"] == model.name and e["version"] == model.version for e in entries):
                entries.append({"name": model.name, "version": model.version, "state": "READY"})
        return sorted(entries, key=lambda e: (e["name"], e["version"]))

    async def load(self, name: str) -> list[OnnxClassifier]:
        async with self._lock:
            models, references = await run_in_threadpool(
                ModelRepository.load_versions,
                self.dataplane.settings.model_dir,
                name,
                self.config,
            )
            scorers = (
                await run_in_threadpool(self.build_scorers, references)
                if self.dataplane.monitor is not None
                else {}
            )
            await self.dataplane.swap_in(name, models, references, scorers)
            return models


def describe(models: list[OnnxClassifier]) -> list[dict[str, Any]]:
    return [{"version": m.version, "sha256": m.manifest.sha256} for m in models]
