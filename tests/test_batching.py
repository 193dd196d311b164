"""Adaptive batching through the app: gathered requests get exactly what they would get alone
(outputs, scores, events), a saturated queue answers 503 with Retry-After, and shutdown finishes
what was queued. Real onnxruntime on the committed digits model, real Redis."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sklearn.datasets import load_digits

from service.app import create_app
from service.events import Event, decode_entry
from service.redis_keys import event_stream
from service.settings import Settings
from tests.support import MODELS_DIR

pytestmark = pytest.mark.anyio

X = load_digits().data.astype(np.float32)
STREAM = event_stream("digits", "1")
SCORE_OUTPUTS = [
    "score_max_probability",
    "score_margin",
    "score_entropy",
    "score_novelty",
    "percentile_novelty",
    "percentile_max_probability",
    "flag_low_confidence",
    "flag_novel",
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def serving(
    redis_url: str, registry: CollectorRegistry | None = None, **settings: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and an in-process client: requests sent together
    are handled concurrently on one event loop, as uvicorn would."""
    app = create_app(
        Settings(model_dir=MODELS_DIR, redis_url=redis_url, **settings),
        registry=registry or CollectorRegistry(),
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://edgeharvest") as client:
            yield client


def mixed_requests() -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """/v1 and OIP requests of 1 to 4 instances, each with its own request id."""
    requests = []
    row = 0
    for i in range(48):
        size = 1 + i % 4
        rows = X[row : row + size]
        row += size
        request_id = f"req-{i}"
        if i % 2:
            body: dict[str, Any] = {"instances": rows.tolist(), "return_probabilities": True}
            requests.append(("/v1/models/digits/predict", body, {"x-request-id": request_id}))
        else:
            body = {
                "id": request_id,
                "inputs": [
                    {
                        "name": "pixels",
                        "shape": [size, 64],
                        "datatype": "FP32",
                        "data": rows.tolist(),
                    }
                ],
                "outputs": [
                    {"name": "probabilities"},
                    {"name": "embedding", "parameters": {"binary_data": i % 4 == 0}},
                    *({"name": name} for name in SCORE_OUTPUTS),
                ],
            }
            requests.append(("/v2/models/digits/infer", body, {}))
    return requests


async def send_together(
    client: httpx.AsyncClient, requests: Sequence[tuple[str, dict[str, Any], dict[str, str]]]
) -> list[httpx.Response]:
    return await asyncio.gather(
        *(client.post(path, content=orjson.dumps(body), headers=h) for path, body, h in requests)
    )


def stream_length(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        return int(client.xlen(STREAM))


def events_by_request(url: str) -> dict[str, list[Event]]:
    with redis.Redis.from_url(url) as client:
        entries = client.xrange(STREAM)
    events: dict[str, list[Event]] = defaultdict(list)
    for _, fields in entries:
        for event in decode_entry(fields):
            events[event.meta["request_id"]].append(event)
    return events


def comparable(event: Event) -> dict[str, Any]:
    """Everything an event says except its random id and its time."""
    meta = {k: v for k, v in event.meta.items() if k not in ("id", "ts")}
    assert event.input is not None
    return {
        "meta": meta,
        "input": event.input.tobytes(),
        "embedding": event.embedding.tobytes(),
        "probabilities": event.probabilities.tobytes(),
    }


async def test_gathered_requests_get_exactly_what_they_get_alone(redis_url: str) -> None:
    requests = mixed_requests()
    alone_url = redis_url.rsplit("/", 1)[0] + "/1"
    registry = CollectorRegistry()
    async with serving(redis_url, registry, batching="on") as client:
        batched = await send_together(client, requests)
    async with serving(alone_url, batching="off") as client:
        alone = await send_together(client, requests)

    assert [r.status_code for r in batched] == [200] * len(requests)
    # Gathering did happen: fewer onnxruntime calls than requests (every request sent at once).
    calls = registry.get_sample_value(
        "edgeharvest_inference_duration_seconds_count", {"model": "digits", "version": "1"}
    )
    assert calls is not None and calls < len(requests)
    # Byte for byte: outputs, scores, percentiles and flags.
    for gathered, single in zip(batched, alone, strict=True):
        assert gathered.headers["content-type"] == single.headers["content-type"]
        assert gathered.content == single.content
    # The same events, request by request (the lifespan's end flushed them).
    batched_events, alone_events = events_by_request(redis_url), events_by_request(alone_url)
    assert set(batched_events) == {f"req-{i}" for i in range(len(requests))}
    for request_id, events in alone_events.items():
        assert [comparable(e) for e in batched_events[request_id]] == [
            comparable(e) for e in events
        ]
        assert [e.meta["index"] for e in events] == list(range(len(events)))
    # One stream entry per onnxruntime call, whatever the number of requests it served.
    assert stream_length(redis_url) == calls
    assert stream_length(alone_url) == len(requests)


async def test_a_saturated_queue_answers_503_with_retry_after(redis_url: str) -> None:
    # One instance per batch and no queueing allowed: while one request waits for its batch,
    # every other is past the bound.
    registry = CollectorRegistry()
    async with serving(
        redis_url,
        registry,
        batching="on",
        batching_max_batch_size=1,
        batching_max_queue_delay_seconds=0.0,
    ) as client:
        body = {"instances": [X[0].tolist()]}
        responses = await send_together(client, [("/v1/models/digits/predict", body, {})] * 5)
        assert [r.status_code for r in responses] == [200, 503, 503, 503, 503]
        refused = responses[1]
        assert refused.headers["retry-after"] == "1"
        message = refused.json()["error"]
        assert "maximum queueing delay of 0.0 s" in message
        assert "EDGEHARVEST_BATCHING_MAX_QUEUE_DELAY_SECONDS" in message
        # The bound is about the queue, not a verdict on the model: alone, a request passes.
        later = await client.post("/v1/models/digits/predict", json=body)
        assert later.status_code == 200
    assert (
        registry.get_sample_value(
            "edgeharvest_batch_rejected_total", {"model": "digits", "version": "1"}
        )
        == 4
    )
    assert (
        registry.get_sample_value(
            "edgeharvest_requests_total",
            {
                "model": "digits",
                "version": "1",
                "endpoint": "/v1/models/{name}/predict",
                "status": "503",
            },
        )
        == 4
    )


async def test_within_the_bound_nothing_is_refused(redis_url: str) -> None:
    async with serving(redis_url, batching="on", batching_max_batch_size=4) as client:
        body = {"instances": [X[0].tolist()]}
        responses = await send_together(client, [("/v1/models/digits/predict", body, {})] * 64)
    assert {r.status_code for r in responses} == {200}


async def test_shutdown_finishes_queued_requests_and_logs_their_events(redis_url: str) -> None:
    registry = CollectorRegistry()
    app = create_app(
        Settings(
            model_dir=MODELS_DIR,
            redis_url=redis_url,
            batching="on",
            batching_max_batch_size=4,
            # Every batch in the batcher's thread, so a batch is in flight at shutdown.
            threadpool_min_elements=0,
        ),
        registry=registry,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://edgeharvest") as client:
        async with app.router.lifespan_context(app):
            batcher = app.state.dataplane.batchers[("digits", "1")]
            pending = [
                asyncio.ensure_future(
                    client.post("/v1/models/digits/predict", json={"instances": [X[i].tolist()]})
                )
                for i in range(20)
            ]
            while batcher.queued_instances == 0:
                await asyncio.sleep(0)
            queued_at_shutdown = batcher.queued_instances
        # The lifespan has ended: the batcher stopped, then the event log flushed.
        responses = await asyncio.gather(*pending)
        after = await client.post("/v1/models/digits/predict", json={"instances": [X[0].tolist()]})
    served = [i for i, r in enumerate(responses) if r.status_code == 200]
    # Whatever was queued or running when shutdown began was served, not dropped; requests
    # that had not reached the queue yet were refused as not ready.
    assert len(served) >= queued_at_shutdown > 0
    assert {r.status_code for r in responses} <= {200, 503}
    expected = expected_classes(X[:20])
    for i in served:
        assert responses[i].json()["predictions"][0]["class_index"] == expected[i]
    assert after.status_code == 503
    assert sum(len(e) for e in events_by_request(redis_url).values()) == len(served)
    assert (
        registry.get_sample_value("edgeharvest_events_dropped_total", {"reason": "shutdown"}) == 0
    )


def expected_classes(rows: np.ndarray) -> list[int]:
    session = ort.InferenceSession(str(MODELS_DIR / "digits" / "model.onnx"))
    probabilities = session.run(["probabilities"], {"pixels": rows})[0]
    return [int(c) for c in probabilities.argmax(axis=1)]


def test_a_live_server_under_concurrent_clients_answers_as_if_unbatched(
    live_server: str, redis_url: str
) -> None:
    """Real uvicorn, real sockets, 16 clients at once: each answer is the unbatched one."""
    requests = mixed_requests()
    with TestClient(
        create_app(
            Settings(model_dir=MODELS_DIR, redis_url=redis_url, batching="off"),
            registry=CollectorRegistry(),
        )
    ) as alone:
        expected = [
            alone.post(path, content=orjson.dumps(body), headers=headers).content
            for path, body, headers in requests
        ]

    def post(request: tuple[str, dict[str, Any], dict[str, str]]) -> bytes:
        path, body, headers = request
        response = httpx.post(
            live_server + path, content=orjson.dumps(body), headers=headers, timeout=30
        )
        assert response.status_code == 200, response.text
        return response.content

    with ThreadPoolExecutor(16) as clients:
        answers = list(clients.map(post, requests * 4))
    assert answers == expected * 4
