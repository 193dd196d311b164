"""The selector worker against a real Redis: rounds, acknowledgement, and SIGKILL at random."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sklearn.datasets import load_digits

from service.app import create_app
from service.events import decode_entry
from service.label_queue import LabelQueue
from service.redis_keys import event_stream
from service.selection_policy import SelectionConfig, WindowBudget
from service.selector_worker import GROUP, ModelStream, SelectorWorker, selection_config
from service.settings import Settings
from service.worker_metrics import WorkerMetrics
from tests.support import (
    MODELS_DIR,
    REPO_ROOT,
    kill_repeatedly,
    start_worker,
    stop_worker,
    wait_for_consumer_group,
)

DIGITS = load_digits()
STREAM = event_stream("digits", "1")
CLASSES = [str(i) for i in range(10)]


def send_traffic(url: str, rows: np.ndarray, batch: int = 100) -> None:
    app = create_app(Settings(model_dir=MODELS_DIR, redis_url=url), registry=CollectorRegistry())
    with TestClient(app) as client:
        for start in range(0, len(rows), batch):
            response = client.post(
                "/v1/models/digits/predict",
                json={"instances": rows[start : start + batch].tolist()},
            )
            assert response.status_code == 200
    # Leaving the context flushed the event log.


def traffic(seed: int = 0, junk: int = 60, repeats: int = 20) -> np.ndarray:
    """Real digits, random-noise junk, and some exact repeats."""
    rng = np.random.default_rng(seed)
    rows = DIGITS.data[rng.permutation(len(DIGITS.data))[:600]].astype(np.float32)
    noise = rng.uniform(0, 16, size=(junk, 64)).astype(np.float32)
    return np.concatenate([rows, noise, rows[:repeats]])


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as r:
        yield r


def make_worker(client: redis.Redis, budget: int = 100, **kwargs: object) -> SelectorWorker:
    return SelectorWorker(
        client,
        [ModelStream("digits", "1", CLASSES)],
        consumer="test",
        config=SelectionConfig(),
        budget=WindowBudget(budget, 3600),
        metrics=WorkerMetrics(CollectorRegistry()),
        # Entries of 100 events (one per request of send_traffic): rounds of 200 events.
        round_size=2,
        seed=0,
        **kwargs,  # type: ignore[arg-type]
    )


def stream_event_ids(client: redis.Redis) -> list[str]:
    return [e.id for _, fields in client.xrange(STREAM) for e in decode_entry(fields)]


def group_state(client: redis.Redis, stream: str = STREAM) -> dict[str, int]:
    """Pending (delivered, unacknowledged) entries and whether any entry was never delivered.

    Redis 6.2 (the bundled server) has no `lag` field: compare the group's last delivered id
    with the stream's last id instead."""
    info = client.xinfo_groups(stream)[0]
    last = client.xinfo_stream(stream)["last-generated-id"]
    return {"pending": int(info["pending"]), "lag": int(info["last-delivered-id"] != last)}


def test_burst_drains_the_stream_and_fills_the_queue(redis_url: str, client: redis.Redis) -> None:
    rows = traffic()
    send_traffic(redis_url, rows)
    assert len(stream_event_ids(client)) == len(rows)
    worker = make_worker(client, budget=100)
    processed = worker.run(burst=True)
    assert processed == client.xlen(STREAM) == 7  # one entry per request
    assert group_state(client) == {"pending": 0, "lag": 0}
    queue = LabelQueue(client, "digits", "1")
    stats = queue.stats(time.time())
    # Never more than the budget; how much of it is used depends on how many candidates exist.
    assert 50 <= stats.queued <= 100
    assert set(stats.queued_by_lane) <= {"uncertain", "novel", "random"}
    # The novel lane is capped, so random-noise junk cannot flood the queue.
    assert stats.queued_by_lane.get("novel", 0) <= 10
    claimed = queue.claim("alice", 100, time.time())
    hashes = [c.item.content_hash for c in claimed]
    assert len(set(hashes)) == len(hashes)
    first = claimed[0].item
    assert first.rule and first.evidence["percentiles"]
    assert first.input is not None and len(first.input) == 64 * 4
    # A second burst finds nothing new.
    assert make_worker(client).run(burst=True) == 0


def test_budget_is_shared_across_rounds_and_workers(redis_url: str, client: redis.Redis) -> None:
    send_traffic(redis_url, traffic())
    first = make_worker(client, budget=30)
    first.ensure_groups()
    first.process_stream(first.streams[0])  # one round of 200 events, by one worker
    second = make_worker(client, budget=30)
    second.run(burst=True)
    assert LabelQueue(client, "digits", "1").stats(time.time()).queued == 30


def test_selection_overrides_are_validated() -> None:
    assert selection_config({"novel_percentile": 98}).novel_percentile == 98
    with pytest.raises(ValueError, match=r"unknown keys \['nope'\]"):
        selection_config({"nope": 1})
    with pytest.raises(ValueError, match="novel_percentile must be within"):
        selection_config({"novel_percentile": 120})


def test_sigkill_at_random_points_loses_and_duplicates_nothing(
    redis_url: str, client: redis.Redis
) -> None:
    rows = traffic(seed=1, repeats=40)
    # Entries of 16 events, as the batcher makes under load: rounds of 32 events.
    send_traffic(redis_url, rows, batch=16)
    env = {
        **os.environ,
        "EDGEHARVEST_REDIS_URL": redis_url,
        "EDGEHARVEST_MODEL_DIR": str(MODELS_DIR),
        "EDGEHARVEST_SELECTOR_ROUND_SIZE": "2",
        "EDGEHARVEST_SELECTOR_BUDGET_PER_WINDOW": "300",
        "EDGEHARVEST_SELECTOR_CLAIM_IDLE_SECONDS": "0.05",
        "EDGEHARVEST_SELECTOR_BLOCK_MS": "50",
    }
    command = [sys.executable, "-m", "service.cli", "select"]
    # Start-up takes a moment; kill somewhere within the first rounds.
    kills = kill_repeatedly(command, env, cycles=8, rng=random.Random(7), after=(0.8, 2.0))
    assert kills >= 4
    finish = subprocess.run(
        [*command, "--burst"], env=env, cwd=REPO_ROOT, timeout=120, capture_output=True, text=True
    )
    assert finish.returncode == 0, finish.stderr
    # Every event was acknowledged, i.e. processed by a round whose picks were stored.
    assert group_state(client) == {"pending": 0, "lag": 0}
    queue = LabelQueue(client, "digits", "1")
    items = queue.claim("auditor", 100, time.time()) + queue.claim("auditor", 100, time.time())
    items += queue.claim("auditor", 100, time.time())
    ids = [c.item.item_id for c in items]
    hashes = [c.item.content_hash for c in items]
    assert len(ids) == len(set(ids))
    assert len(hashes) == len(set(hashes))
    # The 40 repeated inputs were never queued twice; every queued item is a real event.
    assert set(ids) <= set(stream_event_ids(client))
    assert queue.stats(time.time()).queued == 0  # all claimed by the auditor above
    assert 0 < len(ids) <= 300


def test_worker_stops_on_sigterm(redis_url: str, client: redis.Redis) -> None:
    env = {
        **os.environ,
        "EDGEHARVEST_REDIS_URL": redis_url,
        "EDGEHARVEST_MODEL_DIR": str(MODELS_DIR),
        "EDGEHARVEST_SELECTOR_BLOCK_MS": "100",
    }
    process = start_worker("select", env)
    wait_for_consumer_group(client, STREAM, GROUP, process)
    err = stop_worker(process)
    assert process.returncode == 0, err
    assert "selector processed 0 stream entries" in err


def test_junk_trickling_in_small_rounds_cannot_fill_the_budget(
    redis_url: str, client: redis.Redis
) -> None:
    """The novel and random lanes' caps hold per budget window, not per round."""
    rng = np.random.default_rng(5)
    worker = make_worker(client, budget=50)  # novel lane: 10% of 50 = 5 per window
    worker.ensure_groups()
    for _ in range(30):
        send_traffic(redis_url, rng.uniform(0, 16, size=(2, 64)).astype(np.float32))
        worker.run(burst=True)
    stats = LabelQueue(client, "digits", "1").stats(time.time())
    assert stats.queued_by_lane.get("novel", 0) == 5
    assert stats.queued_by_lane.get("random", 0) <= 5
    assert stats.queued <= 10 + stats.queued_by_lane.get("uncertain", 0)


def test_a_version_added_after_start_is_watched_without_a_restart(
    redis_url: str, client: redis.Redis, tmp_path: Path
) -> None:
    """`edgeharvest select` reads the repository again while it runs: events of a version put
    there (and loaded into the API) after it started are selected, by the same process."""
    repository = tmp_path / "models"
    shutil.copytree(MODELS_DIR / "digits", repository / "digits" / "1", ignore=_only_model)
    env = {
        **os.environ,
        "EDGEHARVEST_REDIS_URL": redis_url,
        "EDGEHARVEST_MODEL_DIR": str(repository),
        "EDGEHARVEST_SELECTOR_BLOCK_MS": "100",
        "EDGEHARVEST_WORKER_DISCOVER_SECONDS": "0.2",
    }
    process = start_worker("select", env)
    try:
        wait_for_consumer_group(client, STREAM, GROUP, process)
        version_2 = repository / "digits" / "2"
        # Without the profile: it names version 1 (a version's profile is built for it).
        shutil.copytree(
            repository / "digits" / "1", version_2, ignore=shutil.ignore_patterns("*.npz")
        )
        manifest = json.loads((version_2 / "manifest.json").read_text())
        (version_2 / "manifest.json").write_text(json.dumps({**manifest, "version": "2"}))
        app = create_app(
            Settings(model_dir=repository, redis_url=redis_url), registry=CollectorRegistry()
        )
        with TestClient(app) as api:  # unversioned requests go to the highest version
            response = api.post(
                "/v1/models/digits/predict", json={"instances": traffic()[:200].tolist()}
            )
            assert response.status_code == 200 and response.json()["model_version"] == "2"
        stream_2 = event_stream("digits", "2")
        wait_for_consumer_group(client, stream_2, GROUP, process)
        deadline = time.monotonic() + 60
        while group_state(client, stream_2) != {"pending": 0, "lag": 0}:
            assert time.monotonic() < deadline, f"version 2: {group_state(client, stream_2)}"
            time.sleep(0.1)
    finally:
        err = stop_worker(process)
    assert process.returncode == 0, err


def _only_model(directory: str, names: list[str]) -> list[str]:
    """copytree's ignore: the model, its manifest and its profile, not the build script."""
    return [n for n in names if n not in {"manifest.json", "model.onnx", "reference.npz"}]
