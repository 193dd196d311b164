"""What monitoring costs, measured with monitoring on and off running side by side.

    .venv/bin/python bench/monitoring_cost.py [--bursts 10] [--seconds 3] [--batch 1]
        [--output bench/results/monitoring_cost.json]

`bench/serving.py` starts every contender afresh for each 6-10 s run, so an on run and its off
run are tens of seconds apart. On a shared virtual machine whose CPUs change speed by up to 2x
within a minute, a ratio of two such runs moves by as much as the effect it measures. Here the
four servers (`/v1` and OIP, monitoring on and off, the same contenders as `bench/serving.py`)
start once, all pinned to the server CPU, and wrk drives them in short alternating bursts: on,
off, then off, on, and so on. Each consecutive on/off pair gives a ratio, and the figures are
the medians of those ratios, so a slow spell of the machine hits both halves of a pair. The
server CPU time per request is recorded for every burst too.

Issue 3's targets: monitoring on reaches at least 0.8x the requests/s of monitoring off, with a
p99 latency of at most 1.3x.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_digits

# Run as a script from anywhere: bench.serving is imported from the repository root.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.serving import (  # noqa: E402 (needs the sys.path entry above)
    REPO_ROOT,
    WARM_UP_SECONDS,
    LoadSettings,
    Pinning,
    RunningContender,
    WrkResult,
    busy_cpu_share,
    contenders,
    expected_classes,
    machine_info,
    run_wrk,
    running,
    standalone_redis,
    tree_cpu_seconds,
)

DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "monitoring_cost.json"
# (monitoring on, monitoring off): bench/serving.py's contender names.
PAIRS = (
    ("edgeharvest /v1 predict", "edgeharvest /v1 predict, monitoring off"),
    ("edgeharvest OIP infer (JSON)", "edgeharvest OIP infer (JSON), monitoring off"),
)


@dataclass(frozen=True)
class Burst:
    requests_per_second: float
    p99_ms: float
    server_cpu_us_per_request: float


def burst(server: RunningContender, name: str, load: LoadSettings, pinning: Pinning) -> Burst:
    before = tree_cpu_seconds(server.process.pid)
    result: WrkResult = run_wrk(server.url, server.script, load, load.duration, pinning)
    if result.errors:
        raise RuntimeError(f"{name}: wrk saw {', '.join(result.errors)}")
    seconds = tree_cpu_seconds(server.process.pid) - before
    return Burst(
        result.requests_per_second,
        result.latency_ms["99"],
        seconds / max(result.requests, 1) * 1e6,
    )


def median_ratios(on: Sequence[Burst], off: Sequence[Burst]) -> dict[str, Any]:
    def ratios(read: Any) -> list[float]:
        return [read(a) / read(b) for a, b in zip(on, off, strict=True)]

    result: dict[str, Any] = {}
    for name, read in (
        ("requests_per_second", lambda b: b.requests_per_second),
        ("p99", lambda b: b.p99_ms),
        ("server_cpu_per_request", lambda b: b.server_cpu_us_per_request),
    ):
        values = ratios(read)
        result[name] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "pairs": [round(v, 3) for v in values],
        }
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=10, help="on/off pairs per endpoint")
    parser.add_argument("--seconds", type=int, default=3, help="wrk seconds per burst")
    parser.add_argument("--connections", type=int, default=16, help="open connections (wrk -c)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (wrk -t)")
    parser.add_argument("--batch", type=int, default=1, help="instances per request")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and wrk")
    args = parser.parse_args(argv)
    if args.bursts < 1 or args.seconds < 1:
        parser.error("--bursts and --seconds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = load_digits().data[: args.batch].astype(np.float32)
    expected = expected_classes(rows)
    load = LoadSettings(args.seconds, args.connections, args.threads)
    pinning = Pinning.choose(enabled=not args.no_pin)
    busy = busy_cpu_share()
    print(
        f"{args.bursts} on/off pairs of {args.seconds}s bursts per endpoint; batch {args.batch}, "
        f"{args.connections} connections; server CPUs {pinning.server or 'any'}, "
        f"wrk CPUs {pinning.client or 'any'}",
        flush=True,
    )
    report: dict[str, Any] = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "parameters": {
            **{k: v for k, v in vars(args).items() if k != "output"},
            "pinning": asdict(pinning),
            "busy_cpu_share_before": round(busy, 3),
        },
        "endpoints": [],
    }
    with (
        tempfile.TemporaryDirectory(prefix="edgeharvest-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        redis_url = stack.enter_context(standalone_redis(workdir, pinning.client))
        by_name = {
            c.name: c
            for c in contenders(rows, workdir / "state", {"EDGEHARVEST_REDIS_URL": redis_url})
        }
        for on_name, off_name in PAIRS:
            # One endpoint's two servers at a time; both stop before the next endpoint's start.
            servers = contextlib.ExitStack()
            on_server, off_server = (
                servers.enter_context(running(by_name[name], pinning, expected, workdir))
                for name in (on_name, off_name)
            )
            warm = LoadSettings(WARM_UP_SECONDS, args.connections, args.threads)
            for server in (on_server, off_server):
                run_wrk(server.url, server.script, warm, WARM_UP_SECONDS, pinning)
            on_bursts: list[Burst] = []
            off_bursts: list[Burst] = []
            for pair in range(args.bursts):
                order = [(on_server, on_name, on_bursts), (off_server, off_name, off_bursts)]
                for server, name, bursts in order if pair % 2 == 0 else reversed(order):
                    bursts.append(burst(server, name, load, pinning))
                print(
                    f"  {on_name}: pair {pair + 1}: on {on_bursts[-1].requests_per_second:,.0f}"
                    f" req/s, off {off_bursts[-1].requests_per_second:,.0f} req/s",
                    flush=True,
                )
            ratios = median_ratios(on_bursts, off_bursts)
            report["endpoints"].append(
                {
                    "on": on_name,
                    "off": off_name,
                    "ratios": ratios,
                    "on_bursts": [asdict(b) for b in on_bursts],
                    "off_bursts": [asdict(b) for b in off_bursts],
                }
            )
            print(
                f"{on_name}, monitoring on/off: requests/s "
                f"{ratios['requests_per_second']['median']:.2f}x "
                f"({ratios['requests_per_second']['min']:.2f}-"
                f"{ratios['requests_per_second']['max']:.2f}), p99 {ratios['p99']['median']:.2f}x, "
                f"server CPU per request {ratios['server_cpu_per_request']['median']:.2f}x "
                f"(medians of {args.bursts} pairs)",
                flush=True,
            )
            servers.close()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
