"""The window tests on seeded synthetic data: decisions, hand-computed arithmetic, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from service.drift_tests import (
    PSI_EPSILON,
    benjamini_hochberg,
    class_distribution_test,
    feature_tests,
    ks_columns,
    ks_test,
    mmd_permutation_statistics,
    mmd_test,
    population_stability_index,
    softmax_ks_test,
    tail_test,
)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    result: np.ndarray = z / z.sum(axis=1, keepdims=True)
    return result


# --- KS with PSI ------------------------------------------------------------------------------


def test_ks_on_identical_distributions_does_not_drift() -> None:
    rng = np.random.default_rng(0)
    result = ks_test(np.sort(rng.normal(size=2000)), rng.normal(size=1000))
    assert result.test == "ks" and result.effect_name == "psi"
    assert result.p_value > 0.1
    assert result.effect_size < 0.05
    assert not result.drifting


def test_ks_on_a_shifted_window_drifts() -> None:
    rng = np.random.default_rng(0)
    result = ks_test(np.sort(rng.normal(size=2000)), rng.normal(0.5, 1.0, size=1000))
    assert result.p_value < 1e-10
    assert result.effect_size > 0.1  # at least "moderate" by the PSI conventions
    assert result.drifting
    assert result.details["window_size"] == 1000


def test_ks_alarm_hygiene_significant_but_negligible_shift_does_not_drift() -> None:
    # 200,000 events a side make a shift of 0.03 standard deviations highly significant, yet
    # its PSI is far below the 0.1 floor: the window must not count as drifting.
    rng = np.random.default_rng(0)
    reference = np.sort(rng.normal(size=200_000))
    result = ks_test(reference, rng.normal(0.03, 1.0, size=200_000))
    assert result.p_value < 1e-6
    assert result.effect_size < 0.01
    assert not result.drifting
    assert ks_test(reference, rng.normal(0.03, 1.0, size=200_000), min_effect=0.0).drifting


def test_ks_drops_non_finite_values() -> None:
    result = ks_test(np.arange(10.0), np.array([1.0, np.nan, 2.0, np.inf]))
    assert result.details["window_size"] == 2
    with pytest.raises(ValueError, match="window holds no finite values"):
        ks_test(np.arange(10.0), np.array([np.nan]))


def test_psi_by_hand() -> None:
    reference = np.arange(100.0)  # ten bins of 10% each
    assert population_stability_index(reference, reference) == 0.0
    # Every window value in the first bin: one bin at 100%, nine at the epsilon.
    expected = 0.9 * math.log(1.0 / 0.1) + 9 * (PSI_EPSILON - 0.1) * math.log(PSI_EPSILON / 0.1)
    assert population_stability_index(reference, np.full(10, 3.0)) == pytest.approx(expected)


def test_psi_merges_bins_on_tied_reference_values() -> None:
    # 60% of a saturated confidence score sits at 1.0: the deciles collapse into 5 bins.
    reference = np.concatenate([np.linspace(0.5, 0.9, 40), np.ones(60)])
    assert population_stability_index(reference, reference) == 0.0
    window = np.concatenate([np.linspace(0.5, 0.9, 40), np.ones(60)])[::2]
    assert population_stability_index(reference, window) == pytest.approx(0.0, abs=1e-3)


def test_thresholds_are_validated_with_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"alpha must be within \(0, 1\), got 1.5"):
        ks_test(np.arange(3.0), np.arange(3.0), alpha=1.5)
    with pytest.raises(ValueError, match=r"min_effect must be >= 0, got -0\.1"):
        ks_test(np.arange(3.0), np.arange(3.0), min_effect=-0.1)


# --- class distribution -----------------------------------------------------------------------


def test_class_distribution_goodness_of_fit_by_hand() -> None:
    prior = np.array([0.5, 0.3, 0.2])
    same = class_distribution_test(prior, np.repeat([0, 1, 2], [50, 30, 20]), 3)
    assert (same.statistic, same.p_value, same.effect_size) == (0.0, 1.0, 0.0)
    # Expected 50, 30, 20; observed 60, 20, 20: 100/50 + 100/30 with 2 degrees of freedom,
    # whose survival function is exp(-x / 2).
    moved = class_distribution_test(prior, np.repeat([0, 1, 2], [60, 20, 20]), 3)
    assert moved.statistic == pytest.approx(2.0 + 100.0 / 30.0)
    assert moved.p_value == pytest.approx(math.exp(-(2.0 + 100.0 / 30.0) / 2.0))
    assert moved.details["degrees_of_freedom"] == 2
    assert moved.effect_name == "js_distance"
    assert 0.0 < moved.effect_size < 1.0
    assert not moved.drifting  # p = 0.07


def test_class_distribution_drifts_on_a_prior_shift() -> None:
    rng = np.random.default_rng(0)
    prior = np.full(10, 0.1)
    shifted = np.full(10, 0.8 / 9)
    shifted[3] = 0.2
    result = class_distribution_test(prior, rng.choice(10, 1000, p=shifted), 10)
    assert result.p_value < 1e-10
    assert result.effect_size > 0.05
    assert result.drifting


def test_class_distribution_drops_classes_empty_on_both_sides() -> None:
    result = class_distribution_test(np.array([0.5, 0.5, 0.0]), np.repeat([0, 1], [50, 50]), 3)
    assert result.details["degrees_of_freedom"] == 1
    assert result.p_value == 1.0


def test_class_distribution_pools_classes_with_small_expected_counts() -> None:
    # Expected 49, 49, 1, 1: the two rare classes become one bin of 2 (Cochran's rule).
    prior = np.array([0.49, 0.49, 0.01, 0.01])
    result = class_distribution_test(prior, np.repeat([0, 1, 2], [49, 49, 2]), 4)
    assert result.details["degrees_of_freedom"] == 2
    assert result.statistic == pytest.approx(0.0)


def test_class_the_prior_rules_out_is_certain_drift_but_only_matters_when_large() -> None:
    prior = np.array([0.5, 0.5, 0.0])
    one_stray = class_distribution_test(prior, np.repeat([0, 1, 2], [500, 499, 1]), 3)
    assert one_stray.statistic == math.inf and one_stray.p_value == 0.0
    assert one_stray.effect_size < 0.05
    assert not one_stray.drifting  # the effect floor keeps one stray event from alarming
    many = class_distribution_test(prior, np.repeat([0, 1, 2], [400, 400, 200]), 3)
    assert many.drifting


def test_class_homogeneity_allows_for_reference_noise() -> None:
    prior = np.array([0.4, 0.35, 0.25])
    counts = np.array([450, 320, 230])
    predicted = np.repeat([0, 1, 2], counts)
    result = class_distribution_test(prior, predicted, 3, reference_size=200)
    table = np.vstack([prior * 200, counts])
    expected = stats.chi2_contingency(table, correction=False)
    assert result.details["mode"] == "homogeneity"
    assert result.statistic == pytest.approx(expected.statistic)
    assert result.p_value == pytest.approx(expected.pvalue)
    # The same counts against a prior taken as exact look far less likely.
    assert class_distribution_test(prior, predicted, 3).p_value < result.p_value


def test_class_homogeneity_handles_a_class_absent_from_the_reference() -> None:
    prior = np.array([0.5, 0.5, 0.0])
    predicted = np.repeat([0, 1, 2], [350, 350, 300])
    result = class_distribution_test(prior, predicted, 3, reference_size=1000)
    assert math.isfinite(result.statistic)
    assert result.drifting


def test_class_distribution_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"predicted classes must lie within \[0, 3\)"):
        class_distribution_test(np.full(3, 1 / 3), np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="reference_prior must hold 3 non-negative shares"):
        class_distribution_test(np.array([0.5, 0.5]), np.array([0]), 3)
    with pytest.raises(ValueError, match="window_predicted is empty"):
        class_distribution_test(np.full(3, 1 / 3), np.array([], dtype=np.int64), 3)


# --- softmax KS -------------------------------------------------------------------------------


def test_ks_columns_match_scipy_asymptotic_p_values() -> None:
    rng = np.random.default_rng(0)
    reference, window = rng.normal(size=(700, 3)), rng.normal(0.1, 1.0, size=(300, 3))
    statistic, p_value = ks_columns(reference, window)
    for j in range(3):
        expected = stats.ks_2samp(reference[:, j], window[:, j], method="asymp")
        assert statistic[j] == pytest.approx(expected.statistic, abs=1e-12)
        assert p_value[j] == pytest.approx(expected.pvalue, rel=1e-9)


def test_softmax_bonferroni_arithmetic_is_exact() -> None:
    rng = np.random.default_rng(1)
    reference = softmax(rng.normal(size=(1000, 4)))
    logits = rng.normal(size=(500, 4))
    logits[:, 2] += 0.3
    window = softmax(logits)
    result = softmax_ks_test(reference, window)
    _, raw = ks_columns(reference, window)
    corrected = np.minimum(raw * 4, 1.0)
    assert result.details["corrected_p_values"] == corrected.tolist()
    assert result.p_value == corrected.min()
    assert result.details["class"] == int(np.argmin(corrected)) == 2
    assert result.details["correction"] == "bonferroni"


def test_softmax_identical_does_not_drift_and_shift_does() -> None:
    rng = np.random.default_rng(2)
    reference = softmax(rng.normal(size=(1000, 10)))
    same = softmax_ks_test(reference, softmax(rng.normal(size=(1000, 10))))
    assert same.p_value > 0.1 and not same.drifting
    logits = rng.normal(size=(1000, 10))
    logits[:, 7] += 1.0
    shifted = softmax_ks_test(reference, softmax(logits))
    assert shifted.drifting and shifted.details["class"] == 7
    assert shifted.effect_size == shifted.statistic  # the shifted class is the largest gap


def test_softmax_rejects_mismatched_classes() -> None:
    with pytest.raises(ValueError, match="reference has 3 classes but the window has 4"):
        softmax_ks_test(np.full((5, 3), 1 / 3), np.full((5, 4), 0.25))


# --- input features ---------------------------------------------------------------------------


def test_benjamini_hochberg_by_hand() -> None:
    adjusted = benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.5]))
    # Sorted 0.01, 0.03, 0.04, 0.5 scale to 0.04, 0.06, 0.0533, 0.5; then the running minimum
    # from the largest down.
    np.testing.assert_allclose(adjusted, [0.04, 0.16 / 3, 0.16 / 3, 0.5])


def test_feature_tests_find_the_shifted_feature_and_skip_constant_ones() -> None:
    rng = np.random.default_rng(0)
    reference, window = rng.normal(size=(1000, 6)), rng.normal(size=(1000, 6))
    reference[:, 0] = window[:, 0] = 3.0  # constant on both sides: skipped
    reference[:, 1] = 0.0  # constant in the reference only: tested, and it drifted
    window[:, 1] = rng.integers(0, 2, size=1000)
    window[:, 4] += 0.5
    result = feature_tests(reference, window)
    assert result.details["tested_features"] == 5
    assert result.details["skipped_constant_features"] == 1
    assert result.details["significant_features"] == 2
    most = result.details["most_drifted"]
    assert isinstance(most, list)
    assert [m["feature"] for m in most[:2]] == [1, 4]
    assert result.drifting and result.effect_size == pytest.approx(0.5, abs=0.05)


def test_feature_tests_on_identical_distributions_do_not_drift() -> None:
    rng = np.random.default_rng(3)
    result = feature_tests(rng.normal(size=(1000, 20)), rng.normal(size=(1000, 20)))
    assert result.p_value > 0.1
    assert result.details["significant_features"] == 0
    assert not result.drifting


def test_feature_tests_bonferroni_option() -> None:
    rng = np.random.default_rng(4)
    reference, window = rng.normal(size=(800, 5)), rng.normal(size=(400, 5))
    window[:, 2] += 0.4
    result = feature_tests(reference, window, correction="bonferroni")
    _, raw = ks_columns(reference, window)
    assert result.p_value == min(raw[2] * 5, 1.0)
    with pytest.raises(ValueError, match="correction must be 'bh' or 'bonferroni', got 'holm'"):
        feature_tests(reference, window, correction="holm")  # type: ignore[arg-type]


def test_feature_alarm_hygiene_significant_but_negligible_shift_does_not_drift() -> None:
    rng = np.random.default_rng(5)
    reference = rng.normal(size=(100_000, 3))
    window = rng.normal(size=(100_000, 3))
    window[:, 1] += 0.05  # KS statistic about 0.02: significant, far below the 0.1 floor
    result = feature_tests(reference, window)
    assert result.p_value < 1e-10
    assert result.effect_size < 0.03
    assert not result.drifting


def test_feature_tests_with_only_constant_features() -> None:
    result = feature_tests(np.ones((10, 3)), np.ones((5, 3)))
    assert (result.p_value, result.drifting, result.details["tested_features"]) == (1.0, False, 0)


# --- MMD --------------------------------------------------------------------------------------


def naive_unbiased_mmd2(kernel: np.ndarray, m: int) -> float:
    kxx, kyy, kxy = kernel[:m, :m], kernel[m:, m:], kernel[:m, m:]
    n = len(kernel) - m
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def test_mmd_permutation_statistics_match_the_naive_formula() -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(30, 3))
    kernel = np.exp(-0.5 * ((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=2))
    statistics = mmd_permutation_statistics(kernel, 12, 5, np.random.default_rng(1))
    assert statistics[0] == pytest.approx(naive_unbiased_mmd2(kernel, 12))
    shuffles = np.random.default_rng(1)
    for column in range(1, 6):
        first = shuffles.permutation(30)[:12]
        order = np.concatenate([first, np.setdiff1d(np.arange(30), first)])
        permuted = kernel[np.ix_(order, order)]
        assert statistics[column] == pytest.approx(naive_unbiased_mmd2(permuted, 12))


def test_mmd_p_value_is_the_plus_one_formula_and_deterministic() -> None:
    rng = np.random.default_rng(0)
    reference, window = rng.normal(size=(200, 8)), rng.normal(size=(300, 8))
    first = mmd_test(reference, window, np.random.default_rng(42), permutations=99)
    again = mmd_test(reference, window, np.random.default_rng(42), permutations=99)
    assert first == again
    exceedances = first.details["exceedances"]
    assert isinstance(exceedances, int)
    assert first.p_value == (exceedances + 1) / 100
    assert first.effect_size == math.sqrt(max(first.statistic, 0.0))
    # No subsampling at these sizes, so the same seed gives the same shuffles here.
    pooled = np.vstack([reference, window])
    squared = ((pooled[:, None, :] - pooled[None, :, :]) ** 2).sum(axis=2)
    bandwidth = np.median(squared[np.triu_indices(500, 1)])
    kernel = np.exp(-squared / (2 * bandwidth))
    statistics = mmd_permutation_statistics(kernel, 200, 99, np.random.default_rng(42))
    assert exceedances == int((statistics[1:] >= statistics[0]).sum())
    assert first.statistic == pytest.approx(statistics[0])


def test_mmd_identical_does_not_drift_and_shift_does() -> None:
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(2000, 16))
    same = mmd_test(reference, rng.normal(size=(1000, 16)), np.random.default_rng(0))
    assert same.p_value > 0.1 and not same.drifting
    assert same.details["reference_points"] == 500  # subsampled
    assert same.details["window_points"] == 1000
    shifted_window = rng.normal(size=(1000, 16))
    shifted_window[:, :4] += 0.5
    shifted = mmd_test(reference, shifted_window, np.random.default_rng(0))
    assert shifted.p_value == 1 / 201  # no shuffle reaches the observed statistic
    assert shifted.drifting


def test_mmd_alarm_hygiene_significant_but_below_the_floor_does_not_drift() -> None:
    rng = np.random.default_rng(0)
    reference, window = rng.normal(size=(1000, 2)), rng.normal(size=(1000, 2))
    window[:, 0] += 0.2
    result = mmd_test(
        reference, window, np.random.default_rng(0), max_reference_points=1000, min_effect=0.1
    )
    assert result.p_value < 0.01
    assert result.effect_size < 0.1
    assert not result.drifting


def test_mmd_pca_projection() -> None:
    rng = np.random.default_rng(2)
    reference, window = rng.normal(size=(300, 64)), rng.normal(size=(300, 64))
    result = mmd_test(reference, window, np.random.default_rng(0), pca_dims=8)
    assert result.details["dimensions"] == 8
    wide = mmd_test(reference, window, np.random.default_rng(0), pca_dims=128)
    assert wide.details["dimensions"] == 64  # never "projects" up


def test_mmd_validates_parameters() -> None:
    points = np.zeros((5, 2))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="permutations must be >= 1, got 0"):
        mmd_test(points, points, rng, permutations=0)
    with pytest.raises(ValueError, match="pca_dims must be >= 1 or None, got 0"):
        mmd_test(points, points, rng, pca_dims=0)
    with pytest.raises(ValueError, match="reference embeddings have 2 dimensions, the window's 3"):
        mmd_test(points, np.zeros((5, 3)), rng)
    identical = mmd_test(points, points, rng)  # all distances 0: no crash, no drift
    assert identical.effect_size == 0.0 and not identical.drifting


def test_tail_test_counts_the_share_beyond_the_reference_quantile_exactly() -> None:
    reference = np.arange(100, dtype=np.float64)  # 99th percentile 98.01: one value above it
    window = np.r_[np.zeros(90), np.full(10, 500.0)]  # 10% above it
    result = tail_test(reference, window, 0.99, upper=True)
    assert result.details["threshold"] == pytest.approx(98.01)
    assert result.details["reference_share"] == 0.01 and result.details["window_share"] == 0.1
    assert result.effect_size == pytest.approx(0.09)
    expected = stats.fisher_exact([[10, 90], [1, 99]], alternative="greater")
    assert result.p_value == pytest.approx(expected.pvalue)
    assert expected.pvalue < 0.01 and result.drifting
    lower = tail_test(reference, np.r_[np.full(30, -1.0), np.full(70, 50.0)], 0.05, upper=False)
    assert lower.details["window_share"] == 0.3 and lower.drifting
    # As many beyond as the reference: no excess, no drift, whatever the p-value.
    same = tail_test(reference, reference, 0.99, upper=True)
    assert same.effect_size == 0 and not same.drifting
    with pytest.raises(ValueError, match="quantile must be within"):
        tail_test(reference, window, 1.0, upper=True)
