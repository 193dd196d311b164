"""`edgeharvest run` (what `make run` starts) stops everything it started: the API, the selector
and drift workers, and the embedded Redis, whether it is interrupted (Ctrl-C) or terminated (a
process manager's SIGTERM)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.embedded_redis import PIDFILE_NAME
from tests.support import MODELS_DIR, REPO_ROOT, free_port, wait_until_ready


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Short: the embedded Redis listens on a unix socket inside it (paths are limited to ~100).
    path = Path(tempfile.mkdtemp(prefix="eh-run-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for its parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def wait_for_redis_pid(data_dir: Path) -> int:
    pidfile = data_dir / PIDFILE_NAME
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline, "the embedded Redis wrote no pidfile"
        time.sleep(0.05)
    return int(pidfile.read_text().strip())


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_run_stops_its_workers_and_the_embedded_redis(
    data_dir: Path, stop_signal: signal.Signals
) -> None:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("EDGEHARVEST_")}
    env.update(
        EDGEHARVEST_MODEL_DIR=str(MODELS_DIR),
        EDGEHARVEST_DATA_DIR=str(data_dir),
        EDGEHARVEST_PORT=str(port),
        EDGEHARVEST_LOG_LEVEL="warning",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "run"],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    started: list[int] = []
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", process)
        workers = children(process.pid)
        redis_pid = wait_for_redis_pid(data_dir)
        started.extend(pid for pid in [*workers, redis_pid] if alive(pid))
        # The selector, the drift worker and the Redis server.
        assert len(started) >= 3, (workers, redis_pid)

        process.send_signal(stop_signal)
        process.wait(timeout=60)
        if stop_signal == signal.SIGTERM:
            assert process.returncode == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in started if alive(pid)] == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in started:  # whatever a failed run left behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        _, err = process.communicate()
        assert b"Traceback" not in err, err.decode(errors="replace")
