"""Two contenders at a time, running side by side: monitoring on against off, this service
against the plain baseline, or its HTTP protocol against uvicorn's own.

    .venv/bin/python bench/side_by_side.py [--compare monitoring|baseline|protocol]
        [--bursts 10] [--seconds 3] [--batch 1] [--inputs first|held-out]
        [--output bench/results/side_by_side_<compare>[-held-out].json]

`bench/serving.py` starts every contender afresh for each 6-10 s run, so the runs it compares are
tens of seconds apart. On a shared virtual machine whose CPUs change speed by up to 2x within a
minute, a ratio of two such runs moves by as much as the effect it measures. Here both servers
of a pair start once, pinned to the server CPU, and wrk drives them in short alternating
bursts: first, second, then second, first, and so on. Each consecutive pair of bursts gives a
ratio, and the figures are the medians of those ratios, so a slow spell of the machine hits
both halves of a pair. The server CPU time per request is recorded for every burst too.

The comparisons (`--compare`), each over `/v1` predict and OIP infer:
- `monitoring`: monitoring on against off. Issue 3's targets: on reaches at least 0.8x the
  requests/s of off, with a p99 latency of at most 1.3x.
- `baseline`: the service (monitoring on, then off) against the plain FastAPI baseline of
  `bench/serving.py`. Issue 2's target: at least 2x its requests/s.
- `protocol`: the service as it serves (`service/http_protocol.py`, a response in one write)
  against the same service on uvicorn's own httptools protocol (head and body in two writes).
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# Run as a script from anywhere: bench.serving is imported from the repository root.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.serving import (  # noqa: E402 (needs the sys.path entry above)
    WARM_UP_SECONDS,
    Contender,
    LoadSettings,
    Pinning,
    RunningContender,
    WrkResult,
    add_request_options,
    busy_cpu_share,
    contenders,
    expected_classes,
    machine_info,
    requested_rows,
    results_file,
    run_wrk,
    running,
    standalone_redis,
    tree_cpu_seconds,
)

BASELINE = "baseline (plain FastAPI, pydantic body)"
V1, OIP = "edgeharvest /v1 predict", "edgeharvest OIP infer (JSON)"
UVICORN_PROTOCOL = ", uvicorn's protocol"
# Per comparison, (first, second) contender names; every ratio is first / second.
COMPARISONS = {
    "monitoring": ((V1, f"{V1}, monitoring off"), (OIP, f"{OIP}, monitoring off")),
    "baseline": (
        (V1, BASELINE),
        (f"{V1}, monitoring off", BASELINE),
        (OIP, BASELINE),
        (f"{OIP}, monitoring off", BASELINE),
    ),
    "protocol": ((V1, V1 + UVICORN_PROTOCOL), (OIP, OIP + UVICORN_PROTOCOL)),
}


def with_uvicorn_protocol(contender: Contender) -> Contender:
    """The same service on uvicorn's own httptools protocol (bench/uvicorn_protocol_serve.py)."""
    python, _, module, subcommand, *options = contender.command
    assert (module, subcommand) == ("service.cli", "serve"), contender.command
    return replace(
        contender,
        name=contender.name + UVICORN_PROTOCOL,
        command=(python, "-m", "bench.uvicorn_protocol_serve", *options),
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


def median_ratios(first: Sequence[Burst], second: Sequence[Burst]) -> dict[str, Any]:
    def ratios(read: Any) -> list[float]:
        return [read(a) / read(b) for a, b in zip(first, second, strict=True)]

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
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="monitoring")
    parser.add_argument("--bursts", type=int, default=10, help="pairs of bursts per pair")
    parser.add_argument("--seconds", type=int, default=3, help="wrk seconds per burst")
    add_request_options(parser)
    parser.add_argument("--output", type=Path, help="JSON results file")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and wrk")
    args = parser.parse_args(argv)
    if args.bursts < 1 or args.seconds < 1:
        parser.error("--bursts and --seconds must be at least 1")
    args.output = args.output or results_file(f"side_by_side_{args.compare}", args.inputs)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows, more_rows = requested_rows(args.inputs, args.batch)
    expected = expected_classes(rows)
    load = LoadSettings(args.seconds, args.connections, args.threads)
    pinning = Pinning.choose(enabled=not args.no_pin)
    busy = busy_cpu_share()
    pairs = COMPARISONS[args.compare]
    print(
        f"{args.compare}: {args.bursts} pairs of {args.seconds}s bursts per pair of contenders; "
        f"batch {args.batch}, {args.connections} connections; "
        f"server CPUs {pinning.server or 'any'}, wrk CPUs {pinning.client or 'any'}",
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
        "pairs": [],
    }
    with (
        tempfile.TemporaryDirectory(prefix="edgeharvest-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        redis_url = stack.enter_context(standalone_redis(workdir, pinning.client))
        served = contenders(
            rows, workdir / "state", {"EDGEHARVEST_REDIS_URL": redis_url}, more_rows
        )
        served += [with_uvicorn_protocol(c) for c in served if c.name in (V1, OIP)]
        by_name = {c.name: c for c in served}
        for first_name, second_name in pairs:
            # One pair's two servers at a time; both stop before the next pair's start.
            servers = contextlib.ExitStack()
            first_server, second_server = (
                servers.enter_context(running(by_name[name], pinning, expected, workdir))
                for name in (first_name, second_name)
            )
            warm = LoadSettings(WARM_UP_SECONDS, args.connections, args.threads)
            for server in (first_server, second_server):
                run_wrk(server.url, server.script, warm, WARM_UP_SECONDS, pinning)
            first: list[Burst] = []
            second: list[Burst] = []
            for pair in range(args.bursts):
                order = [(first_server, first_name, first), (second_server, second_name, second)]
                for server, name, bursts in order if pair % 2 == 0 else reversed(order):
                    bursts.append(burst(server, name, load, pinning))
                print(
                    f"  {first_name} | {second_name}: pair {pair + 1}: "
                    f"{first[-1].requests_per_second:,.0f} | "
                    f"{second[-1].requests_per_second:,.0f} req/s",
                    flush=True,
                )
            ratios = median_ratios(first, second)
            report["pairs"].append(
                {
                    "first": first_name,
                    "second": second_name,
                    "ratios": ratios,
                    "first_bursts": [asdict(b) for b in first],
                    "second_bursts": [asdict(b) for b in second],
                }
            )
            print(
                f"{first_name} / {second_name}: requests/s "
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
