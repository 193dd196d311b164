"""End to end: a real Prometheus scrapes the running API, selector and drift workers.

Debian's `prometheus` runs on a free loopback port with the shipped scrape config (targets
rewritten to the test's ports, a 1 s interval) and the shipped rules. Predictions go in, half
of them pure noise; Prometheus must then answer with what the service counted: the request
counter, a latency quantile equal to the one computed from the service's own histogram, and
drift gauges showing the noise windows in alarm.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tests.redis_server import RedisServer
from tests.support import MODELS_DIR, REPO_ROOT, free_port, start_server
from tests.test_deploy_promql import (
    DASHBOARD_FILE,
    DEPLOY,
    RULES_FILE,
    grafana_queries,
    promtool,
    runnable,
)

PREDICT = "/v1/models/{name}/predict"
BATCH = 50
# Drift windows of 250 events: two of held-out digits, then two of noise. The drift tests find
# nothing in the first two and drift in the last two; two drifting windows in a row alarm.
WINDOW = 250
IN_DISTRIBUTION_ROWS = NOISE_ROWS = 2 * WINDOW
BAD_REQUESTS = 2
T = TypeVar("T")


@dataclass
class Stack:
    api: str
    selector: str
    drift: str
    prometheus: str
    predict_requests: int


def traffic() -> np.ndarray:
    x, y = load_digits(return_X_y=True)
    # The rows the committed reference profile held out (as in tests/test_drift_worker.py).
    _, held_out, _, _ = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    rng = np.random.default_rng(0)
    digits = held_out[rng.integers(0, len(held_out), IN_DISTRIBUTION_ROWS)]
    noise = rng.uniform(0, 16, (NOISE_ROWS, 64))
    return np.concatenate([digits, noise]).astype(np.float32)


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = 90) -> T:
    """Poll until `probe` returns something truthy; the timeout only bounds a broken run."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}; last answer: {last!r}")


def get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def start_process(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as stderr:
        return subprocess.Popen(
            command,
            env={**os.environ, **env},
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def prometheus_config(ports: dict[str, int]) -> dict[str, Any]:
    """The shipped scrape config with each job's targets on loopback and a 1 s interval."""
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES_FILE)]
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] not in ports:
            continue
        job = {k: v for k, v in job.items() if not k.endswith("_sd_configs")}
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_binary = shutil.which("prometheus")
    if prometheus_binary is None:
        pytest.fail("prometheus is not installed: run .ci/run (Debian: apt-get install prometheus)")
    redis_server.start()
    redis_server.flushall()
    logs = tmp_path_factory.mktemp("e2e")
    base_env = {"EDGEHARVEST_MODEL_DIR": str(MODELS_DIR), "EDGEHARVEST_REDIS_URL": redis_server.url}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        api_process, api = start_server(MODELS_DIR, base_env)
        processes.append(api_process)
        ports = {"edgeharvest-api": int(api.rsplit(":", 1)[1])}
        worker_env = {
            "selector": {"EDGEHARVEST_SELECTOR_BLOCK_MS": "100"},
            "drift": {
                "EDGEHARVEST_DRIFT_BLOCK_MS": "100",
                "EDGEHARVEST_DRIFT_WINDOW_SIZE": str(WINDOW),
            },
        }
        for worker, command in (("selector", "select"), ("drift", "drift")):
            port = free_port()
            env = {**base_env, **worker_env[worker], "EDGEHARVEST_WORKER_METRICS_PORT": str(port)}
            processes.append(
                start_process(
                    [sys.executable, "-m", "service.cli", command], env, logs / f"{worker}.log"
                )
            )
            ports[f"edgeharvest-{worker}"] = port
        ports["prometheus"] = free_port()
        config = logs / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(ports)))
        prometheus = f"http://127.0.0.1:{ports['prometheus']}"
        processes.append(
            start_process(
                [
                    prometheus_binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={logs / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
                    "--log.level=warn",
                ],
                {},
                logs / "prometheus.log",
            )
        )
        for name in ("selector", "drift"):
            url = f"http://127.0.0.1:{ports[f'edgeharvest-{name}']}/metrics"
            wait_for(lambda url=url: get_ok(url), f"the {name} worker's /metrics")  # type: ignore[misc]
        wait_for(lambda: get_ok(f"{prometheus}/-/ready"), "Prometheus to be ready")

        result = Stack(
            api=api,
            selector=f"http://127.0.0.1:{ports['edgeharvest-selector']}",
            drift=f"http://127.0.0.1:{ports['edgeharvest-drift']}",
            prometheus=prometheus,
            predict_requests=(IN_DISTRIBUTION_ROWS + NOISE_ROWS) // BATCH + BAD_REQUESTS,
        )
        rows = traffic()
        with httpx.Client(base_url=api, timeout=30) as client:

            def predict(batch: np.ndarray) -> None:
                body = {"instances": batch.tolist()}
                assert client.post("/v1/models/digits/predict", json=body).status_code == 200

            first = IN_DISTRIBUTION_ROWS // BATCH
            for start in range(0, IN_DISTRIBUTION_ROWS, BATCH):
                predict(rows[start : start + BATCH])
            # Once Prometheus has scraped the first half, the second half is an increase that
            # rate() sees, so rate-based rules and panels have something to compute.
            counted = f'sum(edgeharvest_requests_total{{endpoint="{PREDICT}"}})'
            wait_for(lambda: values(result, counted) == {"": first}, "the first half scraped")
            for start in range(IN_DISTRIBUTION_ROWS, len(rows), BATCH):
                predict(rows[start : start + BATCH])
            for _ in range(BAD_REQUESTS):
                bad = client.post("/v1/models/digits/predict", json={"instances": [[1, 2, 3]]})
                assert bad.status_code == 400
        yield result
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def query(stack: Stack, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


def values(stack: Stack, expr: str, by: str | None = None) -> dict[str, float]:
    """An instant query's values, keyed by the label `by` (or "" for an unlabelled result)."""
    return {
        (series["metric"].get(by, "") if by else ""): float(series["value"][1])
        for series in query(stack, expr)
    }


def prometheus_histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus's histogram_quantile: linear interpolation inside the bucket holding rank q."""
    bounds = sorted(buckets)
    total = buckets[math.inf]
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == math.inf:
                return previous_bound
            share = (rank - previous_count) / (buckets[bound] - previous_count)
            return previous_bound + (bound - previous_bound) * share
        previous_bound, previous_count = bound, buckets[bound]
    raise AssertionError("the +Inf bucket holds every observation")


def service_buckets(stack: Stack, name: str, endpoint: str) -> dict[float, float]:
    """Bucket counts of a histogram as the service itself exposes them, summed over series."""
    buckets: dict[float, float] = {}
    exposition = httpx.get(f"{stack.api}/metrics", timeout=10).text
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == f"{name}_bucket" and sample.labels.get("endpoint") == endpoint:
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def test_prometheus_scrapes_the_api_and_both_workers(stack: Stack) -> None:
    up = wait_for(
        lambda: (v := values(stack, 'up{job=~"edgeharvest-.*"}', by="job")) and len(v) == 3 and v,
        "three edgeharvest targets",
    )
    assert up == {"edgeharvest-api": 1, "edgeharvest-selector": 1, "edgeharvest-drift": 1}


def test_the_request_counter_comes_back_by_status(stack: Stack) -> None:
    selector = f'job="edgeharvest-api", endpoint="{PREDICT}"'
    expr = f"sum by (status) (edgeharvest_requests_total{{{selector}}})"
    expected = {"200": stack.predict_requests - BAD_REQUESTS, "400": BAD_REQUESTS}
    wait_for(lambda: values(stack, expr, by="status") == expected, f"{expected} from {expr}")


def test_a_latency_quantile_equals_the_one_of_the_service_histogram(stack: Stack) -> None:
    selector = f'job="edgeharvest-api", endpoint="{PREDICT}"'
    count = f"sum(edgeharvest_request_duration_seconds_count{{{selector}}})"
    wait_for(lambda: values(stack, count) == {"": stack.predict_requests}, "every request timed")
    # The traffic is over, so the service's histogram no longer moves: Prometheus's quantile
    # of the scraped buckets must equal the one computed from the service's own exposition.
    buckets = service_buckets(stack, "edgeharvest_request_duration_seconds", PREDICT)
    assert buckets[math.inf] == stack.predict_requests
    for q in (0.5, 0.9, 0.99):
        expr = (
            f"histogram_quantile({q}, sum by (le) "
            f"(edgeharvest_request_duration_seconds_bucket{{{selector}}}))"
        )
        (answer,) = values(stack, expr).values()
        assert answer == pytest.approx(prometheus_histogram_quantile(q, buckets), rel=1e-9)
    # The recording rule behind the latency alert evaluates on the same data.
    p99 = wait_for(
        lambda: values(
            stack, 'model_version:edgeharvest_request_duration_seconds:p99_rate5m{model="digits"}'
        ),
        "the p99 recording rule",
    )
    assert 0 < p99[""] <= max(b for b in buckets if b != math.inf)


def test_drift_gauges_show_the_noise_windows_in_alarm(stack: Stack) -> None:
    model = 'model="digits", version="1"'
    windows = (IN_DISTRIBUTION_ROWS + NOISE_ROWS) // WINDOW
    wait_for(
        lambda: (
            values(stack, f"edgeharvest_drift_windows_evaluated_total{{{model}}}") == {"": windows}
        ),
        f"{windows} drift windows",
        timeout=180,
    )
    assert values(stack, f"edgeharvest_drift_up{{{model}}}") == {"": 1}
    wait_for(
        lambda: values(stack, f"edgeharvest_drift_any_alarm{{{model}}}") == {"": 1},
        "the drift alarm",
    )
    alarms = values(stack, f"edgeharvest_drift_alarm{{{model}}}", by="test")
    assert alarms["scores:novelty"] == 1
    drifting = values(stack, f"edgeharvest_drift_drifting{{{model}}}", by="test")
    assert drifting["scores:novelty"] == 1 and drifting["mmd"] == 1
    p_values = values(stack, f"edgeharvest_drift_p_value{{{model}}}", by="test")
    assert p_values["scores:novelty"] < 0.01
    # Prometheus agrees with what the API reports as JSON.
    report = httpx.get(f"{stack.api}/v1/models/digits/drift", timeout=10).json()
    assert report["windows_evaluated"] == windows and report["alarm"] is True
    # The drift worker's own metrics: every event consumed once.
    events = IN_DISTRIBUTION_ROWS + NOISE_ROWS
    wait_for(
        lambda: (
            values(stack, 'sum(edgeharvest_drift_events_total{job="edgeharvest-drift"})')
            == {"": events}
        ),
        "the drift worker's event count",
    )
    # The alert rule sees it: EdgeharvestDrift is pending (it fires after its `for:` of 10m).
    wait_for(
        lambda: query(stack, 'ALERTS{alertname="EdgeharvestDrift", alertstate="pending"}'),
        "EdgeharvestDrift to be pending",
    )


def test_the_selector_consumed_every_event(stack: Stack) -> None:
    events = IN_DISTRIBUTION_ROWS + NOISE_ROWS
    wait_for(
        lambda: (
            values(stack, 'sum(edgeharvest_selector_events_total{job="edgeharvest-selector"})')
            == {"": events}
        ),
        "the selector's event count",
    )
    assert values(stack, 'sum(edgeharvest_events_written_total{job="edgeharvest-api"})') == {
        "": events
    }
    queued = values(stack, 'max(edgeharvest_label_queue_items{model="digits", state="queued"})')
    assert queued[""] > 0


def test_every_rule_loads_and_evaluates_without_error(stack: Stack) -> None:
    shipped = yaml.safe_load(RULES_FILE.read_text())["groups"]

    def evaluated() -> list[dict[str, Any]] | None:
        groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]
        rules = [rule for group in groups["groups"] for rule in group["rules"]]
        return groups["groups"] if all(r["health"] != "unknown" for r in rules) else None

    groups = wait_for(evaluated, "every rule evaluated once")
    assert sorted(g["name"] for g in groups) == sorted(g["name"] for g in shipped)
    assert sum(len(g["rules"]) for g in groups) == sum(len(g["rules"]) for g in shipped)
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))


def test_every_dashboard_query_runs_on_the_live_data(stack: Stack) -> None:
    wait_for(
        lambda: values(stack, 'sum(edgeharvest_drift_any_alarm{model="digits"})') == {"": 1},
        "the drift state scraped",
    )
    queries = dict(grafana_queries(yaml.safe_load(DASHBOARD_FILE.read_text())))

    def still_empty() -> list[str]:
        return [w for w, expr in queries.items() if not query(stack, runnable(expr, interval="1m"))]

    # A rate needs two scrapes of a series; on a loaded machine a scrape can come late, so
    # ask again for a while before calling a query empty.
    empty = still_empty()
    deadline = time.monotonic() + 30
    while set(empty) - ALLOWED_EMPTY and time.monotonic() < deadline:
        time.sleep(1)
        empty = still_empty()
    assert set(empty) <= ALLOWED_EMPTY, sorted(set(empty) - ALLOWED_EMPTY)


# Only series of things that did not happen in this run may be empty.
ALLOWED_EMPTY = {
    "panel 'Prediction error ratio' A",  # no 5xx
    "panel 'Events dropped, write errors, monitoring errors' C",  # no monitoring error
    "panel 'Selector: consumed, selected, enqueued' D",  # no undecodable event
    "annotation edgeharvest alerts",  # nothing fires within a `for:`
}


@pytest.mark.parametrize("target", ["api", "selector", "drift"])
def test_live_metrics_of_each_process_pass_promtool(stack: Stack, target: str) -> None:
    exposition = httpx.get(f"{getattr(stack, target)}/metrics", timeout=10).text
    assert "edgeharvest_" in exposition
    result = subprocess.run(
        [promtool(), "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout
