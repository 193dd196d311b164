"""Hostile input: property-based fuzzing of the HTTP API from its own OpenAPI schema, plus
targeted attacks. Against the real server over real HTTP; never a 5xx, every error a
well-formed `{"error": "..."}` body."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.settings import Settings
from tests.support import MODELS_DIR

MODEL = "/v1/models/digits/predict"
OIP = "/v2/models/digits/infer"


def openapi_document() -> dict[str, Any]:
    """The schema the live server serves at /openapi.json (same settings, no Redis needed)."""
    app = create_app(
        Settings(model_dir=MODELS_DIR, monitoring_enabled=False), registry=CollectorRegistry()
    )
    return app.openapi()


schema = schemathesis.openapi.from_dict(openapi_document())
# (operation, status) of every fuzzed call, checked by the test that follows the fuzzing.
FUZZED: list[tuple[str, int]] = []


def assert_well_formed(response: Any) -> None:
    status = response.status_code
    assert status < 500, f"{status} for {response.request.method} {response.request.url}"
    if status >= 400:
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_operation_answers_5xx_or_a_malformed_error(case: Any, live_server: str) -> None:
    response = case.call(base_url=live_server, timeout=10)
    FUZZED.append((f"{case.method} {case.path}", response.status_code))
    assert_well_formed(response)


def test_the_fuzzer_reached_every_operation_and_both_outcomes() -> None:
    operations = {operation for operation, _ in FUZZED}
    documented = {
        f"{method.upper()} {path}"
        for path, methods in openapi_document()["paths"].items()
        for method in methods
    }
    # Every documented operation, plus undocumented methods on the same paths (405 expected).
    assert documented <= operations
    statuses = {status // 100 for _, status in FUZZED}
    assert statuses == {2, 4}, sorted({status for _, status in FUZZED})


@pytest.fixture(scope="module")
def http(live_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, timeout=10) as client:
        yield client


def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


HOSTILE_BODIES = {
    "deeply nested JSON": ("application/json", '{"instances": ' + nested(100_000) + "}"),
    "huge number": ("application/json", '{"instances": [[' + "9" * 5000 + "]]}"),
    "huge exponent": ("application/json", '{"instances": [[1e999999]]}'),
    "NaN literal": ("application/json", '{"instances": [[NaN]]}'),
    "very long string": ("application/json", '{"instances": "' + "x" * 1_000_000 + '"}'),
    "not JSON": ("application/json", "\x00\xff garbage"),
    "wrong content type": ("text/plain", "hello"),
    "empty body": ("application/json", ""),
    "JSON null": ("application/json", "null"),
    "instances not a list": ("application/json", '{"instances": {"a": 1}}'),
    "strings as pixels": ("application/json", '{"instances": [["a"]]}'),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
@pytest.mark.parametrize("path", [MODEL, OIP])
def test_hostile_bodies_get_a_4xx_that_says_what_was_wrong(
    http: httpx.Client, path: str, name: str
) -> None:
    content_type, body = HOSTILE_BODIES[name]
    response = http.post(path, content=body.encode(), headers={"content-type": content_type})
    assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:200])
    assert_well_formed(response)


@pytest.mark.parametrize(
    "tensor",
    [
        {"name": "pixels", "shape": [-1, 64], "datatype": "FP32", "data": [0.0] * 64},
        {"name": "pixels", "shape": [1, 10**12], "datatype": "FP32", "data": [0.0] * 64},
        {"name": "pixels", "shape": [2**40, 2**40], "datatype": "FP32", "data": [0.0] * 64},
        {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [float("inf")] * 64},
        {"name": "pixels", "shape": [1, 64], "datatype": "BYTES", "data": ["x"] * 64},
        {"name": "pixels", "shape": [], "datatype": "FP32", "data": []},
        {"name": "pixels", "shape": [1, 64], "datatype": "NOPE", "data": [0.0] * 64},
    ],
    ids=["negative", "enormous", "overflowing", "inf", "bytes", "scalar", "unknown-type"],
)
def test_hostile_shapes_and_values_are_refused_with_a_4xx(
    http: httpx.Client, tensor: dict[str, Any]
) -> None:
    response = http.post(OIP, content=_json({"inputs": [tensor]}))
    assert 400 <= response.status_code < 500, (tensor["shape"], response.text[:200])
    assert_well_formed(response)


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/..%2F..%2Fetc%2Fpasswd/infer",
        "/v2/models/%2e%2e/infer",
        "/v1/models/..%2Fdigits/predict",
        "/v2/models/digits/versions/..%2F..%2F1/infer",
        "/v1/models/digits%00/predict",
    ],
)
def test_path_traversal_in_model_names_finds_no_model(http: httpx.Client, path: str) -> None:
    response = http.post(path, content=_json({"instances": [[0.0] * 64]}))
    assert response.status_code in (400, 404), (path, response.status_code)
    assert_well_formed(response)


def _json(value: object) -> bytes:
    import json

    return json.dumps(value).encode()
