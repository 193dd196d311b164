"""The simple JSON endpoint on the digits model."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.datasets import load_digits

DIGITS = load_digits()
X = DIGITS.data.astype(np.float32)


@pytest.mark.parametrize(
    "path", ["/v1/models/digits/predict", "/v1/models/digits/versions/1/predict"]
)
def test_predict_returns_class_and_probability(digits_client: TestClient, path: str) -> None:
    response = digits_client.post(path, json={"instances": X[:20].tolist()})
    assert response.status_code == 200
    body = response.json()
    assert body["model_name"] == "digits"
    assert body["model_version"] == "1"
    predictions = body["predictions"]
    assert len(predictions) == 20
    assert set(predictions[0]) == {
        "class_index",
        "class_name",
        "probability",
        "scores",
        "percentiles",
        "flags",
    }
    indices = [p["class_index"] for p in predictions]
    assert [p["class_name"] for p in predictions] == [str(i) for i in indices]
    assert np.mean(np.asarray(indices) == DIGITS.target[:20]) >= 0.9


def test_predict_matches_oip_probabilities(digits_client: TestClient) -> None:
    rows = X[:5]
    v1 = digits_client.post(
        "/v1/models/digits/predict",
        json={"instances": rows.tolist(), "return_probabilities": True},
    ).json()["predictions"]
    v2 = digits_client.post(
        "/v2/models/digits/infer",
        json={
            "inputs": [
                {"name": "pixels", "shape": [5, 64], "datatype": "FP32", "data": rows.tolist()}
            ],
            "outputs": [{"name": "probabilities"}],
        },
    ).json()["outputs"][0]["data"]
    expected = np.asarray(v2, dtype=np.float32).reshape(5, 10)
    got = np.asarray([p["probabilities"] for p in v1], dtype=np.float32)
    np.testing.assert_array_equal(got, expected)
    assert [p["probability"] for p in v1] == pytest.approx(expected.max(axis=1).tolist())


def test_image_shaped_instances_are_accepted(digits_client: TestClient) -> None:
    # An 8x8 image holds the 64 values the model takes: the values count, not the nesting.
    images = X[:2].reshape(2, 8, 8).tolist()
    nested = digits_client.post("/v1/models/digits/predict", json={"instances": images})
    flat = digits_client.post("/v1/models/digits/predict", json={"instances": X[:2].tolist()})
    assert nested.status_code == 200
    assert nested.json() == flat.json()


def test_models_listing(digits_client: TestClient) -> None:
    assert digits_client.get("/v1/models").json() == {
        "models": [{"name": "digits", "versions": ["1"], "default_version": "1"}]
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {},
            "'instances' is missing or not a list; expected an object {\"instances\": "
            "[instance, ...]}",
        ),
        ({"instances": []}, "'instances' is empty; expected at least one instance"),
        (
            {"instances": [[1.0] * 63]},
            "each instance has shape [63]; model 'digits' expects instances of shape [64] "
            "(-1 = any)",
        ),
        (
            {"instances": [[1.0] * 64], "return_probabilities": "yes"},
            "'return_probabilities' must be true or false",
        ),
    ],
)
def test_predict_errors(digits_client: TestClient, body: object, message: str) -> None:
    response = digits_client.post("/v1/models/digits/predict", json=body)
    assert response.status_code == 400
    assert response.json() == {"error": message}


def test_ragged_instances_are_400(digits_client: TestClient) -> None:
    response = digits_client.post(
        "/v1/models/digits/predict", json={"instances": [[1.0] * 64, [1.0] * 3]}
    )
    assert response.status_code == 400
    assert "cannot be read as FP32" in response.json()["error"]


def test_nan_instance_is_400(digits_client: TestClient) -> None:
    rows = [[0.0] * 64, [0.0] * 63 + [1e39]]
    response = digits_client.post("/v1/models/digits/predict", json={"instances": rows})
    assert response.status_code == 400
    assert response.json()["error"].startswith("instance 1 holds NaN, infinity")
