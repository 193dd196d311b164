"""API keys, roles, the concurrency limit and the request timeout."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from starlette.types import Receive, Scope, Send

from service.access_control import AccessControl
from service.auth import ANY_KEY, OPEN, ApiKey, KeyRing, hash_key, presented_key, required
from tests.support import MODELS_DIR, start_server

PREDICTOR, LABELER, ADMIN = "eh_predictor-key", "eh_labeler-key", "eh_admin-key"
KEYS = [
    ApiKey(name="api-client", sha256=hash_key(PREDICTOR), roles=["predict"]),
    ApiKey(name="labeler", sha256=hash_key(LABELER), roles=["label"]),
    ApiKey(name="ops", sha256=hash_key(ADMIN), roles=["admin"]),
]


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/v2/models/digits/infer", "predict"),
        ("POST", "/v2/models/digits/versions/1/infer", "predict"),
        ("POST", "/v1/models/digits/predict", "predict"),
        ("GET", "/v2/models/digits", ANY_KEY),
        ("HEAD", "/v2", ANY_KEY),
        ("POST", "/v1/models/digits/queue/claim", "label"),
        ("POST", "/v1/models/digits/versions/1/queue/items/abc/label", "label"),
        ("GET", "/v1/models/digits/queue/stats", "label"),
        ("POST", "/v1/models/digits/queue/import/label-studio", "label"),
        ("GET", "/v1/models/digits/queue/export.jsonl", "admin"),
        ("GET", "/v1/models/digits/versions/1/queue/export/label-studio", "admin"),
        ("POST", "/v2/repository/models/digits/load", "admin"),
        ("GET", "/v1/models/digits/drift", ANY_KEY),
        ("GET", "/v2/health/ready", OPEN),
        ("GET", "/metrics", OPEN),
        ("GET", "/console/index.html", OPEN),
        ("GET", "/something/new", ANY_KEY),  # never open by accident
        ("GET", "/v1/models/digits/queue/../../../v2/repository", "label"),  # no normalising
    ],
)
def test_every_path_needs_the_role_its_table_says(method: str, path: str, expected: str) -> None:
    assert required(method, path) == expected


def test_observability_can_be_protected() -> None:
    assert required("GET", "/metrics", protect_observability=True) == ANY_KEY
    assert required("GET", "/v2/health/live", protect_observability=True) == ANY_KEY


def test_key_ring_decides_401_403_and_admin_holds_every_role() -> None:
    ring = KeyRing(KEYS)
    assert ring.decide("predict", None).status == 401
    assert ring.decide("predict", "eh_wrong").status == 401
    denied = ring.decide("predict", LABELER)
    assert denied.status == 403 and "'labeler'" in denied.message and "'predict'" in denied.message
    assert ring.decide("admin", LABELER).status == 403
    assert ring.decide("label", LABELER).allowed
    assert ring.decide(ANY_KEY, LABELER).allowed
    assert all(ring.decide(role, ADMIN).allowed for role in ("predict", "label", "admin"))
    assert KeyRing([]).decide("admin", None).allowed  # no keys configured: no authentication
    assert ring.decide(OPEN, None).allowed


def test_presented_key_from_bearer_or_x_api_key() -> None:
    assert presented_key({"authorization": "Bearer abc"}) == "abc"
    assert presented_key({"authorization": "bearer  abc "}) == "abc"
    assert presented_key({"x-api-key": "xyz"}) == "xyz"
    assert presented_key({"authorization": "Basic Zm9v"}) is None
    assert presented_key({}) is None


def test_key_entries_are_validated() -> None:
    with pytest.raises(ValueError, match="roles"):
        ApiKey(name="x", sha256="a" * 64, roles=["root"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="sha256"):
        ApiKey(name="x", sha256="not-a-hash", roles=["label"])
    assert ApiKey(name="x", sha256="A" * 64, roles=["label"]).sha256 == "a" * 64


# ---- the real service with keys -----------------------------------------------------------


@pytest.fixture(scope="module")
def secured(redis_server: object) -> Iterator[str]:
    keys = json.dumps([k.model_dump() for k in KEYS])
    process, base_url = start_server(
        MODELS_DIR,
        {"EDGEHARVEST_REDIS_URL": redis_server.url, "EDGEHARVEST_API_KEYS": keys},  # type: ignore[attr-defined]
    )
    try:
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)


def call(base: str, method: str, path: str, key: str | None, **kwargs: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, base + path, headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]


ONE = {"instances": [[0.0] * 64]}


def test_live_service_refuses_without_key_and_with_the_wrong_role(secured: str) -> None:
    missing = call(secured, "POST", "/v1/models/digits/predict", None, json=ONE)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "needs an API key" in missing.json()["error"]
    assert (
        call(secured, "POST", "/v1/models/digits/predict", "eh_bogus", json=ONE).status_code == 401
    )
    assert (
        call(secured, "POST", "/v1/models/digits/predict", PREDICTOR, json=ONE).status_code == 200
    )
    assert call(secured, "POST", "/v1/models/digits/predict", ADMIN, json=ONE).status_code == 200
    oip = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
    assert call(secured, "POST", "/v2/models/digits/infer", LABELER, json=oip).status_code == 403
    # Labelers label, and never reach admin operations; the predicting client cannot label.
    claim = {"labeler": "l1", "count": 1}
    assert (
        call(secured, "POST", "/v1/models/digits/queue/claim", LABELER, json=claim).status_code
        == 200
    )
    assert (
        call(secured, "POST", "/v1/models/digits/queue/claim", PREDICTOR, json=claim).status_code
        == 403
    )
    export = call(secured, "GET", "/v1/models/digits/queue/export.jsonl", LABELER)
    assert export.status_code == 403 and "'admin'" in export.json()["error"]
    assert call(secured, "GET", "/v1/models/digits/queue/export.jsonl", ADMIN).status_code == 200
    # Probes and Prometheus need no key; metadata needs any key.
    assert call(secured, "GET", "/v2/health/ready", None).status_code == 200
    assert call(secured, "GET", "/metrics", None).status_code == 200
    assert call(secured, "GET", "/v2/models/digits", None).status_code == 401
    assert call(secured, "GET", "/v2/models/digits", LABELER).status_code == 200


def test_live_service_answers_503_with_retry_after_past_its_concurrency_limit(
    redis_server: object,
) -> None:
    process, base_url = start_server(
        MODELS_DIR,
        {
            "EDGEHARVEST_REDIS_URL": redis_server.url,  # type: ignore[attr-defined]
            "EDGEHARVEST_MAX_CONCURRENT_REQUESTS": "2",
        },
    )
    # 1,024 instances a request: inference runs in a worker thread, so requests overlap.
    body = {"instances": np.zeros((1024, 64)).tolist()}
    try:
        with httpx.Client(base_url=base_url, timeout=60) as client, ThreadPoolExecutor(16) as pool:
            responses = list(
                pool.map(lambda _: client.post("/v1/models/digits/predict", json=body), range(48))
            )
    finally:
        process.terminate()
        process.wait(timeout=30)
    statuses = {r.status_code for r in responses}
    assert statuses <= {200, 503} and 200 in statuses
    refused = [r for r in responses if r.status_code == 503]
    assert refused, "16 clients against a limit of 2 were never refused"
    assert all(r.headers["retry-after"] == "1" for r in refused)
    assert all("limit of 2 concurrent requests" in r.json()["error"] for r in refused)


# ---- the layer itself, around an app whose timing the test controls -----------------------


def layered(app: object, **kwargs: object) -> httpx.AsyncClient:
    options = {"max_concurrent_requests": 1, "request_timeout_seconds": 0.2, **kwargs}
    wrapped = AccessControl(app, KeyRing([]), **options)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://t")


async def respond(send: Send, body: bytes = b"ok") -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_only_the_request_over_the_limit_is_refused_and_the_slot_comes_back() -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/slow":
            entered.set()
            await release.wait()
        await respond(send)

    async def scenario() -> list[int]:
        async with layered(app, request_timeout_seconds=30) as client:
            slow = asyncio.create_task(client.get("/slow"))
            await entered.wait()  # the one slot is taken
            refused = await client.get("/fast")
            health = await client.get("/v2/health/live")  # never refused, even at the limit
            release.set()
            first = await slow
            again = await client.get("/fast")
            return [refused.status_code, health.status_code, first.status_code, again.status_code]

    assert asyncio.run(scenario()) == [503, 200, 200, 200]


def test_a_request_that_has_not_started_its_response_times_out_with_504() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/stuck":
            await asyncio.Event().wait()
        if scope["path"] == "/streaming":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await asyncio.sleep(0.5)  # longer than the timeout, after the response started
            await send({"type": "http.response.body", "body": b"all of it"})
            return
        await respond(send)

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with layered(app, max_concurrent_requests=10) as client:
            return await client.get("/stuck"), await client.get("/streaming")

    stuck, streaming = asyncio.run(scenario())
    assert stuck.status_code == 504
    assert "did not finish within 0.2 s" in stuck.json()["error"]
    assert streaming.status_code == 200 and streaming.content == b"all of it"
