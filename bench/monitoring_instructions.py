"""What monitoring costs, in instructions: a figure this machine's noise cannot move.

    .venv/bin/python bench/monitoring_instructions.py [--requests 3200] [--inputs first|held-out]
        [--output bench/results/monitoring_instructions.json]

Needs valgrind (Debian: apt-get install -y valgrind).

The wall-clock benchmarks (`bench/serving.py`, `bench/side_by_side.py`) answer the question
that matters, but on a shared virtual machine whose CPUs change speed within a minute their
on/off ratios move by about 0.05 from run to run: more than most single changes to the
monitoring path are worth. So this script counts instructions instead. callgrind counts them
exactly, whatever else the machine is doing; the same code gives the same count to within a
few tenths of a percent.

For each endpoint (`/v1` predict and OIP infer), monitoring on and off, a child process builds
the app with `create_app` (the committed digits model, a real Redis), warms it up, and then
serves `--requests` requests from 16 concurrent in-process clients: ASGI calls straight into
the app, so the batcher gathers them as it does under wrk. The bodies are those of
`bench/serving.py --inputs`: `first` (the default) sends the first digit every time, the novelty
search's cheapest case; `held-out` sends 64 bodies of digits the reference profile holds out, in
turn, as fresh production inputs would come. Instructions of the main thread are
counted only during those requests. Not counted: uvicorn's HTTP parsing (the same for on and
off, so the real on/off ratio is lower than the one here) and the kernel's work.

Under valgrind the app runs about 50 times slower, so a time-based event flush would write a
few events at a time; the flush interval is set to a minute, so the event log writes its
500-event batches by size, as at real request rates.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Run as a script from anywhere: bench.serving is imported from the repository root.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.serving import (  # noqa: E402
    INPUT_CHOICES,
    MODEL_DIR,
    REPO_ROOT,
    input_rows,
    machine_info,
    request_bodies,
    results_file,
    standalone_redis,
)

CLIENTS = 16
ENDPOINTS = {
    "/v1 predict": "/v1/models/digits/predict",
    "OIP infer (JSON)": "/v2/models/digits/infer",
}


def request_bodies_for(path: str, inputs: str) -> list[bytes]:
    """The bodies `bench/serving.py --inputs <inputs>` sends to `path`, one instance each."""
    bodies = [request_bodies(rows) for rows in input_rows(inputs, 1)]
    return [predict if path.startswith("/v1/") else infer for predict, infer in bodies]


async def serve_requests(app: Any, path: str, bodies: list[bytes], count: int) -> None:
    """`count` POSTs to `path`, the `bodies` in turn, from CLIENTS concurrent clients, each
    answered 200."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }

    # Each body with its scope, built once: the harness's own instructions are counted too.
    prepared = [
        (
            body,
            {
                **scope,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            },
        )
        for body in bodies
    ]
    turn = 0

    async def one() -> None:
        nonlocal turn
        body, body_scope = prepared[turn % len(prepared)]
        turn += 1
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        statuses = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # never: the app reads the body once
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(dict(body_scope), receive, send)
        if statuses != [200]:
            raise RuntimeError(f"POST {path} answered {statuses}")

    async def client(requests: int) -> None:
        for _ in range(requests):
            await one()

    share, extra = divmod(count, CLIENTS)
    await asyncio.gather(*(client(share + (i < extra)) for i in range(CLIENTS)))


async def child(
    path: str, monitoring: bool, inputs: str, requests: int, redis_url: str, go: Path
) -> None:
    """The measured process: prints READY, waits for `go`, serves, prints DONE, waits for the
    `.end` file (the parent has dumped the counts by then)."""
    from prometheus_client import CollectorRegistry

    from service.app import create_app
    from service.settings import Settings

    with tempfile.TemporaryDirectory(prefix="edgeharvest-bench-") as data_dir:
        settings = Settings(
            model_dir=MODEL_DIR,
            data_dir=Path(data_dir),
            redis_url=redis_url,
            monitoring_enabled=monitoring,
            log_level="warning",
            event_flush_interval=60.0,
        )
        app = create_app(settings, registry=CollectorRegistry())
        bodies = request_bodies_for(path, inputs)
        async with app.router.lifespan_context(app):
            await serve_requests(app, path, bodies, 2 * requests // 3)
            print("READY", flush=True)
            while not go.exists():
                await asyncio.sleep(0.05)
            await serve_requests(app, path, bodies, requests)
            print("DONE", flush=True)
            end = go.with_suffix(".end")
            while not end.exists():
                await asyncio.sleep(0.05)


def wait_for_line(log: Path, line: str, process: subprocess.Popen[bytes]) -> None:
    while line not in log.read_text():
        if process.poll() is not None:
            raise RuntimeError(f"the measured process ended early:\n{log.read_text()}")
        time.sleep(0.2)


def count_instructions(
    name: str,
    path: str,
    monitoring: bool,
    inputs: str,
    requests: int,
    redis_url: str,
    workdir: Path,
) -> int:
    """Instructions of the main thread while the child served `requests` requests."""
    slug = f"{'v1' if path.startswith('/v1/') else 'oip'}-{'on' if monitoring else 'off'}"
    out = workdir / f"{slug}.callgrind"
    go = workdir / f"{slug}.go"
    log = workdir / f"{slug}.log"
    command = [
        "valgrind",
        "--tool=callgrind",
        "--separate-threads=yes",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        __file__,
        "--child",
        path,
        "on" if monitoring else "off",
        "--inputs",
        inputs,
        "--requests",
        str(requests),
        "--redis-url",
        redis_url,
        "--go",
        str(go),
    ]
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log_file, stderr=log_file)
    try:
        wait_for_line(log, "READY", process)
        control = ["callgrind_control"]
        subprocess.run([*control, "--instr=on", str(process.pid)], check=True, capture_output=True)
        go.touch()
        wait_for_line(log, "DONE", process)
        subprocess.run([*control, "--instr=off", str(process.pid)], check=True, capture_output=True)
        subprocess.run([*control, "--dump", str(process.pid)], check=True, capture_output=True)
        go.with_suffix(".end").touch()
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    # The dump is file 1; with --separate-threads, thread 1 (the event loop's) is "-01".
    dump = Path(f"{out}.1-01")
    for line in dump.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"{name}: no totals in {dump}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3200, help="measured requests each")
    parser.add_argument(
        "--inputs",
        choices=INPUT_CHOICES,
        default="first",
        help="first: the first digit every time; held-out: 64 held-out digits in turn",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="JSON results file (default bench/results/monitoring_instructions[-held-out].json)",
    )
    parser.add_argument("--child", nargs=2, metavar=("PATH", "MONITORING"), help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--go", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.output = args.output or results_file("monitoring_instructions", args.inputs)
    if args.requests < CLIENTS:
        parser.error(f"--requests must be at least {CLIENTS}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        path, monitoring = args.child
        asyncio.run(
            child(path, monitoring == "on", args.inputs, args.requests, args.redis_url, args.go)
        )
        return 0
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(f"error: {', '.join(missing)} not found; apt-get install -y valgrind", flush=True)
        return 2
    print(
        f"instructions per request, {args.requests} requests from {CLIENTS} clients each, "
        f"--inputs {args.inputs}, under callgrind (two processes at a time)",
        flush=True,
    )
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="edgeharvest-bench-") as tmp:
        workdir = Path(tmp)
        with standalone_redis(workdir, None) as redis_url:
            jobs = {
                (name, monitoring): (
                    name,
                    path,
                    monitoring,
                    args.inputs,
                    args.requests,
                    redis_url,
                    workdir,
                )
                for name, path in ENDPOINTS.items()
                for monitoring in (True, False)
            }
            with ThreadPoolExecutor(max_workers=2) as pool:
                futures = {key: pool.submit(count_instructions, *job) for key, job in jobs.items()}
                counts = {key: future.result() for key, future in futures.items()}
    for name in ENDPOINTS:
        on = counts[(name, True)] / args.requests
        off = counts[(name, False)] / args.requests
        results[name] = {
            "monitoring_on_per_request": round(on),
            "monitoring_off_per_request": round(off),
            "on_over_off": round(on / off, 4),
        }
        print(
            f"{name}: monitoring on {on:,.0f}, off {off:,.0f} instructions per request: "
            f"on/off {on / off:.3f}x (+{on - off:,.0f})",
            flush=True,
        )
    report = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "parameters": {"requests": args.requests, "clients": CLIENTS, "inputs": args.inputs},
        "python": sys.version.split()[0],
        "endpoints": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
