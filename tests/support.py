"""Helpers for tests: paths, free ports, and the real server as a subprocess."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_ready(base_url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            if httpx.get(f"{base_url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server at {base_url} not ready after {timeout}s")


def start_server(
    model_dir: Path, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "EDGEHARVEST_MODEL_DIR": str(model_dir),
        "EDGEHARVEST_PORT": str(port),
        **(extra_env or {}),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base_url, process)
    except RuntimeError:
        process.kill()
        _, err = process.communicate()
        raise RuntimeError(err.decode(errors="replace")) from None
    return process, base_url


def kill_repeatedly(
    command: list[str],
    env: dict[str, str],
    *,
    cycles: int,
    rng: random.Random,
    after: tuple[float, float],
) -> int:
    """Start `command` `cycles` times and SIGKILL it after a random delay within `after`
    seconds (if it is still running); returns how many times it was killed."""
    kills = 0
    for _ in range(cycles):
        process = subprocess.Popen(
            command, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(*after))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=30)
    return kills


def wait_for_consumer_group(
    client: redis.Redis, stream: str, group: str, process: subprocess.Popen[str]
) -> None:
    """Wait until a worker `process` has created its consumer group: it then runs, with its
    SIGTERM handler installed (a fixed sleep is too short while other tests load the machine)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            groups = client.xinfo_groups(stream)
        except redis.ResponseError:  # no stream yet
            groups = []
        if any(g["name"] in (group, group.encode()) for g in groups):
            return
        assert process.poll() is None, f"the worker exited with {process.returncode}"
        assert time.monotonic() < deadline, f"no consumer group {group} on {stream} after 60 s"
        time.sleep(0.05)


def start_worker(command: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """`edgeharvest <command>` (select, drift) as a subprocess, its stderr piped as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", command],
        env=env,
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_worker(process: subprocess.Popen[str]) -> str:
    """SIGTERM a worker started by `start_worker`, wait for it, and return its stderr."""
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    return err
