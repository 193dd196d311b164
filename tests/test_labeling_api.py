"""The labeling REST API end to end: traffic -> selector -> claim, label, skip, discard, export."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.settings import Settings
from tests.support import MODELS_DIR
from tests.test_selector_worker import make_worker, stream_event_ids, traffic

Q = "/v1/models/digits/queue"


@pytest.fixture
def client(redis_url: str) -> Iterator[TestClient]:
    app = create_app(
        Settings(model_dir=MODELS_DIR, redis_url=redis_url), registry=CollectorRegistry()
    )
    with TestClient(app) as test_client:
        rows = traffic(seed=3)
        for start in range(0, len(rows), 100):
            test_client.post(
                "/v1/models/digits/predict", json={"instances": rows[start : start + 100].tolist()}
            )
        # The event log flushes in the background: wait until every event is in the stream.
        with redis.Redis.from_url(redis_url) as r:
            deadline = time.monotonic() + 30
            while len(stream_event_ids(r)) < len(rows):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            make_worker(r, budget=40).run(burst=True)
        yield test_client


def claim(client: TestClient, labeler: str, count: int, **extra: object) -> list[dict]:  # type: ignore[type-arg]
    response = client.post(f"{Q}/claim", json={"labeler": labeler, "count": count, **extra})
    assert response.status_code == 200, response.text
    return response.json()["items"]  # type: ignore[no-any-return]


def test_claimed_items_are_rendered_for_a_person(client: TestClient) -> None:
    items = claim(client, "alice", 2)
    assert len(items) == 2
    item = items[0]
    assert item["model"] == "digits" and item["version"] == "1"
    assert item["lane"] in {"uncertain", "novel", "random"}
    assert item["rule"]
    assert item["input"]["shape"] == [64]
    assert item["input"]["layout"]["kind"] == "image"
    assert len(item["input"]["values"]) == 64
    assert len(item["top_classes"]) == 3
    assert item["top_classes"][0]["class_name"] == item["predicted"]["class_name"]
    assert "percentiles" in item["reasons"] and "scores" in item["reasons"]
    assert item["token"] and item["expires_at"] > time.time()
    png = client.get(f"{Q}/items/{item['item_id']}/input.png")
    assert png.headers["content-type"] == "image/png"
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    # 8x8 pixels enlarged 16 times.
    assert int.from_bytes(png.content[16:20], "big") == 128


def test_label_skip_discard_and_the_queue_state(client: TestClient) -> None:
    before = client.get(f"{Q}/stats").json()
    queued = before["queued"]
    assert 20 <= queued <= 40  # the budget is an upper bound
    first, second, third = claim(client, "alice", 3)
    body = {"token": first["token"], "labeler": "alice", "label": "3"}
    labeled = client.post(f"{Q}/items/{first['item_id']}/label", json=body)
    assert labeled.status_code == 200
    assert labeled.json()["replayed"] is False
    replay = client.post(f"{Q}/items/{first['item_id']}/label", json=body)
    assert replay.json()["replayed"] is True
    assert replay.json()["labeled_at"] == labeled.json()["labeled_at"]
    bad = client.post(
        f"{Q}/items/{second['item_id']}/label",
        json={**body, "token": second["token"], "label": "cat"},
    )
    assert bad.status_code == 400
    assert "is not a class of model 'digits'" in bad.json()["error"]
    stale = client.post(
        f"{Q}/items/{second['item_id']}/label", json={**body, "token": "not-the-token"}
    )
    assert stale.status_code == 409
    skipped = client.post(
        f"{Q}/items/{second['item_id']}/skip", json={"token": second["token"], "labeler": "alice"}
    )
    assert skipped.json() == {"item_id": second["item_id"], "state": "queued"}
    discarded = client.post(
        f"{Q}/items/{third['item_id']}/discard",
        json={"token": third["token"], "labeler": "alice", "reason": "junk"},
    )
    assert discarded.status_code == 200
    after = client.get(f"{Q}/stats").json()
    assert after["queued"] == queued - 2 and after["labeled"] == 1 and after["discarded"] == 1
    assert after["leased"] == 0 and after["labeled_last_hour"] == 1
    state = client.get(f"{Q}/items/{third['item_id']}").json()
    assert state["state"] == "discarded" and state["discard"]["reason"] == "junk"
    # The skipped item goes to someone else, never back to alice.
    alice_ids = {i["item_id"] for i in claim(client, "alice", queued)}
    assert second["item_id"] not in alice_ids
    exported = [json.loads(line) for line in client.get(f"{Q}/export.jsonl").text.splitlines()]
    assert [(e["item_id"], e["label"], e["label_index"]) for e in exported] == [
        (first["item_id"], "3", 3)
    ]
    assert exported[0]["labeler"] == "alice" and len(exported[0]["input"]["values"]) == 64


def test_an_expired_lease_comes_back(client: TestClient) -> None:
    (item,) = claim(client, "alice", 1, lease_seconds=0.2)
    time.sleep(0.3)
    late = client.post(
        f"{Q}/items/{item['item_id']}/label",
        json={"token": item["token"], "labeler": "alice", "label": "1"},
    )
    assert late.status_code == 409
    again = claim(client, "bob", 1)
    assert again[0]["item_id"] == item["item_id"]
    heartbeat = client.post(
        f"{Q}/items/{item['item_id']}/heartbeat",
        json={"token": again[0]["token"], "lease_seconds": 120},
    )
    assert heartbeat.json()["expires_at"] > time.time() + 100


def test_label_studio_round_trip(client: TestClient) -> None:
    config = client.get(f"{Q}/export/label-studio/config.xml")
    assert config.text.startswith('<View><Image name="image" value="$image"/>')
    tasks = client.get(f"{Q}/export/label-studio").json()
    assert len(tasks) == client.get(f"{Q}/stats").json()["queued"] > 0
    task = tasks[0]
    assert task["data"]["image"].startswith("data:image/png;base64,")
    prediction = task["predictions"][0]["result"][0]
    assert prediction["type"] == "choices" and prediction["from_name"] == "label"
    # What Label Studio exports after a person annotated two tasks.
    annotated = [
        {
            **tasks[0],
            "id": 1,
            "annotations": [
                {
                    "id": 11,
                    "completed_by": 5,
                    "result": [
                        {
                            "from_name": "label",
                            "to_name": "image",
                            "type": "choices",
                            "value": {"choices": ["7"]},
                        }
                    ],
                }
            ],
        },
        {
            **tasks[1],
            "id": 2,
            "annotations": [
                {
                    "id": 12,
                    "completed_by": 5,
                    "result": [
                        {
                            "from_name": "label",
                            "to_name": "image",
                            "type": "choices",
                            "value": {"choices": ["2"]},
                        }
                    ],
                }
            ],
        },
        {**tasks[2], "id": 3, "annotations": []},
    ]
    first = client.post(f"{Q}/import/label-studio", json=annotated).json()
    assert first == {"labeled": 2, "replayed": 0, "refused": []}
    again = client.post(f"{Q}/import/label-studio", json=annotated).json()
    assert again == {"labeled": 0, "replayed": 2, "refused": []}
    labels = sorted(
        json.loads(line)["label"] for line in client.get(f"{Q}/export.jsonl").text.splitlines()
    )
    assert labels == ["2", "7"]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/models/nope/queue/claim", {"labeler": "a"}, 404, "unknown model 'nope'"),
        (f"{Q}/claim", {"labeler": "a", "count": 0}, 400, "count"),
        (f"{Q}/claim", {"count": 1}, 400, "labeler"),
        (f"{Q}/items/nope/label", {"token": "t", "labeler": "a", "label": "1"}, 404, "nope"),
    ],
)
def test_errors_say_what_was_wrong(
    client: TestClient,
    path: str,
    body: dict,
    status: int,
    message: str,  # type: ignore[type-arg]
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_versioned_paths(client: TestClient) -> None:
    stats = client.get("/v1/models/digits/versions/1/queue/stats")
    assert stats.status_code == 200
    assert stats.json() == client.get(f"{Q}/stats").json() | {
        "oldest_queued_age_seconds": stats.json()["oldest_queued_age_seconds"]
    }
    assert np.isfinite(stats.json()["oldest_queued_age_seconds"])


def test_queue_metrics_are_read_from_redis_at_scrape(client: TestClient) -> None:
    queued = client.get(f"{Q}/stats").json()["queued"]
    first, _second = claim(client, "alice", 2)
    client.post(
        f"{Q}/items/{first['item_id']}/label",
        json={"token": first["token"], "labeler": "alice", "label": "1"},
    )
    text = client.get("/metrics").text
    assert 'edgeharvest_label_queue_up{model="digits",version="1"} 1.0' in text
    assert (
        f'edgeharvest_label_queue_items{{model="digits",state="queued",version="1"}} {queued - 2}.0'
        in text
    )
    assert 'edgeharvest_label_queue_items{model="digits",state="leased",version="1"} 1.0' in text
    assert 'edgeharvest_label_queue_items{model="digits",state="labeled",version="1"} 1.0' in text
    assert 'edgeharvest_label_queue_labeled_last_hour{model="digits",version="1"} 1.0' in text
    assert "edgeharvest_label_queue_oldest_item_age_seconds" in text
