"""A real redis-server on a free loopback port, for tests (the fixtures are in conftest.py).

Tests must never touch a Redis that may already run on 6379, and must be able to take the
server down and bring it back on the same port to see how clients cope with an outage.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.embedded_redis import redis_server_executable
from tests.support import free_port


class RedisServer:
    """redis-server as a subprocess: no persistence, loopback only, a temp dir of its own."""

    def __init__(self, executable: str | None = None, start_timeout: float = 10.0) -> None:
        self.executable = executable or redis_server_executable()
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="edgeharvest-redis-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("RedisServer has not been started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> RedisServer:
        """Start the server; after `stop()`, on the same port so that clients reconnect."""
        if self.running:
            return self
        if self.port is not None:
            self._launch(self.port)
            return self
        # Another process may take the free port before redis-server binds it: try a few.
        for _ in range(5):
            try:
                self._launch(free_port())
                return self
            except RuntimeError:
                continue
        raise RuntimeError(f"redis-server did not start; see {self.dir / 'redis.log'}")

    def stop(self) -> None:
        """Kill the server, as a crash would: nothing is saved."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, retry=Retry(NoBackoff(), 0))

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _launch(self, port: int) -> None:
        command = [
            self.executable,
            "--save", "",
            "--appendonly", "no",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.port = port
        deadline = time.monotonic() + self.start_timeout
        probe = redis.Redis(
            host="127.0.0.1",
            port=port,
            socket_timeout=1,
            socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )
        with probe as client:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    self._process = None
                    raise RuntimeError(f"redis-server exited at start on port {port}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {port} did not answer in {self.start_timeout}s")
