"""Streaming drift detection: a fast per-event alarm, tumbling windows, and the window evaluator.

Everything here is pure: no IO and no clock (event times are passed in), randomness from seeds.
A drift worker feeds events to a `TumblingWindow`, hands each completed window to a
`WindowEvaluator` (the tests of `drift_tests.py` plus per-test `ConsecutiveAlarm`s), and feeds
each event's score to a `PageHinkley` for an alarm that does not wait for the window to close.
Window indices and alarm streaks are small dicts, so another module can persist and resume them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Generic, Literal, TypeVar

import numpy as np

from service.drift_tests import (
    TestResult,
    class_distribution_test,
    feature_tests,
    ks_test,
    mmd_test,
    softmax_ks_test,
    tail_test,
)
from service.reference_profile import ReferenceProfile

T = TypeVar("T")

SCORES = "scores"
CLASS_DISTRIBUTION = "class_distribution"
SOFTMAX = "softmax"
MMD = "mmd"
FEATURES = "features"
TAILS = "tail"
TEST_FAMILIES = frozenset({SCORES, TAILS, CLASS_DISTRIBUTION, SOFTMAX, MMD, FEATURES})
# The tails the flags watch: score, quantile of the reference, upper (True) or lower tail.
TAIL_SCORES: tuple[tuple[str, float, bool], ...] = (
    ("novelty", 0.99, True),
    ("max_probability", 0.05, False),
)


class PageHinkley:
    """Page-Hinkley test for a change in the mean of a stream.

    `direction` "up" watches for increases (novelty rising), "down" for decreases (confidence
    falling), "both" for either. `delta` (the change tolerated) and `threshold` are in the units
    of the stream, so feed scale-free values: a score's reference percentile / 100 is uniform on
    [0, 1] in distribution. On such streams the defaults gave no false alarm in 2,000,000 events
    (4 seeds) and found a mean shift of 0.1 after 400-650 events, of 0.2 after 230-300.

    `forgetting_factor` < 1 fades old deviations from the cumulative sums, but not from their
    recorded extremes, so it makes false alarms far more frequent (with 0.9999, about one every
    40,000 events on the same streams); the default 1 is the classic test. After a detection
    the next update starts afresh.

    >>> detector = PageHinkley(threshold=5.0, min_instances=10)
    >>> stream = [0.5] * 100 + [0.9] * 100
    >>> next(i for i, x in enumerate(stream) if detector.update(x).drift_detected)
    113
    """

    def __init__(
        self,
        *,
        delta: float = 0.01,
        threshold: float = 50.0,
        forgetting_factor: float = 1.0,
        min_instances: int = 30,
        direction: Literal["up", "down", "both"] = "both",
    ) -> None:
        if not delta >= 0.0:
            raise ValueError(f"delta must be >= 0, got {delta}")
        if not threshold > 0.0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if not 0.0 < forgetting_factor <= 1.0:
            raise ValueError(f"forgetting_factor must be within (0, 1], got {forgetting_factor}")
        if min_instances < 1:
            raise ValueError(f"min_instances must be >= 1, got {min_instances}")
        if direction not in ("up", "down", "both"):
            raise ValueError(f"direction must be 'up', 'down' or 'both', got {direction!r}")
        self.delta = delta
        self.threshold = threshold
        self.forgetting_factor = forgetting_factor
        self.min_instances = min_instances
        self.direction = direction
        self.reset()

    def reset(self) -> None:
        self._n = 0
        self._mean = 0.0
        self._sum_increase = 0.0
        self._sum_decrease = 0.0
        self._min_increase = math.inf
        self._max_decrease = -math.inf
        self._drift_detected = False

    @property
    def drift_detected(self) -> bool:
        return self._drift_detected

    @property
    def n(self) -> int:
        """Values seen since the last reset."""
        return self._n

    def state(self) -> dict[str, float | int | bool | None]:
        """The running sums, JSON-friendly (infinities as None), for `restore`."""
        return {
            "n": self._n,
            "mean": self._mean,
            "sum_increase": self._sum_increase,
            "sum_decrease": self._sum_decrease,
            "min_increase": None if math.isinf(self._min_increase) else self._min_increase,
            "max_decrease": None if math.isinf(self._max_decrease) else self._max_decrease,
            "drift_detected": self._drift_detected,
        }

    def restore(self, state: Mapping[str, float | int | bool | None]) -> PageHinkley:
        """Continue from a `state()`: the same parameters and this state go on identically."""
        try:
            n, mean = int(state["n"] or 0), float(state["mean"] or 0.0)
            sum_increase = float(state["sum_increase"] or 0.0)
            sum_decrease = float(state["sum_decrease"] or 0.0)
            min_increase, max_decrease = state["min_increase"], state["max_decrease"]
            detected = bool(state["drift_detected"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a PageHinkley state: {dict(state)} ({exc})") from None
        if n < 0:
            raise ValueError(f"PageHinkley state needs n >= 0, got {n}")
        self._n, self._mean = n, mean
        self._sum_increase, self._sum_decrease = sum_increase, sum_decrease
        self._min_increase = math.inf if min_increase is None else float(min_increase)
        self._max_decrease = -math.inf if max_decrease is None else float(max_decrease)
        self._drift_detected = detected
        return self

    def update(self, x: float) -> PageHinkley:
        if self._drift_detected:
            self.reset()
        if not math.isfinite(x):
            raise ValueError(f"PageHinkley takes finite values, got {x}")
        self._n += 1
        self._mean += (x - self._mean) / self._n
        deviation = x - self._mean
        self._sum_increase = self.forgetting_factor * self._sum_increase + deviation - self.delta
        self._sum_decrease = self.forgetting_factor * self._sum_decrease + deviation + self.delta
        self._min_increase = min(self._min_increase, self._sum_increase)
        self._max_decrease = max(self._max_decrease, self._sum_decrease)
        if self._n >= self.min_instances:
            rose = self._sum_increase - self._min_increase > self.threshold
            fell = self._max_decrease - self._sum_decrease > self.threshold
            self._drift_detected = (rose and self.direction != "down") or (
                fell and self.direction != "up"
            )
        return self


class ConsecutiveAlarm:
    """Alarm after `windows_needed` drifting windows in a row; on while they drift, off after a
    clean one.

    >>> alarm = ConsecutiveAlarm(2)
    >>> [alarm.update(d).alarm for d in (True, False, True, True, True, False)]
    [False, False, False, True, True, False]
    """

    def __init__(self, windows_needed: int = 2, *, streak: int = 0) -> None:
        if windows_needed < 1:
            raise ValueError(f"windows_needed must be >= 1, got {windows_needed}")
        if streak < 0:
            raise ValueError(f"streak must be >= 0, got {streak}")
        self.windows_needed = windows_needed
        self._streak = streak

    @property
    def streak(self) -> int:
        """Drifting windows in a row up to now (the state to persist)."""
        return self._streak

    @property
    def alarm(self) -> bool:
        return self._streak >= self.windows_needed

    def update(self, drifting: bool) -> ConsecutiveAlarm:
        self._streak = self._streak + 1 if drifting else 0
        return self


def _check_window_spec(size: int | None, seconds: float | None) -> None:
    if (size is None) == (seconds is None):
        raise ValueError(
            f"give exactly one of a window size and seconds, got size={size}, seconds={seconds}"
        )
    if size is not None and size < 1:
        raise ValueError(f"window size must be >= 1, got {size}")
    if seconds is not None and not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"window seconds must be a positive number, got {seconds}")


@dataclass(frozen=True)
class CompletedWindow(Generic[T]):
    index: int
    start_time: float
    end_time: float
    items: list[T]


class TumblingWindow(Generic[T]):
    """Cuts a stream into back-to-back windows of `size` events or of `seconds` of event time.

    Count windows are numbered 0, 1, 2, ... and span their first to last event time. Time
    windows are aligned to multiples of `seconds` since the epoch and numbered by that multiple
    (`floor(t / seconds)`), so every replica and every restart agrees on them; a window closes
    when an event of a later window arrives (or `close_elapsed(now)` says its time is up),
    periods without events produce no window, and late events join the open window.

    `state()` holds the window numbering, not the pending events: persist it with each completed
    window and, on resume, replay the events that came after it.
    """

    def __init__(
        self, size: int | None = 1000, seconds: float | None = None, *, index: int = 0
    ) -> None:
        _check_window_spec(size, seconds)
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        self.size = size
        self.seconds = seconds
        self._index = index
        self._items: list[T] = []
        self._start = math.inf
        self._end = -math.inf

    @property
    def index(self) -> int:
        """Index of the open window (time windows: the lowest index the next one may have)."""
        return self._index

    @property
    def pending(self) -> int:
        return len(self._items)

    def state(self) -> dict[str, int | float | None]:
        return {"size": self.size, "seconds": self.seconds, "index": self._index}

    @classmethod
    def from_state(cls, state: Mapping[str, int | float | None]) -> TumblingWindow[T]:
        size, seconds, index = state["size"], state["seconds"], state["index"]
        if not isinstance(index, int) or (size is not None and not isinstance(size, int)):
            raise ValueError(f"window state needs integer size and index, got {dict(state)}")
        return cls(size, None if seconds is None else float(seconds), index=index)

    def add(self, event_time: float, payload: T) -> CompletedWindow[T] | None:
        """Add one event; returns the window this completes (or, for time windows, closes)."""
        if not math.isfinite(event_time):
            raise ValueError(f"event_time must be finite, got {event_time}")
        completed = None
        if self.seconds is not None:
            period = math.floor(event_time / self.seconds)
            if self._items and period > self._index:
                completed = self._close()
            if not self._items:
                self._index = max(self._index, period)
        self._items.append(payload)
        self._start = min(self._start, event_time)
        self._end = max(self._end, event_time)
        if self.size is not None and len(self._items) >= self.size:
            completed = self._close()
        return completed

    def close_elapsed(self, now: float) -> CompletedWindow[T] | None:
        """For time windows: the open window, if `now` lies past its end; never for count ones."""
        if self.seconds is None or not self._items:
            return None
        if now < (self._index + 1) * self.seconds:
            return None
        return self._close()

    def _close(self) -> CompletedWindow[T]:
        if self.seconds is not None:
            start, end = self._index * self.seconds, (self._index + 1) * self.seconds
        else:
            start, end = self._start, self._end
        window = CompletedWindow(self._index, start, end, self._items)
        self._index += 1
        self._items = []
        self._start, self._end = math.inf, -math.inf
        return window


@dataclass(frozen=True)
class DriftConfig:
    """What the window evaluator runs and how strict it is.

    The effect floors keep large windows from alarming on negligible shifts: PSI 0.1 is the
    conventional start of a "moderate" shift; a JS distance of 0.05 is about one class of ten
    moving from 10% to 14%; KS 0.1 is a 10-point gap between two CDFs; MMD 0.02 sits above the
    null's typical range at 500 vs 1,000 points; a tail share 2 points above the reference's
    (e.g. 3% of events above the 99th percentile instead of 1%). MMD is always computed on at most
    `mmd_max_reference_points` + `mmd_max_window_points` points, which bounds its cost.
    """

    window_size: int | None = 1000
    window_seconds: float | None = None
    alpha: float = 0.01
    consecutive_windows: int = 2
    score_min_psi: float = 0.1
    class_min_js_distance: float = 0.05
    softmax_min_ks: float = 0.1
    mmd_min_effect: float = 0.02
    feature_min_ks: float = 0.1
    tail_min_excess: float = 0.02
    mmd_permutations: int = 200
    mmd_max_reference_points: int = 500
    mmd_max_window_points: int = 1000
    mmd_pca_dims: int | None = None
    feature_correction: Literal["bh", "bonferroni"] = "bh"
    tests: frozenset[str] = TEST_FAMILIES
    # Families whose alarms make the overall alarm; None means every enabled family.
    alarm_tests: frozenset[str] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_window_spec(self.window_size, self.window_seconds)
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be within (0, 1), got {self.alpha}")
        if self.consecutive_windows < 1:
            raise ValueError(f"consecutive_windows must be >= 1, got {self.consecutive_windows}")
        for name in (
            "score_min_psi",
            "class_min_js_distance",
            "softmax_min_ks",
            "mmd_min_effect",
            "feature_min_ks",
            "tail_min_excess",
        ):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mmd_permutations < 1:
            raise ValueError(f"mmd_permutations must be >= 1, got {self.mmd_permutations}")
        if MMD in self.tests and 1.0 / (self.mmd_permutations + 1) >= self.alpha:
            raise ValueError(
                f"mmd_permutations={self.mmd_permutations} cannot reach a p-value below "
                f"alpha={self.alpha} (the smallest is 1 / (permutations + 1)); raise it to at "
                f"least {math.ceil(1.0 / self.alpha)}"
            )
        for name in ("mmd_max_reference_points", "mmd_max_window_points"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")
        if self.mmd_pca_dims is not None and self.mmd_pca_dims < 1:
            raise ValueError(f"mmd_pca_dims must be >= 1 or None, got {self.mmd_pca_dims}")
        if self.feature_correction not in ("bh", "bonferroni"):
            raise ValueError(
                f"feature_correction must be 'bh' or 'bonferroni', got {self.feature_correction!r}"
            )
        if not self.tests <= TEST_FAMILIES:
            raise ValueError(
                f"unknown tests {sorted(self.tests - TEST_FAMILIES)}; "
                f"expected some of {sorted(TEST_FAMILIES)}"
            )
        if self.alarm_tests is not None and not self.alarm_tests <= self.tests:
            raise ValueError(
                f"alarm_tests {sorted(self.alarm_tests - self.tests)} are not among the enabled "
                f"tests {sorted(self.tests)}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class ReferenceSample:
    """The reference side of every test: sorted scores, class counts and held-out samples."""

    score_distributions: Mapping[str, np.ndarray]
    # Predicted-class counts of the reference: windows hold predictions, so compare like with
    # like (a labelled prior would flag the model's own confusions as drift).
    class_counts: np.ndarray
    probabilities: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    inputs: np.ndarray | None = None

    @classmethod
    def from_profile(cls, profile: ReferenceProfile) -> ReferenceSample:
        probabilities = profile.holdout_probabilities
        counts = np.bincount(probabilities.argmax(axis=1), minlength=len(profile.class_prior))
        return cls(
            score_distributions=profile.score_distributions,
            class_counts=counts,
            probabilities=probabilities,
            embeddings=profile.holdout_embeddings,
            inputs=profile.holdout_inputs,
        )


@dataclass(frozen=True)
class WindowData:
    """One completed window as arrays; arrays may differ in length (inputs may be sampled)."""

    predicted: np.ndarray
    scores: Mapping[str, np.ndarray] = field(default_factory=dict)
    probabilities: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    inputs: np.ndarray | None = None


@dataclass(frozen=True)
class WindowReport:
    index: int
    size: int
    start_time: float
    end_time: float
    results: tuple[TestResult, ...]
    # Any test of the alarm set drifted in this window.
    drifting: bool
    # Per test that ran: has it drifted in `consecutive_windows` windows in a row?
    alarms: Mapping[str, bool]
    # Some test of the alarm set is in alarm.
    alarm: bool

    def as_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "size": self.size,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "results": [r.as_dict() for r in self.results],
            "drifting": self.drifting,
            "alarms": dict(self.alarms),
            "alarm": self.alarm,
        }


def family_of(test_name: str) -> str:
    return test_name.split(":", 1)[0]


class WindowEvaluator:
    """Runs every enabled, applicable test on a window and keeps one alarm per test.

    A test applies when both sides have its data. The overall alarm needs one test to drift in
    `consecutive_windows` windows in a row: different tests drifting once each in successive
    windows is what multiple testing produces by chance, while real drift keeps tripping the
    same test. A test that does not run in a window keeps its streak. The MMD subsample is drawn
    from a generator seeded by (seed, window index), so a window's report does not depend on
    which windows this process saw before.
    """

    def __init__(
        self,
        reference: ReferenceSample,
        config: DriftConfig | None = None,
        *,
        streaks: Mapping[str, int] | None = None,
    ) -> None:
        self.reference = reference
        self.config = config or DriftConfig()
        counts = np.asarray(reference.class_counts, dtype=np.float64)
        self._n_classes = len(counts)
        self._reference_size = round(float(counts.sum()))
        self._prior = counts / counts.sum() if counts.sum() > 0 else counts
        self._alarms = {
            name: ConsecutiveAlarm(self.config.consecutive_windows, streak=streak)
            for name, streak in (streaks or {}).items()
        }

    def state(self) -> dict[str, dict[str, int]]:
        return {"streaks": {name: a.streak for name, a in sorted(self._alarms.items())}}

    def evaluate(
        self, data: WindowData, *, index: int, start_time: float, end_time: float
    ) -> WindowReport:
        if index < 0:
            raise ValueError(f"window index must be >= 0, got {index}")
        results = self._run_tests(data, index)
        alarm_set = self.config.alarm_tests or self.config.tests
        alarms = {}
        for result in results:
            alarm = self._alarms.setdefault(
                result.test, ConsecutiveAlarm(self.config.consecutive_windows)
            )
            alarms[result.test] = alarm.update(result.drifting).alarm
        counted = [r for r in results if family_of(r.test) in alarm_set]
        return WindowReport(
            index=index,
            size=len(data.predicted),
            start_time=start_time,
            end_time=end_time,
            results=tuple(results),
            drifting=any(r.drifting for r in counted),
            alarms=alarms,
            alarm=any(alarms[r.test] for r in counted),
        )

    def _run_tests(self, data: WindowData, index: int) -> list[TestResult]:
        config, reference, tests = self.config, self.reference, self.config.tests
        alpha = config.alpha
        results: list[TestResult] = []
        if SCORES in tests:
            for name in sorted(reference.score_distributions):
                values = data.scores.get(name)
                if values is None or not np.isfinite(values).any():
                    continue
                result = ks_test(
                    reference.score_distributions[name], values, alpha, config.score_min_psi
                )
                results.append(replace(result, test=f"{SCORES}:{name}"))
        if TAILS in tests:
            for name, quantile, upper in TAIL_SCORES:
                values = data.scores.get(name)
                reference_values = reference.score_distributions.get(name)
                if values is None or reference_values is None or not np.isfinite(values).any():
                    continue
                result = tail_test(
                    reference_values, values, quantile, upper, alpha, config.tail_min_excess
                )
                results.append(replace(result, test=f"{TAILS}:{name}"))
        if CLASS_DISTRIBUTION in tests and self._reference_size > 0 and len(data.predicted):
            results.append(
                class_distribution_test(
                    self._prior,
                    data.predicted,
                    self._n_classes,
                    alpha,
                    config.class_min_js_distance,
                    reference_size=self._reference_size,
                )
            )
        ref_probabilities, probabilities = reference.probabilities, data.probabilities
        if (
            SOFTMAX in tests
            and ref_probabilities is not None
            and probabilities is not None
            and len(ref_probabilities)
            and len(probabilities)
        ):
            results.append(
                softmax_ks_test(ref_probabilities, probabilities, alpha, config.softmax_min_ks)
            )
        ref_embeddings, embeddings = reference.embeddings, data.embeddings
        if (
            MMD in tests
            and ref_embeddings is not None
            and embeddings is not None
            and len(ref_embeddings) >= 2
            and len(embeddings) >= 2
        ):
            results.append(
                mmd_test(
                    ref_embeddings,
                    embeddings,
                    np.random.default_rng([config.seed, index]),
                    permutations=config.mmd_permutations,
                    max_reference_points=config.mmd_max_reference_points,
                    max_window_points=config.mmd_max_window_points,
                    pca_dims=config.mmd_pca_dims,
                    alpha=alpha,
                    min_effect=config.mmd_min_effect,
                )
            )
        ref_inputs, inputs = reference.inputs, data.inputs
        if (
            FEATURES in tests
            and ref_inputs is not None
            and inputs is not None
            and len(ref_inputs)
            and len(inputs)
        ):
            results.append(
                feature_tests(
                    ref_inputs,
                    inputs,
                    alpha,
                    config.feature_min_ks,
                    correction=config.feature_correction,
                )
            )
        return results
