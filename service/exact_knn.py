"""Exact k-th nearest-neighbour distances that do not depend on how queries are batched.

One matrix product ranks every reference for a whole batch of queries, but BLAS rounds a
product differently for different batch sizes (a one-row product takes another kernel than a
32-row one): the same embedding would get a novelty score differing in the last bits, and after
the cancellation in |q|^2 + |r|^2 - 2 q.r by up to 5e-4 for near-duplicates, depending on what
else was in its batch. With the adaptive batcher gathering requests, a request's scores must not
depend on its neighbours in the queue.

So the product only selects candidates: every reference whose approximate squared distance is
within a rounding bound of the approximate k-th smallest. That set provably holds the true k
nearest, and their distances are then computed from the differences, row by row, which is
exact to float32 rounding and the same whatever the batch. The result is the k-th smallest of
those, at about the cost of the plain product (the candidate sets are a handful of rows).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

_EPS = float(np.finfo(np.float32).eps)
# Bounds the [queries x references] block held at once (16 MiB), as the exact index does.
_BLOCK_ELEMENTS = 1 << 22
_PRODUCT_ROWS = 8


class ExactKthDistance:
    """k-th nearest-neighbour Euclidean distance to a fixed reference, batch-invariant."""

    def __init__(self, reference: npt.ArrayLike) -> None:
        rows = np.array(reference, dtype=np.float32, copy=True)
        if rows.ndim != 2 or len(rows) == 0:
            raise ValueError(f"reference must be a non-empty 2-D array, got shape {rows.shape}")
        self._reference = rows
        squared_norms = np.einsum("ij,ij->i", rows, rows)
        # [-2 r, |r|^2] per reference, transposed: one product with [q, 1] gives |r|^2 - 2 q.r,
        # which ranks references like the squared distance (|q|^2 is the same per query),
        # without two more passes over the [queries x references] block.
        self._ranking = np.ascontiguousarray(np.vstack([-2.0 * rows.T, squared_norms[None, :]]))
        # The rounding bound of one approximate squared distance, times two (see module doc):
        # float32 dot products of dimension d + 1 err by at most about
        # (d + 1) * eps * (2 |q| |r| + |r|^2).
        scale = max(1.0, float(squared_norms.max()))
        self._tolerance_per_query_norm = 8.0 * (rows.shape[1] + 1) * _EPS * scale

    @property
    def size(self) -> int:
        return len(self._reference)

    @property
    def dim(self) -> int:
        return int(self._reference.shape[1])

    def kth_distance(self, queries: npt.ArrayLike, k: int) -> FloatArray:
        """Distance from each query row to its k-th nearest reference, float32 [n_queries].

        k is clamped to the reference size; a row holding NaN or infinity gets NaN.
        """
        rows = np.ascontiguousarray(queries, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (n, {self.dim}), got {rows.shape}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, self.size)
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            result = np.full(len(rows), np.nan, dtype=np.float32)
            if finite.any():
                result[finite] = self.kth_distance(rows[finite], k)
            return result
        step = max(1, _BLOCK_ELEMENTS // self.size)
        if len(rows) <= step:
            return self._kth(rows, k)
        return np.concatenate(
            [self._kth(rows[start : start + step], k) for start in range(0, len(rows), step)]
        )

    def _ranks(self, queries: FloatArray) -> FloatArray:
        """|r|^2 - 2 q.r for every query and reference, in blocks of 8 query rows: OpenBLAS
        takes a slower kernel from about 12 rows (16 rows: 35 us in one product, 29 us in two,
        at 1,347 x 64)."""
        augmented = np.ones((len(queries), self.dim + 1), dtype=np.float32)
        augmented[:, :-1] = queries
        if len(queries) <= _PRODUCT_ROWS:
            ranks: FloatArray = augmented @ self._ranking
            return ranks
        ranks = np.empty((len(queries), self.size), dtype=np.float32)
        for start in range(0, len(queries), _PRODUCT_ROWS):
            stop = start + _PRODUCT_ROWS
            np.matmul(augmented[start:stop], self._ranking, out=ranks[start:stop])
        return ranks

    def _kth(self, queries: FloatArray, k: int) -> FloatArray:
        approximate = self._ranks(queries)
        nearest_index = None
        if k == 1:
            # One pass finds each row's approximate nearest; its value is the bound.
            nearest_index = approximate.argmin(axis=1)
            bound = approximate[np.arange(len(queries)), nearest_index]
        else:
            bound = _kth_smallest_bound(approximate, k)
        # One bound for the block, from its largest query: a wider bound only adds candidates,
        # which cannot change the result.
        largest_norm = float(np.einsum("ij,ij->i", queries, queries).max())
        tolerance = self._tolerance_per_query_norm * max(largest_norm, 1.0)
        candidates = approximate <= (bound + tolerance)[:, None]
        if nearest_index is not None and np.count_nonzero(candidates) == len(queries):
            # The common case: one candidate per query, the approximate nearest.
            differences = self._reference[nearest_index] - queries
            nearest: FloatArray = np.sqrt(np.einsum("ij,ij->i", differences, differences))
            return nearest
        # Row-major: candidates come out grouped by query, in query order.
        query_of, reference_of = np.divmod(np.flatnonzero(candidates), self.size)
        differences = self._reference[reference_of] - queries[query_of]
        squared = np.einsum("ij,ij->i", differences, differences)
        starts = np.searchsorted(query_of, np.arange(len(queries)))
        if k == 1:
            kth_squared = np.minimum.reduceat(squared, starts)
        else:
            # Sorted by query, then by distance: the k-th of each query's group.
            order = np.lexsort((squared, query_of))
            kth_squared = squared[order][starts + k - 1]
        result: FloatArray = np.sqrt(kth_squared)
        return result


def _kth_smallest_bound(values: FloatArray, k: int) -> FloatArray:
    """Per row, a value at least the k-th smallest and usually equal to it.

    np.partition costs about 6 ns per element; the minima of 8k contiguous chunks (and of the
    remainder) take one vectorised pass, and the k-th smallest of those minima is at least the
    row's k-th smallest (they are k distinct elements). Candidates up to that bound are then a
    few more than k.
    """
    if k == 1:
        minima: FloatArray = values.min(axis=1)
        return minima
    n, size = values.shape
    chunks = 8 * k
    if size < 4 * chunks:
        partitioned: FloatArray = np.partition(values, k - 1, axis=1)[:, k - 1]
        return partitioned
    length = size // chunks
    chunk_minima = values[:, : chunks * length].reshape(n, chunks, length).min(axis=2)
    if size % chunks:
        chunk_minima = np.hstack([chunk_minima, values[:, chunks * length :].min(axis=1)[:, None]])
    bound: FloatArray = np.partition(chunk_minima, k - 1, axis=1)[:, k - 1]
    return bound
