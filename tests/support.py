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
