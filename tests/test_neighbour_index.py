"""Neighbour indexes: exact distances on hand-made vectors, edge cases, and faiss against exact."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service import neighbour_index
from service.neighbour_index import (
    ExactIndex,
    FaissIvfIndex,
    FloatArray,
    NeighbourIndex,
    build_neighbour_index,
    default_k,
    l2_normalize,
)

SQRT2 = np.float32(math.sqrt(2.0))
E1, E2, E3 = np.eye(3, dtype=np.float32)
# Unit vectors on the axes: from E1 they are at 0 (E1), sqrt(2) (E2) and 2 (-E1).
AXES = np.stack([E1, E2, -E1])


def clustered(size: int, dim: int, seed: int) -> FloatArray:
    """Unit vectors from a seeded mixture of 20 Gaussian clusters, like class embeddings."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(1).standard_normal((20, dim), dtype=np.float32)
    labels = rng.integers(0, len(centers), size)
    return l2_normalize(centers[labels] + 0.5 * rng.standard_normal((size, dim), dtype=np.float32))


def approximate_against_exact(
    index: NeighbourIndex, reference: FloatArray, queries: FloatArray, k: int
) -> tuple[float, FloatArray, FloatArray]:
    """Mean recall of the k-nearest set, and the approximate and exact k-th distances."""
    _, found = index.nearest(queries, k)
    truth_distances, truth = ExactIndex(reference).nearest(queries, k)
    recall = np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)])
    return float(recall), index.kth_distance(queries, k), truth_distances[:, k - 1]


# l2_normalize


def test_l2_normalize_scales_rows_to_unit_length_as_float32() -> None:
    rows = l2_normalize(np.array([[3.0, 4.0], [0.0, -2.0]]))
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, np.array([[0.6, 0.8], [0.0, -1.0]], dtype=np.float32))


def test_l2_normalize_leaves_zero_rows_zero() -> None:
    rows = l2_normalize(np.array([[0.0, 0.0, 0.0], [0.0, 5.0, 0.0]], dtype=np.float32))
    np.testing.assert_array_equal(rows, [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def test_l2_normalize_keeps_an_empty_batch_and_rejects_one_dimensional_input() -> None:
    assert l2_normalize(np.empty((0, 4))).shape == (0, 4)
    with pytest.raises(ValueError, match=r"2-D .* shape \(3,\)"):
        l2_normalize(np.ones(3))


# default_k


@pytest.mark.parametrize(
    ("size", "k"),
    [(0, 1), (1, 1), (1_999, 1), (2_000, 2), (10_000, 10), (49_999, 49), (50_000, 50)],
)
def test_default_k_is_a_thousandth_of_the_reference_clamped(size: int, k: int) -> None:
    assert default_k(size) == k
    assert default_k(10_000_000) == 50


# Exact search on hand-made vectors


def test_exact_kth_distance_on_axis_vectors() -> None:
    index = ExactIndex(AXES)
    queries = np.stack([E1, E3])
    np.testing.assert_array_equal(index.kth_distance(queries, 1), [0.0, SQRT2])
    np.testing.assert_array_equal(index.kth_distance(queries, 2), [SQRT2, SQRT2])
    np.testing.assert_array_equal(index.kth_distance(queries, 3), [2.0, SQRT2])
    assert index.kth_distance(queries, 1).dtype == np.float32


def test_exact_nearest_sorts_distances_and_indices() -> None:
    distances, indices = ExactIndex(AXES).nearest(np.stack([-E1, E2]), 3)
    np.testing.assert_array_equal(distances, [[0.0, SQRT2, 2.0], [0.0, SQRT2, SQRT2]])
    assert indices[0].tolist() == [2, 1, 0]
    assert indices[1, 0] == 1 and sorted(indices[1, 1:].tolist()) == [0, 2]
    assert distances.dtype == np.float32 and indices.dtype == np.int64


def test_zero_query_is_at_distance_one_from_unit_references() -> None:
    # The general form |q|^2 + |r|^2 - 2 q.r; 2 - 2 q.r would give sqrt(2).
    zero = np.zeros((1, 3), dtype=np.float32)
    np.testing.assert_array_equal(ExactIndex(AXES).kth_distance(zero, 1), [1.0])
    np.testing.assert_array_equal(ExactIndex(AXES).nearest(zero, 3)[0], [[1.0, 1.0, 1.0]])


def test_zero_reference_row_is_at_distance_one_from_unit_queries() -> None:
    index = ExactIndex(np.stack([np.zeros(3, dtype=np.float32), E1]))
    distances, indices = index.nearest(np.stack([E1, -E1]), 2)
    np.testing.assert_array_equal(distances, [[0.0, 1.0], [1.0, 2.0]])
    assert indices.tolist() == [[1, 0], [0, 1]]


def test_k_larger_than_the_reference_is_clamped_to_its_size() -> None:
    index = ExactIndex(AXES)
    np.testing.assert_array_equal(index.kth_distance(E1[None, :], 50), [2.0])
    distances, indices = index.nearest(E1[None, :], 50)
    assert distances.shape == indices.shape == (1, 3)


def test_exact_matches_a_full_sort_across_query_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    reference, queries = clustered(500, 16, seed=2), clustered(40, 16, seed=3)
    squared = ((queries[:, None, :] - reference[None, :, :]) ** 2).sum(axis=2)
    expected = np.sqrt(np.sort(squared, axis=1)[:, :7])
    # Blocks of 3 query rows, so several blocks and a short last one are exercised.
    monkeypatch.setattr(neighbour_index, "_EXACT_BLOCK_ELEMENTS", 3 * 500)
    index = ExactIndex(reference)
    distances, indices = index.nearest(queries, 7)
    np.testing.assert_allclose(distances, expected, atol=1e-5)
    np.testing.assert_allclose(index.kth_distance(queries, 7), expected[:, 6], atol=1e-5)
    found = np.sqrt(np.take_along_axis(squared, indices, axis=1))
    np.testing.assert_allclose(found, expected, atol=1e-5)


def test_exact_index_keeps_its_own_copy_of_the_reference() -> None:
    reference = AXES.copy()
    index = ExactIndex(reference)
    reference[:] = 0.0
    np.testing.assert_array_equal(index.kth_distance(E1[None, :], 1), [0.0])


# Validation and bad rows


def test_non_finite_query_rows_get_nan_and_no_neighbours() -> None:
    index = ExactIndex(AXES)
    queries = np.stack([E1, np.array([np.nan, 0.0, 0.0], dtype=np.float32), E2])
    np.testing.assert_array_equal(index.kth_distance(queries, 1), [0.0, np.nan, 0.0])
    distances, indices = index.nearest(queries, 2)
    assert np.isnan(distances[1]).all() and indices[1].tolist() == [-1, -1]
    np.testing.assert_array_equal(distances[[0, 2]], [[0.0, SQRT2], [0.0, SQRT2]])


@pytest.mark.parametrize(
    ("queries", "k", "message"),
    [
        (np.ones((1, 2), dtype=np.float32), 1, r"shape \(n, 3\) .* got \(1, 2\)"),
        (np.ones(3, dtype=np.float32), 1, r"shape \(n, 3\) .* got \(3,\)"),
        (np.ones((1, 3), dtype=np.float32), 0, "k must be at least 1, got 0"),
    ],
)
def test_bad_queries_and_k_are_rejected(queries: FloatArray, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExactIndex(AXES).kth_distance(queries, k)


def test_empty_batches_give_empty_results() -> None:
    empty = np.empty((0, 3), dtype=np.float32)
    for index in (ExactIndex(AXES), FaissIvfIndex(AXES)):
        assert index.kth_distance(empty, 2).shape == (0,)
        distances, indices = index.nearest(empty, 2)
        assert distances.shape == indices.shape == (0, 2)


def test_bad_references_and_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"at least one row .* got \(0, 3\)"):
        build_neighbour_index(np.empty((0, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="reference row 1 holds NaN or inf"):
        build_neighbour_index(np.array([[1.0, 0.0], [np.inf, 0.0]]))
    with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
        build_neighbour_index(AXES, threads=0)
    with pytest.raises(ValueError, match="exact_max_size must be at least 0, got -1"):
        build_neighbour_index(AXES, exact_max_size=-1)


# Choosing the index, and faiss against exact search


def test_build_chooses_exact_up_to_the_limit_and_faiss_above() -> None:
    assert neighbour_index.EXACT_MAX_SIZE > 0
    reference = clustered(300, 8, seed=4)
    assert build_neighbour_index(reference).kind == "exact"
    assert build_neighbour_index(reference, exact_max_size=300).kind == "exact"
    approximate = build_neighbour_index(reference, exact_max_size=299, threads=2)
    assert approximate.kind == "faiss"
    assert (approximate.size, approximate.dim) == (300, 8)


def test_faiss_agrees_with_exact_search_on_clustered_embeddings() -> None:
    reference, queries = clustered(8_000, 32, seed=5), clustered(300, 32, seed=6)
    index = build_neighbour_index(reference, exact_max_size=0)
    recall, kth, exact_kth = approximate_against_exact(index, reference, queries, 10)
    assert recall >= 0.95
    # A missed neighbour can only push the k-th distance out, never in.
    assert (kth >= exact_kth - 1e-6).all()
    assert np.mean(np.isclose(kth, exact_kth, rtol=1e-5, atol=1e-6)) >= 0.9


def test_calibration_raises_nprobe_for_data_without_clusters() -> None:
    rng = np.random.default_rng(7)
    reference = l2_normalize(rng.standard_normal((4_000, 16), dtype=np.float32))
    queries = l2_normalize(rng.standard_normal((200, 16), dtype=np.float32))
    index = FaissIvfIndex(reference)
    assert index.nlist == 63
    assert index.nprobe > math.ceil(0.05 * index.nlist)
    recall, _, _ = approximate_against_exact(index, reference, queries, default_k(4_000))
    assert recall >= 0.95


def test_faiss_fills_k_when_the_probed_cells_hold_fewer_vectors() -> None:
    reference = clustered(400, 8, seed=8)
    queries = clustered(20, 8, seed=9)
    index = FaissIvfIndex(reference, nlist=10, nprobe=1)
    distances, indices = index.nearest(queries, 100)
    assert (indices >= 0).all()
    exact_distances, _ = ExactIndex(reference).nearest(queries, 100)
    np.testing.assert_allclose(distances, exact_distances, atol=1e-5)


def test_faiss_distances_are_euclidean_including_the_zero_query() -> None:
    index = FaissIvfIndex(AXES)
    queries = np.stack([E1, E3, np.zeros(3, dtype=np.float32)])
    np.testing.assert_allclose(
        index.kth_distance(queries, 3), [2.0, math.sqrt(2.0), 1.0], rtol=1e-6
    )
    np.testing.assert_allclose(
        index.kth_distance(queries, 1), [0.0, math.sqrt(2.0), 1.0], atol=1e-6
    )


def test_faiss_rejects_parameters_outside_the_reference() -> None:
    with pytest.raises(ValueError, match="nlist must be between 1 and the reference size 3"):
        FaissIvfIndex(AXES, nlist=4)
    with pytest.raises(ValueError, match="nprobe must be between 1 and nlist 1, got 2"):
        FaissIvfIndex(AXES, nprobe=2)
