"""Selector and drift workers SIGKILLed again and again while the real service takes traffic.

Each cycle starts `edgeharvest select` and `edgeharvest drift` as processes, under new consumer
names, and kills each one: on odd cycles the moment it holds events it has read but not yet
acknowledged (mid-batch, as its XPENDING entry shows), on even cycles at a random moment (which
may fall in a window evaluation or a budget update). Meanwhile the service keeps logging events,
with many exact repeats among them. Finally one burst of each drains the streams, and:
- every event was acknowledged by the selector group, and each queue item is a distinct event
  with a distinct content hash, within the budget;
- the drift windows are exactly 0..n-1, of the configured size, and every event is in exactly
  one window or still in the buffer of the next one.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from sklearn.datasets import load_digits

from service.drift_store import DriftStore
from service.events import decode_entry
from service.label_queue import LabelQueue
from service.redis_keys import event_stream
from tests.prediction_load import PredictionLoad
from tests.service_process import ServiceProcess
from tests.support import MODELS_DIR, REPO_ROOT

STREAM = event_stream("digits", "1")
WINDOW = 100
BUDGET = 1000
CYCLES = 6
# How long a mid-batch cycle waits for its worker to hold unacknowledged events.
MID_BATCH_WAIT_SECONDS = 20.0


def traffic_rows(seed: int = 3) -> np.ndarray:
    """Real digits and random-noise junk; the load samples with replacement, so many repeat."""
    rng = np.random.default_rng(seed)
    digits = load_digits().data.astype(np.float32)
    noise = rng.uniform(0, 16, size=(100, 64)).astype(np.float32)
    return np.concatenate([digits, noise])


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as r:
        yield r


def worker_env(redis_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "EDGEHARVEST_REDIS_URL": redis_url,
        "EDGEHARVEST_MODEL_DIR": str(MODELS_DIR),
        "EDGEHARVEST_SELECTOR_ROUND_SIZE": "5",
        "EDGEHARVEST_SELECTOR_BUDGET_PER_WINDOW": str(BUDGET),
        "EDGEHARVEST_SELECTOR_CLAIM_IDLE_SECONDS": "0.05",
        "EDGEHARVEST_SELECTOR_BLOCK_MS": "50",
        "EDGEHARVEST_DRIFT_WINDOW_SIZE": str(WINDOW),
        "EDGEHARVEST_DRIFT_ROUND_SIZE": "4",
        "EDGEHARVEST_DRIFT_CLAIM_IDLE_SECONDS": "0.05",
        "EDGEHARVEST_DRIFT_BLOCK_MS": "50",
    }


def start_worker(command: str, consumer: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", command, "--consumer", consumer],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def pending_of(client: redis.Redis, group: str, consumer: str) -> int:
    try:
        summary = client.xpending(STREAM, group)
    except redis.ResponseError:  # the group does not exist yet
        return 0
    return sum(int(c["pending"]) for c in summary["consumers"] if c["name"] == consumer.encode())


def test_workers_killed_mid_batch_under_traffic_lose_and_double_count_nothing(
    redis_url: str, client: redis.Redis
) -> None:
    env = worker_env(redis_url)
    rng = random.Random(13)
    kills = {"select": 0, "drift": 0}
    mid_batch_kills = {"select": 0, "drift": 0}
    service_env = {"EDGEHARVEST_REDIS_URL": redis_url, "EDGEHARVEST_LOG_LEVEL": "warning"}
    with ServiceProcess(MODELS_DIR, service_env) as service:
        load = PredictionLoad(
            service.url, traffic_rows(), batch=4, threads=2, pause=0.03, seed=5
        ).start()
        try:
            for cycle in range(CYCLES):
                mid_batch = cycle % 2 == 1
                workers = {
                    kind: start_worker(kind, f"{kind}-{cycle}", env) for kind in ("select", "drift")
                }
                # A random moment after start-up (imports take about a second), or, mid-batch,
                # the first moment the worker holds unacknowledged events. The mid-batch wait is
                # long because a loaded machine can take seconds to start a worker; a started one
                # is usually caught holding within a few of its rounds.
                wait = MID_BATCH_WAIT_SECONDS if mid_batch else 0.0
                deadline = {
                    kind: time.monotonic() + rng.uniform(1.0, 2.5) + wait for kind in workers
                }
                while workers:
                    for kind, process in list(workers.items()):
                        group = "selector" if kind == "select" else "drift"
                        holding = mid_batch and pending_of(client, group, f"{kind}-{cycle}") > 0
                        if holding or time.monotonic() >= deadline[kind]:
                            assert process.poll() is None, f"{kind} worker exited on its own"
                            process.send_signal(signal.SIGKILL)
                            process.wait(timeout=30)
                            kills[kind] += 1
                            mid_batch_kills[kind] += holding
                            del workers[kind]
                    time.sleep(0.002)
        finally:
            load.stop()
        assert load.failures == []
        sent = load.sent
        load.wait_for(lambda: service.metric("edgeharvest_events_written_total") >= sent)
        assert service.metric("edgeharvest_events_dropped_total") == 0

    assert kills == {"select": CYCLES, "drift": CYCLES}
    # Most mid-batch attempts catch the worker holding events (a quiet moment may not).
    assert mid_batch_kills["select"] >= 1 and mid_batch_kills["drift"] >= 1
    finishers = [
        subprocess.Popen(
            [sys.executable, "-m", "service.cli", kind, "--burst"],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for kind in ("select", "drift")
    ]
    for finisher in finishers:
        _, err = finisher.communicate(timeout=180)
        assert finisher.returncode == 0, err.decode(errors="replace")

    stream_ids = {e.id for _, fields in client.xrange(STREAM) for e in decode_entry(fields)}
    assert len(stream_ids) == sent
    last = client.xinfo_stream(STREAM)["last-generated-id"]
    groups = {g["name"].decode(): g for g in client.xinfo_groups(STREAM)}
    for group in ("selector", "drift"):
        # Every event delivered to the group, and acknowledged only after it was handled.
        assert groups[group]["pending"] == 0
        assert groups[group]["last-delivered-id"] == last

    queue = LabelQueue(client, "digits", "1")
    items = list(queue.iter_queued())
    ids = [stored.item.item_id for stored in items]
    hashes = [stored.item.content_hash for stored in items]
    assert len(ids) == len(set(ids)) and len(hashes) == len(set(hashes))
    assert set(ids) <= stream_ids
    assert 0 < len(items) <= BUDGET
    assert queue.stats(time.time()).queued == len(items)

    store = DriftStore(client, "digits", "1")
    state, _, _ = store.overview()
    windows = state["windows_evaluated"]
    assert windows == sent // WINDOW
    assert state["events_evaluated"] == windows * WINDOW
    history = store.history(1000)
    assert sorted(w["index"] for w in history) == list(range(windows))
    assert all(w["size"] == WINDOW for w in history)
    # The rest of the events wait, each once, in the buffer of the next window.
    assert state["events_evaluated"] + store.buffered_count() == sent
