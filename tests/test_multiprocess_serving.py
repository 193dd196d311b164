"""`edgeharvest serve --workers 2`: two real worker processes on one port, one real Redis.

Prometheus scrapes one process at random, so the test that matters is that every scrape reports
the whole service: requests sent to both workers add up in `/metrics`, whichever process answers,
and still do after a worker is killed and replaced, and after SIGHUP replaces them all. Every
worker's event writer delivers its events. Stopping the service leaves no metric files behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import redis
from sklearn.datasets import load_digits

from service.events import decode_entry
from tests.metric_samples import sample_sum
from tests.service_process import ServiceProcess
from tests.support import MODELS_DIR
from tests.test_deploy_promql import promtool

STREAM = "edgeharvest:{digits}:1:events"
ENDPOINT = "/v1/models/{name}/predict"


def command_line(pid: str) -> bytes:
    """The process's command line; empty once it has exited (a replaced worker may exit
    between the listing of the children and this read)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def worker_pids(parent: int) -> list[int]:
    """The uvicorn workers: children of the parent started by multiprocessing's spawn."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return sorted(int(pid) for pid in children if b"spawn_main" in command_line(pid))


def wait_for_workers(parent: int, count: int, exclude: frozenset[int] = frozenset()) -> list[int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = [p for p in worker_pids(parent) if p not in exclude]
        if len(pids) == count:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"expected {count} new workers of {parent}, found {worker_pids(parent)}")


def logged_event_ids(client: redis.Redis) -> list[str]:
    """The ids of every event in the stream (an entry holds one inference batch's events)."""
    return [event.id for _, fields in client.xrange(STREAM) for event in decode_entry(fields)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send(url: str, rows: np.ndarray, requests: int, threads: int = 8) -> Counter[int | str]:
    """`requests` predictions of one instance each, from threads, each on a new connection so
    the kernel hands connections to both workers; counts the outcomes: status codes, and the
    names of the errors of requests that got no response."""
    outcomes: Counter[int | str] = Counter()
    lock = threading.Lock()

    def post(start: int) -> None:
        for i in range(start, requests, threads):
            row = rows[i % len(rows)].tolist()
            outcome: int | str
            try:
                outcome = httpx.post(url, json={"instances": [row]}, timeout=30).status_code
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            with lock:
                outcomes[outcome] += 1

    pool = [threading.Thread(target=post, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return outcomes


def scraped(service: ServiceProcess, name: str, **labels: str) -> float:
    return sample_sum(service.metrics(), name, **labels)


def wait_for(read: Callable[[], float], expected: float, what: str) -> None:
    deadline = time.monotonic() + 30
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        value = read()
    assert value == expected, f"{what}: {value}, expected {expected}"


def test_two_workers_report_every_request_in_every_scrape(redis_url: str, tmp_path: Path) -> None:
    rows = load_digits().data.astype(np.float32)
    metrics_parent = tmp_path / "metrics"
    metrics_parent.mkdir()
    env = {
        "EDGEHARVEST_WORKERS": "2",
        "EDGEHARVEST_REDIS_URL": redis_url,
        "EDGEHARVEST_DATA_DIR": str(tmp_path / "var"),
        "EDGEHARVEST_LOG_LEVEL": "warning",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_parent),
    }
    client = redis.Redis.from_url(redis_url)
    with ServiceProcess(MODELS_DIR, env) as service:
        workers = wait_for_workers(service.pid, 2)
        url = f"{service.url}/v1/models/digits/predict"
        before = {pid: cpu_seconds(pid) for pid in workers}
        assert send(url, rows, 600) == {200: 600}
        used = {pid: cpu_seconds(pid) - before[pid] for pid in workers}
        # Both processes served: an idle worker uses next to no CPU (its gauge publisher wakes
        # once a second), one that answered even a tenth of the requests uses tens of ms.
        assert min(used.values()) > 0.02, f"CPU seconds per worker while serving: {used}"

        # Any process may answer a scrape; ten in a row must all report the whole service.
        for _ in range(10):
            text = service.metrics()
            labels = {"endpoint": ENDPOINT, "status": "200"}
            assert sample_sum(text, "edgeharvest_requests_total", **labels) == 600
            assert sample_sum(text, "edgeharvest_predictions_total") == 600
            assert sample_sum(text, "edgeharvest_prediction_confidence_count") == 600
            assert sample_sum(text, "edgeharvest_request_duration_seconds_count") >= 600
        # The merged page is valid exposition, as Prometheus's own checker reads it.
        check = subprocess.run(
            [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
        )
        assert check.returncode == 0, check.stdout + check.stderr
        # Served once per loaded version, not once per process.
        assert scraped(service, "edgeharvest_model_info", model="digits") == 1
        # Each worker's event writer delivers its own events.
        wait_for(lambda: scraped(service, "edgeharvest_events_written_total"), 600, "written")
        assert len(logged_event_ids(client)) == 600
        wait_for(lambda: scraped(service, "edgeharvest_event_buffer_events"), 0, "buffered")

        # A worker killed outright is replaced; what it counted still counts.
        os.kill(workers[0], signal.SIGKILL)
        replacement = wait_for_workers(service.pid, 1, exclude=frozenset(workers))
        assert replacement and workers[1] in worker_pids(service.pid)
        assert send(url, rows, 200) == {200: 200}
        labels = {"endpoint": ENDPOINT, "status": "200"}
        wait_for(lambda: scraped(service, "edgeharvest_requests_total", **labels), 800, "requests")
        assert scraped(service, "edgeharvest_predictions_total") == 800
        wait_for(lambda: scraped(service, "edgeharvest_events_written_total"), 800, "written")

        # SIGHUP replaces every worker, one after another, while requests keep being answered.
        serving = [*replacement, workers[1]]
        answered: list[Counter[int | str]] = []
        traffic = threading.Thread(target=lambda: answered.append(send(url, rows, 400, 2)))
        traffic.start()
        os.kill(service.pid, signal.SIGHUP)
        wait_for_workers(service.pid, 2, exclude=frozenset(serving))
        traffic.join()
        assert answered == [{200: 400}]
        wait_for(lambda: scraped(service, "edgeharvest_predictions_total"), 1200, "predictions")
    # Stopping the service removes its metric files; the operator's directory stays.
    assert metrics_parent.is_dir() and list(metrics_parent.iterdir()) == []
    # The events the killed worker had already written are there; none were written twice.
    ids = logged_event_ids(client)
    assert len(ids) == 1200 and len(set(ids)) == 1200
