"""deploy/grafana/dashboard.json: well formed, every query parses (promtool), and every query
names only metrics that the running service and the workers export."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_deploy_promql import (
    DASHBOARD_FILE,
    PROMETHEUS_SERIES,
    exported_names,
    grafana_queries,
    metric_names,
    promtool,
    runnable,
    write_rule_file,
)

DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
QUERIES = list(grafana_queries(DASHBOARD))
# What the issue asks the dashboard to show, as metric names its queries must use.
REQUIRED = {
    "request rate and errors": {"edgeharvest_requests_total"},
    "latency percentiles": {"edgeharvest_request_duration_seconds_bucket"},
    "confidence and novelty distributions": {
        "edgeharvest_prediction_confidence_bucket",
        "edgeharvest_prediction_novelty_percentile_bucket",
    },
    "flagged rate by reason": {"edgeharvest_predictions_flagged_total"},
    "drift statistics and alarms": {
        "edgeharvest_drift_statistic",
        "edgeharvest_drift_p_value",
        "edgeharvest_drift_effect_size",
        "edgeharvest_drift_drifting",
        "edgeharvest_drift_alarm",
        "edgeharvest_drift_any_alarm",
        "edgeharvest_drift_streaming_alarm",
    },
    "queue depth and age": {
        "edgeharvest_label_queue_depth",
        "edgeharvest_label_queue_oldest_item_age_seconds",
    },
    "labels per hour": {"edgeharvest_label_queue_labeled_last_hour"},
    "event-log health": {
        "edgeharvest_events_written_total",
        "edgeharvest_events_dropped_total",
        "edgeharvest_redis_write_errors_total",
        "edgeharvest_event_buffer_events",
    },
}


def test_dashboard_identity_and_variables() -> None:
    assert DASHBOARD["uid"] == "edgeharvest" and DASHBOARD["title"] == "edgeharvest"
    assert DASHBOARD["id"] is None and isinstance(DASHBOARD["schemaVersion"], int)
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for name in ("model", "version"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"


def test_panels_have_unique_ids_a_datasource_and_queries() -> None:
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in PANELS:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and panel["title"] and panel["description"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]


def test_panels_tile_the_grid_without_overlapping() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in DASHBOARD["panels"]:
        box = panel["gridPos"]
        assert box["x"] >= 0 and box["x"] + box["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(box["x"], box["x"] + box["w"])
            for y in range(box["y"], box["y"] + box["h"])
        }
        assert not cells & taken, f"panel '{panel['title']}' overlaps another"
        taken |= cells


def test_every_query_parses(tmp_path: Path) -> None:
    """promtool parses each query (Grafana variables filled in) as the expression of a rule."""
    rule_file = write_rule_file(tmp_path / "dashboard.yml", (runnable(e) for _, e in QUERIES))
    result = subprocess.run(
        [promtool(), "check", "rules", str(rule_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(QUERIES)} rules found" in result.stdout


def test_every_query_names_only_metrics_the_service_and_workers_export(live_server: str) -> None:
    known = exported_names(live_server) | PROMETHEUS_SERIES
    for where, expr in QUERIES:
        names = metric_names(expr)
        assert names, f"{where} names no metric: {expr}"
        assert names <= known, f"{where} names metrics nobody exports: {sorted(names - known)}"


@pytest.mark.parametrize("topic", sorted(REQUIRED))
def test_the_dashboard_shows(topic: str) -> None:
    used = set().union(*(metric_names(e) for _, e in QUERIES))
    assert REQUIRED[topic] <= used, sorted(REQUIRED[topic] - used)


def test_latency_percentiles_come_from_the_histogram() -> None:
    (panel,) = [p for p in PANELS if p["title"] == "Prediction latency percentiles"]
    quantiles = [
        re.match(r"histogram_quantile\((0\.\d+), sum by \(le\) \(rate\(", t["expr"])
        for t in panel["targets"]
    ]
    assert [q.group(1) for q in quantiles if q] == ["0.5", "0.9", "0.99"]
    assert panel["fieldConfig"]["defaults"]["unit"] == "s"


def test_histograms_are_drawn_as_heatmaps_of_their_buckets() -> None:
    heatmaps = [p for p in PANELS if p["type"] == "heatmap"]
    assert len(heatmaps) == 2
    for panel in heatmaps:
        (target,) = panel["targets"]
        assert target["format"] == "heatmap" and target["legendFormat"] == "{{le}}"
        assert re.fullmatch(
            r"sum by \(le\) \(increase\(\w+_bucket\{.*\}\[\$__rate_interval\]\)\)", target["expr"]
        )
