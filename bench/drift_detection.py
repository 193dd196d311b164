"""Drift detection on digits replayed through the real service: false alarms, delay, cost.

Run: `.venv/bin/python bench/drift_detection.py [--clean-windows 100]` (about 3 minutes).

A digits MLP is trained on half of scikit-learn's digits with 8 and 9 withheld; a quarter is
the reference profile's held-out part; the last quarter (never seen by model or reference) is
the production pool. Each scenario starts a fresh Redis stream, sends its traffic through the
real service over HTTP (`/v1` predict, 100 instances per request, monitoring on), runs a drift
worker over the stream with windows of 1,000 events, and reads the window reports back:

- in-distribution replay: only production-pool digits 0-7; every drifting window is a false one;
- unseen classes: 5% of traffic from digits 8 and 9 (never trained on);
- covariate shift: Gaussian pixel noise (sigma 2 and 4), images shifted right by 1 and 2 pixels,
  inverted images (all of them, and a quarter of them);
- label-prior shift: digits 0 and 1 four times as frequent.

Shift scenarios send `--onset` clean windows, then shifted ones. Detection delay counts windows
from the first shifted one: 1 = the first shifted window drifted. An alarm needs the same test
to drift in two consecutive windows (the default), so its best delay is 2.

If an Evidently interpreter is given (`--evidently-python`, a venv with `pip install evidently`;
bench-only, never a dependency of the service), its default `DataDriftPreset` is run on the same
windows' input pixels against the same reference rows, for comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client import CollectorRegistry
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.drift_detectors import ReferenceSample  # noqa: E402
from service.drift_store import DriftStore  # noqa: E402
from service.drift_worker import DriftStream, DriftWorker, DriftWorkerMetrics, drift_config  # noqa: E402
from service.events import decode_entry  # noqa: E402
from service.model_repository import ModelRepository  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402
from tests.support import start_server  # noqa: E402

WINDOW = 1000
HELD_OUT = (8, 9)
MODEL = "digits-drift"
SEED = 0


def load_build_module() -> Any:
    spec = importlib.util.spec_from_file_location("digits_build", REPO / "models/digits/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Pools:
    reference_inputs: np.ndarray
    production: np.ndarray  # digits 0-7 the model and reference never saw
    production_labels: np.ndarray
    unseen: np.ndarray  # digits 8 and 9


def build_model(out_dir: Path) -> Pools:
    """Train on 50%, reference on 25%, keep 25% as production; digits 8 and 9 withheld."""
    build = load_build_module()
    x, y = load_digits(return_X_y=True)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.5, random_state=SEED, stratify=y
    )
    x_ref, x_prod, y_ref, y_prod = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=SEED, stratify=y_rest
    )
    known_train = ~np.isin(y_train, HELD_OUT)
    known_ref = ~np.isin(y_ref, HELD_OUT)
    split = build.DigitsSplit(
        x_train[known_train], y_train[known_train], x_ref[known_ref], y_ref[known_ref]
    )
    mlp = build.train_mlp(split.x_train, split.y_train)
    out_dir.mkdir(parents=True)
    model_path = out_dir / build.MODEL_FILE
    model_path.write_bytes(build.mlp_to_onnx(mlp).SerializeToString())
    build.Manifest(
        name=MODEL,
        version="1",
        model_file=build.MODEL_FILE,
        sha256=build.file_sha256(model_path),
        description="digits MLP for the drift benchmark (8 and 9 withheld)",
        input=build.TensorSpec(name=build.INPUT_NAME, datatype="FP32", shape=[-1, 64]),
        outputs=build.OutputRoles(
            probabilities=build.PROBABILITIES_NAME, embedding=build.EMBEDDING_NAME
        ),
        class_names=[str(c) for c in mlp.classes_],
    ).save(out_dir / "manifest.json")
    build.write_reference(out_dir, split, mlp)
    known_prod = ~np.isin(y_prod, HELD_OUT)
    return Pools(
        reference_inputs=split.x_test.astype(np.float32),
        production=x_prod[known_prod].astype(np.float32),
        production_labels=y_prod[known_prod],
        unseen=x[np.isin(y, HELD_OUT)].astype(np.float32),
    )


# ---- traffic -----------------------------------------------------------------------------


def shift_right(images: np.ndarray, pixels: int) -> np.ndarray:
    grid = images.reshape(-1, 8, 8)
    shifted = np.zeros_like(grid)
    shifted[:, :, pixels:] = grid[:, :, : 8 - pixels]
    return shifted.reshape(-1, 64)


def invert(images: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    out = images.copy()
    chosen = rng.random(len(out)) < share
    out[chosen] = 16.0 - out[chosen]
    return out


def gaussian(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(images + rng.normal(0, sigma, images.shape), 0, 16).astype(np.float32)


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "clean" or the family of shift
    # window index (from the first shifted one) -> rows of one window
    make: Callable[[np.random.Generator, int], np.ndarray]


def scenarios(
    pools: Pools,
) -> tuple[list[Scenario], Callable[[np.random.Generator, int], np.ndarray]]:
    production, labels = pools.production, pools.production_labels

    def clean(rng: np.random.Generator, n: int) -> np.ndarray:
        return production[rng.integers(0, len(production), n)]

    def unseen_share(share: float) -> Callable[[np.random.Generator, int], np.ndarray]:
        def make(rng: np.random.Generator, n: int) -> np.ndarray:
            rows = clean(rng, n)
            chosen = rng.random(n) < share
            rows[chosen] = pools.unseen[rng.integers(0, len(pools.unseen), int(chosen.sum()))]
            return rows

        return make

    def prior_shift(rng: np.random.Generator, n: int) -> np.ndarray:
        weights = np.where(np.isin(labels, (0, 1)), 4.0, 1.0)
        return production[rng.choice(len(production), n, p=weights / weights.sum())]

    return [
        Scenario("unseen classes 5%", "unseen", unseen_share(0.05)),
        Scenario("gaussian noise sigma=2", "noise", lambda r, n: gaussian(clean(r, n), 2.0, r)),
        Scenario("gaussian noise sigma=4", "noise", lambda r, n: gaussian(clean(r, n), 4.0, r)),
        Scenario("shifted 1 pixel", "shift", lambda r, n: shift_right(clean(r, n), 1)),
        Scenario("shifted 2 pixels", "shift", lambda r, n: shift_right(clean(r, n), 2)),
        Scenario("inverted 25%", "invert", lambda r, n: invert(clean(r, n), 0.25, r)),
        Scenario("inverted 100%", "invert", lambda r, n: invert(clean(r, n), 1.0, r)),
        Scenario("label prior: 0,1 x4", "prior", prior_shift),
    ], clean


# ---- one replay --------------------------------------------------------------------------


def logged_events(connection: Any, stream_key: str) -> int:
    return sum(len(decode_entry(fields)) for _, fields in connection.xrange(stream_key))


def replay(
    base_url: str, redis_server: RedisServer, reference: ReferenceSample, rows: np.ndarray
) -> list[dict[str, Any]]:
    """Send `rows` through the service, then run a drift worker over them; reports, oldest first."""
    redis_server.flushall()
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for start in range(0, len(rows), 100):
            response = client.post(
                f"/v1/models/{MODEL}/predict",
                json={"instances": rows[start : start + 100].tolist()},
            )
            response.raise_for_status()
    connection = redis_server.client()
    store = DriftStore(connection, MODEL, "1")
    deadline = time.monotonic() + 60
    while logged_events(connection, store.stream_key) < len(rows):
        if time.monotonic() > deadline:
            raise RuntimeError("the service did not log every event within 60 s")
        time.sleep(0.05)
    worker = DriftWorker(
        connection,
        [DriftStream(MODEL, "1", reference)],
        consumer="bench",
        config=drift_config(WINDOW, None, {}),
        metrics=DriftWorkerMetrics(CollectorRegistry()),
        round_size=10,  # entries of 100 events (one per request above)
    )
    with threadpool_limits(limits=1):  # one core, as the cost target says
        worker.run(burst=True)
    return list(reversed(store.history(10_000)))


def families(report: dict[str, Any]) -> dict[str, tuple[bool, bool]]:
    """Per test family: (drifting, in alarm); the score tests count as one family each."""
    return {
        r["test"]: (r["drifting"], report["alarms"].get(r["test"], False))
        for r in report["results"]
    }


def first(windows: list[dict[str, Any]], test: str | None, what: int) -> int | None:
    """1-based index of the first window where `test` (None: any) drifted (0) or alarmed (1)."""
    for i, report in enumerate(windows, start=1):
        flags = families(report)
        if test is None:
            hit = report["drifting"] if what == 0 else report["alarm"]
        else:
            hit = flags.get(test, (False, False))[what]
        if hit:
            return i
    return None


def run_evidently(
    python: str, reference: np.ndarray, windows: dict[str, np.ndarray]
) -> dict[str, list[bool]]:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "windows.npz"
        np.savez(data, reference=reference, **windows)
        result = subprocess.run(
            [python, str(REPO / "bench/evidently_windows.py"), str(data), str(WINDOW)],
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean-windows", type=int, default=100)
    parser.add_argument("--onset", type=int, default=3, help="clean windows before a shift")
    parser.add_argument("--shifted-windows", type=int, default=4)
    parser.add_argument("--evidently-python", default=os.environ.get("EVIDENTLY_PYTHON"))
    parser.add_argument("--evidently-clean-windows", type=int, default=30)
    parser.add_argument("--output", type=Path, default=REPO / "bench/results/drift_detection.json")
    args = parser.parse_args()
    rng = np.random.default_rng(SEED)
    results: dict[str, Any] = {"window": WINDOW, "scenarios": []}
    evidently_inputs: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis_server:
        pools = build_model(Path(tmp) / MODEL)
        profile = next(p for m, p in ModelRepository.find_references(Path(tmp)) if p is not None)
        reference = ReferenceSample.from_profile(profile)
        process, base_url = start_server(Path(tmp), {"EDGEHARVEST_REDIS_URL": redis_server.url})
        try:
            shifts, clean = scenarios(pools)
            rows = clean(rng, args.clean_windows * WINDOW)
            windows = replay(base_url, redis_server, reference, rows)
            # Evidently takes seconds per window: compare on the first of the clean windows.
            evidently_inputs["clean"] = rows[: args.evidently_clean_windows * WINDOW]
            durations = [w["duration_seconds"] for w in windows]
            tests = sorted({r["test"] for w in windows for r in w["results"]})
            false_drifting = {
                t: sum(families(w).get(t, (False, False))[0] for w in windows) / len(windows)
                for t in tests
            }
            clean_row = {
                "name": "in-distribution replay",
                "windows": len(windows),
                "drifting_share": sum(w["drifting"] for w in windows) / len(windows),
                "alarm_share": sum(w["alarm"] for w in windows) / len(windows),
                "drifting_share_by_test": false_drifting,
            }
            results["scenarios"].append(clean_row)
            for scenario in shifts:
                before = clean(rng, args.onset * WINDOW)
                after = scenario.make(rng, args.shifted_windows * WINDOW)
                reports = replay(base_url, redis_server, reference, np.concatenate([before, after]))
                onset, shifted = reports[: args.onset], reports[args.onset :]
                evidently_inputs[scenario.name] = np.concatenate([before, after])
                results["scenarios"].append(
                    {
                        "name": scenario.name,
                        "kind": scenario.kind,
                        "windows": len(reports),
                        "false_before_onset": sum(w["drifting"] for w in onset),
                        "first_drifting": first(shifted, None, 0),
                        "first_alarm": first(shifted, None, 1),
                        "by_test": {
                            t: {
                                "first_drifting": first(shifted, t, 0),
                                "first_alarm": first(shifted, t, 1),
                            }
                            for t in tests
                        },
                    }
                )
        finally:
            process.terminate()
            process.wait(timeout=30)
    results["window_seconds"] = {
        "median": statistics.median(durations),
        "max": max(durations),
        "p95": float(np.percentile(durations, 95)),
    }
    if args.evidently_python:
        evidently = run_evidently(args.evidently_python, pools.reference_inputs, evidently_inputs)
        results["evidently"] = evidently
    print_table(results, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


def _delay(value: int | None) -> str:
    return "-" if value is None else str(value)


def print_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    clean = results["scenarios"][0]
    evidently = results.get("evidently", {})
    print(f"\nwindows of {results['window']} events; delays in windows after the onset")
    print(
        f"in-distribution replay, {clean['windows']} windows: drifting "
        f"{clean['drifting_share']:.1%}, in alarm {clean['alarm_share']:.1%}"
        + (
            f"; Evidently DataDriftPreset: {np.mean(evidently['clean']):.1%} of the first "
            f"{len(evidently['clean'])} windows drifting"
            if "clean" in evidently
            else ""
        )
    )
    for test, share in clean["drifting_share_by_test"].items():
        print(f"  {test:<28} false drifting windows {share:.1%}")
    header = (
        f"{'scenario':<26}{'before onset':>13}{'drifting':>10}{'alarm':>7}  first drifting test(s)"
    )
    if evidently:
        header += "   Evidently drifting"
    print(header)
    for row in results["scenarios"][1:]:
        earliest = min(
            (v["first_drifting"] for v in row["by_test"].values() if v["first_drifting"]),
            default=None,
        )
        leaders = ", ".join(
            t for t, v in row["by_test"].items() if earliest and v["first_drifting"] == earliest
        )
        line = (
            f"{row['name']:<26}{row['false_before_onset']:>13}{_delay(row['first_drifting']):>10}"
            f"{_delay(row['first_alarm']):>7}  {leaders}"
        )
        if row["name"] in evidently:
            flags = evidently[row["name"]][args.onset :]
            line += f"   {_delay(next((i + 1 for i, f in enumerate(flags) if f), None))}"
        print(line)
    seconds = results["window_seconds"]
    print(
        f"one {results['window']}-event window, every test incl. MMD, one thread: median "
        f"{seconds['median'] * 1000:.0f} ms, p95 {seconds['p95'] * 1000:.0f} ms, max "
        f"{seconds['max'] * 1000:.0f} ms (target < 500 ms)"
    )


if __name__ == "__main__":
    main()
