"""Every score against hand-computed values, edge cases included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.scores import (
    FlagThresholds,
    PercentileLookup,
    confidence_scores,
    energy,
    entropy,
    flag,
    margin,
    max_probability,
    percentile_in,
)

P = np.array(
    [
        [0.7, 0.2, 0.1],  # a confident prediction
        [1 / 3, 1 / 3, 1 / 3],  # uniform
        [0.5, 0.5, 0.0],  # a tie at the top, one impossible class
        [1.0, 0.0, 0.0],  # certain
    ],
    dtype=np.float32,
)


def test_max_probability() -> None:
    np.testing.assert_allclose(max_probability(P), [0.7, 1 / 3, 0.5, 1.0], rtol=1e-6)


def test_margin_including_ties_and_uniform() -> None:
    np.testing.assert_allclose(margin(P), [0.5, 0.0, 0.0, 1.0], atol=1e-7)


def test_margin_of_a_single_class_model_is_one() -> None:
    assert margin(np.ones((2, 1), dtype=np.float32)).tolist() == [1.0, 1.0]


def test_entropy_in_nats() -> None:
    expected = [
        -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)),
        math.log(3),
        math.log(2),
        0.0,
    ]
    np.testing.assert_allclose(entropy(P), expected, rtol=1e-6)
    assert entropy(P)[3] == 0.0  # 0 * log 0 counts as 0, and no -0.0


def test_entropy_of_one_class_is_zero() -> None:
    assert entropy(np.ones((1, 1), dtype=np.float32)).tolist() == [0.0]


def test_energy_is_negative_logsumexp() -> None:
    logits = np.array([[0.0, 0.0], [1.0, 2.0], [1000.0, 1000.0]], dtype=np.float32)
    expected = [-math.log(2), -(2 + math.log(1 + math.exp(-1))), -(1000 + math.log(2))]
    np.testing.assert_allclose(energy(logits), expected, rtol=1e-6)


def test_confidence_scores_include_energy_only_with_logits() -> None:
    assert set(confidence_scores(P, None)) == {"max_probability", "margin", "entropy"}
    logits = np.log(np.clip(P, 1e-9, None))
    assert "energy" in confidence_scores(P, logits)


def test_percentile_uses_mid_rank() -> None:
    reference = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    values = np.array([0.0, 1.0, 2.5, 4.0, 9.0], dtype=np.float32)
    assert percentile_in(values, reference).tolist() == [0.0, 12.5, 50.0, 87.5, 100.0]


def test_percentile_of_a_constant_reference_is_50_at_the_constant() -> None:
    reference = np.ones(10, dtype=np.float32)
    assert percentile_in(np.array([1.0, 0.5, 2.0]), reference).tolist() == [50.0, 0.0, 100.0]


def test_percentile_without_reference_is_nan() -> None:
    assert np.isnan(percentile_in(np.array([1.0]), np.array([]))).all()


def test_percentile_lookup_uses_mid_rank_with_one_search() -> None:
    lookup = PercentileLookup(np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32))
    values = np.array([0.0, 1.0, 2.5, 4.0, 9.0], dtype=np.float32)
    assert lookup(values).tolist() == [0.0, 12.5, 50.0, 87.5, 100.0]
    constant = PercentileLookup(np.ones(10, dtype=np.float32))
    assert constant(np.array([1.0, 0.5, 2.0], dtype=np.float32)).tolist() == [50.0, 0.0, 100.0]
    assert np.isnan(PercentileLookup(np.array([], dtype=np.float32))(values)).all()


def adjacent_floats(points: np.ndarray) -> np.ndarray:
    """Every point, and the floats just below and just above it."""
    with np.errstate(over="ignore"):
        return np.concatenate(
            [points, np.nextafter(points, -np.inf), np.nextafter(points, np.inf)]
        ).astype(points.dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_percentile_lookup_equals_two_searches_at_every_tie_and_edge(dtype: type) -> None:
    rng = np.random.default_rng(7)
    # Ties, signed zeros, subnormals and the largest floats, and a spread of random points.
    finfo = np.finfo(dtype)
    special = np.array(
        [0.0, -0.0, 1.0, 1.0, 1.0, finfo.smallest_subnormal, -finfo.max, finfo.max], dtype=dtype
    )
    reference = np.sort(np.concatenate([special, rng.normal(size=200).astype(dtype)]))
    lookup = PercentileLookup(reference)
    values = np.concatenate(
        [
            adjacent_floats(reference),
            np.array([np.nan, np.inf, -np.inf, -0.0], dtype=dtype),
            rng.normal(size=500).astype(dtype),
        ]
    )
    np.testing.assert_array_equal(lookup(values), percentile_in(values, reference))


def test_percentile_lookup_falls_back_for_other_types_and_non_finite_references() -> None:
    reference = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    # A float64 value between a float32 point and the next float32 must rank above the point.
    between = np.array([np.float64(np.float32(0.2)) + 1e-12], dtype=np.float64)
    assert (
        PercentileLookup(reference)(between).tolist() == percentile_in(between, reference).tolist()
    )
    assert PercentileLookup(reference)(between).tolist() == [np.float32(200 / 3)]
    with_inf = np.array([0.1, 0.2, np.inf], dtype=np.float32)
    values = np.array([np.inf, 0.2, 5.0], dtype=np.float32)
    np.testing.assert_array_equal(
        PercentileLookup(with_inf)(values), percentile_in(values, with_inf)
    )


def test_flags_at_default_thresholds() -> None:
    percentiles = {
        "max_probability": np.array([4.0, 5.0, 6.0, 50.0], dtype=np.float32),
        "novelty": np.array([50.0, 98.9, 99.0, 100.0], dtype=np.float32),
    }
    low, novel = flag(percentiles, FlagThresholds(), 4)
    assert low.tolist() == [True, True, False, False]
    assert novel.tolist() == [False, False, True, True]


def test_no_reference_never_flags() -> None:
    low, novel = flag({}, FlagThresholds(), 2)
    assert low.tolist() == [False, False]
    assert novel.tolist() == [False, False]


def test_thresholds_are_validated() -> None:
    with pytest.raises(ValueError, match=r"novel_percentile must be within \[0, 100\], got 101"):
        FlagThresholds(novel_percentile=101)
