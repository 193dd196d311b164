"""Monitoring end to end through the app factory: scores in responses, events in a real Redis,
metrics on /metrics, and predictions that keep succeeding while Redis is down."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sklearn.datasets import load_digits

from service.app import create_app
from service.events import Event, decode_entry
from service.neighbour_index import l2_normalize
from service.redis_keys import event_stream
from service.settings import Settings
from tests.redis_server import RedisServer
from tests.support import MODELS_DIR

X = load_digits().data.astype(np.float32)
STREAM = event_stream("digits", "1")


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


def make_client(url: str, registry: CollectorRegistry, **settings: object) -> TestClient:
    app = create_app(
        Settings(model_dir=MODELS_DIR, redis_url=url, **settings),  # type: ignore[arg-type]
        registry=registry,
    )
    return TestClient(app)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def client(redis_url: str, registry: CollectorRegistry) -> Iterator[TestClient]:
    with make_client(redis_url, registry) as test_client:
        yield test_client


def stream_entries(url: str) -> list[dict[bytes, bytes]]:
    with redis.Redis.from_url(url) as r:
        return [fields for _, fields in r.xrange(STREAM)]


def stream_events(url: str) -> list[Event]:
    return [event for fields in stream_entries(url) for event in decode_entry(fields)]


def test_v1_response_carries_scores_percentiles_and_flags(client: TestClient) -> None:
    body = client.post("/v1/models/digits/predict", json={"instances": X[:3].tolist()}).json()
    prediction = body["predictions"][0]
    assert set(prediction["scores"]) == {"max_probability", "margin", "entropy", "novelty"}
    assert set(prediction["percentiles"]) == set(prediction["scores"])
    assert set(prediction["flags"]) == {"low_confidence", "novel"}
    assert all(0 <= v <= 100 for v in prediction["percentiles"].values())
    assert prediction["scores"]["max_probability"] == pytest.approx(prediction["probability"])


def test_oip_response_carries_scores_in_parameters_and_as_outputs(client: TestClient) -> None:
    import orjson

    body = {
        "inputs": [
            {"name": "pixels", "shape": [2, 64], "datatype": "FP32", "data": X[:2].tolist()}
        ],
        "outputs": [
            {"name": "probabilities"},
            {"name": "score_novelty"},
            {"name": "percentile_novelty"},
            {"name": "flag_novel"},
        ],
    }
    document = client.post("/v2/models/digits/infer", json=body).json()
    rows = orjson.loads(document["parameters"]["scores"])
    assert len(rows) == 2
    outputs = {o["name"]: o for o in document["outputs"]}
    assert outputs["score_novelty"]["datatype"] == "FP32"
    assert outputs["score_novelty"]["data"] == pytest.approx([r["scores"]["novelty"] for r in rows])
    assert outputs["flag_novel"]["datatype"] == "BOOL"
    assert outputs["flag_novel"]["data"] == [r["flags"]["novel"] for r in rows]
    metadata = client.get("/v2/models/digits").json()
    assert "score_novelty" in metadata["parameters"]["score_outputs"]
    # Without an output selection, only the model's own outputs come back.
    plain = client.post("/v2/models/digits/infer", json={"inputs": body["inputs"]}).json()
    assert {o["name"] for o in plain["outputs"]} == {"probabilities", "embedding"}


def test_events_land_in_the_stream_and_decode_to_the_original(
    client: TestClient, redis_url: str
) -> None:
    rows = X[10:15]
    body = {
        "id": "req-7",
        "inputs": [{"name": "pixels", "shape": [5, 64], "datatype": "FP32", "data": rows.tolist()}],
        "outputs": [{"name": "embedding"}, {"name": "probabilities"}, {"name": "score_margin"}],
    }
    document = client.post("/v2/models/digits/infer", json=body).json()
    outputs = {o["name"]: o for o in document["outputs"]}
    embedding = np.asarray(outputs["embedding"]["data"], np.float32).reshape(5, -1)
    probabilities = np.asarray(outputs["probabilities"]["data"], np.float32).reshape(5, 10)
    wait_for(lambda: len(stream_events(redis_url)) == 5)
    # One request, one inference batch: one stream entry.
    assert len(stream_entries(redis_url)) == 1
    events = stream_events(redis_url)
    assert len({e.id for e in events}) == 5
    for i, event in enumerate(events):
        assert event.meta["request_id"] == "req-7"
        assert event.meta["model"] == "digits" and event.meta["version"] == "1"
        assert event.meta["index"] == i
        np.testing.assert_array_equal(event.input, rows[i])
        np.testing.assert_allclose(event.embedding, l2_normalize(embedding)[i], atol=1e-3)
        np.testing.assert_array_equal(event.probabilities, probabilities[i])
        assert event.predicted == int(probabilities[i].argmax())
        assert event.scores["margin"] == pytest.approx(outputs["score_margin"]["data"][i])


def test_metrics_count_requests_predictions_and_events(
    client: TestClient, registry: CollectorRegistry, redis_url: str
) -> None:
    for _ in range(3):
        client.post("/v1/models/digits/predict", json={"instances": X[:4].tolist()})
    client.post("/v1/models/digits/predict", json={"instances": [[1.0]]})
    client.post("/v1/models/nope/predict", json={"instances": [[1.0]]})
    labels = {"model": "digits", "version": "1", "endpoint": "/v1/models/{name}/predict"}
    get = registry.get_sample_value
    assert get("edgeharvest_requests_total", {**labels, "status": "200"}) == 3
    assert get("edgeharvest_requests_total", {**labels, "status": "400"}) == 1
    unknown = {
        "model": "unknown",
        "version": "unknown",
        "endpoint": labels["endpoint"],
        "status": "404",
    }
    assert get("edgeharvest_requests_total", unknown) == 1
    assert get("edgeharvest_request_duration_seconds_count", labels) == 4
    model = {"model": "digits", "version": "1"}
    assert get("edgeharvest_batch_size_sum", model) == 12
    assert get("edgeharvest_prediction_confidence_count", model) == 12
    assert get("edgeharvest_prediction_novelty_percentile_count", model) == 12
    assert get("edgeharvest_reference_profile_loaded", model) == 1
    wait_for(lambda: (get("edgeharvest_events_written_total", {"stream": STREAM}) or 0) == 12)
    text = client.get("/metrics").text
    assert 'edgeharvest_model_info{model="digits",platform="onnxruntime_onnx"' in text


def test_predictions_survive_a_redis_outage_and_buffered_events_arrive(
    registry: CollectorRegistry,
) -> None:
    with (
        RedisServer() as server,
        make_client(
            server.url,
            registry,
            event_buffer_capacity=1000,
            event_backoff_max=0.2,
            redis_socket_timeout=0.5,
        ) as client,
    ):
        get = registry.get_sample_value
        for i in range(20):
            assert (
                client.post(
                    "/v1/models/digits/predict", json={"instances": [X[i].tolist()]}
                ).status_code
                == 200
            )
        wait_for(lambda: len(stream_events(server.url)) == 20)
        server.stop()
        for i in range(20, 120):
            response = client.post("/v1/models/digits/predict", json={"instances": [X[i].tolist()]})
            assert response.status_code == 200
        wait_for(lambda: (get("edgeharvest_redis_write_errors_total") or 0) >= 1)
        assert get("edgeharvest_events_dropped_total", {"reason": "buffer_full"}) == 0
        server.start()
        wait_for(lambda: len(stream_events(server.url)) >= 100)
        # The server lost its first 20 events in the crash; the 100 buffered ones all arrive
        # (a batch in flight when Redis died may be written twice: ids tell them apart).
        ids = {e.id for e in stream_events(server.url)}
        assert len(ids) == 100
        assert get("edgeharvest_events_dropped_total", {"reason": "buffer_full"}) == 0


def test_a_full_buffer_drops_the_oldest_and_counts_them(registry: CollectorRegistry) -> None:
    with RedisServer() as server:
        url = server.url
        server.stop()
        with make_client(
            url, registry, event_buffer_capacity=10, redis_socket_timeout=0.5
        ) as client:
            for i in range(25):
                response = client.post(
                    "/v1/models/digits/predict", json={"instances": [X[i].tolist()]}
                )
                assert response.status_code == 200
            get = registry.get_sample_value
            assert get("edgeharvest_events_dropped_total", {"reason": "buffer_full"}) == 15
            assert get("edgeharvest_event_buffer_events") is not None
            server.start()
            wait_for(lambda: len(stream_events(url)) == 10)
            newest = [e.meta["request_id"] for e in stream_events(url)]
            assert len(set(newest)) == 10


def test_monitoring_off_serves_plain_predictions(redis_url: str) -> None:
    with make_client(redis_url, CollectorRegistry(), monitoring_enabled=False) as client:
        body = client.post("/v1/models/digits/predict", json={"instances": [X[0].tolist()]}).json()
        assert set(body["predictions"][0]) == {"class_index", "class_name", "probability"}
    assert stream_events(redis_url) == []
