"""Steady prediction traffic against a live service, from threads, for the fault-injection tests.

Each thread posts `/v1` predictions in a loop until stopped. Every request carries its own
`X-Request-ID`, so the events it produced can be recognised in the stream; the counts say how
many instances the service answered, and every request that did not end in a 200 is kept as a
failure with what went wrong.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import numpy as np


class PredictionLoad:
    def __init__(
        self,
        base_url: str,
        rows: np.ndarray,
        *,
        model: str = "digits",
        batch: int = 8,
        threads: int = 2,
        pause: float = 0.0,
        seed: int = 0,
    ) -> None:
        if batch < 1 or threads < 1:
            raise ValueError(f"PredictionLoad batch={batch}, threads={threads}: both must be >= 1")
        self.url = f"{base_url}/v1/models/{model}/predict"
        self.rows = rows
        self.batch = batch
        self.pause = pause
        self.seed = seed
        self.answered_instances = 0
        self.answered_requests: list[str] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), name=f"load-{n}", daemon=True)
            for n in range(threads)
        ]

    def start(self) -> PredictionLoad:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    @property
    def sent(self) -> int:
        """Instances answered with a 200 so far: each one is an event the service logged."""
        with self._lock:
            return self.answered_instances

    def wait_for(self, condition: Callable[[], bool], timeout: float = 60.0) -> None:
        """Poll `condition` while the load runs; the timeout only guards against hanging."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.failures:
                raise AssertionError(f"predictions failed: {self.failures[:3]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not reached within {timeout}s")
            time.sleep(0.02)

    def _run(self, number: int) -> None:
        rng = np.random.default_rng(self.seed + number)
        with httpx.Client(timeout=30) as client:
            request = 0
            while not self._stop.is_set():
                request_id = f"load-{number}-{request}"
                request += 1
                picks = self.rows[rng.integers(0, len(self.rows), self.batch)]
                try:
                    response = client.post(
                        self.url,
                        json={"instances": picks.tolist()},
                        headers={"X-Request-ID": request_id},
                    )
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.failures.append(f"{request_id}: {type(exc).__name__}: {exc}")
                    continue
                with self._lock:
                    if response.status_code == 200:
                        self.answered_instances += len(picks)
                        self.answered_requests.append(request_id)
                    else:
                        self.failures.append(
                            f"{request_id}: {response.status_code} {response.text[:200]}"
                        )
                if self.pause:
                    self._stop.wait(self.pause)
