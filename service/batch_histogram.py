"""A Prometheus histogram that observes a whole array at once.

prometheus_client's Histogram takes one value per call, a few microseconds each; scores come
in batches, so per-instance histograms would cost more than the scoring. This collector keeps
bucket counts per label set in numpy arrays and adds a batch with one `searchsorted` and one
`bincount`. It exposes the standard histogram series (`_bucket{le}`, `_sum`, `_count`).

In prometheus_client's multiprocess mode (several API worker processes, see shared_metrics.py)
each child also adds its counts to the library's per-process files, under the same names a
Histogram uses, so the merged scrape shows them as one histogram.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import values as metric_values
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from service.shared_metrics import multiprocess_mode


class HistogramChild:
    # Below this many values, a Python loop beats numpy's per-call overhead.
    SMALL = 8

    def __init__(self, bounds: np.ndarray, lock: threading.Lock) -> None:
        self._bounds = bounds
        self._bound_list = bounds.tolist()
        self._lock = lock
        # Non-cumulative: counts[i] holds bounds[i-1] < v <= bounds[i]; the last is +Inf.
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)
        self.total = 0.0

    def observe_many(self, values: np.ndarray) -> None:
        if len(values) <= self.SMALL:
            with self._lock:
                for value in values.tolist():
                    if math.isfinite(value):
                        self.counts[bisect_left(self._bound_list, value)] += 1
                        self.total += value
            return
        self._observe_vectorised(values)

    def _observe_vectorised(self, values: np.ndarray) -> None:
        finite = values[np.isfinite(values)]
        if not len(finite):
            return
        slots = np.searchsorted(self._bounds, finite, side="left")
        counts = np.bincount(slots, minlength=len(self.counts))
        with self._lock:
            self._add(counts, float(finite.sum()))

    def _add(self, counts: np.ndarray, total: float) -> None:
        """Add per-bucket counts and their sum; the caller holds the lock."""
        self.counts += counts
        self.total += total


class SharedHistogramChild(HistogramChild):
    """A child that also writes to the multiprocess files: one value per bucket, not
    cumulative (the merge accumulates them), and the sum."""

    def __init__(
        self,
        bounds: np.ndarray,
        lock: threading.Lock,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        labelvalues: Sequence[str],
    ) -> None:
        super().__init__(bounds, lock)
        edges = [*(floatToGoString(b) for b in self._bound_list), "+Inf"]  # type: ignore[no-untyped-call]
        value = metric_values.ValueClass
        self._shared_buckets = [
            value(
                "histogram",
                name,
                f"{name}_bucket",
                (*labelnames, "le"),
                (*labelvalues, e),
                documentation,
            )
            for e in edges
        ]
        self._shared_sum = value(
            "histogram", name, f"{name}_sum", tuple(labelnames), tuple(labelvalues), documentation
        )

    def observe_many(self, values: np.ndarray) -> None:
        # Always by bucket counts: the files take one update per bucket, not one per value.
        self._observe_vectorised(values)

    def _add(self, counts: np.ndarray, total: float) -> None:
        super()._add(counts, total)
        for index in np.flatnonzero(counts).tolist():
            self._shared_buckets[index].inc(int(counts[index]))
        self._shared_sum.inc(total)


class BatchHistogram(Collector):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = [float(b) for b in buckets if b != float("inf")]
        if bounds != sorted(set(bounds)):
            raise ValueError(f"buckets of {name} must be strictly increasing, got {list(buckets)}")
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self._bounds = np.asarray(bounds, dtype=np.float64)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        with self._lock:
            child = self._children.get(values)
            if child is None:
                child = self._children[values] = (
                    SharedHistogramChild(
                        self._bounds,
                        self._lock,
                        self.name,
                        self.documentation,
                        self.labelnames,
                        values,
                    )
                    if multiprocess_mode()
                    else HistogramChild(self._bounds, self._lock)
                )
            return child

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [*(floatToGoString(b) for b in self._bounds), "+Inf"]  # type: ignore[no-untyped-call]
        with self._lock:
            snapshot = [(k, c.counts.cumsum().tolist(), c.total) for k, c in self._children.items()]
        for labels, cumulative, total in snapshot:
            family.add_metric(list(labels), list(zip(edges, cumulative, strict=True)), total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
