"""The selector worker: event stream -> selection policy -> labeling queue.

Each worker is a consumer in the `selector` consumer group of every served model version's
event stream, so any number of workers share the load. A stream entry holds the events of one
inference batch; it is acknowledged only after its round's picks (from all its events) are in
the queue; enqueueing is idempotent by event id and content hash, so a worker that dies
mid-round leaves its entries pending, another worker (or the same one after a
restart) claims them back with XAUTOCLAIM, and the replay neither loses nor duplicates anything.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from redis.commands.core import Script

from service.events import Event, decode_entry
from service.label_queue import LabelQueue, QueueItem
from service.redis_connection import SyncRedis
from service.redis_keys import event_stream, selector_budget
from service.selection_policy import (
    NOVEL_LANE,
    RANDOM_LANE,
    Candidate,
    Selection,
    SelectionConfig,
    WindowBudget,
    content_hash,
    select_round,
)
from service.settings import check_override_keys
from service.stream_group import (
    GroupReader,
    StreamDiscovery,
    StreamKey,
    round_over,
    run_rounds,
)
from service.worker_metrics import WorkerMetrics

logger = logging.getLogger("edgeharvest.selector")

GROUP = "selector"

# KEYS = the budget counters of one model version and window (one hash tag, one Cluster slot)
# ARGV[1] = their time to live in seconds, ARGV[1 + i] = the amount added to KEYS[i]
# A script rather than MULTI: the cluster client of redis-py 5 (which we support) refuses
# transactions, and a counter without its expiry (a crash between the two) would never go away.
SPEND_BUDGET_LUA = """
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, ARGV[i + 1])
  redis.call('EXPIRE', key, ARGV[1])
end
return #KEYS
"""


@dataclass(frozen=True)
class ModelStream:
    """What the worker needs to know about one served model version."""

    model: str
    version: str
    class_names: list[str]


def candidate_of(event: Event) -> Candidate:
    meta = event.meta
    if event.input is not None:
        digest = content_hash(event.input.tobytes(), meta["input_dtype"], meta["input_shape"])
    else:
        # Without the stored input the embedding is the best identity the event has.
        digest = content_hash(event.embedding.astype("<f2").tobytes(), "float16", [-1])
    return Candidate(
        event_id=event.id,
        content_hash=digest,
        predicted=event.predicted,
        embedding=event.embedding,
        scores=event.scores,
        percentiles=event.percentiles,
    )


def queue_item_of(
    event: Event, candidate: Candidate, selection: Selection, class_names: list[str]
) -> QueueItem:
    meta = event.meta
    predicted = event.predicted
    return QueueItem(
        item_id=event.id,
        content_hash=candidate.content_hash,
        priority=selection.priority,
        lane=selection.lane,
        rule=selection.rule,
        predicted=predicted,
        predicted_class=class_names[predicted] if predicted < len(class_names) else str(predicted),
        model_version=meta["version"],
        created_at=float(meta["ts"]),
        evidence={
            **dict(selection.reasons),
            "request_id": meta.get("request_id"),
            "flags": meta.get("flags", {}),
        },
        nearest_labeled_distance=selection.nearest_labeled_distance,
        input=None if event.input is None else event.input.tobytes(),
        input_dtype=meta["input_dtype"],
        input_shape=tuple(meta["input_shape"]),
        embedding=event.embedding.astype("<f2").tobytes(),
        probabilities=tuple(float(p) for p in event.probabilities),
    )


class SelectorWorker:
    def __init__(
        self,
        redis_client: SyncRedis,
        streams: list[ModelStream],
        *,
        consumer: str,
        config: SelectionConfig,
        budget: WindowBudget,
        metrics: WorkerMetrics,
        round_size: int = 1000,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        lease_seconds: float = 600.0,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
        discover: Callable[[set[StreamKey]], list[ModelStream]] | None = None,
        discover_seconds: float = 30.0,
    ) -> None:
        self.redis = redis_client
        self.streams = list(streams)
        self.consumer = consumer
        self.config = config
        self.budget = budget
        self.metrics = metrics
        self.reader = GroupReader(
            redis_client,
            GROUP,
            consumer,
            round_size=round_size,
            block_ms=block_ms,
            claim_idle_ms=claim_idle_ms,
        )
        self.clock = clock
        self.lease_seconds = lease_seconds
        self.queues = {
            (s.model, s.version): LabelQueue(
                redis_client, s.model, s.version, lease_seconds=lease_seconds
            )
            for s in streams
        }
        # Versions loaded into the API after this worker started (see stream_group.py).
        self._discovery = StreamDiscovery[ModelStream](discover, discover_seconds, logger)
        self._spend: Script = redis_client.register_script(SPEND_BUDGET_LUA)
        self._rng = np.random.default_rng(seed)
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def ensure_groups(self) -> None:
        for stream in self.streams:
            self.reader.ensure_group(event_stream(stream.model, stream.version))

    def run(self, burst: bool = False) -> int:
        """Process rounds until stopped; with `burst`, until every stream is drained. Returns
        the number of stream entries processed (the metrics count their events)."""
        self.ensure_groups()

        def one_round(block: bool) -> int:
            for stream in self._discovery.new_streams(set(self.queues)):
                self.add_stream(stream)
            return round_over(
                self.streams, self.process_stream, block, self._stop, self.reader.block_ms
            )

        return run_rounds(self._stop, one_round, burst, logger, f"selector {self.consumer}")

    def add_stream(self, stream: ModelStream) -> None:
        """Watch one more model version's events from now on (and those already logged)."""
        self.queues[(stream.model, stream.version)] = LabelQueue(
            self.redis, stream.model, stream.version, lease_seconds=self.lease_seconds
        )
        self.streams.append(stream)
        self.reader.ensure_group(event_stream(stream.model, stream.version))
        logger.info("selector %s watches model %s v%s", self.consumer, stream.model, stream.version)

    def process_stream(self, stream: ModelStream, block: bool = False) -> int:
        """One round on one stream: stale pending entries first, then new ones. Returns the
        number of entries."""
        key = event_stream(stream.model, stream.version)
        entries = self.reader.read_round(key, block=block)
        if not entries:
            return 0
        self._process(stream, key, entries)
        return len(entries)

    def _process(
        self, stream: ModelStream, key: str, entries: list[tuple[bytes, dict[bytes, bytes]]]
    ) -> None:
        started = time.perf_counter()
        events: dict[str, Event] = {}
        consumed = undecodable = 0
        for _, fields in entries:
            try:
                decoded = decode_entry(fields)
            except (KeyError, ValueError) as exc:
                undecodable += 1
                logger.warning("skipping an undecodable entry on %s: %s", key, exc)
                continue
            consumed += len(decoded)
            for event in decoded:
                # The event writer may deliver an entry twice; the first copy counts.
                events.setdefault(event.id, event)
        queue = self.queues[(stream.model, stream.version)]
        now = self.clock()
        candidates = [candidate_of(e) for e in events.values()]
        outcome_enqueued = 0
        if candidates:
            hashes = [c.content_hash for c in candidates]
            seen = {h for h, known in zip(hashes, queue.seen_hashes(hashes), strict=True) if known}
            known = queue.known_embeddings()
            remaining = self._remaining_budget(stream, now)
            outcome = select_round(
                candidates,
                known_embeddings=known.vectors,
                labeled_embeddings=known.vectors[known.labeled],
                seen_hashes=seen,
                budget=remaining,
                config=self._round_config(stream, now, remaining),
                rng=self._rng,
            )
            by_id = {c.event_id: c for c in candidates}
            items = [
                queue_item_of(events[s.event_id], by_id[s.event_id], s, stream.class_names)
                for s in outcome.selected
            ]
            if items:
                outcome_enqueued = queue.enqueue(items, now)
                lanes = Counter(item.lane for item in items)
                self._spend_budget(stream, now, outcome_enqueued, lanes)
            self.metrics.observe_round(stream.model, stream.version, outcome, outcome_enqueued)
        # Acknowledged only now that the round's picks are stored.
        self.redis.xack(key, GROUP, *[entry_id for entry_id, _ in entries])
        self.metrics.events_processed(stream.model, stream.version, consumed, undecodable)
        self.metrics.round_duration(time.perf_counter() - started)

    def _remaining_budget(self, stream: ModelStream, now: float) -> int:
        window = self.budget.window_start(now)
        used = self.redis.get(selector_budget(stream.model, stream.version, window))
        return self.budget.remaining(now, int(used or 0), window)

    def _round_config(self, stream: ModelStream, now: float, remaining: int) -> SelectionConfig:
        """The policy's config for this round, with the novel lane's cap applied per window.

        The policy caps the novel lane at a share of the budget it is given; rounds are often
        small (a quiet stream delivers a few events at a time), so without this the cap would
        apply per round and a trickle of junk would fill the window's budget round by round.
        """
        window = self.budget.window_start(now)
        shares = {}
        for lane, share in self._capped_lanes():
            window_cap = math.floor(share * self.budget.per_window)
            key = selector_budget(stream.model, stream.version, window, lane=lane)
            left = max(0, window_cap - int(self.redis.get(key) or 0))
            shares[lane] = 0.0 if remaining <= 0 else min(share, left / remaining)
        return replace(
            self.config,
            novel_lane_share=shares[NOVEL_LANE],
            random_lane_share=shares[RANDOM_LANE],
        )

    def _capped_lanes(self) -> list[tuple[str, float]]:
        # The random lane is capped too: in small rounds it would otherwise sample nearly
        # every event instead of a small unbiased share.
        return [
            (NOVEL_LANE, self.config.novel_lane_share),
            (RANDOM_LANE, self.config.random_lane_share),
        ]

    def _spend_budget(
        self, stream: ModelStream, now: float, count: int, lanes: Counter[str]
    ) -> None:
        if count <= 0:
            return
        window = self.budget.window_start(now)
        counters = [(selector_budget(stream.model, stream.version, window), count)]
        counters += [
            (selector_budget(stream.model, stream.version, window, lane=lane), lanes[lane])
            for lane, _ in self._capped_lanes()
        ]
        # The counters outlive their window by one window, then expire.
        ttl = 2 * self.budget.window_seconds
        self._spend(keys=[key for key, _ in counters], args=[ttl, *(n for _, n in counters)])


def selection_config(overrides: dict[str, float]) -> SelectionConfig:
    """The policy's defaults with the settings' overrides; names a bad key or value."""
    check_override_keys(overrides, SelectionConfig, "EDGEHARVEST_SELECTION")
    values: dict[str, Any] = dict(overrides)
    if "shortlist_factor" in values:
        values["shortlist_factor"] = int(values["shortlist_factor"])
    return SelectionConfig(**values)
