"""Metrics of the selector (and later drift) workers, on their own injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from service.metrics import LATENCY_BUCKETS
from service.selection_policy import RoundOutcome


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        model = ["model", "version"]
        self.events = Counter(
            "edgeharvest_selector_events_total",
            "Events the selector consumed (and acknowledged).",
            model,
            registry=registry,
        )
        self.undecodable = Counter(
            "edgeharvest_selector_undecodable_events_total",
            "Stream entries (each an inference batch of events) that could not be decoded and "
            "were skipped.",
            model,
            registry=registry,
        )
        self.selected = Counter(
            "edgeharvest_selector_selected_total",
            "Events selected for labeling, by lane (uncertain, novel, random).",
            [*model, "lane"],
            registry=registry,
        )
        self.skipped = Counter(
            "edgeharvest_selector_skipped_total",
            "Events not selected, by the reason that stopped them.",
            [*model, "reason"],
            registry=registry,
        )
        self.enqueued = Counter(
            "edgeharvest_selector_enqueued_total",
            "Items newly added to the labeling queue.",
            model,
            registry=registry,
        )
        self.rounds = Histogram(
            "edgeharvest_selector_round_duration_seconds",
            "Time to select and enqueue one round of events.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def events_processed(self, model: str, version: str, count: int, undecodable: int) -> None:
        self.events.labels(model, version).inc(count)
        if undecodable:
            self.undecodable.labels(model, version).inc(undecodable)

    def observe_round(self, model: str, version: str, outcome: RoundOutcome, enqueued: int) -> None:
        for selection in outcome.selected:
            self.selected.labels(model, version, selection.lane).inc()
        for reason, count in outcome.skipped.items():
            self.skipped.labels(model, version, reason).inc(count)
        self.enqueued.labels(model, version).inc(enqueued)

    def round_duration(self, seconds: float) -> None:
        self.rounds.observe(seconds)
