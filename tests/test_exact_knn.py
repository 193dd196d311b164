"""Batch-invariant exact k-th neighbour distances: the same for a row whatever else is batched
with it, and equal to the distance computed directly from the differences."""

from __future__ import annotations

import numpy as np
import pytest

from service.exact_knn import ExactKthDistance, principal_basis
from service.neighbour_index import l2_normalize


def direct_kth(queries: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """The k-th smallest distance, each computed from differences like the class does."""
    result = []
    for query in queries:
        differences = reference - query
        squared = np.einsum("ij,ij->i", differences, differences)
        result.append(np.sqrt(np.sort(squared)[k - 1]))
    return np.asarray(result, dtype=np.float32)


def assert_exact_in_any_batch(
    reference: np.ndarray, queries: np.ndarray, k: int, sizes: tuple[int, ...]
) -> None:
    """The same distances for the whole batch, each row alone and batches of `sizes`, and
    equal to the direct computation; with the queries' lengths measured, and taken as 1 (every
    query here is L2-normalised)."""
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, rtol=1e-6)
    for unit_queries in (False, True):
        search = ExactKthDistance(reference, unit_queries=unit_queries)
        assert_exact_for(search, reference, queries, k, sizes)


def assert_exact_for(
    search: ExactKthDistance,
    reference: np.ndarray,
    queries: np.ndarray,
    k: int,
    sizes: tuple[int, ...],
) -> None:
    whole = search.kth_distance(queries, k)
    np.testing.assert_array_equal(whole, direct_kth(queries, reference, k))
    alone = np.concatenate(
        [search.kth_distance(queries[i : i + 1], k) for i in range(len(queries))]
    )
    np.testing.assert_array_equal(whole, alone)
    for size in sizes:
        parts = [
            search.kth_distance(queries[i : i + size], k) for i in range(0, len(queries), size)
        ]
        np.testing.assert_array_equal(np.concatenate(parts), whole)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    reference = l2_normalize(rng.normal(size=(1500, 64)))
    # Near-duplicates of reference rows (where the |q|^2 + |r|^2 - 2 q.r form cancels worst),
    # exact duplicates, and unrelated points.
    near = reference[:40] + rng.normal(scale=1e-4, size=(40, 64))
    queries = np.vstack(
        [l2_normalize(near), reference[40:60], l2_normalize(rng.normal(size=(40, 64)))]
    )
    return reference, queries.astype(np.float32)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_every_row_gets_the_same_distance_in_any_batch(
    data: tuple[np.ndarray, np.ndarray], k: int
) -> None:
    reference, queries = data
    assert_exact_in_any_batch(reference, queries, k, sizes=(2, 7, 32))


def test_exact_duplicates_are_at_distance_zero(data: tuple[np.ndarray, np.ndarray]) -> None:
    reference, queries = data
    search = ExactKthDistance(reference)
    np.testing.assert_array_equal(search.kth_distance(queries[40:60], 1), np.zeros(20))


def test_ties_and_repeated_reference_rows() -> None:
    reference = np.vstack([np.eye(4)] * 3).astype(np.float32)  # every row three times
    search = ExactKthDistance(reference)
    query = np.array([[1.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    # Three copies at 0, then nine rows at sqrt(2).
    assert search.kth_distance(query, 3).tolist() == [0.0]
    assert search.kth_distance(query, 4)[0] == pytest.approx(np.sqrt(2))
    # An all-zero query is at distance 1 from every unit reference row.
    assert search.kth_distance(np.zeros((1, 4), np.float32), 5).tolist() == [1.0]


def test_k_is_clamped_and_bad_rows_get_nan() -> None:
    search = ExactKthDistance(np.eye(3, dtype=np.float32))
    queries = np.array([[1, 0, 0], [np.nan, 0, 0], [0, 1, 0]], dtype=np.float32)
    result = search.kth_distance(queries, 10)
    assert result[0] == pytest.approx(np.sqrt(2)) and result[2] == pytest.approx(np.sqrt(2))
    assert np.isnan(result[1])


def test_bad_arguments_are_refused() -> None:
    search = ExactKthDistance(np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match=r"queries must have shape \(n, 3\)"):
        search.kth_distance(np.zeros((1, 4), np.float32), 1)
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        search.kth_distance(np.zeros((1, 3), np.float32), 0)
    with pytest.raises(ValueError, match="reference must be a non-empty 2-D array"):
        ExactKthDistance(np.zeros((0, 3), np.float32))


@pytest.fixture(scope="module")
def low_rank() -> tuple[np.ndarray, np.ndarray]:
    """Like a trained network's embeddings: clusters in a few directions, a little noise in
    the rest, so the search works in a projection."""
    rng = np.random.default_rng(5)
    directions = rng.normal(size=(6, 48))
    centres = rng.normal(size=(10, 6)) * 3.0
    labels = rng.integers(0, 10, size=1200)
    points = (centres[labels] + rng.normal(scale=0.5, size=(1200, 6))) @ directions
    reference = l2_normalize(points + rng.normal(scale=0.05, size=points.shape))
    near = reference[:30] + rng.normal(scale=1e-4, size=(30, 48))
    # Off the reference's subspace: the bounds are loose there, and the result still exact.
    novel = rng.normal(size=(30, 48))
    queries = np.vstack([l2_normalize(near), reference[30:50], l2_normalize(novel)])
    return reference, queries.astype(np.float32)


def test_a_low_rank_reference_is_searched_in_its_principal_subspace(
    low_rank: tuple[np.ndarray, np.ndarray],
) -> None:
    reference, _ = low_rank
    search = ExactKthDistance(reference)
    assert search.projected_dim < search.dim // 2
    basis = principal_basis(reference)
    assert basis is not None
    np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-5)


def test_isotropic_or_constant_references_are_searched_in_full(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    reference, _ = data
    assert principal_basis(reference) is None
    assert ExactKthDistance(reference).projected_dim == 64
    assert principal_basis(np.ones((5, 8), dtype=np.float32)) is None


@pytest.mark.parametrize("k", [1, 2, 5, 40])
def test_projected_search_is_exact_and_batch_invariant(
    low_rank: tuple[np.ndarray, np.ndarray], k: int
) -> None:
    reference, queries = low_rank
    assert_exact_in_any_batch(reference, queries, k, sizes=(3, 16))
