"""Loading a model again, or a new version of it, while traffic flows: no request fails."""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import redis

from service.redis_keys import event_stream
from tests.support import MODELS_DIR, start_server

PIXELS = np.random.default_rng(0).uniform(0, 16, (4, 64)).round(1).tolist()


def copy_digits(root: Path, version: str, folder: str) -> Path:
    target = root / "digits" / folder
    shutil.copytree(MODELS_DIR / "digits", target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["version"] = version
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_a_new_version_is_loaded_under_load_without_a_failed_request(
    redis_url: str, tmp_path: Path
) -> None:
    copy_digits(tmp_path, "1", "1")
    process, base = start_server(tmp_path, {"EDGEHARVEST_REDIS_URL": redis_url})
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=base, timeout=30) as client:
            while not stop.is_set():
                response = client.post("/v1/models/digits/predict", json={"instances": PIXELS})
                statuses[response.status_code] += 1

    senders = [threading.Thread(target=traffic) for _ in range(4)]
    try:
        for sender in senders:
            sender.start()
        with httpx.Client(base_url=base, timeout=60) as admin:
            assert admin.post("/v2/repository/index").json() == [
                {"name": "digits", "version": "1", "state": "READY"}
            ]
            copy_digits(tmp_path, "2", "2")
            loaded = admin.post("/v2/repository/models/digits/load")
            assert loaded.status_code == 200, loaded.text
            assert [v["version"] for v in loaded.json()["versions"]] == ["1", "2"]
            metadata = admin.get("/v2/models/digits").json()
            assert metadata["versions"] == ["1", "2"]
            assert metadata["parameters"]["version"] == "2"  # the latest now

            # A version whose reference does not match its model is refused; 2 keeps serving.
            broken = copy_digits(tmp_path, "3", "3")
            manifest = json.loads((broken / "manifest.json").read_text())
            manifest["sha256"] = "0" * 64
            (broken / "manifest.json").write_text(json.dumps(manifest))
            refused = admin.post("/v2/repository/models/digits/load")
            assert refused.status_code == 400
            assert "the versions served before keep serving" in refused.json()["error"]
            assert admin.get("/v2/models/digits").json()["parameters"]["version"] == "2"
            missing = admin.post("/v2/repository/models/nope/load")
            assert missing.status_code == 404 and "'nope'" in missing.json()["error"]
            shutil.rmtree(broken)
            # The version just loaded scores and logs its events to its own stream.
            scored = admin.post(
                "/v1/models/digits/versions/2/predict", json={"instances": PIXELS[:1]}
            ).json()
            assert "novelty" in scored["predictions"][0]["scores"]
    finally:
        stop.set()
        for sender in senders:
            sender.join(timeout=30)
        process.terminate()
        process.wait(timeout=30)
    assert statuses[200] > 0 and set(statuses) == {200}, statuses
    with redis.Redis.from_url(redis_url) as client:
        assert client.xlen(event_stream("digits", "1")) > 0
        assert client.xlen(event_stream("digits", "2")) > 0
