"""Labeling-queue gauges, read from Redis when Prometheus scrapes (so every replica agrees).

A custom collector rather than gauges set by a loop: the queue's state lives in Redis and is
changed by every API replica and worker, so the only true value is the one read at scrape time.
If Redis cannot be read, `edgeharvest_label_queue_up` is 0 and the other series are absent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.label_queue import LabelQueue

logger = logging.getLogger("edgeharvest.metrics")


class LabelQueueCollector(Collector):
    def __init__(
        self, queues: Callable[[], list[LabelQueue]], clock: Callable[[], float] = time.time
    ) -> None:
        self._queues = queues
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model", "version"]
        up = GaugeMetricFamily(
            "edgeharvest_label_queue_up", "1 when the labeling queue could be read.", labels=labels
        )
        items = GaugeMetricFamily(
            "edgeharvest_label_queue_items",
            "Items by state (queued, leased, labeled, discarded).",
            labels=[*labels, "state"],
        )
        depth = GaugeMetricFamily(
            "edgeharvest_label_queue_depth", "Queued items by lane.", labels=[*labels, "lane"]
        )
        oldest = GaugeMetricFamily(
            "edgeharvest_label_queue_oldest_item_age_seconds",
            "Age of the oldest queued item (0 when the queue is empty).",
            labels=labels,
        )
        expired = GaugeMetricFamily(
            "edgeharvest_label_queue_expired_leases",
            "Leases past their expiry whose items the next claim or sweep returns.",
            labels=labels,
        )
        labeled_hour = GaugeMetricFamily(
            "edgeharvest_label_queue_labeled_last_hour",
            "Items labeled in the last hour.",
            labels=labels,
        )
        for queue in self._queues():
            key = [queue.model, queue.version]
            try:
                stats = queue.stats(self._clock())
            except Exception as exc:  # any Redis failure: report it, never fail the scrape
                logger.warning("cannot read the labeling queue of %s v%s: %s", *key, exc)
                up.add_metric(key, 0)
                continue
            up.add_metric(key, 1)
            for state in ("queued", "leased", "labeled", "discarded"):
                items.add_metric([*key, state], getattr(stats, state))
            for lane, count in stats.queued_by_lane.items():
                depth.add_metric([*key, lane], count)
            oldest.add_metric(key, stats.oldest_queued_age_seconds or 0.0)
            expired.add_metric(key, stats.expired_leases)
            labeled_hour.add_metric(key, stats.labeled_last_hour)
        yield from (up, items, depth, oldest, expired, labeled_hour)
