"""deploy/prometheus/ checked by promtool, and /metrics of the running service linted by it."""

from __future__ import annotations

import subprocess
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from service.drift_worker import DriftWorkerMetrics
from service.selection_policy import RoundOutcome
from service.worker_metrics import WorkerMetrics
from tests.test_deploy_promql import (
    DEPLOY,
    PROMETHEUS_SERIES,
    RULES_FILE,
    exported_names,
    metric_names,
    promtool,
    recorded_names,
)

CONFIG_FILE = DEPLOY / "prometheus" / "prometheus.yml"
RULES_TEST_FILE = DEPLOY / "prometheus" / "rules_test.yml"
DEPLOY_README = DEPLOY / "README.md"
DIGIT = [
    0,
    0,
    5,
    13,
    9,
    1,
    0,
    0,
    0,
    0,
    13,
    15,
    10,
    15,
    5,
    0,
    0,
    3,
    15,
    2,
    0,
    11,
    8,
    0,
    0,
    4,
    12,
    0,
    0,
    8,
    8,
    0,
    0,
    5,
    8,
    0,
    0,
    9,
    8,
    0,
    0,
    4,
    11,
    0,
    1,
    12,
    7,
    0,
    0,
    2,
    14,
    5,
    10,
    12,
    0,
    0,
    0,
    0,
    6,
    13,
    10,
    0,
    0,
    0,
]


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def load_rules() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(RULES_FILE.read_text())
    return rules


def alerts() -> list[dict[str, Any]]:
    return [rule for group in load_rules()["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_accepts_the_scrape_config_and_the_rules_it_loads() -> None:
    result = run_promtool("check", "config", "--lint=all", "--lint-fatal", str(CONFIG_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid prometheus config file" in result.stdout
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_promtool_accepts_the_rules_with_every_lint() -> None:
    result = run_promtool("check", "rules", "--lint=all", "--lint-fatal", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    rule_count = sum(len(group["rules"]) for group in load_rules()["groups"])
    assert f"SUCCESS: {rule_count} rules found" in result.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = run_promtool("test", "rules", str(RULES_TEST_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_firing_with_its_annotations() -> None:
    tests = yaml.safe_load(RULES_TEST_FILE.read_text())["tests"]
    fired_with_annotations = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"] and all("exp_annotations" in a for a in case["exp_alerts"])
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if not case["exp_alerts"]
    }
    names = {alert["alert"] for alert in alerts()}
    assert names - fired_with_annotations == set()
    # Most alerts are also tested where they must stay quiet (pending, or traffic too low).
    assert len(names & quiet) >= len(names) * 2 // 3


def test_every_alert_has_a_severity_a_summary_and_a_runbook_entry() -> None:
    readme = DEPLOY_README.read_text()
    for alert in alerts():
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, alert["alert"]
        assert {"summary", "description"} <= set(alert["annotations"]), alert["alert"]
        # The README's alert table says what it means and what to do about it.
        assert f"| `{alert['alert']}` |" in readme, f"{alert['alert']} is not in deploy/README.md"


def test_alerts_on_the_metrics_wait_with_for() -> None:
    """Every alert waits (`for:`) so that one bad scrape or one slow window pages nobody."""
    for alert in alerts():
        assert "for" in alert, f"{alert['alert']} has no for: duration"


def test_rules_name_only_metrics_the_service_and_workers_export(live_server: str) -> None:
    rules = load_rules()
    known = exported_names(live_server) | recorded_names(rules) | PROMETHEUS_SERIES
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            unknown = metric_names(rule["expr"]) - known
            assert not unknown, f"rule {name} names metrics nobody exports: {sorted(unknown)}"


def test_live_metrics_of_the_running_service_pass_promtool(live_server: str) -> None:
    # One prediction first, so that every labelled family has series to lint.
    response = httpx.post(
        f"{live_server}/v1/models/digits/predict", json={"instances": [DIGIT]}, timeout=10
    )
    assert response.status_code == 200
    exposition = httpx.get(f"{live_server}/metrics", timeout=10).text
    assert "edgeharvest_requests_total{" in exposition
    assert "edgeharvest_label_queue_up{" in exposition
    assert "edgeharvest_drift_up{" in exposition
    result = run_promtool("check", "metrics", stdin=exposition)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_worker_metrics_pass_promtool() -> None:
    registry = CollectorRegistry()
    selector = WorkerMetrics(registry)
    selector.events_processed("digits", "1", 10, undecodable=1)
    selector.observe_round("digits", "1", RoundOutcome(selected=[], skipped={"budget": 3}), 0)
    selector.round_duration(0.01)
    drift = DriftWorkerMetrics(registry)
    drift.events.labels("digits", "1").inc(10)
    drift.window_duration.observe(0.2)
    result = run_promtool("check", "metrics", stdin=generate_latest(registry).decode())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


@pytest.mark.parametrize(
    ("exposition", "problem"),
    [
        ("# HELP x_seconds Time.\n# TYPE x_seconds counter\nx_seconds 1\n", '"_total" suffix'),
        ("# TYPE y gauge\ny 1\n", "no help text"),
    ],
)
def test_promtool_check_metrics_rejects_bad_metrics(exposition: str, problem: str) -> None:
    """The lint has teeth: the checks above would see a badly named metric."""
    result = run_promtool("check", "metrics", stdin=exposition)
    assert result.returncode != 0
    assert problem in result.stdout + result.stderr
