"""The console's model catalog and its routes: class names, layouts, reference ranges, files."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sklearn.datasets import load_iris

from service.app import create_app, session_config
from service.console.catalog import console_catalog
from service.manifest import MANIFEST_FILE, Manifest
from service.model_repository import ModelRepository
from service.onnx_classifier import OnnxClassifier
from service.reference_builder import build_reference_profile
from service.reference_profile import REFERENCE_FILE
from service.settings import Settings
from tests.model_factories import IRIS_MODEL_NAME, build_sklearn_zipmap_model
from tests.support import MODELS_DIR


def build_console_models(directory: Path) -> Path:
    """The committed digits model (image) and iris (tabular) with a reference profile."""
    shutil.copytree(MODELS_DIR / "digits", directory / "digits")
    folder = build_sklearn_zipmap_model(directory)
    manifest = Manifest.load(folder / MANIFEST_FILE)
    model = OnnxClassifier(manifest, folder, session_config(Settings()))
    features, labels = load_iris(return_X_y=True)
    profile = build_reference_profile(model, features.astype(np.float32), labels, seed=0)
    profile.save(folder / REFERENCE_FILE)
    return directory


@pytest.fixture(scope="module")
def console_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_console_models(tmp_path_factory.mktemp("console-models"))


@pytest.fixture(scope="module")
def repository(console_models: Path) -> ModelRepository:
    return ModelRepository.from_directory(console_models, session_config(Settings()))


def test_catalog_lists_versions_classes_and_reference_ranges(repository: ModelRepository) -> None:
    catalog = console_catalog(repository, 120.0)
    assert catalog["label_lease_seconds"] == 120.0
    assert catalog["range_percentiles"] == [1.0, 99.0]
    assert [m["name"] for m in catalog["models"]] == ["digits", IRIS_MODEL_NAME]
    digits, iris = catalog["models"]
    assert digits["default_version"] == "1"
    (digits_v1,) = digits["versions"]
    assert digits_v1["class_names"] == [str(i) for i in range(10)]
    assert digits_v1["input_layout"] == {
        "kind": "image",
        "image_shape": [8, 8],
        "value_range": [0.0, 16.0],
    }
    # Images are shown as images: no per-pixel ranges.
    assert digits_v1["has_reference"] is True and digits_v1["feature_ranges"] == []
    (iris_v1,) = iris["versions"]
    ranges = iris_v1["feature_ranges"]
    assert [r["name"] for r in ranges] == list(load_iris().feature_names)
    profile = repository.references[(IRIS_MODEL_NAME, "1")]
    held_out = profile.holdout_inputs.astype(np.float64)
    for i, feature in enumerate(ranges):
        assert feature["p1"] == pytest.approx(np.percentile(held_out[:, i], 1))
        assert feature["p99"] == pytest.approx(np.percentile(held_out[:, i], 99))
        assert feature["mean"] == pytest.approx(held_out[:, i].mean())
        assert feature["p1"] <= feature["mean"] <= feature["p99"]


def test_a_model_without_reference_has_no_ranges(tmp_path: Path) -> None:
    build_sklearn_zipmap_model(tmp_path)
    repository = ModelRepository.from_directory(tmp_path, session_config(Settings()))
    (entry,) = console_catalog(repository, 600.0)["models"]
    assert entry["versions"][0]["has_reference"] is False
    assert entry["versions"][0]["feature_ranges"] == []


@pytest.fixture(scope="module")
def client(console_models: Path) -> Iterator[TestClient]:
    # The console's files and catalog need no Redis.
    settings = Settings(model_dir=console_models, monitoring_enabled=False)
    with TestClient(create_app(settings, registry=CollectorRegistry())) as test_client:
        yield test_client


def test_console_files_are_served_by_name(client: TestClient) -> None:
    redirect = client.get("/console", follow_redirects=False)
    assert redirect.status_code == 307 and redirect.headers["location"] == "console/"
    page = client.get("/console/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache"
    assert '<script type="module" src="console.js"></script>' in page.text
    static = Path(__file__).resolve().parent.parent / "service" / "console" / "static"
    for asset in sorted(static.iterdir()):
        response = client.get(f"/console/{asset.name}")
        assert response.status_code == 200, asset.name
        assert response.content == asset.read_bytes()
    assert client.get("/console/console.js").headers["content-type"] == (
        "text/javascript; charset=utf-8"
    )
    assert client.get("/console/console.css").headers["content-type"] == "text/css; charset=utf-8"


@pytest.mark.parametrize(
    "path",
    [
        "/console/nope.js",
        "/console/catalog.py",
        "/console/%2e%2e",
        "/console/%2e%2e%2fcatalog.py",
        "/console/%2e%2e%2f%2e%2e%2fapp.py",
    ],
)
def test_only_the_console_files_are_served(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert response.json()["error"].startswith("no endpoint at GET /console/")


def test_the_catalog_endpoint(client: TestClient, repository: ModelRepository) -> None:
    body = client.get("/v1/console/models").json()
    assert body == console_catalog(repository, Settings().label_lease_seconds)
