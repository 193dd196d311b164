"""Shared fixtures: the committed model repository, app clients, and a live server process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.support import MODELS_DIR, start_server


@pytest.fixture(scope="session")
def digits_client() -> Iterator[TestClient]:
    app = create_app(Settings(model_dir=MODELS_DIR))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="session")
def live_server() -> Iterator[str]:
    """The real service as `make run` starts it, on a free port."""
    process, base_url = start_server(MODELS_DIR)
    try:
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)
