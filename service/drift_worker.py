"""The drift worker: every replica's events -> tumbling windows -> drift tests -> Redis.

Each worker is a consumer in the `drift` consumer group of every served model version's event
stream (independent of the selector's group: both see every event). A round reads a batch of
stream entries, feeds their events to the streaming alarms and moves the events, one by one,
into the shared window buffer in Redis, acknowledging the entries in the same script; then,
while the buffer holds a complete window, it evaluates the oldest window against the reference
profile and commits the report. Both steps are compare-and-set (see `drift_store.py`), so
several workers, restarts and SIGKILLs neither lose nor double-count a window.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from service.drift_detectors import DriftConfig, ReferenceSample, WindowEvaluator
from service.drift_store import DriftStore, Snapshot
from service.drift_windows import (
    BufferedEvent,
    StreamingAlarms,
    WindowPlan,
    finite_json,
    pack_event,
    plan_count_window,
    plan_time_window,
    read_buffered,
    score_histograms,
    window_data,
)
from service.events import decode_entry, event_fields
from service.redis_connection import SyncRedis
from service.settings import check_override_keys
from service.stream_group import (
    GroupReader,
    StreamDiscovery,
    StreamKey,
    round_over,
    run_rounds,
)

logger = logging.getLogger("edgeharvest.drift")

GROUP = "drift"
# Compare-and-set attempts per step before the round gives up (the next round retries).
MAX_ATTEMPTS = 8


@dataclass(frozen=True)
class DriftStream:
    """What the worker needs to know about one served model version."""

    model: str
    version: str
    reference: ReferenceSample


class DriftWorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        model = ["model", "version"]
        self.events = Counter(
            "edgeharvest_drift_events_total",
            "Events the drift worker consumed (and acknowledged).",
            model,
            registry=registry,
        )
        self.undecodable = Counter(
            "edgeharvest_drift_undecodable_events_total",
            "Stream entries (each an inference batch of events) that could not be decoded and "
            "were skipped.",
            model,
            registry=registry,
        )
        self.late = Counter(
            "edgeharvest_drift_late_events_total",
            "Events of a time window that had already closed: counted here, not tested.",
            model,
            registry=registry,
        )
        self.windows = Counter(
            "edgeharvest_drift_windows_total",
            "Windows this worker evaluated and committed.",
            model,
            registry=registry,
        )
        self.conflicts = Counter(
            "edgeharvest_drift_conflicts_total",
            "Compare-and-set steps lost to another worker (and retried).",
            model,
            registry=registry,
        )
        self.window_duration = Histogram(
            "edgeharvest_drift_window_duration_seconds",
            "Time to evaluate one window with every test.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )


class DriftWorker:
    def __init__(
        self,
        redis_client: SyncRedis,
        streams: list[DriftStream],
        *,
        consumer: str,
        config: DriftConfig,
        metrics: DriftWorkerMetrics,
        round_size: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        history_size: int = 200,
        grace_seconds: float = 10.0,
        clock: Callable[[], float] = time.time,
        discover: Callable[[set[StreamKey]], list[DriftStream]] | None = None,
        discover_seconds: float = 30.0,
    ) -> None:
        self.redis = redis_client
        self.streams = list(streams)
        self.consumer = consumer
        self.config = config
        self.metrics = metrics
        self.reader = GroupReader(
            redis_client,
            GROUP,
            consumer,
            round_size=round_size,
            block_ms=block_ms,
            claim_idle_ms=claim_idle_ms,
        )
        self.history_size = history_size
        self.grace_seconds = grace_seconds
        self.clock = clock
        self.stores = {
            (s.model, s.version): DriftStore(redis_client, s.model, s.version) for s in streams
        }
        self._stop = threading.Event()
        self._next_time_check: dict[tuple[str, str], float] = {}
        # Versions loaded into the API after this worker started (see stream_group.py).
        self._discovery = StreamDiscovery[DriftStream](discover, discover_seconds, logger)

    @property
    def span(self) -> int:
        """Events a streaming alarm stays visible: about one window."""
        return self.config.window_size or 1000

    def stop(self) -> None:
        self._stop.set()

    def ensure_groups(self) -> None:
        for store in self.stores.values():
            self.reader.ensure_group(store.stream_key)

    def run(self, burst: bool = False) -> int:
        """Process rounds until stopped; with `burst`, until every stream is drained. Returns
        the number of stream entries processed (the metrics count their events)."""
        self.ensure_groups()

        def one_round(block: bool) -> int:
            for stream in self._discovery.new_streams(set(self.stores)):
                self.add_stream(stream)
            return round_over(
                self.streams, self.process_stream, block, self._stop, self.reader.block_ms
            )

        return run_rounds(self._stop, one_round, burst, logger, f"drift worker {self.consumer}")

    def add_stream(self, stream: DriftStream) -> None:
        """Watch one more model version's events from now on (and those already logged)."""
        store = DriftStore(self.redis, stream.model, stream.version)
        self.stores[(stream.model, stream.version)] = store
        self.streams.append(stream)
        self.reader.ensure_group(store.stream_key)
        logger.info(
            "drift worker %s watches model %s v%s", self.consumer, stream.model, stream.version
        )

    def process_stream(self, stream: DriftStream, block: bool = False) -> int:
        """One round on one stream: ingest stale pending entries or new ones, close windows.
        Returns the number of entries."""
        store = self.stores[(stream.model, stream.version)]
        entries = self.reader.read_round(store.stream_key, block=block)
        if entries:
            self._ingest(stream, store, entries)
        self.close_windows(stream)
        return len(entries)

    def _ingest(
        self,
        stream: DriftStream,
        store: DriftStore,
        entries: list[tuple[bytes, dict[bytes, bytes]]],
    ) -> None:
        labels = (stream.model, stream.version)
        packed: list[tuple[str, bytes]] = []
        percentiles: list[dict[str, float]] = []
        undecodable = 0
        for entry_id, fields in entries:
            try:
                events = decode_entry(fields)
            except (KeyError, ValueError) as exc:
                undecodable += 1
                logger.warning("skipping an undecodable entry on %s: %s", store.stream_key, exc)
                continue
            # Keyed by event id, so a redelivered entry overwrites its own events; ordered by
            # (entry id, row), so windows follow the stream.
            for row, event in enumerate(events):
                timestamp = float(event.meta["ts"])
                buffered = pack_event(entry_id.decode(), row, timestamp, event_fields(event))
                packed.append((event.id, buffered))
                percentiles.append(event.percentiles)
        ids = [entry_id for entry_id, _ in entries]
        for _ in range(MAX_ATTEMPTS):
            snapshot = store.streaming()
            alarms = StreamingAlarms(snapshot.value, self.span)
            for event_percentiles in percentiles:
                alarms.update(event_percentiles)
            if store.ingest(snapshot, alarms.state(), GROUP, packed, ids):
                break
            self.metrics.conflicts.labels(*labels).inc()
        else:
            # Left pending: claimed again once idle, by this worker or another.
            logger.warning("could not ingest %d events on %s; retried later", len(ids), labels)
            return
        self.metrics.events.labels(*labels).inc(len(packed))
        if undecodable:
            self.metrics.undecodable.labels(*labels).inc(undecodable)

    def close_windows(self, stream: DriftStream) -> list[dict[str, Any]]:
        """Evaluate and commit every complete window in the buffer; returns their reports.

        Time windows are looked at no more than every tenth of a window (at most every 5 s):
        finding a closed period reads the whole buffer, which holds the open period's events.
        """
        seconds = self.config.window_seconds
        if seconds is not None:
            now = self.clock()
            key = (stream.model, stream.version)
            if now < self._next_time_check.get(key, -math.inf):
                return []
            self._next_time_check[key] = now + min(seconds / 10, 5.0)
        reports = []
        while not self._stop.is_set():
            report = self._close_one(stream)
            if report is None:
                break
            reports.append(report)
        return reports

    def _close_one(self, stream: DriftStream) -> dict[str, Any] | None:
        store = self.stores[(stream.model, stream.version)]
        labels = (stream.model, stream.version)
        for _ in range(MAX_ATTEMPTS):
            snapshot = store.state()
            # Cheap check first: most rounds do not complete a count window.
            size = self.config.window_size
            if size is not None and store.buffered_count() < size:
                return None
            buffered = {k: read_buffered(v) for k, v in store.buffered().items()}
            plan = self._plan(buffered, snapshot)
            if plan is None:
                return None
            state, report = self._evaluate(stream, snapshot, plan, buffered)
            removed = plan.event_ids + plan.late_ids
            if store.close_window(snapshot, state, report, self.history_size, removed):
                if plan.late_ids:
                    self.metrics.late.labels(*labels).inc(len(plan.late_ids))
                if report is None:
                    continue
                self.metrics.windows.labels(*labels).inc()
                return report
            self.metrics.conflicts.labels(*labels).inc()
        return None

    def _plan(self, buffered: dict[str, BufferedEvent], snapshot: Snapshot) -> WindowPlan | None:
        next_index = int(snapshot.value.get("next_index", 0))
        if self.config.window_seconds is not None:
            return plan_time_window(
                buffered, self.config.window_seconds, next_index, self.clock(), self.grace_seconds
            )
        return plan_count_window(buffered, self.config.window_size or 1, next_index)

    def _evaluate(
        self,
        stream: DriftStream,
        snapshot: Snapshot,
        plan: WindowPlan,
        buffered: dict[str, BufferedEvent],
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        previous = snapshot.value
        state: dict[str, Any] = {
            "next_index": int(previous.get("next_index", 0)),
            "streaks": dict(previous.get("streaks", {})),
            "windows_evaluated": int(previous.get("windows_evaluated", 0)),
            "events_evaluated": int(previous.get("events_evaluated", 0)),
            "late_events": int(previous.get("late_events", 0)) + len(plan.late_ids),
        }
        if not plan.event_ids:
            return state, None
        started = time.perf_counter()
        events = [buffered[i].event() for i in plan.event_ids]
        reference = stream.reference
        data = window_data(events, reference.score_distributions)
        evaluator = WindowEvaluator(reference, self.config, streaks=state["streaks"])
        report = evaluator.evaluate(
            data, index=plan.index, start_time=plan.start_time, end_time=plan.end_time
        )
        duration = time.perf_counter() - started
        self.metrics.window_duration.observe(duration)
        state.update(
            next_index=plan.index + 1,
            streaks=evaluator.state()["streaks"],
            windows_evaluated=state["windows_evaluated"] + 1,
            events_evaluated=state["events_evaluated"] + len(events),
        )
        summary = {
            **report.as_dict(),
            "model": stream.model,
            "version": stream.version,
            "evaluated_at": self.clock(),
            "duration_seconds": duration,
            "histograms": score_histograms(reference.score_distributions, data.scores),
            "class_counts": _class_counts(data.predicted, len(reference.class_counts)),
        }
        return state, finite_json(summary)


def _class_counts(predicted: np.ndarray, n_classes: int) -> list[int]:
    known = predicted[(predicted >= 0) & (predicted < n_classes)]
    return [int(c) for c in np.bincount(known, minlength=n_classes)]


def drift_config(
    settings_window_size: int, window_seconds: float | None, overrides: dict[str, Any]
) -> DriftConfig:
    """The evaluator's config from settings and EDGEHARVEST_DRIFT overrides; names a bad key."""
    check_override_keys(overrides, DriftConfig, "EDGEHARVEST_DRIFT")
    values: dict[str, Any] = {
        "window_size": None if window_seconds is not None else settings_window_size,
        "window_seconds": window_seconds,
        **overrides,
    }
    for name in ("tests", "alarm_tests"):
        if values.get(name) is not None:
            values[name] = frozenset(values[name])
    try:
        return DriftConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"EDGEHARVEST_DRIFT: {exc}") from None
