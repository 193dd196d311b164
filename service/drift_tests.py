"""Two-sample drift tests of one window against the reference: pure functions over arrays.

Every test reports a statistic, a p-value and an effect size, and calls a window drifting only
when the p-value is below `alpha` *and* the effect size reaches `min_effect`. The second
condition is the alarm hygiene: with enough events any difference becomes significant, so
significance alone would alarm on large windows for shifts nobody cares about.

Multiple-testing choices: per-class softmax tests use Bonferroni (few, strongly dependent
columns; the corrected p is simply `p * C`); per-feature input tests use Benjamini-Hochberg,
whose smallest adjusted p-value is Simes' test of "no feature drifted" - as strict as
Bonferroni when nothing drifts, but more powerful when several features move together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import stats
from scipy.spatial import distance

# Population stability index conventions: below 0.1 no meaningful shift, 0.1-0.25 a moderate
# one, above 0.25 a major one. The default floor is the start of "moderate".
PSI_BINS = 10
PSI_EPSILON = 1e-4  # stands in for an empty bin's share, so log(0) never happens
# Cochran's rule: the chi-square approximation needs expected counts of about 5 or more.
MIN_EXPECTED_COUNT = 5.0
# How many of the most drifted features a feature-test result names.
TOP_FEATURES = 5


@dataclass(frozen=True)
class TestResult:
    """One test on one window; `details` holds JSON-friendly extras (ints, floats, lists)."""

    __test__ = False  # not a pytest test class, despite the name

    test: str
    statistic: float
    p_value: float
    effect_size: float
    effect_name: str
    drifting: bool
    details: Mapping[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "test": self.test,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "effect_size": self.effect_size,
            "effect_name": self.effect_name,
            "drifting": self.drifting,
            "details": dict(self.details),
        }


def _check_thresholds(alpha: float, min_effect: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be within (0, 1), got {alpha}")
    if not min_effect >= 0.0:
        raise ValueError(f"min_effect must be >= 0, got {min_effect}")


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    flat = np.asarray(values, dtype=np.float64).ravel()
    kept = flat[np.isfinite(flat)]
    if len(kept) == 0:
        raise ValueError(f"{what} holds no finite values (got {len(flat)} values)")
    return kept


def _two_dimensional(values: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or len(array) == 0:
        raise ValueError(f"{what} must be a non-empty 2-d array, got shape {array.shape}")
    return array


def _decide(p_value: float, effect: float, alpha: float, min_effect: float) -> bool:
    return bool(p_value < alpha and effect >= min_effect)


def population_stability_index(
    reference: np.ndarray, window: np.ndarray, bins: int = PSI_BINS
) -> float:
    """PSI over bins cut at the reference's quantiles (ties merge bins, so there may be fewer)."""
    inner = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    n_bins = len(inner) + 1
    ref_share = np.bincount(np.searchsorted(inner, reference, side="right"), minlength=n_bins)
    win_share = np.bincount(np.searchsorted(inner, window, side="right"), minlength=n_bins)
    r = np.maximum(ref_share / len(reference), PSI_EPSILON)
    w = np.maximum(win_share / len(window), PSI_EPSILON)
    return float(np.sum((w - r) * np.log(w / r)))


def ks_test(
    reference_sorted: np.ndarray,
    window: np.ndarray,
    alpha: float = 0.01,
    min_effect: float = 0.1,
) -> TestResult:
    """Two-sample Kolmogorov-Smirnov on one score, with the PSI as effect size.

    Non-finite values are dropped from both samples. scipy picks the exact or the asymptotic
    p-value (exact up to 10,000 points per sample).
    """
    _check_thresholds(alpha, min_effect)
    reference = _finite(reference_sorted, "reference")
    values = _finite(window, "window")
    result = stats.ks_2samp(reference, values)
    statistic, p_value = float(result.statistic), float(result.pvalue)
    psi = population_stability_index(reference, values)
    return TestResult(
        test="ks",
        statistic=statistic,
        p_value=p_value,
        effect_size=psi,
        effect_name="psi",
        drifting=_decide(p_value, psi, alpha, min_effect),
        details={
            "reference_size": len(reference),
            "window_size": len(values),
            "reference_mean": float(reference.mean()),
            "window_mean": float(values.mean()),
        },
    )


def tail_test(
    reference: np.ndarray,
    window: np.ndarray,
    quantile: float,
    upper: bool,
    alpha: float = 0.01,
    min_effect: float = 0.02,
) -> TestResult:
    """Is the window's share beyond the reference's `quantile` larger than the reference's own?

    The tail share is what the flags count (novel above the 99th percentile, low confidence
    below the 5th), and where a small share of unseen inputs shows first: 5% of them barely
    move a KS or PSI over the whole range, but multiply the share above the 99th percentile.
    One-sided Fisher exact test on the two 2x2 counts, so the reference's own sampling error
    is accounted for; effect size: the window's share minus the reference's (absolute).
    """
    _check_thresholds(alpha, min_effect)
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be within (0, 1), got {quantile}")
    reference = _finite(reference, "reference")
    values = _finite(window, "window")
    threshold = float(np.quantile(reference, quantile))
    if upper:
        ref_beyond, win_beyond = int((reference > threshold).sum()), int((values > threshold).sum())
    else:
        ref_beyond, win_beyond = int((reference < threshold).sum()), int((values < threshold).sum())
    table = [[win_beyond, len(values) - win_beyond], [ref_beyond, len(reference) - ref_beyond]]
    odds, p_value = stats.fisher_exact(table, alternative="greater")
    excess = win_beyond / len(values) - ref_beyond / len(reference)
    return TestResult(
        test="tail",
        statistic=float(odds),
        p_value=float(p_value),
        effect_size=excess,
        effect_name="excess_share",
        drifting=_decide(float(p_value), excess, alpha, min_effect),
        details={
            "threshold": threshold,
            "side": "upper" if upper else "lower",
            "quantile": quantile,
            "reference_share": ref_beyond / len(reference),
            "window_share": win_beyond / len(values),
        },
    )


def _pool_sparse_columns(table: np.ndarray) -> np.ndarray:
    """Merge the columns of a 2-row count table whose smallest expected count is below 5."""
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    sparse = expected.min(axis=0) < MIN_EXPECTED_COUNT
    if sparse.sum() < 2:
        return table
    pooled = table[:, sparse].sum(axis=1, keepdims=True)
    return np.concatenate([table[:, ~sparse], pooled], axis=1)


def class_distribution_test(
    reference_prior: np.ndarray,
    window_predicted: np.ndarray,
    n_classes: int,
    alpha: float = 0.01,
    min_effect: float = 0.05,
    reference_size: int | None = None,
) -> TestResult:
    """Chi-square test of the predicted-class counts, with the Jensen-Shannon distance as effect.

    With `reference_size` (how many predictions the prior was measured on) this is the test of
    homogeneity of the 2 x C table, which allows for the reference's own sampling noise; without
    it, a goodness-of-fit test that takes the prior as exact.

    Empty classes: classes absent from both sides are dropped; classes whose expected count is
    below 5 are pooled into one bin (Cochran's rule keeps the chi-square approximation honest).
    In goodness of fit, a prior of exactly 0 says the class never occurs, so any window event
    in such a class makes the statistic infinite and p = 0; the effect size then says whether
    the intrusion matters (a handful of events in 1,000 stays below the default floor). The
    effect size is the base-2 Jensen-Shannon distance in [0, 1] over all classes.
    """
    _check_thresholds(alpha, min_effect)
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    prior = np.asarray(reference_prior, dtype=np.float64)
    if prior.shape != (n_classes,) or (prior < 0).any() or not prior.sum() > 0:
        raise ValueError(
            f"reference_prior must hold {n_classes} non-negative shares with a positive sum, "
            f"got {prior.tolist()}"
        )
    if reference_size is not None and reference_size < 1:
        raise ValueError(f"reference_size must be >= 1 or None, got {reference_size}")
    predicted = np.asarray(window_predicted).ravel()
    if len(predicted) == 0:
        raise ValueError("window_predicted is empty; a window needs at least one prediction")
    if predicted.min() < 0 or predicted.max() >= n_classes:
        raise ValueError(
            f"predicted classes must lie within [0, {n_classes}), "
            f"got values from {predicted.min()} to {predicted.max()}"
        )
    prior = prior / prior.sum()
    counts = np.bincount(predicted.astype(np.int64), minlength=n_classes).astype(np.float64)
    n = counts.sum()
    observed_share = counts / n
    js = float(distance.jensenshannon(observed_share, prior, base=2))

    present = (counts > 0) | (prior > 0)
    if reference_size is None:
        unexpected = int(counts[prior == 0].sum())
        possible = prior > 0
        observed, expected = counts[possible], prior[possible] * n
        low = expected < MIN_EXPECTED_COUNT
        if low.sum() >= 2:
            observed = np.append(observed[~low], observed[low].sum())
            expected = np.append(expected[~low], expected[low].sum())
        dof = len(observed) - 1 + (unexpected > 0)
        if unexpected:
            statistic, p_value = float("inf"), 0.0
        elif dof < 1:
            statistic, p_value = 0.0, 1.0
        else:
            statistic = float(np.sum((observed - expected) ** 2 / expected))
            p_value = float(stats.chi2.sf(statistic, dof))
    else:
        table = _pool_sparse_columns(np.vstack([prior * reference_size, counts])[:, present])
        dof = table.shape[1] - 1
        if dof < 1:
            statistic, p_value = 0.0, 1.0
        else:
            expected_table = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
            statistic = float(np.sum((table - expected_table) ** 2 / expected_table))
            p_value = float(stats.chi2.sf(statistic, dof))
    return TestResult(
        test="class_distribution",
        statistic=statistic,
        p_value=p_value,
        effect_size=js,
        effect_name="js_distance",
        drifting=_decide(p_value, js, alpha, min_effect),
        details={
            "mode": "goodness_of_fit" if reference_size is None else "homogeneity",
            "degrees_of_freedom": int(dof),
            "window_counts": counts.astype(np.int64).tolist(),
            "reference_prior": prior.tolist(),
        },
    )


def ks_columns(reference: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided KS statistic and asymptotic p-value of each column; non-finite values dropped.

    The p-value is scipy's own asymptotic one (`ks_2samp(method="asymp")`): computed here for
    all columns at once, because hundreds of separate calls would cost more than the window.
    Columns left empty on either side get statistic 0 and p-value 1.
    """
    n_columns = reference.shape[1]
    statistic = np.zeros(n_columns)
    effective_n = np.ones(n_columns)
    for j in range(n_columns):
        ref = np.sort(reference[:, j][np.isfinite(reference[:, j])])
        win = np.sort(window[:, j][np.isfinite(window[:, j])])
        if len(ref) == 0 or len(win) == 0:
            continue
        pooled = np.concatenate([ref, win])
        gap = np.searchsorted(ref, pooled, side="right") / len(ref) - np.searchsorted(
            win, pooled, side="right"
        ) / len(win)
        statistic[j] = np.abs(gap).max()
        effective_n[j] = np.round(len(ref) * len(win) / (len(ref) + len(win)))
    p_value = np.clip(stats.kstwo.sf(statistic, effective_n), 0.0, 1.0)
    return statistic, p_value


def softmax_ks_test(
    reference_probabilities: np.ndarray,
    window_probabilities: np.ndarray,
    alpha: float = 0.01,
    min_effect: float = 0.1,
) -> TestResult:
    """Black-box shift detection: KS on each softmax column, Bonferroni-corrected (p * C).

    The p-value is the smallest corrected one; the effect size is the largest KS statistic among
    the classes significant after correction (among all classes when none is).
    """
    _check_thresholds(alpha, min_effect)
    reference = _two_dimensional(reference_probabilities, "reference_probabilities")
    window = _two_dimensional(window_probabilities, "window_probabilities")
    if reference.shape[1] != window.shape[1]:
        raise ValueError(
            f"reference has {reference.shape[1]} classes but the window has {window.shape[1]}"
        )
    n_classes = reference.shape[1]
    statistic, raw_p = ks_columns(reference, window)
    corrected = np.minimum(raw_p * n_classes, 1.0)
    worst = int(np.argmin(corrected))
    significant = corrected < alpha
    effect = float(statistic[significant].max() if significant.any() else statistic.max())
    p_value = float(corrected[worst])
    return TestResult(
        test="softmax",
        statistic=float(statistic[worst]),
        p_value=p_value,
        effect_size=effect,
        effect_name="max_ks_statistic",
        drifting=_decide(p_value, effect, alpha, min_effect),
        details={
            "class": worst,
            "correction": "bonferroni",
            "statistics": statistic.tolist(),
            "corrected_p_values": corrected.tolist(),
        },
    )


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values (q-values); the smallest is Simes' global p-value."""
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    scaled = p_values[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    result = np.empty(m)
    result[order] = np.minimum(adjusted, 1.0)
    return result


def feature_tests(
    reference_inputs: np.ndarray,
    window_inputs: np.ndarray,
    alpha: float = 0.01,
    min_effect: float = 0.1,
    correction: Literal["bh", "bonferroni"] = "bh",
) -> TestResult:
    """KS on every input feature, corrected for multiple testing (Benjamini-Hochberg default).

    Features holding one and the same value on both sides (constant pixels, unused columns) are
    skipped and not counted in the correction; a feature constant in the reference that varies
    in the window is tested, since that is drift. The effect size is the largest KS statistic
    among the features significant after correction (among all tested ones when none is).
    """
    _check_thresholds(alpha, min_effect)
    if correction not in ("bh", "bonferroni"):
        raise ValueError(f"correction must be 'bh' or 'bonferroni', got {correction!r}")
    reference = _two_dimensional(reference_inputs, "reference_inputs")
    window = _two_dimensional(window_inputs, "window_inputs")
    if reference.shape[1] != window.shape[1]:
        raise ValueError(
            f"reference has {reference.shape[1]} features but the window has {window.shape[1]}"
        )
    both = np.vstack([reference, window])
    finite = np.isfinite(both)
    low = np.where(finite, both, np.inf).min(axis=0)
    high = np.where(finite, both, -np.inf).max(axis=0)
    tested = np.flatnonzero(low < high)
    details: dict[str, object] = {
        "correction": correction,
        "tested_features": len(tested),
        "skipped_constant_features": int(reference.shape[1] - len(tested)),
    }
    if len(tested) == 0:
        return TestResult("features", 0.0, 1.0, 0.0, "max_ks_statistic", False, details)
    statistic, raw_p = ks_columns(reference[:, tested], window[:, tested])
    if correction == "bh":
        adjusted = benjamini_hochberg(raw_p)
    else:
        adjusted = np.minimum(raw_p * len(tested), 1.0)
    significant = adjusted < alpha
    effect = float(statistic[significant].max() if significant.any() else statistic.max())
    ranking = np.lexsort((-statistic, adjusted))[:TOP_FEATURES]
    worst = int(ranking[0])
    p_value = float(adjusted[worst])
    details["significant_features"] = int(significant.sum())
    details["most_drifted"] = [
        {
            "feature": int(tested[i]),
            "statistic": float(statistic[i]),
            "p_value": float(adjusted[i]),
        }
        for i in ranking
    ]
    return TestResult(
        test="features",
        statistic=float(statistic[worst]),
        p_value=p_value,
        effect_size=effect,
        effect_name="max_ks_statistic",
        drifting=_decide(p_value, effect, alpha, min_effect),
        details=details,
    )


def _subsample(points: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if len(points) <= limit:
        return points
    return points[np.sort(rng.choice(len(points), size=limit, replace=False))]


def _pca_project(
    reference: np.ndarray, window: np.ndarray, dims: int
) -> tuple[np.ndarray, np.ndarray]:
    """Both samples on the reference's top `dims` principal axes (fitted on the reference)."""
    centre = reference.mean(axis=0)
    _, _, axes = np.linalg.svd(reference - centre, full_matrices=False)
    basis = axes[:dims].T
    return (reference - centre) @ basis, (window - centre) @ basis


def mmd_permutation_statistics(
    kernel: np.ndarray, m: int, permutations: int, rng: np.random.Generator
) -> np.ndarray:
    """Unbiased MMD² of the first `m` points against the rest, then of `permutations` shuffles.

    All from one kernel matrix: with K's diagonal zeroed and `a` the indicator of the first
    sample, the within-sample sums are aᵀKa and bᵀKb and the cross sum aᵀKb, so every
    permutation costs one column of a single matrix product.
    """
    size = len(kernel)
    n = size - m
    k = kernel.copy()
    np.fill_diagonal(k, 0.0)
    row_sums = k.sum(axis=1)
    total = row_sums.sum()
    membership = np.zeros((size, permutations + 1))
    membership[:m, 0] = 1.0
    for column in range(1, permutations + 1):
        membership[rng.permutation(size)[:m], column] = 1.0
    within_first = np.einsum("ij,ij->j", membership, k @ membership)
    first_to_all = row_sums @ membership
    within_second = total - 2.0 * first_to_all + within_first
    across = first_to_all - within_first
    statistics: np.ndarray = (
        within_first / (m * (m - 1)) + within_second / (n * (n - 1)) - 2.0 * across / (m * n)
    )
    return statistics


def mmd_test(
    reference_embeddings: np.ndarray,
    window_embeddings: np.ndarray,
    rng: np.random.Generator,
    *,
    permutations: int = 200,
    max_reference_points: int = 500,
    max_window_points: int = 1000,
    pca_dims: int | None = None,
    alpha: float = 0.01,
    min_effect: float = 0.05,
) -> TestResult:
    """Maximum mean discrepancy with an RBF kernel and a permutation test.

    Both samples are subsampled with `rng` (cost grows with the square of the points), then
    optionally projected onto the reference's top `pca_dims` principal axes. The bandwidth is
    the median heuristic on the pooled sample, k(x, y) = exp(-|x - y|² / (2 median|x - y|²)),
    which every permutation shares. p = (exceedances + 1) / (permutations + 1): never 0, and
    valid at any number of permutations, so alpha must exceed 1 / (permutations + 1). The
    effect size is MMD = sqrt(max(MMD², 0)), in the units of the kernel's feature space.
    """
    _check_thresholds(alpha, min_effect)
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    for name, value in (
        ("max_reference_points", max_reference_points),
        ("max_window_points", max_window_points),
    ):
        if value < 2:
            raise ValueError(f"{name} must be >= 2, got {value}")
    if pca_dims is not None and pca_dims < 1:
        raise ValueError(f"pca_dims must be >= 1 or None, got {pca_dims}")
    reference = _two_dimensional(reference_embeddings, "reference_embeddings")
    window = _two_dimensional(window_embeddings, "window_embeddings")
    if reference.shape[1] != window.shape[1]:
        raise ValueError(
            f"reference embeddings have {reference.shape[1]} dimensions, the window's "
            f"{window.shape[1]}"
        )
    if len(reference) < 2 or len(window) < 2:
        raise ValueError(
            f"MMD needs at least 2 points per sample, got {len(reference)} and {len(window)}"
        )
    reference = _subsample(reference, max_reference_points, rng)
    window = _subsample(window, max_window_points, rng)
    projected = pca_dims is not None and pca_dims < reference.shape[1]
    if pca_dims is not None and projected:
        reference, window = _pca_project(reference, window, pca_dims)

    pooled = np.vstack([reference, window])
    norms = np.einsum("ij,ij->i", pooled, pooled)
    squared = np.maximum(norms[:, None] + norms[None, :] - 2.0 * (pooled @ pooled.T), 0.0)
    median = float(np.median(squared[np.triu_indices(len(pooled), 1)]))
    bandwidth = median if median > 0 else 1.0  # all points equal: any bandwidth gives MMD 0
    kernel = np.exp(squared * (-0.5 / bandwidth))
    statistics = mmd_permutation_statistics(kernel, len(reference), permutations, rng)
    observed = float(statistics[0])
    exceedances = int(np.sum(statistics[1:] >= observed))
    p_value = (exceedances + 1) / (permutations + 1)
    effect = float(np.sqrt(max(observed, 0.0)))
    return TestResult(
        test="mmd",
        statistic=observed,
        p_value=p_value,
        effect_size=effect,
        effect_name="mmd",
        drifting=_decide(p_value, effect, alpha, min_effect),
        details={
            "permutations": permutations,
            "exceedances": exceedances,
            "bandwidth_squared": bandwidth,
            "reference_points": len(reference),
            "window_points": len(window),
            "dimensions": int(pooled.shape[1]),
        },
    )
