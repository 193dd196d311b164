"""Nearest-neighbour search over reference embeddings, for deep-kNN novelty.

Novelty of a prediction is the Euclidean distance from its L2-normalised embedding to the k-th
nearest L2-normalised reference embedding (Sun et al. 2022, "Out-of-Distribution Detection with
Deep Nearest Neighbors"). Small references are searched exactly with numpy; larger ones with a
faiss IVF-Flat index whose probe count is calibrated against exact search when it is built.
`bench/novelty_search.py` measures both, and the contenders that lost, on 1k, 10k and 100k
references.

The indexes compute plain Euclidean distances between the vectors they are given; callers pass
`l2_normalize`d vectors. Distances use the general form sqrt(|q|^2 + |r|^2 - 2 q.r) rather than
sqrt(2 - 2 q.r), so an all-zero query (no direction, norm 0) is at distance exactly 1 from
every unit reference instead of sqrt(2).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import faiss
import numpy as np
import numpy.typing as npt
from threadpoolctl import ThreadpoolController

FloatArray = npt.NDArray[np.float32]
IndexArray = npt.NDArray[np.int64]

# The largest reference, at dim 64, that exact search answers one query for in under 1 ms
# (p50). Measured with `bench/novelty_search.py --threshold-only` (ExactIndex.kth_distance on
# one row, 1,000 queries per size after 50 warm-up calls, one BLAS thread, 2-core AMD EPYC),
# and an earlier loop of the same computation; runs with and without this machine's
# OPENBLAS_CORETYPE=Haswell. p50 at 90k: 0.49-0.77 ms in all 8 runs; at 100k: 0.63-1.10 ms,
# over 1 ms in 1 of 10; at 110k: 0.94-1.19 ms. Cost follows size x dim, reaching 1 ms at
# about 7M floats: at dim 256 the limit is 25k (0.56-0.86 ms; 30k took 0.80-1.19), at dim 1024
# it is 6k (0.46-0.65 ms): build_neighbour_index scales the limit by dim (EXACT_MAX_ELEMENTS).
EXACT_MAX_SIZE = 90_000
EXACT_MAX_ELEMENTS = EXACT_MAX_SIZE * 64

# Sun et al. 2022 use k=50 with the full 50,000-image CIFAR-10 training set; scaling k with the
# reference size keeps the same fraction (0.1%) of the reference inside the neighbourhood.
_DEFAULT_K_MAX = 50
_REFERENCES_PER_NEIGHBOUR = 1000

# faiss k-means wants at least 39 training points per centroid and warns below that.
_MIN_POINTS_PER_LIST = 39
# Probing 5% of sqrt(N) lists gave recall 0.99-1.0 on clustered embeddings at 100k x 64
# (bench data); calibration raises it where the data needs more.
_START_PROBE_FRACTION = 0.05
_CALIBRATION_QUERIES = 256
# Above the required 0.95: calibration queries are reference rows, and fresh or novel queries
# recall a little less than those.
_CALIBRATION_RECALL = 0.98
# Bounds the [queries x references] distance block exact search holds at once (16 MiB).
_EXACT_BLOCK_ELEMENTS = 1 << 22


def l2_normalize(x: npt.ArrayLike) -> FloatArray:
    """Each row scaled to unit length, as float32. All-zero rows stay zero instead of NaN."""
    rows = np.asarray(x, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"expected a 2-D array of row vectors, got shape {rows.shape}")
    # einsum rather than np.linalg.norm: the same result at a third of the call overhead,
    # which matters on the request path where a batch is often one row.
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))[:, None]
    # Dividing by 1 leaves a zero row at zero; a NaN or inf row still comes out NaN.
    norms[norms == 0.0] = 1.0
    normalized: FloatArray = rows / norms
    return normalized


def default_k(reference_size: int) -> int:
    """Which neighbour's distance is the novelty score, for a reference of this size.

    k=50 is the literature default for a 50,000-sample reference (Sun et al. 2022, CIFAR-10).
    k scales with the reference so the neighbourhood stays about 0.1% of it: a fixed k=50 on a
    1,000-sample reference would reach across whole classes, while k=1 on 50,000 samples makes
    the score hinge on single, possibly mislabelled, points. Clamped to [1, 50]: past 50 the
    score changes little and search gets slower.
    """
    return min(_DEFAULT_K_MAX, max(1, reference_size // _REFERENCES_PER_NEIGHBOUR))


class NeighbourIndex(ABC):
    """Euclidean k-nearest-neighbour search over a fixed reference set.

    Queries are float rows of the index's dimension, already normalised like the reference.
    A k larger than the reference is clamped to its size, so a small reference still yields
    a score (the distance to its farthest point). A query row holding NaN or inf gets NaN
    distances and index -1 instead of an error: one bad embedding should not fail the request
    that carries it.
    """

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of reference vectors."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Dimension of the reference vectors."""

    @property
    @abstractmethod
    def kind(self) -> str:
        """Either "exact" or the name of the approximate-search library."""

    def kth_distance(self, queries: npt.ArrayLike, k: int) -> FloatArray:
        """Distance from each query to its k-th nearest reference, float32 [n_queries]."""
        rows, k, finite = self._prepare(queries, k)
        if finite.all():
            return self._kth_distance(rows, k)
        result = np.full(len(rows), np.nan, dtype=np.float32)
        if finite.any():
            result[finite] = self._kth_distance(rows[finite], k)
        return result

    def nearest(self, queries: npt.ArrayLike, k: int) -> tuple[FloatArray, IndexArray]:
        """Distances float32 [n, k] and reference row indices int64 [n, k], nearest first."""
        rows, k, finite = self._prepare(queries, k)
        if finite.all():
            return self._nearest(rows, k)
        distances = np.full((len(rows), k), np.nan, dtype=np.float32)
        indices = np.full((len(rows), k), -1, dtype=np.int64)
        if finite.any():
            distances[finite], indices[finite] = self._nearest(rows[finite], k)
        return distances, indices

    @abstractmethod
    def _kth_distance(self, queries: FloatArray, k: int) -> FloatArray: ...

    @abstractmethod
    def _nearest(self, queries: FloatArray, k: int) -> tuple[FloatArray, IndexArray]: ...

    def _prepare(
        self, queries: npt.ArrayLike, k: int
    ) -> tuple[FloatArray, int, npt.NDArray[np.bool_]]:
        rows = np.ascontiguousarray(queries, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(
                f"queries must have shape (n, {self.dim}) for this index, got {rows.shape}"
            )
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        finite = np.asarray(np.isfinite(rows).all(axis=1))
        return rows, min(k, self.size), finite


def _distances(squared: FloatArray) -> FloatArray:
    # Rounding can leave a tiny negative where the true squared distance is 0.
    result: FloatArray = np.sqrt(np.maximum(squared, np.float32(0.0)))
    return result


class ExactIndex(NeighbourIndex):
    """Brute force: one matrix product against the whole reference per block of queries."""

    def __init__(
        self, reference: npt.ArrayLike, *, threads: int = 1, manage_blas_threads: bool = True
    ) -> None:
        # A copy, so a caller reusing its array cannot change the reference under the index.
        self._reference = _checked_reference(reference, copy=True)
        self._squared_norms = np.einsum("ij,ij->i", self._reference, self._reference)
        self._threads = _checked_threads(threads)
        # A process that limits BLAS threads once at start (the service does) passes False:
        # setting and restoring them costs about 13 us per search, twice the search itself
        # at a reference of 1,000.
        self._manage_blas_threads = manage_blas_threads
        # numpy's BLAS threads by default, and with two BLAS threads on this 2-core machine
        # single-query p90 went from 0.2 ms to 9 ms (40k x 64). The thread count is
        # process-global, so it is set only around our products and restored after (about
        # 2 us). Concurrent searches may restore each other's value: that changes speed only,
        # never results.
        self._blas = ThreadpoolController().select(user_api="blas").lib_controllers

    @property
    def size(self) -> int:
        return len(self._reference)

    @property
    def dim(self) -> int:
        return int(self._reference.shape[1])

    @property
    def kind(self) -> str:
        return "exact"

    def _kth_distance(self, queries: FloatArray, k: int) -> FloatArray:
        result = np.empty(len(queries), dtype=np.float32)
        for rows in self._row_blocks(len(queries)):
            block = self._partial_squared(queries[rows])
            # Partition, not sort: only the k-th smallest is needed, in O(size) per query.
            result[rows] = np.partition(block, k - 1, axis=1)[:, k - 1]
        return _distances(result + _squared_norms(queries))

    def _nearest(self, queries: FloatArray, k: int) -> tuple[FloatArray, IndexArray]:
        distances = np.empty((len(queries), k), dtype=np.float32)
        indices = np.empty((len(queries), k), dtype=np.int64)
        for rows in self._row_blocks(len(queries)):
            block = self._partial_squared(queries[rows])
            candidates = np.argpartition(block, k - 1, axis=1)[:, :k]
            partial = np.take_along_axis(block, candidates, axis=1)
            order = np.argsort(partial, axis=1, kind="stable")
            indices[rows] = np.take_along_axis(candidates, order, axis=1)
            distances[rows] = np.take_along_axis(partial, order, axis=1)
        return _distances(distances + _squared_norms(queries)[:, None]), indices

    def _row_blocks(self, n_queries: int) -> list[slice]:
        step = max(1, _EXACT_BLOCK_ELEMENTS // self.size)
        return [slice(start, start + step) for start in range(0, n_queries, step)]

    def _partial_squared(self, queries: FloatArray) -> FloatArray:
        """|r|^2 - 2 q.r for every query and reference; adding |q|^2 gives squared distances.

        |q|^2 is constant along a row, so ranking and partitioning happen without it and it
        is added to the k values kept, not to every reference.
        """
        if not self._manage_blas_threads:
            block: FloatArray = queries @ self._reference.T
            block *= -2.0
            block += self._squared_norms
            return block
        saved = [blas.get_num_threads() for blas in self._blas]
        for blas in self._blas:
            blas.set_num_threads(self._threads)
        try:
            block = queries @ self._reference.T
        finally:
            for blas, threads in zip(self._blas, saved, strict=True):
                blas.set_num_threads(threads)
        block *= -2.0
        block += self._squared_norms
        return block


class FaissIvfIndex(NeighbourIndex):
    """faiss IndexIVFFlat: k-means cells over the reference, and exact distances within the
    `nprobe` cells nearest to each query.

    Chosen by measurement over faiss HNSW-Flat and usearch HNSW (M=32, ef 128 and 512) with
    bench/novelty_search.py at 100k x 64, one thread: build 0.6-1.0 s against 6-8 s, p50 55 us
    against 120-410 us, recall 0.994 against 0.952-0.982, 26 MB against 53 MB, and on novel
    queries (clusters absent from the reference) recall 0.94 with k-th distance errors under
    1%, where HNSW's greedy walk got stuck (recall 0.55-0.82, worst errors 5-135%).
    Its weakness is data without cluster structure, where a fixed nprobe loses recall (0.34 at
    5% of the lists on isotropic data). So unless `nprobe` is given it is calibrated at build:
    the smallest probe count, raised by half at a time from 5% of the lists, whose recall of
    the `default_k` nearest set against exact search is at least 0.98 on 256 seeded reference
    rows (each leaving itself out). On isotropic data that climbs to nearly every list, as
    slow as exact search but as accurate.
    """

    def __init__(
        self,
        reference: npt.ArrayLike,
        *,
        nlist: int | None = None,
        nprobe: int | None = None,
        threads: int = 1,
        seed: int = 0,
    ) -> None:
        # No copy: faiss copies the vectors into its own storage.
        vectors = _checked_reference(reference, copy=False)
        self._threads = _checked_threads(threads)
        n, dim = vectors.shape
        # sqrt(N) cells balances scanning the centroids against scanning the probed cells.
        self._nlist = nlist if nlist is not None else _default_nlist(n)
        if not 1 <= self._nlist <= n:
            raise ValueError(f"nlist must be between 1 and the reference size {n}, got {nlist}")
        self._index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, self._nlist)
        self._index.cp.seed = seed
        faiss.omp_set_num_threads(self._threads)
        self._index.train(vectors)
        self._index.add(vectors)
        if nprobe is None:
            nprobe = self._calibrated_nprobe(vectors, seed)
        if not 1 <= nprobe <= self._nlist:
            raise ValueError(f"nprobe must be between 1 and nlist {self._nlist}, got {nprobe}")
        self._index.nprobe = nprobe

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def kind(self) -> str:
        return "faiss"

    @property
    def nlist(self) -> int:
        return self._nlist

    @property
    def nprobe(self) -> int:
        return int(self._index.nprobe)

    def _kth_distance(self, queries: FloatArray, k: int) -> FloatArray:
        distances, _ = self._nearest(queries, k)
        kth: FloatArray = distances[:, k - 1]
        return kth

    def _nearest(self, queries: FloatArray, k: int) -> tuple[FloatArray, IndexArray]:
        squared, indices = self._search(queries, k, self.nprobe)
        # The probed cells can hold fewer than k vectors (faiss pads with -1): search those
        # rows again over every cell, which is exact and always finds k.
        short = indices[:, k - 1] < 0
        if short.any():
            squared[short], indices[short] = self._search(queries[short], k, self._nlist)
        # IVF-Flat returns squared L2 computed from differences, so never negative.
        return np.sqrt(squared), indices

    def _search(self, queries: FloatArray, k: int, nprobe: int) -> tuple[FloatArray, IndexArray]:
        # faiss's OpenMP thread count is process-global: set it before every call so this
        # index runs with its own setting whatever another index set last.
        faiss.omp_set_num_threads(self._threads)
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        return self._index.search(queries, k, params=params)

    def _calibrated_nprobe(self, vectors: FloatArray, seed: int) -> int:
        n = len(vectors)
        if self._nlist == 1:
            return 1
        k = min(default_k(n), n - 1)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(_CALIBRATION_QUERIES, n), replace=False))
        queries = vectors[sample]
        # k + 1 because each calibration query finds itself first; it is excluded below.
        _, truth = ExactIndex(vectors, threads=self._threads).nearest(queries, k + 1)
        nprobe = max(1, math.ceil(_START_PROBE_FRACTION * self._nlist))
        while nprobe < self._nlist:
            _, found = self._search(queries, k + 1, nprobe)
            if _recall(found, truth, sample) >= _CALIBRATION_RECALL:
                return nprobe
            nprobe = min(self._nlist, math.ceil(nprobe * 1.5))
        return self._nlist


def _recall(found: IndexArray, truth: IndexArray, own_rows: IndexArray) -> float:
    """Mean share of each true neighbour set that was found, leaving out the query's own row."""
    shares = []
    for row, (found_row, truth_row) in enumerate(zip(found, truth, strict=True)):
        expected = set(truth_row.tolist()) - {int(own_rows[row])}
        shares.append(len(expected & set(found_row.tolist())) / max(1, len(expected)))
    return float(np.mean(shares))


def _default_nlist(size: int) -> int:
    return max(1, min(round(math.sqrt(size)), size // _MIN_POINTS_PER_LIST))


def _squared_norms(rows: FloatArray) -> FloatArray:
    result: FloatArray = np.einsum("ij,ij->i", rows, rows)
    return result


def _checked_reference(reference: npt.ArrayLike, *, copy: bool) -> FloatArray:
    vectors = (np.array if copy else np.ascontiguousarray)(reference, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] < 1 or vectors.shape[1] < 1:
        raise ValueError(
            f"reference must be a 2-D array with at least one row and column, got {vectors.shape}"
        )
    if not np.isfinite(vectors).all():
        bad = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
        raise ValueError(f"reference row {bad} holds NaN or inf")
    return vectors


def _checked_threads(threads: int) -> int:
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return threads


def build_neighbour_index(
    reference: npt.ArrayLike,
    exact_max_size: int | None = None,
    threads: int = 1,
    manage_blas_threads: bool = True,
) -> NeighbourIndex:
    """Exact search for references of up to `exact_max_size` rows, faiss IVF-Flat above that.

    Without `exact_max_size`, the limit follows the cost of exact search, size x dim: 90,000
    rows at dim 64 (EXACT_MAX_ELEMENTS), 22,500 at dim 256 (measured 25k), 5,625 at dim 1024
    (measured 6k). One thread by default: onnxruntime and the web server share the cores.
    """
    if exact_max_size is not None and exact_max_size < 0:
        raise ValueError(f"exact_max_size must be at least 0, got {exact_max_size}")
    # The index validates the reference; a malformed one counts as small so ExactIndex says why.
    size = np.shape(reference)[0] if np.ndim(reference) == 2 else 0
    if exact_max_size is None:
        dim = max(1, np.shape(reference)[1]) if np.ndim(reference) == 2 else 1
        exact_max_size = EXACT_MAX_ELEMENTS // dim
    if size <= exact_max_size:
        return ExactIndex(reference, threads=threads, manage_blas_threads=manage_blas_threads)
    return FaissIvfIndex(reference, threads=threads)
