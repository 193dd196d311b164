"""Predictions, events, selection, drift and labels through a real three-node Redis Cluster.

Two models whose hash tags live on different nodes (`{digits}` in slot 12149, `{iris-sklearn}`
in 3495), and clients given only the first node's address: every command is routed by slot, the
event writer's batches are split per node, and every Lua script must keep to its model's slot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis
import redis.cluster
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from redis.crc import key_slot
from sklearn.datasets import load_digits, load_iris

from service.app import create_app
from service.drift_detectors import ReferenceSample
from service.drift_store import DriftStore
from service.drift_worker import DriftStream, DriftWorker, DriftWorkerMetrics, drift_config
from service.events import decode_entry
from service.model_repository import ModelRepository
from service.redis_connection import create_redis
from service.redis_keys import event_stream, model_tag
from service.selection_policy import SelectionConfig, WindowBudget
from service.selector_worker import ModelStream, SelectorWorker
from service.settings import Settings
from service.worker_metrics import WorkerMetrics
from tests.metric_samples import sample_sum
from tests.model_factories import IRIS_CLASS_NAMES, IRIS_MODEL_NAME, build_sklearn_zipmap_model
from tests.redis_cluster import RedisCluster
from tests.support import MODELS_DIR, REPO_ROOT

DIGITS = load_digits().data.astype(np.float32)
IRIS = load_iris().data.astype(np.float32)
DIGITS_STREAM = event_stream("digits", "1")
IRIS_STREAM = event_stream(IRIS_MODEL_NAME, "1")
DIGIT_CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(size=3) as started:
        yield started


@pytest.fixture
def cluster_client(cluster: RedisCluster) -> Iterator[redis.cluster.RedisCluster]:
    cluster.flushall()
    client = create_redis(cluster.url)
    assert isinstance(client, redis.cluster.RedisCluster)
    yield client
    client.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cluster-models")
    shutil.copytree(MODELS_DIR / "digits", directory / "digits")
    build_sklearn_zipmap_model(directory)
    return directory


def digits_reference() -> ReferenceSample:
    profile = next(p for m, p in ModelRepository.find_references(MODELS_DIR) if m.name == "digits")
    assert profile is not None
    return ReferenceSample.from_profile(profile)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll until `condition()` holds; the timeout only guards against hanging."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def send_interleaved(api: TestClient, digit_batches: int, iris_batches: int) -> tuple[int, int]:
    """Batches of both models in turn, so the event writer's batches span two nodes."""
    sent = [0, 0]
    for i in range(max(digit_batches, iris_batches)):
        if i < digit_batches:
            rows = DIGITS[i * 100 : (i + 1) * 100]
            response = api.post("/v1/models/digits/predict", json={"instances": rows.tolist()})
            assert response.status_code == 200, response.text
            sent[0] += len(rows)
        if i < iris_batches:
            rows = IRIS[i * 50 : (i + 1) * 50]
            response = api.post(
                f"/v1/models/{IRIS_MODEL_NAME}/predict", json={"instances": rows.tolist()}
            )
            assert response.status_code == 200, response.text
            sent[1] += len(rows)
    return sent[0], sent[1]


def event_count(client: redis.cluster.RedisCluster, stream: str) -> int:
    return sum(len(decode_entry(fields)) for _, fields in client.xrange(stream))


def keys_by_node(cluster: RedisCluster, model: str) -> dict[int, int]:
    """How many of the model's keys each node holds, by port."""
    counts = {}
    for node in cluster.nodes:
        with node.client() as client:
            counts[node.port] = len(client.keys(f"*{model_tag(model)}*"))
    return counts


def test_predictions_events_selection_drift_and_labels_through_a_cluster(
    cluster: RedisCluster, cluster_client: redis.cluster.RedisCluster, model_dir: Path
) -> None:
    digits_node = cluster.node_of_slot(key_slot(DIGITS_STREAM.encode()))
    iris_node = cluster.node_of_slot(key_slot(IRIS_STREAM.encode()))
    # The URL names the first node only; the models live on two different nodes.
    assert digits_node.port != iris_node.port
    assert digits_node.port != cluster.nodes[0].port

    settings = Settings(model_dir=model_dir, redis_url=cluster.url, label_lease_seconds=60)
    app = create_app(settings, registry=CollectorRegistry())
    with TestClient(app) as api:
        digits_sent, iris_sent = send_interleaved(api, digit_batches=6, iris_batches=3)
        assert (digits_sent, iris_sent) == (600, 150)
        wait_for(
            lambda: (
                sample_sum(api.get("/metrics").text, "edgeharvest_events_written_total")
                == digits_sent + iris_sent
            )
        )
        metrics = api.get("/metrics").text
        assert sample_sum(metrics, "edgeharvest_events_dropped_total") == 0
        assert sample_sum(metrics, "edgeharvest_redis_write_errors_total") == 0
        assert event_count(cluster_client, DIGITS_STREAM) == digits_sent
        assert event_count(cluster_client, IRIS_STREAM) == iris_sent
        # One stream entry per request (each is one inference batch).
        assert cluster_client.xlen(DIGITS_STREAM) == 6
        assert cluster_client.xlen(IRIS_STREAM) == 3

        # Selection, by a worker of the same kind `edgeharvest select` runs.
        selector = SelectorWorker(
            create_redis(cluster.url),
            [
                ModelStream("digits", "1", DIGIT_CLASSES),
                ModelStream(IRIS_MODEL_NAME, "1", IRIS_CLASS_NAMES),
            ],
            consumer="cluster-selector",
            config=SelectionConfig(),
            budget=WindowBudget(100, 3600),
            metrics=WorkerMetrics(CollectorRegistry()),
            round_size=200,
            seed=0,
        )
        assert selector.run(burst=True) == 6 + 3
        for stream in (DIGITS_STREAM, IRIS_STREAM):
            assert cluster_client.xpending(stream, "selector")["pending"] == 0

        # Drift, in windows of 200 digits events.
        drift = DriftWorker(
            create_redis(cluster.url),
            [DriftStream("digits", "1", digits_reference())],
            consumer="cluster-drift",
            config=drift_config(200, None, {}),
            metrics=DriftWorkerMetrics(CollectorRegistry()),
            round_size=100,
        )
        assert drift.run(burst=True) == 6
        assert cluster_client.xpending(DIGITS_STREAM, "drift")["pending"] == 0
        store = DriftStore(cluster_client, "digits", "1")
        assert [w["index"] for w in store.history(10)] == [2, 1, 0]
        body = api.get("/v1/models/digits/drift").json()
        assert body["windows_evaluated"] == 3 and body["events_evaluated"] == digits_sent

        # Labeling over REST: claim six, label four, skip one, discard one.
        queue_url = "/v1/models/digits/queue"
        before = api.get(f"{queue_url}/stats").json()
        assert 0 < before["queued"] <= 100
        claimed = api.post(f"{queue_url}/claim", json={"labeler": "alice", "count": 6}).json()
        items = claimed["items"]
        assert len(items) == 6 and len({i["item_id"] for i in items}) == 6
        labeled = []
        for item in items[:4]:
            answer = api.post(
                f"{queue_url}/items/{item['item_id']}/label",
                json={"token": item["token"], "labeler": "alice", "label": "3"},
            )
            assert answer.status_code == 200, answer.text
            labeled.append(item["item_id"])
        skip, discard = items[4], items[5]
        assert (
            api.post(
                f"{queue_url}/items/{skip['item_id']}/skip",
                json={"token": skip["token"], "labeler": "alice"},
            ).status_code
            == 200
        )
        assert (
            api.post(
                f"{queue_url}/items/{discard['item_id']}/discard",
                json={"token": discard["token"], "labeler": "alice", "reason": "blank"},
            ).status_code
            == 200
        )
        after = api.get(f"{queue_url}/stats").json()
        assert (after["labeled"], after["discarded"], after["leased"]) == (4, 1, 0)
        assert after["queued"] == before["queued"] - 5
        export = api.get(f"{queue_url}/export.jsonl")
        exported = [orjson.loads(line) for line in export.iter_lines()]
        assert sorted(record["item_id"] for record in exported) == sorted(labeled)
        tasks = api.get(f"{queue_url}/export/label-studio").json()
        assert len(tasks) == after["queued"]
        iris_claim = api.post(
            f"/v1/models/{IRIS_MODEL_NAME}/queue/claim", json={"labeler": "bob", "count": 2}
        )
        assert iris_claim.status_code == 200 and len(iris_claim.json()["items"]) >= 1

        metrics = api.get("/metrics").text
        assert sample_sum(metrics, "edgeharvest_label_queue_up") == 2
        assert sample_sum(metrics, "edgeharvest_drift_up", model="digits") == 1
        assert (
            sample_sum(metrics, "edgeharvest_label_queue_items", model="digits", state="labeled")
            == 4
        )

    # Every key of a model sits on the node that owns its hash tag's slot, and nowhere else.
    for model, node in (("digits", digits_node), (IRIS_MODEL_NAME, iris_node)):
        counts = keys_by_node(cluster, model)
        assert counts[node.port] > 0
        assert sum(counts.values()) == counts[node.port]


def test_worker_commands_with_the_cluster_setting_drain_the_streams(
    cluster: RedisCluster, cluster_client: redis.cluster.RedisCluster, model_dir: Path
) -> None:
    """`edgeharvest select` and `drift` as deployed, told by EDGEHARVEST_REDIS_CLUSTER."""
    app = create_app(
        Settings(model_dir=model_dir, redis_url=cluster.url), registry=CollectorRegistry()
    )
    with TestClient(app) as api:
        digits_sent, iris_sent = send_interleaved(api, digit_batches=3, iris_batches=2)
    # Leaving the client flushed the event log.
    assert event_count(cluster_client, DIGITS_STREAM) == digits_sent
    assert event_count(cluster_client, IRIS_STREAM) == iris_sent

    plain_url = cluster.url.split("?", 1)[0]
    env = {
        **os.environ,
        "EDGEHARVEST_REDIS_URL": plain_url,
        "EDGEHARVEST_REDIS_CLUSTER": "true",
        "EDGEHARVEST_MODEL_DIR": str(model_dir),
        "EDGEHARVEST_DRIFT_WINDOW_SIZE": "100",
    }
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "service.cli", command, "--burst"],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in ("select", "drift")
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
    for stream in (DIGITS_STREAM, IRIS_STREAM):
        info = cluster_client.xinfo_groups(stream)
        groups = {group["name"].decode(): group for group in info}
        last = cluster_client.xinfo_stream(stream)["last-generated-id"]
        assert groups["selector"]["pending"] == 0
        assert groups["selector"]["last-delivered-id"] == last
    state, _, _ = DriftStore(cluster_client, "digits", "1").overview()
    assert state["windows_evaluated"] == 3 and state["events_evaluated"] == digits_sent
