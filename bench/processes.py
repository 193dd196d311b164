"""Multi-core serving: one API worker process against two (`serve --workers 2`), digits model.

    .venv/bin/python bench/processes.py [--duration 10] [--connections 16] [--threads 2]
        [--rounds 3] [--output bench/results/processes.json]

Both contenders serve `/v1` predictions of one instance, monitoring on (scores, events to a
separate redis-server, merged multiprocess metrics), measured in this one invocation with the
same wrk load as `bench/serving.py`, whose plumbing this reuses. Nothing is pinned: the point is
how the service uses every core, so the server processes, wrk and Redis share the machine's CPUs
as the scheduler sees fit. On a 2-core machine wrk itself needs a good part of a core, so two
workers cannot double the throughput there. That the merged metrics of both processes add up
is a test (tests/test_multiprocess_serving.py), not a benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

# Run as a script from anywhere: bench.serving is imported from the repository root.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.serving import (  # noqa: E402 (needs the sys.path entry above)
    REPO_ROOT,
    Contender,
    LoadSettings,
    Pinning,
    busy_cpu_share,
    contenders,
    expected_classes,
    machine_info,
    markdown_table,
    measure_rounds,
    standalone_redis,
    summarise_rounds,
)

DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "processes.json"
PROCESS_COUNTS = (1, 2)


def process_contenders(rows: np.ndarray, state_dir: Path, redis_url: str) -> list[Contender]:
    """`/v1` predict with 1 and 2 worker processes; the first is the reference."""
    v1 = next(
        c
        for c in contenders(rows, state_dir, {"EDGEHARVEST_REDIS_URL": redis_url})
        if c.name == "edgeharvest /v1 predict"
    )
    return [
        replace(
            v1,
            name=f"edgeharvest /v1 predict, {n} worker process{'es' if n > 1 else ''}",
            env={
                **v1.env,
                "EDGEHARVEST_DATA_DIR": str(state_dir / f"workers-{n}"),
                "EDGEHARVEST_WORKERS": str(n),
            },
        )
        for n in PROCESS_COUNTS
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per contender")
    parser.add_argument("--connections", type=int, default=16, help="open connections (wrk -c)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (wrk -t)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs per contender, in turn; figures are medians"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args(argv)
    for option in ("duration", "connections", "threads", "rounds"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} is {getattr(args, option)}; expected a positive integer")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = load_digits().data[:1].astype(np.float32)
    expected = expected_classes(rows)
    load = LoadSettings(args.duration, args.connections, args.threads)
    unpinned = Pinning(None, None)
    busy = busy_cpu_share()
    print(
        f"{args.duration}s per contender, {args.rounds} rounds; batch 1, {args.connections} "
        f"connections, {args.threads} wrk threads; nothing pinned",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory(prefix="edgeharvest-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        redis_url = stack.enter_context(standalone_redis(workdir, None))
        entries = process_contenders(rows, workdir / "state", redis_url)
        runs = measure_rounds(entries, load, unpinned, expected, workdir, args.rounds)
    rows_out = summarise_rounds(entries, runs)
    report = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "parameters": {
            **asdict(load),
            "batch": 1,
            "rounds": args.rounds,
            "pinning": "none",
            "redis": "separate",
            "busy_cpu_share_before": round(busy, 3),
            "baseline": entries[0].name,
        },
        "contenders": rows_out,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    # The table's "baseline" columns are against one worker process here.
    print(markdown_table(rows_out).replace("vs baseline", "vs 1 process"))
    print(f"\nwrote {args.output}")
    if not all(row["valid"] for row in rows_out):
        print("error: some runs saw errors; their figures are not valid", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
