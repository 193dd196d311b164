"""Novelty search: exact numpy search against approximate-nearest-neighbour indexes.

    .venv/bin/python bench/novelty_search.py [--output bench/results/novelty_search.json]
                                             [--sizes 1000,10000,100000] [--dim 64]
                                             [--queries 1000] [--threads 1]
                                             [--data mixture|isotropic] [--seed 0]
                                             [--skip-threshold | --threshold-only]

Data (seeded): unit vectors from a Gaussian mixture of 50 clusters with spreads between 0.35
and 0.7, like a classifier's embeddings of its training classes. Queries are fresh draws: 90%
from the same clusters and 10% from 10 held-out clusters, the novel inputs novelty search
exists for. `--data isotropic` draws everything from one isotropic Gaussian instead: no
cluster structure, the worst case for approximate search.

Every contender answers the same queries with k = default_k(size), single-threaded by default
(`--threads`), in this one invocation. For each reference size and contender: build time, p50
and p99 latency of single-query calls (each timed with perf_counter_ns after a warm-up),
throughput in batches of 64, recall of the k-nearest set against exact search (all queries and
the novel ones), the relative error of the k-th distance (the novelty score), and the index's
size. Ratios are against exact search, the baseline: a latency ratio below 1 is faster.

The exact_threshold section times exact search alone for one query at growing sizes and dims
64, 256 and 1024; it is where the default exact_max_size in service/neighbour_index.py
comes from.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_info
from usearch.index import Index as UsearchIndex

from service.neighbour_index import (
    ExactIndex,
    FaissIvfIndex,
    FloatArray,
    IndexArray,
    default_k,
    l2_normalize,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "novelty_search.json"
PACKAGES = ("numpy", "faiss-cpu", "usearch", "threadpoolctl")
CLUSTERS = 50
NOVEL_CLUSTERS = 10
NOVEL_FRACTION = 0.1
WARM_UP_QUERIES = 50
BATCH = 64
BATCH_PASSES = 3
THRESHOLD_SIZES = {
    64: (10_000, 20_000, 40_000, 60_000, 70_000, 80_000, 90_000, 100_000, 110_000, 120_000),
    256: (5_000, 10_000, 15_000, 20_000, 25_000, 30_000, 35_000),
    1024: (2_000, 4_000, 6_000, 8_000),
}


class Searcher(Protocol):
    def kth_distance(self, queries: FloatArray, k: int) -> FloatArray: ...

    def nearest(self, queries: FloatArray, k: int) -> tuple[FloatArray, IndexArray]: ...


class KthFromNearest:
    """kth_distance for libraries that only answer the k nearest."""

    def nearest(self, queries: FloatArray, k: int) -> tuple[FloatArray, IndexArray]:
        raise NotImplementedError

    def kth_distance(self, queries: FloatArray, k: int) -> FloatArray:
        distances, _ = self.nearest(queries, k)
        kth: FloatArray = distances[:, k - 1]
        return kth


class FaissSearcher(KthFromNearest):
    """A faiss index with L2 metric; faiss returns squared distances."""

    def __init__(self, index: faiss.Index, threads: int) -> None:
        self.index = index
        self.threads = threads

    def nearest(self, queries: FloatArray, k: int) -> tuple[FloatArray, IndexArray]:
        faiss.omp_set_num_threads(self.threads)
        squared, indices = self.index.search(queries, k)
        return np.sqrt(np.maximum(squared, 0.0)), indices


class UsearchSearcher(KthFromNearest):
    def __init__(self, index: UsearchIndex, threads: int) -> None:
        self.index = index
        self.threads = threads

    def nearest(self, queries: FloatArray, k: int) -> tuple[FloatArray, IndexArray]:
        matches = self.index.search(queries, k, threads=self.threads)
        # One query comes back as flat Matches, several as BatchMatches: shape both [n, k].
        squared = np.asarray(matches.distances, dtype=np.float32).reshape(len(queries), k)
        keys = np.asarray(matches.keys).astype(np.int64).reshape(len(queries), k)
        return np.sqrt(np.maximum(squared, 0.0)), keys


@dataclass(frozen=True)
class Built:
    searcher: Searcher
    params: dict[str, Any]
    index_bytes: int


@dataclass(frozen=True)
class Contender:
    name: str
    build: Callable[[FloatArray, int], Built]


def build_exact(reference: FloatArray, threads: int) -> Built:
    # The reference itself and its squared norms.
    n, dim = reference.shape
    return Built(ExactIndex(reference, threads=threads), {}, n * (dim + 1) * 4)


def build_faiss_flat(reference: FloatArray, threads: int) -> Built:
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatL2(reference.shape[1])
    index.add(reference)
    return Built(FaissSearcher(index, threads), {}, int(faiss.serialize_index(index).nbytes))


def build_faiss_ivf(reference: FloatArray, threads: int) -> Built:
    index = FaissIvfIndex(reference, threads=threads)
    n, dim = reference.shape
    # What IVF-Flat stores: every vector and its int64 id in the lists, plus the centroids.
    size = n * (dim * 4 + 8) + index.nlist * dim * 4
    return Built(index, {"nlist": index.nlist, "nprobe": index.nprobe}, size)


def faiss_hnsw(m: int, ef_construction: int, ef_search: int) -> Callable[[FloatArray, int], Built]:
    def build(reference: FloatArray, threads: int) -> Built:
        faiss.omp_set_num_threads(threads)
        index = faiss.IndexHNSWFlat(reference.shape[1], m)
        index.hnsw.efConstruction = ef_construction
        index.add(reference)
        index.hnsw.efSearch = ef_search
        params = {"M": m, "efConstruction": ef_construction, "efSearch": ef_search}
        size = int(faiss.serialize_index(index).nbytes)
        return Built(FaissSearcher(index, threads), params, size)

    return build


def usearch_hnsw(
    m: int, ef_construction: int, ef_search: int
) -> Callable[[FloatArray, int], Built]:
    def build(reference: FloatArray, threads: int) -> Built:
        index = UsearchIndex(
            ndim=reference.shape[1],
            metric="l2sq",
            dtype="f32",
            connectivity=m,
            expansion_add=ef_construction,
            expansion_search=ef_search,
        )
        index.add(np.arange(len(reference)), reference, threads=threads)
        params = {"M": m, "efConstruction": ef_construction, "efSearch": ef_search}
        # serialized_length, like faiss's serialised size; memory_usage also counts the
        # arenas usearch reserves ahead (118 MB at 100k x 64).
        return Built(UsearchSearcher(index, threads), params, int(index.serialized_length))

    return build


def contenders() -> list[Contender]:
    # Exact first: it is the baseline of every ratio and the truth for recall.
    return [
        Contender("exact numpy", build_exact),
        Contender("faiss Flat (exact)", build_faiss_flat),
        Contender("faiss IVF-Flat (shipped)", build_faiss_ivf),
        Contender("faiss HNSW-Flat", faiss_hnsw(32, 100, 128)),
        Contender("faiss HNSW-Flat", faiss_hnsw(32, 100, 512)),
        Contender("usearch HNSW", usearch_hnsw(32, 100, 128)),
        Contender("usearch HNSW", usearch_hnsw(32, 100, 512)),
    ]


def embedding_like(
    size: int, n_queries: int, dim: int, data: str, seed: int
) -> tuple[FloatArray, FloatArray, npt.NDArray[np.bool_]]:
    """Reference, queries, and which queries are novel (from clusters the reference lacks)."""
    rng = np.random.default_rng(seed)
    n_novel = round(n_queries * NOVEL_FRACTION)
    novel = np.arange(n_queries) >= n_queries - n_novel
    if data == "isotropic":
        vectors = rng.standard_normal((size + n_queries, dim), dtype=np.float32)
        return l2_normalize(vectors[:size]), l2_normalize(vectors[size:]), novel
    centers = rng.standard_normal((CLUSTERS + NOVEL_CLUSTERS, dim), dtype=np.float32)
    spreads = rng.uniform(0.35, 0.7, CLUSTERS + NOVEL_CLUSTERS).astype(np.float32)

    def draw(count: int, first: int, stop: int) -> FloatArray:
        labels = rng.integers(first, stop, count)
        noise = rng.standard_normal((count, dim), dtype=np.float32)
        return l2_normalize(centers[labels] + spreads[labels, None] * noise)

    reference = draw(size, 0, CLUSTERS)
    queries = np.concatenate(
        [
            draw(n_queries - n_novel, 0, CLUSTERS),
            draw(n_novel, CLUSTERS, CLUSTERS + NOVEL_CLUSTERS),
        ]
    )
    return reference, queries, novel


def single_query_latencies_us(
    searcher: Searcher, k: int, queries: FloatArray
) -> npt.NDArray[np.float64]:
    """Microseconds of each kth_distance call with one query row, the request-path call."""
    for row in range(min(WARM_UP_QUERIES, len(queries))):
        searcher.kth_distance(queries[row : row + 1], k)
    elapsed = np.empty(len(queries), dtype=np.int64)
    # A collection in the middle of a timed call would land in p99 of whoever was unlucky.
    gc.disable()
    try:
        for row in range(len(queries)):
            one = queries[row : row + 1]
            start = time.perf_counter_ns()
            searcher.kth_distance(one, k)
            elapsed[row] = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / 1000.0


def batch_throughput(searcher: Searcher, k: int, queries: FloatArray) -> float:
    """Queries per second in batches of BATCH, median of BATCH_PASSES passes."""
    passes = []
    for _ in range(BATCH_PASSES):
        start = time.perf_counter_ns()
        for first in range(0, len(queries), BATCH):
            searcher.kth_distance(queries[first : first + BATCH], k)
        passes.append(time.perf_counter_ns() - start)
    return len(queries) / (float(np.median(passes)) / 1e9)


def recall(found: IndexArray, truth: IndexArray) -> npt.NDArray[np.float64]:
    """Per query, the share of the true k nearest that were found."""
    return np.array(
        [len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]
    )


def measure_size(
    size: int, args: argparse.Namespace, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    reference, queries, novel = embedding_like(size, args.queries, args.dim, args.data, seed)
    k = default_k(size)
    rows: list[dict[str, Any]] = []
    truth_distances: FloatArray | None = None
    truth_indices: IndexArray | None = None
    for contender in contenders():
        start = time.perf_counter()
        built = contender.build(reference, args.threads)
        build_seconds = time.perf_counter() - start
        searcher = built.searcher
        latencies = single_query_latencies_us(searcher, k, queries)
        throughput = batch_throughput(searcher, k, queries)
        distances, indices = searcher.nearest(queries, k)
        if truth_distances is None or truth_indices is None:
            truth_distances, truth_indices = distances, indices
        recalls = recall(indices, truth_indices)
        errors = np.abs(distances[:, -1] - truth_distances[:, -1]) / truth_distances[:, -1]
        row: dict[str, Any] = {
            "size": size,
            "k": k,
            "contender": contender.name,
            "params": built.params,
            "build_seconds": build_seconds,
            "p50_us": float(np.percentile(latencies, 50)),
            "p99_us": float(np.percentile(latencies, 99)),
            "batch64_queries_per_second": throughput,
            "recall_at_k": float(recalls.mean()),
            "recall_at_k_novel": float(recalls[novel].mean()),
            "recall_at_k_min": float(recalls.min()),
            "kth_distance_rel_error_mean": float(errors.mean()),
            "kth_distance_rel_error_max": float(errors.max()),
            "index_bytes": built.index_bytes,
        }
        baseline = rows[0] if rows else row
        row["p50_ratio_vs_exact"] = row["p50_us"] / baseline["p50_us"]
        row["throughput_ratio_vs_exact"] = throughput / baseline["batch64_queries_per_second"]
        rows.append(row)
        print(f"  size {size}: {contender.name} {built.params} done", file=sys.stderr, flush=True)
    data = {
        "size": size,
        "k": k,
        "queries": len(queries),
        "novel_queries": int(novel.sum()),
        "exact_kth_distance_p50": float(np.median(truth_distances[:, -1]))
        if truth_distances is not None
        else None,
    }
    return rows, data


def exact_threshold(threads: int, n_queries: int, seed: int) -> list[dict[str, Any]]:
    """Single-query p50/p99 of ExactIndex by size and dimension."""
    rng = np.random.default_rng(seed)
    results = []
    for dim, sizes in THRESHOLD_SIZES.items():
        queries = l2_normalize(rng.standard_normal((n_queries, dim), dtype=np.float32))
        for size in sizes:
            reference = l2_normalize(rng.standard_normal((size, dim), dtype=np.float32))
            index = ExactIndex(reference, threads=threads)
            k = default_k(size)
            latencies = single_query_latencies_us(index, k, queries)
            results.append(
                {
                    "dim": dim,
                    "size": size,
                    "k": k,
                    "p50_us": float(np.percentile(latencies, 50)),
                    "p99_us": float(np.percentile(latencies, 99)),
                }
            )
            print(f"  exact threshold dim {dim} size {size} done", file=sys.stderr, flush=True)
    return results


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if names:
            cpu = names[0].split(":", 1)[1].strip()
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "openblas_env": {
            name: os.environ.get(name) for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
        },
        "threadpools": [
            {key: info.get(key) for key in ("prefix", "version", "architecture", "num_threads")}
            for info in threadpool_info()
        ],
    }


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        "| size | k | contender | params | build s | p50 µs | p99 µs | p50 vs exact "
        "| batch-64 q/s | q/s vs exact | recall@k | recall@k novel | k-th dist rel err mean / max "
        "| index MB |"
    )
    lines = [header, "|" + "---|" * 14]
    for r in rows:
        params = ", ".join(f"{key}={value}" for key, value in r["params"].items()) or "-"
        lines.append(
            f"| {r['size']:,} | {r['k']} | {r['contender']} | {params} "
            f"| {r['build_seconds']:.2f} | {r['p50_us']:.0f} | {r['p99_us']:.0f} "
            f"| {r['p50_ratio_vs_exact']:.2f}x | {r['batch64_queries_per_second']:,.0f} "
            f"| {r['throughput_ratio_vs_exact']:.2f}x | {r['recall_at_k']:.4f} "
            f"| {r['recall_at_k_novel']:.4f} | {r['kth_distance_rel_error_mean']:.5f} / "
            f"{r['kth_distance_rel_error_max']:.4f} | {r['index_bytes'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def threshold_table(results: Sequence[dict[str, Any]]) -> str:
    lines = ["| dim | size | k | p50 µs | p99 µs |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['dim']} | {r['size']:,} | {r['k']} | {r['p50_us']:.0f} | {r['p99_us']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", choices=("mixture", "isotropic"), default="mixture")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-threshold", action="store_true")
    parser.add_argument("--threshold-only", action="store_true")
    args = parser.parse_args(argv)
    sizes = [] if args.threshold_only else [int(size) for size in args.sizes.split(",")]

    rows: list[dict[str, Any]] = []
    datasets = []
    for size in sizes:
        size_rows, dataset = measure_size(size, args, args.seed)
        rows.extend(size_rows)
        datasets.append(dataset)
    threshold = (
        [] if args.skip_threshold else exact_threshold(args.threads, args.queries, args.seed)
    )

    print(
        f"\nNovelty search, dim {args.dim}, {args.data} data, {args.queries} queries, "
        f"{args.threads} thread(s); ratios against exact numpy\n"
    )
    print(markdown_table(rows))
    if threshold:
        print("\nExact search, one query per call\n")
        print(threshold_table(threshold))

    report = {
        "benchmark": "novelty_search",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "parameters": {
            "sizes": sizes,
            "dim": args.dim,
            "queries": args.queries,
            "novel_fraction": NOVEL_FRACTION,
            "data": args.data,
            "clusters": CLUSTERS,
            "novel_clusters": NOVEL_CLUSTERS,
            "threads": args.threads,
            "seed": args.seed,
            "batch": BATCH,
            "warm_up_queries": WARM_UP_QUERIES,
            "k": "default_k(size)",
        },
        "datasets": datasets,
        "results": rows,
        "exact_threshold": threshold,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
