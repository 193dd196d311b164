"""Requests lost while `serve --workers 2` replaces its workers on SIGHUP, under traffic.

    .venv/bin/python bench/restarts.py [--restarts 10] [--clients 4]
        [--output bench/results/restarts.json]

Two contenders, one after the other in one invocation: the service as it serves
(`service/http_protocol.py`), and the same service on uvicorn's own httptools protocol
(`bench/uvicorn_protocol_serve.py`), which closes unanswered a connection it accepted just before
a worker began to stop. Clients post one digit per request, each on a new connection (like a
proxy that does not keep connections open; it also lets the kernel spread them over both
workers). The parent gets SIGHUP `--restarts` times, each once the previous restart has
replaced both workers. Every request's outcome is counted: its status, or the error of a
request that got no response. Monitoring is off: the event log plays no part in a restart.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

# Run as a script from anywhere: bench.serving is imported from the repository root.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.serving import (  # noqa: E402 (needs the sys.path entry above)
    MODEL_DIR,
    REPO_ROOT,
    free_port,
    input_rows,
    machine_info,
    request_bodies,
    stop,
    wait_until_ready,
)

RESULTS = REPO_ROOT / "bench" / "results"
WORKERS = 2
# Per contender, what follows `python -m` (before the serve options).
CONTENDERS = {
    "edgeharvest (service/http_protocol.py)": ("service.cli", "serve"),
    "edgeharvest on uvicorn's protocol": ("bench.uvicorn_protocol_serve",),
}


def workers_of(parent: int) -> set[int]:
    """The parent's worker processes (multiprocessing's spawn runs them as `spawn_main`)."""
    workers = set()
    for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.add(int(pid))
        except FileNotFoundError:  # it exited meanwhile
            pass
    return workers


def wait_for_new_workers(parent: int, old: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = workers_of(parent)
        if len(current) == WORKERS and not current & old:
            return current
        time.sleep(0.05)
    raise RuntimeError(f"workers {sorted(old)} of {parent} not replaced within {timeout:.0f}s")


class Traffic:
    """Clients posting on new connections until stopped, counting every outcome."""

    def __init__(self, url: str, body: bytes, clients: int) -> None:
        self.outcomes: Counter[str] = Counter()
        self._url = url
        self._body = body
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._post) for _ in range(clients)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join()

    def _post(self) -> None:
        headers = {"content-type": "application/json"}
        while not self._stopping.is_set():
            try:
                response = httpx.post(self._url, content=self._body, headers=headers, timeout=30)
                outcome = str(response.status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            with self._lock:
                self.outcomes[outcome] += 1


def run_contender(
    name: str, module: tuple[str, ...], restarts: int, clients: int, workdir: Path
) -> dict[str, Any]:
    port = free_port()
    env = {
        **os.environ,
        "EDGEHARVEST_MODEL_DIR": str(MODEL_DIR),
        "EDGEHARVEST_DATA_DIR": str(workdir / module[0]),
        "EDGEHARVEST_WORKERS": str(WORKERS),
        "EDGEHARVEST_MONITORING_ENABLED": "false",
        "EDGEHARVEST_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", *module, "--host", "127.0.0.1", "--port", str(port)]
    log = workdir / f"{module[0]}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=output, stderr=output)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/v2/health/ready", process, log)
        workers = wait_for_new_workers(process.pid, set(), 120)
        predict_body, _ = request_bodies(input_rows("first", 1)[0])
        url = f"http://127.0.0.1:{port}/v1/models/digits/predict"
        seconds = []
        with Traffic(url, predict_body, clients) as traffic:
            for i in range(restarts):
                started = time.monotonic()
                os.kill(process.pid, signal.SIGHUP)
                workers = wait_for_new_workers(process.pid, workers, 300)
                seconds.append(time.monotonic() - started)
                print(f"  {name}: restart {i + 1} of {restarts}: {dict(traffic.outcomes)}")
    finally:
        stop(process)
    outcomes = dict(traffic.outcomes)
    sent = sum(outcomes.values())
    lost = sent - outcomes.get("200", 0)
    return {
        "name": name,
        "restarts": restarts,
        "requests": sent,
        "answered_200": outcomes.get("200", 0),
        "lost": lost,
        "lost_per_10000": 10_000 * lost / sent if sent else 0.0,
        "outcomes": outcomes,
        "median_restart_seconds": sorted(seconds)[len(seconds) // 2],
    }


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| contender | SIGHUP restarts | requests | not answered 200 | per 10,000 | restart s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['restarts']} | {r['requests']:,} | {r['lost']:,} "
            f"| {r['lost_per_10000']:.1f} | {r['median_restart_seconds']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=10, help="SIGHUPs per contender")
    parser.add_argument("--clients", type=int, default=4, help="client threads posting")
    parser.add_argument("--output", type=Path, default=RESULTS / "restarts.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeharvest-restarts-") as tmp:
        for name, module in CONTENDERS.items():
            rows.append(run_contender(name, module, args.restarts, args.clients, Path(tmp)))
    print(markdown_table(rows))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bench/restarts.py", *(argv or sys.argv[1:])]),
        "machine": machine_info(),
        "workers": WORKERS,
        "clients": args.clients,
        "results": rows,
    }
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
