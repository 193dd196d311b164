"""Streaming detectors, windows and the window evaluator on seeded streams, with exact indices."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest

import service.drift_detectors
from service.drift_detectors import (
    ConsecutiveAlarm,
    DriftConfig,
    PageHinkley,
    ReferenceSample,
    TumblingWindow,
    WindowData,
    WindowEvaluator,
)
from service.reference_profile import ReferenceProfile
from service.scores import confidence_scores
from tests.support import MODELS_DIR


def test_docstring_examples() -> None:
    assert doctest.testmod(service.drift_detectors).failed == 0


# --- Page-Hinkley -----------------------------------------------------------------------------


def percentile_stream(seed: int, stationary: int, shifted: int, shift: float) -> np.ndarray:
    """Reference percentiles / 100: uniform in distribution, then moved up by `shift`."""
    rng = np.random.default_rng(seed)
    before = rng.random(stationary)
    return np.concatenate([before, np.clip(rng.random(shifted) + shift, 0.0, 1.0)])


def detections(detector: PageHinkley, stream: np.ndarray) -> list[int]:
    return [i for i, x in enumerate(stream) if detector.update(float(x)).drift_detected]


def test_page_hinkley_detects_a_mean_shift_at_the_exact_index() -> None:
    stream = percentile_stream(seed=7, stationary=2000, shifted=1000, shift=0.2)
    assert detections(PageHinkley(), stream) == [2247]  # 247 events after the change
    assert detections(PageHinkley(direction="up"), stream) == [2247]
    assert detections(PageHinkley(direction="down"), stream) == []
    assert detections(PageHinkley(direction="down"), 1.0 - stream) == [2247]


@pytest.mark.parametrize("seed", range(3))
def test_page_hinkley_stays_quiet_on_a_stationary_stream(seed: int) -> None:
    assert detections(PageHinkley(), np.random.default_rng(seed).random(20_000)) == []


def test_page_hinkley_starts_afresh_after_a_detection() -> None:
    detector = PageHinkley(threshold=1.0, min_instances=1, delta=0.0)
    for x in (0.0, 0.0, 5.0):
        detector.update(x)
    assert detector.drift_detected and detector.n == 3
    detector.update(0.0)
    assert not detector.drift_detected and detector.n == 1


def test_page_hinkley_waits_for_min_instances() -> None:
    detector = PageHinkley(threshold=1.0, min_instances=5, delta=0.0)
    assert detections(detector, np.array([0.0, 0.0, 10.0, 10.0, 10.0])) == [4]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delta": -1.0}, "delta must be >= 0, got -1.0"),
        ({"threshold": 0.0}, "threshold must be > 0, got 0.0"),
        ({"forgetting_factor": 1.5}, r"forgetting_factor must be within \(0, 1\], got 1.5"),
        ({"min_instances": 0}, "min_instances must be >= 1, got 0"),
        ({"direction": "sideways"}, "direction must be 'up', 'down' or 'both', got 'sideways'"),
    ],
)
def test_page_hinkley_validates_parameters(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PageHinkley(**options)  # type: ignore[arg-type]


def test_page_hinkley_rejects_non_finite_values() -> None:
    with pytest.raises(ValueError, match="finite values, got nan"):
        PageHinkley().update(float("nan"))


# --- consecutive alarm ------------------------------------------------------------------------


def test_consecutive_alarm_exact_sequence() -> None:
    alarm = ConsecutiveAlarm(3)
    drifting = [True, True, False, True, True, True, True, False, True]
    states = [alarm.update(d).alarm for d in drifting]
    assert states == [False, False, False, False, False, True, True, False, False]
    assert alarm.streak == 1


def test_consecutive_alarm_of_one_window_follows_each_window() -> None:
    alarm = ConsecutiveAlarm(1)
    assert [alarm.update(d).alarm for d in (False, True, False)] == [False, True, False]


def test_consecutive_alarm_resumes_from_its_streak() -> None:
    alarm = ConsecutiveAlarm(2, streak=1)
    assert alarm.update(True).alarm
    with pytest.raises(ValueError, match="windows_needed must be >= 1, got 0"):
        ConsecutiveAlarm(0)


# --- tumbling windows -------------------------------------------------------------------------


def test_count_window_completes_every_size_events() -> None:
    window: TumblingWindow[str] = TumblingWindow(size=3)
    completed = [window.add(t, f"e{t:g}") for t in (5.0, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0)]
    first, second = completed[2], completed[5]
    assert [c is not None for c in completed] == [False, False, True, False, False, True, False]
    assert first is not None and second is not None
    assert (first.index, first.start_time, first.end_time) == (0, 3.0, 5.0)
    assert first.items == ["e5", "e3", "e4"]
    assert (second.index, second.items) == (1, ["e6", "e7", "e8"])
    assert window.index == 2 and window.pending == 1
    assert window.close_elapsed(1e9) is None  # count windows wait for their count


def test_count_window_state_round_trips_through_json() -> None:
    window: TumblingWindow[int] = TumblingWindow(size=2)
    for t in range(4):
        window.add(float(t), t)
    state = json.loads(json.dumps(window.state()))
    assert state == {"size": 2, "seconds": None, "index": 2}
    resumed: TumblingWindow[int] = TumblingWindow.from_state(state)
    resumed.add(10.0, 10)
    completed = resumed.add(11.0, 11)
    assert completed is not None and (completed.index, completed.items) == (2, [10, 11])


def test_time_window_is_aligned_to_the_epoch_and_closes_on_a_later_event() -> None:
    window: TumblingWindow[float] = TumblingWindow(size=None, seconds=10.0)
    assert window.add(3.0, 3.0) is None
    assert window.add(7.0, 7.0) is None
    first = window.add(12.0, 12.0)
    assert first is not None
    assert (first.index, first.start_time, first.end_time, first.items) == (0, 0.0, 10.0, [3, 7])
    # No events from 20 to 40: no windows for those periods; the next one is numbered by time.
    second = window.add(45.0, 45.0)
    assert second is not None and (second.index, second.items) == (1, [12.0])
    assert window.index == 4
    assert window.close_elapsed(49.9) is None
    third = window.close_elapsed(50.0)
    assert third is not None and (third.index, third.start_time, third.end_time) == (4, 40.0, 50.0)
    # A late event (period 3, after window 4 closed) joins the next open window.
    window.add(31.0, 31.0)
    assert window.index == 5 and window.pending == 1


def test_time_window_numbering_survives_a_restart() -> None:
    window: TumblingWindow[int] = TumblingWindow(size=None, seconds=60.0)
    window.add(125.0, 1)
    resumed: TumblingWindow[int] = TumblingWindow.from_state(window.state())
    resumed.add(130.0, 2)
    completed = resumed.add(185.0, 3)
    assert completed is not None and (completed.index, completed.items) == (2, [2])


@pytest.mark.parametrize(
    ("size", "seconds", "message"),
    [
        (None, None, "give exactly one of a window size and seconds, got size=None"),
        (10, 5.0, "give exactly one of a window size and seconds, got size=10, seconds=5.0"),
        (0, None, "window size must be >= 1, got 0"),
        (None, -1.0, "window seconds must be a positive number, got -1.0"),
    ],
)
def test_window_validates_its_spec(size: int | None, seconds: float | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TumblingWindow(size, seconds)


# --- configuration ----------------------------------------------------------------------------


def test_default_config() -> None:
    config = DriftConfig()
    assert (config.window_size, config.alpha, config.consecutive_windows) == (1000, 0.01, 2)
    assert config.mmd_permutations == 200


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"alpha": 0.0}, r"alpha must be within \(0, 1\), got 0.0"),
        ({"consecutive_windows": 0}, "consecutive_windows must be >= 1, got 0"),
        ({"score_min_psi": -0.5}, "score_min_psi must be >= 0, got -0.5"),
        ({"mmd_permutations": 50}, "mmd_permutations=50 cannot reach a p-value below alpha=0.01"),
        ({"tests": frozenset({"scores", "ks"})}, r"unknown tests \['ks'\]"),
        (
            {"tests": frozenset({"scores"}), "alarm_tests": frozenset({"mmd"})},
            r"alarm_tests \['mmd'\] are not among the enabled tests \['scores'\]",
        ),
        ({"window_size": None}, "give exactly one of a window size and seconds"),
        ({"mmd_pca_dims": 0}, "mmd_pca_dims must be >= 1 or None, got 0"),
    ],
)
def test_config_validates_with_the_bad_value(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DriftConfig(**options)  # type: ignore[arg-type]


def test_few_permutations_are_fine_without_mmd() -> None:
    assert DriftConfig(mmd_permutations=50, tests=frozenset({"scores"})).mmd_permutations == 50


# --- window evaluator -------------------------------------------------------------------------

# Digits-like synthetic model: 10 classes, 64-d embeddings, 16 input features.
N_CLASSES, DIM, N_FEATURES = 10, 64, 16
_SHAPE = np.random.default_rng(12345)
CENTRES = _SHAPE.normal(size=(N_CLASSES, DIM))
UNIT_CENTRES = CENTRES / np.linalg.norm(CENTRES, axis=1, keepdims=True)


def draw_window(rng: np.random.Generator, size: int, shift: float = 0.0) -> WindowData:
    """Events of the synthetic model; `shift` moves the first 8 latent dimensions (covariates)."""
    latent = CENTRES[rng.integers(0, N_CLASSES, size)] + rng.normal(scale=1.5, size=(size, DIM))
    latent[:, :8] += shift
    logits = latent @ CENTRES.T / 16.0
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = z / z.sum(axis=1, keepdims=True)
    embeddings = latent / np.linalg.norm(latent, axis=1, keepdims=True)
    scores = confidence_scores(probabilities, logits)
    scores["novelty"] = (1.0 - embeddings @ UNIT_CENTRES.T).min(axis=1)
    return WindowData(
        predicted=probabilities.argmax(axis=1),
        scores=scores,
        probabilities=probabilities,
        embeddings=embeddings,
        inputs=latent[:, :N_FEATURES],
    )


@pytest.fixture(scope="module")
def reference() -> ReferenceSample:
    held_out = draw_window(np.random.default_rng(0), 1000)
    assert held_out.probabilities is not None
    return ReferenceSample(
        score_distributions={k: np.sort(v) for k, v in held_out.scores.items()},
        class_counts=np.bincount(held_out.predicted, minlength=N_CLASSES),
        probabilities=held_out.probabilities,
        embeddings=held_out.embeddings,
        inputs=held_out.inputs,
    )


def run_stream(
    evaluator: WindowEvaluator, seed: int, shifts: list[float], first_index: int = 0
) -> list[bool]:
    rng = np.random.default_rng(seed)
    alarms = []
    for i, shift in enumerate(shifts, start=first_index):
        window = draw_window(rng, 1000, shift)
        alarms.append(evaluator.evaluate(window, index=i, start_time=i, end_time=i + 1).alarm)
    return alarms


@pytest.mark.parametrize("seed", [1000, 1001, 1002, 1003])
def test_in_distribution_windows_never_alarm(reference: ReferenceSample, seed: int) -> None:
    evaluator = WindowEvaluator(reference, DriftConfig())
    assert run_stream(evaluator, seed, [0.0] * 5) == [False] * 5


def test_shift_from_window_3_alarms_at_window_4(reference: ReferenceSample) -> None:
    evaluator = WindowEvaluator(reference, DriftConfig(consecutive_windows=2))
    rng = np.random.default_rng(7)
    reports = [
        evaluator.evaluate(
            draw_window(rng, 1000, 1.0 if i >= 3 else 0.0), index=i, start_time=i, end_time=i + 1
        )
        for i in range(6)
    ]
    assert [r.drifting for r in reports] == [False, False, False, True, True, True]
    assert [r.alarm for r in reports] == [False, False, False, False, True, True]
    shifted = reports[4]
    assert shifted.alarms["mmd"] and shifted.alarms["features"]
    assert {r.test for r in shifted.results} == {
        "scores:energy",
        "scores:entropy",
        "scores:margin",
        "scores:max_probability",
        "scores:novelty",
        "tail:max_probability",
        "tail:novelty",
        "class_distribution",
        "softmax",
        "mmd",
        "features",
    }
    report = shifted.as_dict()
    assert json.loads(json.dumps(report)) == report  # ready to store as JSON
    assert report["size"] == 1000 and report["index"] == 4


def test_evaluator_is_deterministic_and_resumes_from_its_state(reference: ReferenceSample) -> None:
    shifts = [0.0, 0.0, 0.0, 1.0, 1.0]
    first = WindowEvaluator(reference)
    assert run_stream(first, 7, shifts) == [False, False, False, False, True]
    # A restart after window 3: the streaks and the window index carry the state.
    before = WindowEvaluator(reference)
    run_stream(before, 7, shifts[:4])
    resumed = WindowEvaluator(reference, streaks=before.state()["streaks"])
    rng = np.random.default_rng(7)
    windows = [draw_window(rng, 1000, s) for s in shifts]
    report = resumed.evaluate(windows[4], index=4, start_time=4, end_time=5)
    again = WindowEvaluator(reference, streaks=before.state()["streaks"]).evaluate(
        windows[4], index=4, start_time=4, end_time=5
    )
    assert report.alarm
    assert report.as_dict() == again.as_dict()


def test_alarm_tests_choose_what_raises_the_overall_alarm(reference: ReferenceSample) -> None:
    config = DriftConfig(alarm_tests=frozenset({"class_distribution"}))
    evaluator = WindowEvaluator(reference, config)
    assert run_stream(evaluator, 7, [0.0, 0.0, 0.0, 1.0, 1.0]) == [False] * 5
    assert evaluator.state()["streaks"]["mmd"] == 2  # mmd still drifts, it just does not alarm


def test_tests_without_data_do_not_run_and_keep_their_streak(reference: ReferenceSample) -> None:
    config = DriftConfig(tests=frozenset({"features", "class_distribution"}))
    evaluator = WindowEvaluator(reference, config, streaks={"features": 1})
    window = draw_window(np.random.default_rng(3), 1000)
    no_inputs = WindowData(predicted=window.predicted, scores=window.scores)
    report = evaluator.evaluate(no_inputs, index=0, start_time=0.0, end_time=1.0)
    assert [r.test for r in report.results] == ["class_distribution"]
    assert evaluator.state()["streaks"] == {"class_distribution": 0, "features": 1}


def test_reference_sample_from_the_committed_digits_profile() -> None:
    profile = ReferenceProfile.load(MODELS_DIR / "digits" / "reference.npz")
    sample = ReferenceSample.from_profile(profile)
    assert sample.class_counts.sum() == len(profile.holdout_probabilities)
    assert (
        sample.class_counts.tolist()
        == np.bincount(profile.holdout_probabilities.argmax(axis=1), minlength=10).tolist()
    )
    assert set(sample.score_distributions) == set(profile.score_distributions)


def test_evaluator_rejects_a_negative_index(reference: ReferenceSample) -> None:
    window = draw_window(np.random.default_rng(0), 10)
    with pytest.raises(ValueError, match="window index must be >= 0, got -1"):
        WindowEvaluator(reference).evaluate(window, index=-1, start_time=0.0, end_time=1.0)
