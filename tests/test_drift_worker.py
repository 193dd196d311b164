"""The drift worker against a real Redis: windows, API, gauges, concurrency and SIGKILL."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from service.app import create_app
from service.drift_detectors import ReferenceSample
from service.drift_store import DriftStore
from service.drift_worker import GROUP, DriftStream, DriftWorker, DriftWorkerMetrics, drift_config
from service.events import decode_entry
from service.model_repository import ModelRepository
from service.redis_keys import event_stream
from service.settings import Settings
from tests.support import (
    MODELS_DIR,
    REPO_ROOT,
    kill_repeatedly,
    start_worker,
    stop_worker,
    wait_for_consumer_group,
)

STREAM = event_stream("digits", "1")
X, Y = load_digits(return_X_y=True)
# The rows the committed reference profile holds out (its score distributions come from them).
_, X_HELD_OUT, _, _ = train_test_split(X, Y, test_size=0.25, random_state=0, stratify=Y)
DIGITS_PROFILE = next(
    p for m, p in ModelRepository.find_references(MODELS_DIR) if m.name == "digits"
)
assert DIGITS_PROFILE is not None
REFERENCE = ReferenceSample.from_profile(DIGITS_PROFILE)


def in_distribution(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return X_HELD_OUT[rng.integers(0, len(X_HELD_OUT), n)].astype(np.float32)


def noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, (n, 64)).astype(np.float32)


def send_traffic(url: str, rows: np.ndarray, batch: int = 100) -> None:
    app = create_app(Settings(model_dir=MODELS_DIR, redis_url=url), registry=CollectorRegistry())
    with TestClient(app) as client:
        for start in range(0, len(rows), batch):
            response = client.post(
                "/v1/models/digits/predict",
                json={"instances": rows[start : start + batch].tolist()},
            )
            assert response.status_code == 200
    # Leaving the context flushed the event log.


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as r:
        yield r


def make_worker(
    client: redis.Redis, window: int = 250, consumer: str = "w1", **overrides: object
) -> DriftWorker:
    return DriftWorker(
        client,
        [DriftStream("digits", "1", REFERENCE)],
        consumer=consumer,
        config=drift_config(window, None, dict(overrides)),
        metrics=DriftWorkerMetrics(CollectorRegistry()),
        # Entries of 64 or 100 events: rounds of 128-200, so several workers share a stream.
        round_size=2,
        block_ms=50,
    )


def test_windows_are_tested_and_served_by_the_api_and_metrics(
    redis_url: str, client: redis.Redis
) -> None:
    send_traffic(redis_url, np.concatenate([in_distribution(500), noise(500)]))
    # Ten requests of 100: ten stream entries, cut by the windows of 250 events.
    assert make_worker(client).run(burst=True) == 10
    store = DriftStore(client, "digits", "1")
    history = store.history(10)
    assert [w["index"] for w in history] == [3, 2, 1, 0]
    assert all(w["size"] == 250 for w in history)
    tests = {r["test"] for r in history[0]["results"]}
    assert {"class_distribution", "softmax", "mmd", "features", "scores:novelty"} <= tests
    # The two in-distribution windows are quiet; pure noise drifts, and alarms on the second.
    assert not history[3]["drifting"] and not history[2]["drifting"]
    assert history[1]["drifting"] and not history[1]["alarm"]
    assert history[0]["drifting"] and history[0]["alarm"]
    novelty = next(r for r in history[0]["results"] if r["test"] == "scores:novelty")
    assert novelty["p_value"] < 0.01 and novelty["effect_size"] >= 0.1
    assert set(history[0]["histograms"]) == set(REFERENCE.score_distributions)
    assert sum(history[0]["class_counts"]) == 250

    app = create_app(
        Settings(model_dir=MODELS_DIR, redis_url=redis_url), registry=CollectorRegistry()
    )
    with TestClient(app) as api:
        body = api.get("/v1/models/digits/drift", params={"limit": 2}).json()
        assert body["windows_evaluated"] == 4 and body["events_evaluated"] == 1000
        assert body["buffered_events"] == 0 and body["alarm"] is True
        assert body["latest"] == history[0] and len(body["history"]) == 2
        # Page-Hinkley caught the change point (and, having reset, learnt the new level).
        assert body["streaming"]["novelty"]["detections"] >= 1
        assert api.get("/v1/models/digits/versions/1/drift").json()["latest"]["index"] == 3
        missing = api.get("/v1/models/nope/drift")
        assert missing.status_code == 404 and "unknown model 'nope'" in missing.json()["error"]
        assert api.get("/v1/models/digits/drift", params={"limit": -1}).status_code == 400
        metrics = api.get("/metrics").text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    }
    model = (("model", "digits"), ("version", "1"))

    def sample(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(model + tuple(labels.items()))))]

    assert sample("edgeharvest_drift_up") == 1
    assert sample("edgeharvest_drift_windows_evaluated_total") == 4
    assert sample("edgeharvest_drift_alarm", test="scores:novelty") == 1
    assert sample("edgeharvest_drift_any_alarm") == 1
    assert sample("edgeharvest_drift_drifting", test="mmd") == 1
    assert sample("edgeharvest_drift_p_value", test="scores:novelty") == novelty["p_value"]
    assert sample("edgeharvest_drift_effect_size", test="scores:novelty") == novelty["effect_size"]
    assert sample("edgeharvest_drift_streaming_alarm", score="novelty") in (0, 1)


def test_concurrent_workers_neither_lose_nor_double_count_a_window(
    redis_url: str, client: redis.Redis
) -> None:
    # Requests of 64 rows, one stream entry each: windows of 200 cut through entries.
    send_traffic(redis_url, in_distribution(2000, seed=1), batch=64)
    workers = []
    for name in ("a", "b", "c"):
        connection = redis.Redis.from_url(redis_url)
        workers.append(make_worker(connection, window=200, consumer=name))
    counts: dict[str, int] = {}
    threads = [
        threading.Thread(target=lambda w=w: counts.__setitem__(w.consumer, w.run(burst=True)))
        for w in workers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sum(counts.values()) == client.xlen(STREAM) == 32
    assert sum(1 for c in counts.values() if c > 0) >= 2  # the work was really shared
    store = DriftStore(client, "digits", "1")
    state, _, _ = store.overview()
    assert state["windows_evaluated"] == 10 and state["events_evaluated"] == 2000
    assert sorted(w["index"] for w in store.history(100)) == list(range(10))
    assert store.buffered_count() == 0
    assert client.xpending(STREAM, GROUP)["pending"] == 0


def test_sigkill_at_random_points_loses_and_double_counts_no_window(
    redis_url: str, client: redis.Redis, tmp_path: Path
) -> None:
    # Requests of 64 rows, one stream entry each: windows of 100 cut through entries.
    send_traffic(redis_url, in_distribution(1500, seed=2), batch=64)
    env = {
        **os.environ,
        "EDGEHARVEST_REDIS_URL": redis_url,
        "EDGEHARVEST_MODEL_DIR": str(MODELS_DIR),
        "EDGEHARVEST_DRIFT_WINDOW_SIZE": "100",
        # One entry (64 events) per round: many rounds for the kills to fall into.
        "EDGEHARVEST_DRIFT_ROUND_SIZE": "1",
        "EDGEHARVEST_DRIFT_CLAIM_IDLE_SECONDS": "0.05",
        "EDGEHARVEST_DRIFT_BLOCK_MS": "50",
    }
    command = [sys.executable, "-m", "service.cli", "drift"]
    kills = kill_repeatedly(command, env, cycles=6, rng=random.Random(11), after=(1.0, 2.0))
    assert kills >= 3
    finish = subprocess.run(
        [*command, "--burst"], env=env, cwd=REPO_ROOT, timeout=180, capture_output=True, text=True
    )
    assert finish.returncode == 0, finish.stderr
    store = DriftStore(client, "digits", "1")
    state, _, _ = store.overview()
    assert state["windows_evaluated"] == 15 and state["events_evaluated"] == 1500
    assert sorted(w["index"] for w in store.history(100)) == list(range(15))
    assert store.buffered_count() == 0
    assert client.xpending(STREAM, GROUP)["pending"] == 0

    report = tmp_path / "report.html"
    written = subprocess.run(
        [*command[:-1], "drift-report", "--model", "digits", "--out", str(report)],
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
        capture_output=True,
        text=True,
    )
    assert written.returncode == 0, written.stderr
    assert "15 windows evaluated" in written.stdout
    page = report.read_text()
    assert "Drift report: digits version 1" in page and page.count("<svg") == 4


def test_drift_worker_stops_on_sigterm_and_skips_models_without_reference(
    redis_url: str, client: redis.Redis
) -> None:
    env = {
        **os.environ,
        "EDGEHARVEST_REDIS_URL": redis_url,
        "EDGEHARVEST_MODEL_DIR": str(MODELS_DIR),
        "EDGEHARVEST_DRIFT_BLOCK_MS": "100",
    }
    process = start_worker("drift", env)
    wait_for_consumer_group(client, STREAM, GROUP, process)
    err = stop_worker(process)
    assert process.returncode == 0, err
    assert "drift worker processed 0 stream entries" in err
    bad = subprocess.run(
        [sys.executable, "-m", "service.cli", "drift"],
        env={**env, "EDGEHARVEST_DRIFT": '{"alpah": 0.1}'},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown keys ['alpah']" in bad.stderr


def test_time_windows_close_after_their_end_and_are_numbered_by_period(
    redis_url: str, client: redis.Redis
) -> None:
    send_traffic(redis_url, in_distribution(300, seed=3))
    worker = DriftWorker(
        client,
        [DriftStream("digits", "1", REFERENCE)],
        consumer="timed",
        config=drift_config(1000, 60.0, {}),
        metrics=DriftWorkerMetrics(CollectorRegistry()),
        grace_seconds=10.0,
    )
    store = DriftStore(client, "digits", "1")
    times = [float(meta["ts"]) for meta in event_meta(client)]
    # While the latest period is open (plus grace), its events wait in the buffer.
    worker.clock = lambda: max(times)
    worker.run(burst=True)
    open_period = math.floor(max(times) / 60)
    assert all(w["index"] < open_period for w in store.history(10))
    assert store.buffered_count() == sum(1 for t in times if math.floor(t / 60) == open_period)
    # Once it has ended (and the grace passed), every event is in exactly one window.
    worker.clock = lambda: (open_period + 1) * 60 + 10
    worker.run(burst=True)
    history = store.history(10)
    periods = sorted({math.floor(t / 60) for t in times})
    assert sorted(w["index"] for w in history) == periods
    assert sum(w["size"] for w in history) == 300 and store.buffered_count() == 0
    assert all(w["end_time"] - w["start_time"] == 60 for w in history)


def event_meta(client: redis.Redis) -> list[dict[str, object]]:
    return [e.meta for _, fields in client.xrange(STREAM) for e in decode_entry(fields)]


def test_a_version_discovered_while_running_is_watched(redis_url: str, client: redis.Redis) -> None:
    """A worker that started before the version was in the repository picks its stream up at
    the next look at the repository, events logged before that included."""
    send_traffic(redis_url, in_distribution(500, seed=4), batch=100)
    on_disk = [DriftStream("digits", "1", REFERENCE)]
    worker = DriftWorker(
        client,
        [],
        consumer="late",
        config=drift_config(250, None, {}),
        metrics=DriftWorkerMetrics(CollectorRegistry()),
        block_ms=50,
        discover=lambda known: [s for s in on_disk if (s.model, s.version) not in known],
        discover_seconds=0.0,
    )
    assert worker.run(burst=True) == client.xlen(STREAM) == 5
    state, _, _ = DriftStore(client, "digits", "1").overview()
    assert state["windows_evaluated"] == 2 and state["events_evaluated"] == 500
    assert client.xpending(STREAM, GROUP)["pending"] == 0
