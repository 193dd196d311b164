"""Models we did not export ourselves: a scikit-learn ZipMap classifier and a logits-only graph
whose embedding is an intermediate tensor named only in the manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.manifest_proposal import propose_manifest
from service.settings import Settings
from tests.model_factories import (
    IRIS_CLASS_NAMES,
    build_intermediate_embedding_model,
    build_sklearn_zipmap_model,
    fit_iris_logistic_regression,
    tiny_mlp_forward,
)
from tests.redis_server import RedisServer
from tests.support import REPO_ROOT


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    build_sklearn_zipmap_model(root)
    build_intermediate_embedding_model(root)
    return root


@pytest.fixture(scope="module")
def client(repository: Path, redis_server: RedisServer) -> Iterator[TestClient]:
    settings = Settings(model_dir=repository, redis_url=redis_server.url)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_both_models_are_served_side_by_side(client: TestClient) -> None:
    names = [m["name"] for m in client.get("/v1/models").json()["models"]]
    assert names == ["iris-sklearn", "tiny-logits"]


def test_zipmap_model_serves_dense_probabilities(client: TestClient) -> None:
    sklearn_model, features = fit_iris_logistic_regression()
    rows = features[::10]
    body = {
        "inputs": [
            {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
        ]
    }
    response = client.post("/v2/models/iris-sklearn/infer", json=body)
    assert response.status_code == 200
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    probabilities = outputs["output_probability"]
    assert probabilities["datatype"] == "FP32"
    assert probabilities["shape"] == [len(rows), 3]
    served = np.asarray(probabilities["data"], dtype=np.float32).reshape(-1, 3)
    np.testing.assert_allclose(served, sklearn_model.predict_proba(rows), atol=1e-5)
    assert outputs["output_label"]["datatype"] == "INT64"
    assert outputs["output_label"]["data"] == sklearn_model.predict(rows).tolist()


def test_zipmap_model_metadata_declares_a_dense_tensor(client: TestClient) -> None:
    outputs = {o["name"]: o for o in client.get("/v2/models/iris-sklearn").json()["outputs"]}
    assert outputs["output_probability"] == {
        "name": "output_probability",
        "datatype": "FP32",
        "shape": [-1, 3],
    }


def test_zipmap_model_v1_predict_names_classes(client: TestClient) -> None:
    sklearn_model, features = fit_iris_logistic_regression()
    rows = features[[0, 60, 120]]
    predictions = client.post(
        "/v1/models/iris-sklearn/predict", json={"instances": rows.tolist()}
    ).json()["predictions"]
    expected = sklearn_model.predict(rows)
    assert [p["class_name"] for p in predictions] == [IRIS_CLASS_NAMES[i] for i in expected]


def test_intermediate_embedding_is_exposed_without_reexport(client: TestClient) -> None:
    inputs = (np.arange(8, dtype=np.float32).reshape(2, 4) - 3) / 8
    body = {
        "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": inputs.tolist()}]
    }
    response = client.post("/v2/models/tiny-logits/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert set(outputs) == {"logits", "hidden_relu", "probabilities"}
    hidden, logits = tiny_mlp_forward(inputs)
    assert np.array_equal(
        np.asarray(outputs["hidden_relu"]["data"], dtype=np.float32), hidden.ravel()
    )
    assert np.array_equal(np.asarray(outputs["logits"]["data"], dtype=np.float32), logits.ravel())
    probabilities = np.asarray(outputs["probabilities"]["data"]).reshape(2, 3)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-6)


def test_proposal_for_zipmap_model(repository: Path) -> None:
    manifest = propose_manifest(repository / "iris-sklearn" / "model.onnx", name="iris")
    assert manifest.outputs.probabilities == "output_probability"
    assert manifest.outputs.label == "output_label"
    assert manifest.outputs.embedding is None
    assert manifest.class_names == ["0", "1", "2"]
    assert manifest.input.shape == [-1, 4]


def test_proposal_for_logits_model_finds_the_penultimate_layer(repository: Path) -> None:
    manifest = propose_manifest(repository / "tiny-logits" / "model.onnx")
    assert manifest.outputs.logits == "logits"
    assert manifest.outputs.probabilities is None
    assert manifest.outputs.embedding == "hidden_relu"
    assert manifest.name == "model"


def test_proposal_for_digits_model() -> None:
    manifest = propose_manifest(REPO_ROOT / "models" / "digits" / "model.onnx", name="digits")
    assert manifest.outputs.probabilities == "probabilities"
    assert manifest.outputs.embedding == "embedding"
    assert manifest.class_names == [str(i) for i in range(10)]


def test_cli_proposes_a_manifest_that_serves(tmp_path: Path) -> None:
    folder = build_intermediate_embedding_model(tmp_path)
    (folder / "manifest.json").unlink()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "manifest",
            "propose",
            str(folder / "model.onnx"),
            "--name",
            "proposed",
            "--write",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((folder / "manifest.json").read_text())["name"] == "proposed"
    check = subprocess.run(
        [sys.executable, "-m", "service.cli", "check", "--model-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("proposed v1: 3 classes; outputs")
