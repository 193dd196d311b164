"""What labeling teams do, for every served model version: one object the REST router calls.

Holds a synchronous Redis client (the queue's scripts are short) and is called from worker
threads by the router, so the event loop never waits on Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from service.errors import EdgeharvestError, InvalidInput
from service.label_queue import LabelQueue, LabelResult, QueueStats
from service.labeling import (
    export_record,
    label_studio_annotations,
    label_studio_task,
    png_of,
    render_item,
)
from service.manifest import Manifest
from service.model_repository import ModelRepository
from service.redis_connection import SyncRedis


class LabelDesk:
    def __init__(
        self,
        repository: ModelRepository,
        redis: SyncRedis,
        lease_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.repository = repository
        self.clock = clock
        self._redis = redis
        self._lease_seconds = lease_seconds
        self._queues: dict[tuple[str, str], LabelQueue] = {}

    def _queue(self, name: str, version: str) -> LabelQueue:
        """The queue of a served version, made on first use (versions may be loaded later)."""
        queue = self._queues.get((name, version))
        if queue is None:
            queue = LabelQueue(self._redis, name, version, lease_seconds=self._lease_seconds)
            self._queues[(name, version)] = queue
        return queue

    @property
    def queues(self) -> list[LabelQueue]:
        return [self._queue(m.name, m.version) for m in self.repository]

    def _resolve(self, name: str, version: str | None) -> tuple[LabelQueue, Manifest]:
        model = self.repository.get(name, version)
        return self._queue(model.name, model.version), model.manifest

    def _check_label(self, manifest: Manifest, label: str) -> None:
        if label not in manifest.class_names:
            raise InvalidInput(
                f"label {label[:64]!r} is not a class of model '{manifest.name}'; expected one "
                f"of {manifest.class_names}"
            )

    def claim(
        self,
        name: str,
        version: str | None,
        labeler: str,
        count: int,
        lease_seconds: float | None,
    ) -> list[dict[str, Any]]:
        queue, manifest = self._resolve(name, version)
        claimed = queue.claim(labeler, count, self.clock(), lease_seconds)
        return [
            {**render_item(c.item, manifest), "token": c.token, "expires_at": c.expires_at}
            for c in claimed
        ]

    def heartbeat(
        self,
        name: str,
        version: str | None,
        item_id: str,
        token: str,
        lease_seconds: float | None,
    ) -> float:
        queue, _ = self._resolve(name, version)
        return queue.heartbeat(item_id, token, self.clock(), lease_seconds)

    def label(
        self,
        name: str,
        version: str | None,
        item_id: str,
        token: str,
        label: str,
        labeler: str,
        idempotency_key: str | None,
    ) -> LabelResult:
        queue, manifest = self._resolve(name, version)
        self._check_label(manifest, label)
        # Without a key, a resubmission of the same label under the same lease is the replay.
        key = idempotency_key or f"{token}:{label}"
        return queue.label(item_id, token, label, labeler, key, self.clock())

    def skip(self, name: str, version: str | None, item_id: str, token: str, labeler: str) -> None:
        queue, _ = self._resolve(name, version)
        queue.skip(item_id, token, labeler, self.clock())

    def discard(
        self, name: str, version: str | None, item_id: str, token: str, labeler: str, reason: str
    ) -> None:
        queue, _ = self._resolve(name, version)
        queue.discard(item_id, token, labeler, reason, self.clock())

    def item(self, name: str, version: str | None, item_id: str) -> dict[str, Any]:
        queue, manifest = self._resolve(name, version)
        stored = queue.get(item_id)
        return {
            **render_item(stored.item, manifest),
            "state": stored.state.value,
            "enqueued_at": stored.enqueued_at,
            "label": None
            if stored.label is None
            else {
                "label": stored.label.label,
                "labeler": stored.label.labeler,
                "labeled_at": stored.label.labeled_at,
            },
            "discard": None
            if stored.discard is None
            else {
                "labeler": stored.discard.labeler,
                "reason": stored.discard.reason,
                "discarded_at": stored.discard.discarded_at,
            },
            "skipped_by": list(stored.skipped_by),
            "history": [
                {"event": h.event, "at": h.at, "by": h.by, "detail": h.detail}
                for h in stored.history
            ],
        }

    def png(self, name: str, version: str | None, item_id: str) -> bytes:
        queue, manifest = self._resolve(name, version)
        return png_of(queue.get(item_id).item, manifest)

    def stats(self, name: str, version: str | None) -> QueueStats:
        queue, _ = self._resolve(name, version)
        return queue.stats(self.clock())

    def export_labeled(
        self, name: str, version: str | None, since: float | None
    ) -> Iterator[dict[str, Any]]:
        queue, manifest = self._resolve(name, version)
        for stored in queue.iter_labeled(since=since):
            yield export_record(stored, manifest)

    def export_label_studio(self, name: str, version: str | None) -> Iterator[dict[str, Any]]:
        queue, manifest = self._resolve(name, version)
        for stored in queue.iter_queued():
            yield label_studio_task(stored, manifest)

    def manifest(self, name: str, version: str | None) -> Manifest:
        return self._resolve(name, version)[1]

    def import_label_studio(self, name: str, version: str | None, tasks: object) -> dict[str, Any]:
        """Apply every annotation it can; the others are listed with the reason, not fatal."""
        queue, manifest = self._resolve(name, version)
        labeled = replayed = 0
        refused = []
        for item_id, label, labeler, key in label_studio_annotations(tasks):
            try:
                self._check_label(manifest, label)
                result = queue.import_label(item_id, label, labeler, key, self.clock())
            except EdgeharvestError as exc:
                refused.append({"item_id": item_id, "error": exc.message})
                continue
            if result.replayed:
                replayed += 1
            else:
                labeled += 1
        return {"labeled": labeled, "replayed": replayed, "refused": refused}
