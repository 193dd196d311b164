"""Which metrics a PromQL expression names, and which ones edgeharvest exports.

The deployment tests (rules, dashboard, end-to-end) check every query they ship against the
metric names the service and the workers really expose; the helpers live here, tested below.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.drift_worker import DriftWorkerMetrics
from service.worker_metrics import WorkerMetrics
from tests.support import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
RULES_FILE = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD_FILE = DEPLOY / "grafana" / "dashboard.json"
# Series that Prometheus itself makes: scrape health and alert state.
PROMETHEUS_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})
# Grafana's interval variables, replaced by a concrete duration to run a query elsewhere.
GRAFANA_INTERVALS = ("$__rate_interval", "$__interval", "$__range")

# fmt: off
_KEYWORDS = frozenset({
    "and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "inf", "nan", "atan2",
})
# fmt: on
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-z]+")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (functions, keywords and labels left out).

    `label_values(selector, label)` (a Grafana variable query) names the metric of its selector.
    """
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _OFFSET.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    values = re.fullmatch(r"\s*label_values\s*\((.*),\s*\w+\s*\)\s*", text, re.DOTALL)
    if values:
        text = values.group(1)
    return {
        name
        for name, call in _IDENTIFIER.findall(text)
        if not call and name.lower() not in _KEYWORDS
    }


def exposed_names(exposition: str) -> set[str]:
    """Every series name an exposition (Prometheus text format) can carry, samples or not.

    A family that has no samples yet (a labelled counter never incremented) is still announced
    by its TYPE line, so its names are derived from its type.
    """
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def worker_exposition() -> str:
    """What the selector and drift workers serve on EDGEHARVEST_WORKER_METRICS_PORT."""
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    DriftWorkerMetrics(registry)
    return generate_latest(registry).decode()


def exported_names(api_base_url: str) -> set[str]:
    """Names of a live API's /metrics plus the worker registries."""
    api = httpx.get(f"{api_base_url}/metrics", timeout=10)
    api.raise_for_status()
    return exposed_names(api.text) | exposed_names(worker_exposition())


def recorded_names(rules: dict[str, Any]) -> set[str]:
    return {
        rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule
    }


def grafana_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, expression) of every Prometheus query of a dashboard: panels (in rows too),
    template variables and annotations."""

    def panels(items: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel '{panel['title']}' {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield (
                f"variable {variable['name']}",
                query["query"] if isinstance(query, dict) else query,
            )
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            yield f"annotation {annotation['name']}", annotation["expr"]


def runnable(expr: str, interval: str = "5m") -> str:
    """A Grafana query as plain PromQL: intervals given, every other variable matching all,
    and a variable's `label_values(selector, label)` reduced to its selector."""
    values = re.fullmatch(r"\s*label_values\s*\((.*),\s*\w+\s*\)\s*", expr, re.DOTALL)
    if values:
        expr = values.group(1)
    for variable in GRAFANA_INTERVALS:
        expr = expr.replace(variable, interval)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run .ci/run (Debian: apt-get install prometheus)")
    return path


def write_rule_file(path: Path, exprs: Iterable[str]) -> Path:
    """A rule file recording each expression, so that `promtool check rules` parses them."""
    import yaml

    rules = [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    return path


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('up{job="edgeharvest-api"} == 0', {"up"}),
        (
            'sum by (model, version) (rate(edgeharvest_requests_total{status=~"5.."}[5m]))'
            " / on (model, version) model_version:edgeharvest_requests:rate5m",
            {"edgeharvest_requests_total", "model_version:edgeharvest_requests:rate5m"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(x_seconds_bucket[$__rate_interval])))",
            {"x_seconds_bucket"},
        ),
        (
            "time() - max without (instance) (a_timestamp_seconds offset 1h)",
            {"a_timestamp_seconds"},
        ),
        ("1e-9 * vector(0.1) > bool 2", set()),
        ("a > on () group_left () b and on (x) c unless d", {"a", "b", "c", "d"}),
        (
            'label_values(edgeharvest_model_info{model=~"$model"}, version)',
            {"edgeharvest_model_info"},
        ),
        ('count(x{label="sum(by)"}) by (job)', {"x"}),
    ],
)
def test_metric_names_finds_selectors_only(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_exposed_names_derive_suffixes_from_types() -> None:
    exposition = (
        "# HELP a_total A counter never incremented.\n# TYPE a_total counter\n"
        "# HELP b_seconds A histogram.\n# TYPE b_seconds histogram\n"
        'b_seconds_bucket{le="+Inf"} 1.0\nb_seconds_count 1.0\nb_seconds_sum 0.5\n'
        "# HELP c A gauge.\n# TYPE c gauge\nc 1.0\n"
    )
    assert exposed_names(exposition) == {
        "a_total",
        "a_created",
        "b_seconds_bucket",
        "b_seconds_sum",
        "b_seconds_count",
        "b_seconds_created",
        "c",
    }


def test_runnable_replaces_grafana_variables() -> None:
    expr = 'rate(x{model=~"$model", version=~"${version}"}[$__rate_interval])'
    assert runnable(expr, "1m") == 'rate(x{model=~".*", version=~".*"}[1m])'
    variable = 'label_values(edgeharvest_model_info{model=~"$model"}, version)'
    assert runnable(variable) == 'edgeharvest_model_info{model=~".*"}'
