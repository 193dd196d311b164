"""Exact k-th nearest-neighbour distances that do not depend on how queries are batched.

One matrix product ranks every reference for a whole batch of queries, but BLAS rounds a
product differently for different batch sizes (a one-row product takes another kernel than a
32-row one): the same embedding would get a novelty score differing in the last bits, and after
the cancellation in |q|^2 + |r|^2 - 2 q.r by up to 5e-4 for near-duplicates, depending on what
else was in its batch. With the adaptive batcher gathering requests, a request's scores must not
depend on its neighbours in the queue.

So the product only selects candidates, and it does so in a smaller space. Distances between
projections onto an orthonormal basis are never larger than the distances themselves, so the
product of the projections gives a lower bound for every reference. The k references with the
smallest bounds give an upper bound U for the k-th distance: their true distances, computed
from the differences. Every reference whose lower bound is within U plus a rounding tolerance
is a candidate; that set provably holds the true k nearest. Their distances are then computed
from the differences, row by row, which is exact to float32 rounding and the same whatever the
batch, and the result is the k-th smallest of those.

The basis is the reference's principal subspace that holds 97 % of its variance
(`principal_basis`). Embeddings of a trained network are far from isotropic: the digits
model's 64-dimensional embeddings need 16 dimensions, and its held-out queries then get 2.5
candidates on average (6 at the 95th percentile). The product touches a quarter of the memory,
which on the request path, where the caches are cold after every batch's HTTP work, is most of
its cost. Where the variance is spread over more than half the dimensions the projection would
not pay, and the full vectors are used, with the same algorithm.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.intp]

_EPS = float(np.finfo(np.float32).eps)
# Bounds the [queries x references] block held at once (16 MiB), as the exact index does.
_BLOCK_ELEMENTS = 1 << 22


# The share of the reference's variance its principal basis keeps.
_BASIS_VARIANCE = 0.97


def principal_basis(rows: FloatArray) -> FloatArray | None:
    """Orthonormal columns [d, p] spanning the reference's principal subspace that holds
    `_BASIS_VARIANCE` of its variance; None when that takes more than half the d dimensions
    (or the reference has no variance)."""
    centred = rows.astype(np.float64) - rows.mean(axis=0, dtype=np.float64)
    # Eigenvectors of the d x d scatter matrix: cheaper than an SVD of the rows for large
    # references, and as exact as needed (any orthonormal basis gives valid bounds).
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred)
    eigenvalues = np.clip(eigenvalues[::-1], 0.0, None)
    total = float(eigenvalues.sum())
    if total <= 0.0:
        return None
    kept = int(np.searchsorted(np.cumsum(eigenvalues) / total, _BASIS_VARIANCE)) + 1
    if kept > rows.shape[1] // 2:
        return None
    basis: FloatArray = np.ascontiguousarray(eigenvectors[:, ::-1][:, :kept], dtype=np.float32)
    return basis


class ExactKthDistance:
    """k-th nearest-neighbour Euclidean distance to a fixed reference, batch-invariant."""

    def __init__(self, reference: npt.ArrayLike, *, unit_queries: bool = False) -> None:
        """`unit_queries`: every query will be L2-normalised (length 1 up to rounding, or 0),
        so the rounding tolerance need not measure the queries' lengths."""
        rows = np.array(reference, dtype=np.float32, copy=True)
        if rows.ndim != 2 or len(rows) == 0:
            raise ValueError(f"reference must be a non-empty 2-D array, got shape {rows.shape}")
        self._reference = rows
        self._basis = principal_basis(rows)
        projected = rows if self._basis is None else rows @ self._basis
        # -2 r' per projected reference, transposed, with |r'|^2 as one more row: a projected
        # query with a 1 appended, times this, is |r'|^2 - 2 q'.r', the projected squared
        # distance less |q'|^2 (the same for every reference of a query), in one product.
        norms = np.einsum("ij,ij->i", projected, projected)
        self._cross = np.ascontiguousarray(np.vstack([-2.0 * projected.T, norms[None, :]]))
        # The appended 1s, for blocks of up to this many queries.
        self._ones = np.ones((max(1, _BLOCK_ELEMENTS // len(rows)), 1), dtype=np.float32)
        # The rounding bound of one approximate squared distance, with room to spare: float32
        # dot products of dimension d + 1 err by at most about (d + 1) * eps * (2 |q| |r| +
        # |r|^2), and projecting the query adds about as much again. A wider bound only adds
        # candidates, which cannot change the result.
        scale = max(1.0, float(np.einsum("ij,ij->i", rows, rows).max()))
        self._tolerance_per_query_norm = 16.0 * (rows.shape[1] + 1) * _EPS * scale
        # A unit query's squared length is 1 to within a few eps, which the 16x spare covers.
        self._unit_tolerance = self._tolerance_per_query_norm if unit_queries else None

    @property
    def size(self) -> int:
        return len(self._reference)

    @property
    def dim(self) -> int:
        return int(self._reference.shape[1])

    @property
    def projected_dim(self) -> int:
        """Dimensions the candidate search works in (`dim` when there is no projection)."""
        return self.dim if self._basis is None else int(self._basis.shape[1])

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
        if not np.isfinite(rows).all():
            finite = np.isfinite(rows).all(axis=1)
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

    def _squared(
        self, queries: FloatArray, query_of: IntArray, reference_of: IntArray
    ) -> FloatArray:
        """Squared distances of the given (query, reference) pairs, from their differences."""
        differences = self._reference[reference_of] - queries[query_of]
        squared: FloatArray = np.einsum("ij,ij->i", differences, differences)
        return squared

    def _kth(self, queries: FloatArray, k: int) -> FloatArray:
        # On the request path this runs once per inference batch, with cold caches: its cost
        # is mostly the number of numpy calls, which the k = 1 case keeps to about fifteen.
        n = len(queries)
        projected = queries if self._basis is None else queries @ self._basis
        # Lower bounds of the squared distances, less |q'|^2 per row.
        ranks: FloatArray = np.concatenate((projected, self._ones[:n]), axis=1) @ self._cross
        # One tolerance for the block, from its largest query; a wider one only adds candidates.
        tolerance = self._unit_tolerance
        if tolerance is None:
            largest_norm = float(np.einsum("ij,ij->i", queries, queries).max())
            tolerance = self._tolerance_per_query_norm * max(largest_norm, 1.0)
        # A reference is a candidate when ranks + |q'|^2 <= upper + tolerance.
        slack = tolerance - np.einsum("ij,ij->i", projected, projected)
        if k == 1:
            # The approximate nearest; its true distance bounds the nearest one from above.
            nearest = ranks.argmin(axis=1)
            differences = self._reference[nearest] - queries
            upper: FloatArray = np.einsum("ij,ij->i", differences, differences)
            candidates = ranks <= (upper + slack)[:, None]
            # Each query's measured nearest is among its candidates (the tolerance bounds the
            # rounding of its lower bound), so a count above n means other candidates.
            if np.count_nonzero(candidates) > n:
                # The smallest of their true distances and the one already measured.
                # (np.nonzero of the mask gives the pairs in one call, at ten times the cost.)
                query_of, reference_of = np.divmod(np.flatnonzero(candidates), self.size)
                np.minimum.at(upper, query_of, self._squared(queries, query_of, reference_of))
            # Else the common case: each query's one candidate is the one already measured.
            result: FloatArray = np.sqrt(upper)
            return result
        # The largest true distance of k references with small lower bounds.
        chosen = _k_low_columns(ranks, k)
        pairs = self._squared(queries, np.repeat(np.arange(n), k), chosen.ravel())
        upper = pairs.reshape(n, k).max(axis=1)
        candidates = ranks <= (upper + slack)[:, None]
        # The measured references are candidates whatever the rounding, so every query keeps
        # at least k.
        candidates[np.repeat(np.arange(n), k), chosen.ravel()] = True
        # Row-major: candidates come out grouped by query, in query order.
        query_of, reference_of = np.divmod(np.flatnonzero(candidates), self.size)
        squared = self._squared(queries, query_of, reference_of)
        starts = np.searchsorted(query_of, np.arange(n))
        # Sorted by query, then by distance: the k-th of each query's group.
        order = np.lexsort((squared, query_of))
        kth: FloatArray = np.sqrt(squared[order][starts + k - 1])
        return kth


def _k_low_columns(values: FloatArray, k: int) -> IntArray:
    """Per row, the columns [n, k] of k distinct elements that are among the smallest.

    They need not be the k smallest, only small: their true distances bound the k-th one from
    above, and a tighter bound only means fewer candidates. np.argpartition costs about 6 ns
    per element; for a wide row, the argmin of each of 8k contiguous chunks takes one
    vectorised pass, and the k chunks with the smallest minima give k distinct columns.
    """
    n, size = values.shape
    if k == 1:
        lowest: IntArray = values.argmin(axis=1)[:, None]
        return lowest
    chunks = 8 * k
    if size < 4 * chunks:
        partitioned: IntArray = np.argpartition(values, k - 1, axis=1)[:, :k]
        return partitioned
    length = size // chunks
    blocks = values[:, : chunks * length].reshape(n, chunks, length)
    within = blocks.argmin(axis=2)
    minima = np.take_along_axis(blocks, within[:, :, None], axis=2)[:, :, 0]
    best = np.argpartition(minima, k - 1, axis=1)[:, :k]
    columns: IntArray = best * length + np.take_along_axis(within, best, axis=1)
    return columns
