"""What readers of drift results ask, for every served model version (API and report)."""

from __future__ import annotations

from typing import Any

from service.drift_store import DriftStore
from service.model_repository import ModelRepository
from service.redis_connection import SyncRedis


def drift_summary(store: DriftStore, has_reference: bool, limit: int) -> dict[str, Any]:
    """The latest window, the newest `limit` windows and the streaming alarms of one version."""
    state, streaming, latest = store.overview()
    return {
        "model": store.model,
        "version": store.version,
        "has_reference": has_reference,
        "windows_evaluated": int(state.get("windows_evaluated", 0)),
        "events_evaluated": int(state.get("events_evaluated", 0)),
        "late_events": int(state.get("late_events", 0)),
        "buffered_events": store.buffered_count(),
        "alarm": bool(latest and latest.get("alarm")),
        "streaming": {
            score: {
                "alarm": bool(value.get("alarm")),
                "detections": int(value.get("detections", 0)),
            }
            for score, value in sorted(streaming.items())
        },
        "latest": latest,
        "history": store.history(limit),
    }


class DriftDesk:
    def __init__(self, repository: ModelRepository, redis: SyncRedis) -> None:
        self.repository = repository
        self._redis = redis
        self._stores: dict[tuple[str, str], DriftStore] = {}

    def _store(self, name: str, version: str) -> DriftStore:
        """The drift keys of a served version, made on first use (versions may be loaded later)."""
        store = self._stores.get((name, version))
        if store is None:
            store = self._stores[(name, version)] = DriftStore(self._redis, name, version)
        return store

    @property
    def stores(self) -> list[DriftStore]:
        return [self._store(m.name, m.version) for m in self.repository]

    def summary(self, name: str, version: str | None, limit: int) -> dict[str, Any]:
        model = self.repository.get(name, version)  # raises ModelNotFound, naming what exists
        key = (model.name, model.version)
        return drift_summary(self._store(*key), key in self.repository.references, limit)
