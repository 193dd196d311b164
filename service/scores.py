"""Per-prediction scores: pure functions over arrays, no IO.

Confidence scores come from the class probabilities (and logits, when the model gives them);
novelty is the distance to the k-th nearest reference embedding (see `neighbour_index.py`).
Every score is also placed as a percentile within the reference profile's own distribution of
that score, measured on held-out reference data, so thresholds mean the same for every model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from scipy.special import entr

# Scores where a high value signals trouble; for the others (max probability, margin) a low
# value does. Percentiles are always "share of the reference at or below this value".
CONFIDENCE_SCORES = ("max_probability", "margin", "entropy", "energy")
NOVELTY_SCORE = "novelty"


def max_probability(probabilities: np.ndarray) -> np.ndarray:
    result: np.ndarray = probabilities.max(axis=1).astype(np.float32)
    return result


def margin(probabilities: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability; 1.0 for a single-class model (nothing competes)."""
    return _max_and_margin(probabilities)[1]


def _max_and_margin(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max probability and margin from one partial sort of each row."""
    if probabilities.shape[1] < 2:
        return max_probability(probabilities), np.ones(len(probabilities), dtype=np.float32)
    # The last two columns hold each row's two largest, the largest last.
    top_two = np.partition(probabilities, -2, axis=1)[:, -2:]
    top = top_two[:, 1].astype(np.float32)
    gap: np.ndarray = (top_two[:, 1] - top_two[:, 0]).astype(np.float32)
    return top, gap


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats; 0 * log 0 counts as 0 (scipy's `entr`, -p log p per element)."""
    result: np.ndarray = entr(probabilities.astype(np.float64)).sum(axis=1).astype(np.float32)
    return result + 0.0  # normalise -0.0 (entr(1) is -0.0) to 0.0


def energy(logits: np.ndarray) -> np.ndarray:
    """Free energy -logsumexp(logits) at temperature 1 (Liu et al. 2020): higher = less familiar."""
    z = logits.astype(np.float64)
    peak = z.max(axis=1)
    result: np.ndarray = (-(peak + np.log(np.exp(z - peak[:, None]).sum(axis=1)))).astype(
        np.float32
    )
    return result


def confidence_scores(
    probabilities: np.ndarray, logits: np.ndarray | None
) -> dict[str, np.ndarray]:
    # On the request path once per batch: one partial sort serves two scores.
    top, gap = _max_and_margin(probabilities)
    scores = {"max_probability": top, "margin": gap, "entropy": entropy(probabilities)}
    if logits is not None:
        scores["energy"] = energy(logits)
    return scores


def percentile_in(values: np.ndarray, sorted_reference: np.ndarray) -> np.ndarray:
    """Percentile (0-100) of each value within a sorted reference sample.

    Mid-rank for ties: a value equal to every reference point sits at 50, not at 100, so a
    model that is always fully confident is not flagged for being fully confident.
    """
    n = len(sorted_reference)
    if n == 0:
        return np.full(len(values), np.nan, dtype=np.float32)
    # The array methods, not np.searchsorted: its dispatch wrapper costs about as much as the
    # search on a batch of a few values.
    below = sorted_reference.searchsorted(values, side="left")
    below += sorted_reference.searchsorted(values, side="right")
    result: np.ndarray = _half_ranks_to_percentiles(n)[below]
    return result


class PercentileLookup:
    """`percentile_in` against one fixed reference, with one binary search per value.

    The lookup holds every reference point r twice: as r, and as the next float above r. A
    value v is at or above the first when r <= v and at or above the second when r < v, so
    the count of held points at or below v is the sum of v's two ranks that `percentile_in`
    finds with two searches. That holds for a value of the reference's own float type (every
    score is float32, as the profile stores its distributions); any other value, or a
    reference with non-finite points, takes `percentile_in`.
    """

    __slots__ = ("_bounds", "_percentiles", "_reference")

    def __init__(self, sorted_reference: np.ndarray) -> None:
        self._reference = sorted_reference
        n = len(sorted_reference)
        finite = n > 0 and bool(np.isfinite(sorted_reference).all())
        self._bounds: np.ndarray | None = None
        if finite and sorted_reference.dtype.kind == "f":
            # Above the largest float is infinity, which is still exactly "r < v".
            with np.errstate(over="ignore"):
                after = np.nextafter(sorted_reference, np.inf)
            self._bounds = np.sort(np.concatenate([sorted_reference, after]))
        self._percentiles = _half_ranks_to_percentiles(n) if n else None

    def __call__(self, values: np.ndarray) -> np.ndarray:
        bounds = self._bounds
        if bounds is None or values.dtype != bounds.dtype:
            return percentile_in(values, self._reference)
        assert self._percentiles is not None
        result: np.ndarray = self._percentiles[bounds.searchsorted(values, side="right")]
        return result


@functools.lru_cache(maxsize=64)
def _half_ranks_to_percentiles(n: int) -> np.ndarray:
    """Percentile (float32) of every sum of the two ranks (0..2n) in a reference of n: one
    lookup instead of two more array operations per score and batch."""
    table: np.ndarray = (np.arange(2 * n + 1) * (50.0 / n)).astype(np.float32)
    table.flags.writeable = False
    return table


_JSON_BOOL = (b"false", b"true")


@functools.lru_cache(maxsize=64)
def _row_template(scores: tuple[str, ...], percentiles: tuple[str, ...]) -> bytes:
    """A row's JSON object with `%d` for the predicted class, `%b` for each score and
    percentile (in this order) and for the two flags."""

    def members(names: tuple[str, ...]) -> bytes:
        return b",".join(orjson.dumps(name).replace(b"%", b"%%") + b":%b" for name in names)

    return (
        b'{"predicted":%d,"scores":{'
        + members(scores)
        + b'},"percentiles":{'
        + members(percentiles)
        + b'},"flags":{"low_confidence":%b,"novel":%b}}'
    )


@dataclass(frozen=True)
class FlagThresholds:
    """Percentiles of the reference at which a prediction is flagged."""

    # Flag when max probability is at or below this percentile of the reference.
    low_confidence_percentile: float = 5.0
    # Flag when novelty is at or above this percentile of the reference.
    novel_percentile: float = 99.0

    def __post_init__(self) -> None:
        for name in ("low_confidence_percentile", "novel_percentile"):
            value = getattr(self, name)
            if not 0.0 <= value <= 100.0:
                raise ValueError(f"{name} must be within [0, 100], got {value}")


class ScoredBatch:
    """Scores, their reference percentiles and the flags of one batch, one row per instance.

    `slice` gives one request's rows of a gathered batch as a view that slices the arrays only
    when they are read: a /v1 response reads just the rows, already built for the events.
    """

    __slots__ = (
        "_low",
        "_novel",
        "_parent",
        "_percentiles",
        "_predicted",
        "_rows",
        "_rows_json",
        "_scores",
    )

    def __init__(
        self,
        predicted: np.ndarray,
        scores: dict[str, np.ndarray],
        percentiles: dict[str, np.ndarray],
        low_confidence: np.ndarray,
        novel: np.ndarray,
    ) -> None:
        self._predicted: np.ndarray | None = predicted  # int64 class index
        self._scores: dict[str, np.ndarray] | None = scores
        self._percentiles: dict[str, np.ndarray] | None = percentiles
        self._low: np.ndarray | None = low_confidence  # bool
        self._novel: np.ndarray | None = novel  # bool
        self._parent: tuple[ScoredBatch, int, int] | None = None
        self._rows: list[dict[str, Any]] | None = None
        self._rows_json: RowsJson | None = None

    def _part(self) -> tuple[ScoredBatch, slice]:
        assert self._parent is not None
        parent, start, stop = self._parent
        return parent, slice(start, stop)

    @property
    def predicted(self) -> np.ndarray:
        if self._predicted is None:
            parent, rows = self._part()
            self._predicted = parent.predicted[rows]
        return self._predicted

    @property
    def scores(self) -> dict[str, np.ndarray]:
        if self._scores is None:
            parent, rows = self._part()
            self._scores = {k: v[rows] for k, v in parent.scores.items()}
        return self._scores

    @property
    def percentiles(self) -> dict[str, np.ndarray]:
        if self._percentiles is None:
            parent, rows = self._part()
            self._percentiles = {k: v[rows] for k, v in parent.percentiles.items()}
        return self._percentiles

    @property
    def low_confidence(self) -> np.ndarray:
        if self._low is None:
            parent, rows = self._part()
            self._low = parent.low_confidence[rows]
        return self._low

    @property
    def novel(self) -> np.ndarray:
        if self._novel is None:
            parent, rows = self._part()
            self._novel = parent.novel[rows]
        return self._novel

    def __len__(self) -> int:
        if self._parent is not None:
            return self._parent[2] - self._parent[1]
        return len(self.predicted)

    def tensors(self) -> dict[str, np.ndarray]:
        """Scores, percentiles and flags as tensors named like `score_output_names` says."""
        result = {f"score_{k}": v for k, v in self.scores.items()}
        if self.percentiles:
            result.update({f"percentile_{k}": v for k, v in self.percentiles.items()})
            result["flag_low_confidence"] = self.low_confidence
            result["flag_novel"] = self.novel
        return result

    def rows(self) -> list[dict[str, Any]]:
        """Every instance as plain Python values (for JSON responses), built once: parsed back
        from `rows_json()`, which the events hold anyway; orjson parses them in about half
        the time Python builds the dicts."""
        if self._rows is None:
            if self._parent is not None:
                parent, rows_slice = self._part()
                self._rows = parent.rows()[rows_slice]
            else:
                self._rows = orjson.loads(self.rows_json().array())
        return self._rows

    def rows_json(self) -> RowsJson:
        """Each instance as a JSON object, built once per batch (cached): the event entry
        embeds the array as it is, and each request's share goes into its response without
        serialising its rows again."""
        if self._rows_json is None:
            if self._parent is not None:
                parent, rows_slice = self._part()
                self._rows_json = parent.rows_json().part(rows_slice)
            else:
                self._rows_json = RowsJson(self._row_objects())
        return self._rows_json

    def _row_objects(self) -> list[bytes]:
        """The rows' JSON objects without building a dict per row: every score of every row is
        serialised by one orjson call and filled into a template of the fixed keys. The
        scores are float32, and are written as such: the shortest text that reads back as the
        same float32, as in the OIP outputs (a float64 text would add digits the score never
        had, 0.9999953508377075 for 0.99999535)."""
        scores, percentiles = self.scores, self.percentiles
        template = _row_template(tuple(scores), tuple(percentiles))
        predicted = self.predicted.tolist()
        n = len(predicted)
        columns = [*scores.values(), *percentiles.values()]
        if columns:
            # Column after column, "[a,b,...]": numbers and nulls only, so the cuts are
            # unambiguous, and row i's values are every n-th from i.
            flat = np.concatenate(columns, dtype=np.float32)
            numbers = orjson.dumps(flat, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
        else:
            numbers = []
        return [
            template % (value, *numbers[i::n], _JSON_BOOL[low], _JSON_BOOL[novel])
            for i, (value, low, novel) in enumerate(
                zip(predicted, self.low_confidence.tolist(), self.novel.tolist(), strict=True)
            )
        ]

    def row(self, i: int) -> dict[str, Any]:
        """One instance as plain Python values."""
        return self.rows()[i]

    def slice(self, start: int, stop: int) -> ScoredBatch:
        """Instances [start, stop), as a view sliced lazily."""
        part = ScoredBatch.__new__(ScoredBatch)
        part._predicted = part._scores = part._percentiles = part._low = part._novel = None
        part._parent = (self, start, stop)
        part._rows = None
        part._rows_json = None
        return part


class RowsJson:
    """JSON objects of rows as `ScoredBatch.rows_json` builds them, one bytes object per row."""

    __slots__ = ("_array", "objects")

    def __init__(self, objects: list[bytes]) -> None:
        self.objects = objects
        self._array: bytes | None = None

    def part(self, rows: slice) -> RowsJson:
        return RowsJson(self.objects[rows])

    def array(self) -> bytes:
        """The rows as one JSON array."""
        if self._array is None:
            self._array = b"[" + b",".join(self.objects) + b"]"
        return self._array

    def string(self, rows: slice | None = None) -> bytes:
        """The array (or its `rows`) as a JSON string literal, quotes included: `orjson.dumps`
        of the array decoded, ready to embed with `orjson.Fragment`. orjson escapes the whole
        text in one call, faster than escaping each row's quotes with `bytes.replace`."""
        array = self.array() if rows is None else b"[" + b",".join(self.objects[rows]) + b"]"
        return orjson.dumps(array.decode())


def score_output_names(has_logits: bool, has_reference: bool) -> list[str]:
    """Names of the extra OIP outputs carrying scores, percentiles and flags."""
    names = [n for n in CONFIDENCE_SCORES if has_logits or n != "energy"]
    if has_reference:
        names.append(NOVELTY_SCORE)
    outputs = [f"score_{n}" for n in names]
    if has_reference:
        outputs += [f"percentile_{n}" for n in names] + ["flag_low_confidence", "flag_novel"]
    return outputs


def flag(
    percentiles: dict[str, np.ndarray], thresholds: FlagThresholds, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(low_confidence, novel) boolean arrays; a score without a reference never flags."""
    confidence = percentiles.get("max_probability")
    novelty = percentiles.get(NOVELTY_SCORE)
    low = (
        confidence <= thresholds.low_confidence_percentile
        if confidence is not None
        else np.zeros(size, dtype=bool)
    )
    novel = (
        novelty >= thresholds.novel_percentile
        if novelty is not None
        else np.zeros(size, dtype=bool)
    )
    return low, novel
