"""Drift gauges, read from Redis when Prometheus scrapes (so every replica reports the same).

The drift workers write each window's report to Redis; the API's /metrics reads the latest one
per model version. If Redis cannot be read, `edgeharvest_drift_up` is 0 and the other series of
that model version are absent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.drift_store import DriftStore
from service.drift_windows import STREAMING_SCORES

logger = logging.getLogger("edgeharvest.metrics")

# Per test of the latest window: (metric suffix, report key, help).
TEST_GAUGES = (
    ("statistic", "statistic", "Test statistic of the latest window."),
    ("p_value", "p_value", "p-value of the latest window's test."),
    ("effect_size", "effect_size", "Effect size of the latest window's test (see effect_name)."),
)


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else float("nan")


class DriftCollector(Collector):
    def __init__(self, stores: Callable[[], list[DriftStore]]) -> None:
        self._stores = stores

    def collect(self) -> Iterator[Metric]:
        model = ["model", "version"]
        test = [*model, "test"]
        up = GaugeMetricFamily(
            "edgeharvest_drift_up", "1 when the drift state could be read.", labels=model
        )
        per_test = {
            key: GaugeMetricFamily(f"edgeharvest_drift_{suffix}", text, labels=test)
            for suffix, key, text in TEST_GAUGES
        }
        drifting = GaugeMetricFamily(
            "edgeharvest_drift_drifting",
            "1 when the test found drift in the latest window (p < alpha and effect >= floor).",
            labels=test,
        )
        alarm = GaugeMetricFamily(
            "edgeharvest_drift_alarm",
            "1 when the test has drifted in the configured number of consecutive windows.",
            labels=test,
        )
        any_alarm = GaugeMetricFamily(
            "edgeharvest_drift_any_alarm",
            "1 when any test of the alarm set is in alarm in the latest window.",
            labels=model,
        )
        windows = CounterMetricFamily(
            "edgeharvest_drift_windows_evaluated",
            "Windows evaluated for this model version, by all drift workers.",
            labels=model,
        )
        window_end = GaugeMetricFamily(
            "edgeharvest_drift_last_window_end_timestamp_seconds",
            "Event time at which the latest evaluated window ended.",
            labels=model,
        )
        streaming = GaugeMetricFamily(
            "edgeharvest_drift_streaming_alarm",
            "1 when the Page-Hinkley detector on the score fired within about one window.",
            labels=[*model, "score"],
        )
        for store in self._stores():
            key = [store.model, store.version]
            try:
                state, stream_state, latest = store.overview()
            except Exception as exc:  # any Redis failure: report it, never fail the scrape
                logger.warning("cannot read the drift state of %s v%s: %s", *key, exc)
                up.add_metric(key, 0)
                continue
            up.add_metric(key, 1)
            windows.add_metric(key, float(state.get("windows_evaluated", 0)))
            for score, _ in STREAMING_SCORES:
                alarmed = stream_state.get(score, {}).get("alarm", False)
                streaming.add_metric([*key, score], 1.0 if alarmed else 0.0)
            if latest is None:
                continue
            window_end.add_metric(key, _number(latest.get("end_time")))
            any_alarm.add_metric(key, 1.0 if latest.get("alarm") else 0.0)
            alarms = latest.get("alarms", {})
            for result in latest.get("results", []):
                labels = [*key, str(result["test"])]
                for report_key, family in per_test.items():
                    family.add_metric(labels, _number(result.get(report_key)))
                drifting.add_metric(labels, 1.0 if result.get("drifting") else 0.0)
                alarm.add_metric(labels, 1.0 if alarms.get(result["test"]) else 0.0)
        yield from (up, *per_test.values(), drifting, alarm, any_alarm, windows, window_end)
        yield streaming
