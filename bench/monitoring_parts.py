"""What each part of monitoring costs per row, in instructions, in a warm loop.

    .venv/bin/python bench/monitoring_parts.py [--inputs first|held-out]
        [--output bench/results/monitoring_parts.json]

Needs valgrind (Debian: apt-get install -y valgrind).

`bench/monitoring_instructions.py` counts what monitoring adds to a whole request in the
running app; this script splits that figure. It builds the monitoring pieces the app uses (the
committed digits model, its reference profile, the metrics and an event log that is not
started) and runs a stage of them over one inference batch of 16 one-row requests, in a loop.
Each stage adds one part to the one before, so the differences between stages are the parts.

Each stage runs in a child process under callgrind, which counts only the main thread, and only
inside `eval`, which runs the loop. The child runs the loop ITERATIONS[0] times in one process
and ITERATIONS[1] times in another; the difference of the two counts, divided by the extra
iterations and the 16 rows, is the stage's cost per row, with the child's start-up cancelled
out. Python's string hashing is fixed (PYTHONHASHSEED=0) in every child, so dictionary
layouts, and with them the counts, are the same from run to run. Garbage collection is off
during the loop: what it costs depends on the whole heap, not on the part measured.

A warm loop runs with hot caches: the server pays more time per instruction than this loop
does (see the README), but the same instructions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

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
    results_file,
)

ROWS = 16
ITERATIONS = (10, 60)
WARM_UP = 50

# Each stage, what it runs per batch, in the order they build on each other.
STAGES = {
    "knn": "the exact kNN search of the batch's normalised embeddings",
    "scores": "PredictionScorer.score: embeddings, confidence, kNN, percentiles, flags",
    "scores_rows": "scores, then the rows' JSON (ScoredBatch.rows_json)",
    "scores_metrics": "PredictionMonitor.observe without an event log: scores, batch metrics",
    "observe": "PredictionMonitor.observe: scores, the batch's metrics, event entry, buffer",
    "observe_v1": "observe, then the 16 /v1 response bodies",
    "v1_off": "the 16 /v1 response bodies without monitoring",
    "observe_oip": "observe, then the 16 OIP scores parameters (JSON strings)",
}

# The parts, as differences of two stages (minuend, subtrahend or None).
PARTS = {
    "exact kNN": ("knn", None),
    "scores (kNN included)": ("scores", None),
    "rows' JSON": ("scores_rows", "scores"),
    "batch metrics": ("scores_metrics", "scores"),
    "event entry and buffer (rows' JSON included)": ("observe", "scores_metrics"),
    "all of observe": ("observe", None),
    "/v1 responses with scores": ("observe_v1", "observe"),
    "/v1 responses without monitoring": ("v1_off", None),
    "OIP scores parameters": ("observe_oip", "observe"),
}


def stage_function(stage: str, inputs: str) -> Callable[[], object]:
    """The work of `stage` on one batch, built from the pieces the app uses."""
    from prometheus_client import CollectorRegistry

    from service.app import build_scorers, session_config
    from service.batch_plan import RequestSpan
    from service.dataplane import MonitoredPrediction
    from service.event_log import EventLog
    from service.metrics import ServiceMetrics
    from service.model_repository import ModelRepository
    from service.monitoring import PredictionMonitor
    from service.predict_protocol import encode_predict_response
    from service.scores import ScoredBatch
    from service.settings import Settings

    settings = Settings(model_dir=MODEL_DIR, data_dir=Path(tempfile.gettempdir()))
    repository = ModelRepository.from_directory(MODEL_DIR, session_config(settings))
    model = repository.get("digits")
    scorers = build_scorers(repository.references, settings)
    scorer = scorers[(model.name, model.version)]
    metrics = ServiceMetrics(CollectorRegistry())
    metrics.register_model(model.name, model.version, "", "onnx", model.class_names, True)
    # Never started: appended entries stay in its buffer, which each iteration empties.
    log = EventLog(capacity=1_000_000)
    monitor = PredictionMonitor(scorers, metrics, log)
    unlogged = PredictionMonitor(scorers, metrics, None)
    # One-row requests as bench/serving.py sends them; `first` sends the same one every time.
    rows = np.concatenate(input_rows(inputs, 1))
    batch = np.resize(rows, (ROWS, rows.shape[1]))
    prediction = model.predict(batch)
    spans = [RequestSpan(f"request-{i}", i, i + 1) for i in range(ROWS)]
    embeddings = scorer.embed(prediction, batch)

    def observe() -> ScoredBatch:
        scored = monitor.observe(model, batch, prediction, spans)
        log._buffer.clear()
        log._buffered = 0
        return scored

    def requests(scored: ScoredBatch | None) -> list[MonitoredPrediction]:
        """Each request's share of the batch, as the data plane hands it to its handler."""
        return [
            MonitoredPrediction(
                prediction.slice(span.start, span.stop), scored, slice(span.start, span.stop)
            )
            for span in spans
        ]

    def v1_bodies(scored: ScoredBatch | None) -> None:
        for request in requests(scored):
            encode_predict_response(model, request.prediction, request.scored, False)

    def oip_scores() -> None:
        for request in requests(observe()):
            request.scores_json_string()

    functions: dict[str, Callable[[], object]] = {
        "knn": lambda: scorer.novelty(embeddings),
        "scores": lambda: scorer.score(prediction, batch),
        "scores_rows": lambda: scorer.score(prediction, batch)[0].rows_json().array(),
        "scores_metrics": lambda: unlogged.observe(model, batch, prediction, spans),
        "observe": observe,
        "observe_v1": lambda: v1_bodies(observe()),
        "v1_off": lambda: v1_bodies(None),
        "observe_oip": oip_scores,
    }
    return functions[stage]


def child(stage: str, inputs: str, iterations: int) -> None:
    """The measured process: warms the stage up, then runs it `iterations` times in `eval`,
    the only code callgrind counts."""
    import gc

    work = stage_function(stage, inputs)
    for _ in range(WARM_UP):
        work()
    gc.collect()
    gc.freeze()
    gc.disable()
    eval("[work() for _ in range(iterations)]", {"work": work, "iterations": iterations})


def count(stage: str, inputs: str, iterations: int, workdir: Path) -> int:
    """Instructions of the main thread inside `eval`, for one child."""
    out = workdir / f"{stage}-{iterations}.callgrind"
    command = [
        "valgrind",
        "--tool=callgrind",
        "--separate-threads=yes",
        "--collect-atstart=no",
        "--toggle-collect=builtin_eval",
        f"--callgrind-out-file={out}",
        sys.executable,
        __file__,
        "--child",
        stage,
        str(iterations),
        "--inputs",
        inputs,
    ]
    environment = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{done.stderr[-3000:]}")
    # With --separate-threads, the main thread's counts are in "-01".
    for line in Path(f"{out}-01").read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"stage {stage}: no totals in {out}-01")


def per_row(stage: str, inputs: str, workdir: Path) -> float:
    few, many = ITERATIONS
    extra = count(stage, inputs, many, workdir) - count(stage, inputs, few, workdir)
    return extra / (many - few) / ROWS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--inputs",
        choices=INPUT_CHOICES,
        default="first",
        help="the batch's rows: 16 copies of the first digit (as bench/serving.py sends), "
        "or 16 held-out digits (fresh inputs: several kNN candidates per row)",
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON results file")
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "ITERATIONS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        stage, iterations = args.child
        child(stage, args.inputs, int(iterations))
        return 0
    if shutil.which("valgrind") is None:
        print("error: valgrind not found; apt-get install -y valgrind", flush=True)
        return 2
    output = args.output or results_file("monitoring_parts", args.inputs)
    print(
        f"instructions per row, batch of {ROWS} one-row requests ({args.inputs} inputs), "
        f"warm loop under callgrind, {len(STAGES)} stages two at a time",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory(prefix="edgeharvest-bench-") as tmp,
        ThreadPoolExecutor(max_workers=2) as pool,
    ):
        futures = {stage: pool.submit(per_row, stage, args.inputs, Path(tmp)) for stage in STAGES}
        stages = {stage: future.result() for stage, future in futures.items()}
    parts = {}
    for name, (minuend, subtrahend) in PARTS.items():
        value = stages[minuend] - (stages[subtrahend] if subtrahend else 0.0)
        parts[name] = round(value)
        print(f"  {name:36s} {value:9,.0f}", flush=True)
    report = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "parameters": {"inputs": args.inputs, "rows": ROWS, "iterations": list(ITERATIONS)},
        "stages": {
            stage: {"runs": STAGES[stage], "per_row": round(v)} for stage, v in stages.items()
        },
        "parts_per_row": parts,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
