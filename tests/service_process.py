"""The real service as a subprocess, for tests that take its dependencies down under load.

`start_server` pipes the server's stderr; a test that makes the server log a warning per failed
Redis call must keep reading it, or the full pipe would block the server mid-request. The last
lines are kept for the failure message.
"""

from __future__ import annotations

import subprocess
import threading
from collections import deque
from pathlib import Path
from types import TracebackType

import httpx

from tests.metric_samples import sample_sum
from tests.support import start_server


class ServiceProcess:
    def __init__(self, model_dir: Path, env: dict[str, str]) -> None:
        self.model_dir = model_dir
        self.env = env
        self.url = ""
        self.log: deque[str] = deque(maxlen=200)
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> ServiceProcess:
        self._process, self.url = start_server(self.model_dir, self.env)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=30)
        if self._reader is not None:
            self._reader.join(timeout=10)

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=30).text

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` with these labels, read now."""
        return sample_sum(self.metrics(), name, **labels)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(list(self.log)[-lines:])

    def _read_stderr(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        for line in self._process.stderr:
            self.log.append(line.decode(errors="replace").rstrip())
