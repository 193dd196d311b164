"""One request's share of a gathered batch's outputs and scores: the same values as slicing
eagerly, and the rows the whole batch already built, shared rather than rebuilt."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from service.onnx_classifier import Prediction
from service.scores import RowsJson, ScoredBatch


def gathered() -> ScoredBatch:
    return ScoredBatch(
        predicted=np.array([0, 1, 2, 1, 0]),
        scores={
            "max_probability": np.array([0.9, 0.5, 0.7, 0.6, 0.99], dtype=np.float32),
            "novelty": np.array([0.1, 0.2, 0.3, 0.4, 0.5], dtype=np.float32),
        },
        percentiles={"max_probability": np.array([50, 2, 20, 10, 90], dtype=np.float32)},
        low_confidence=np.array([False, True, False, False, False]),
        novel=np.array([False, False, True, False, False]),
    )


def test_a_slice_holds_exactly_its_rows() -> None:
    whole = gathered()
    part = whole.slice(1, 4)
    assert len(part) == 3
    np.testing.assert_array_equal(part.predicted, [1, 2, 1])
    np.testing.assert_array_equal(part.scores["novelty"], np.float32([0.2, 0.3, 0.4]))
    np.testing.assert_array_equal(part.percentiles["max_probability"], np.float32([2, 20, 10]))
    np.testing.assert_array_equal(part.low_confidence, [True, False, False])
    np.testing.assert_array_equal(part.novel, [False, True, False])
    assert set(part.tensors()) == set(whole.tensors())
    for name, tensor in part.tensors().items():
        np.testing.assert_array_equal(tensor, whole.tensors()[name][1:4])
    assert part.rows() == whole.rows()[1:4]
    assert part.slice(1, 2).rows() == whole.rows()[2:3]


def test_slices_share_the_rows_the_batch_built() -> None:
    whole = gathered()
    rows = whole.rows()
    part = whole.slice(3, 5)
    assert part.rows()[0] is rows[3]
    assert part.row(1) is rows[4]


def as_float32_text(column: np.ndarray) -> list[float]:
    """Each float32 value as the Python float its shortest float32 text reads as (numpy's
    `str` of a float32 is that text): 0.1 for float32 0.1, not 0.10000000149011612."""
    return [float(str(value)) for value in column.astype(np.float32)]


def rows_built_in_python(scored: ScoredBatch) -> list[dict[str, Any]]:
    """The rows as plain Python values, built dict by dict from the columns."""
    scores = {k: as_float32_text(v) for k, v in scored.scores.items()}
    percentiles = {k: as_float32_text(v) for k, v in scored.percentiles.items()}
    low, novel = scored.low_confidence.tolist(), scored.novel.tolist()
    return [
        {
            "predicted": predicted,
            "scores": {k: v[i] for k, v in scores.items()},
            "percentiles": {k: v[i] for k, v in percentiles.items()},
            "flags": {"low_confidence": low[i], "novel": novel[i]},
        }
        for i, predicted in enumerate(scored.predicted.tolist())
    ]


def test_rows_json_is_exactly_what_serialising_the_rows_gives() -> None:
    whole = gathered()
    expected = rows_built_in_python(whole)
    rows_json = whole.rows_json()
    assert rows_json.objects == [orjson.dumps(row) for row in expected]
    assert rows_json.array() == orjson.dumps(expected)
    assert whole.rows() == expected
    part = whole.slice(1, 4).rows_json()
    assert part.objects == rows_json.objects[1:4]
    assert part.array() == orjson.dumps(expected[1:4])
    assert whole.slice(4, 5).rows_json().array() == orjson.dumps(expected[4:5])


@pytest.mark.parametrize("with_percentiles", [True, False])
def test_rows_json_writes_every_number_as_the_shortest_text_of_its_float32(
    with_percentiles: bool,
) -> None:
    # Values whose text could differ between writers: integral, tiny, huge, signed zero,
    # float32 rounding, and the non-finite ones (JSON null).
    values = np.array(
        [0.0, -0.0, 100.0, 50.0, 1e-7, 3.4e38, 1.0 / 3, np.nan, np.inf, -np.inf, 0.1, 2.5e-45],
        dtype=np.float32,
    )
    n = len(values)
    scored = ScoredBatch(
        predicted=np.arange(n) % 3,
        scores={"max_probability": values, "energy": values[::-1].copy(), "novelty": values},
        percentiles={"novelty": values[::-1].copy()} if with_percentiles else {},
        low_confidence=np.arange(n) % 2 == 0,
        novel=np.arange(n) % 3 == 0,
    )
    expected = rows_built_in_python(scored)
    assert scored.rows_json().objects == [orjson.dumps(row) for row in expected]
    assert orjson.loads(scored.rows_json().array()) == orjson.loads(orjson.dumps(expected))
    # As the OIP outputs write the same tensors, and every number reads back as its float32.
    written = orjson.loads(scored.rows_json().array())
    outputs = orjson.loads(orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY))
    assert [row["scores"]["max_probability"] for row in written] == outputs
    finite = np.isfinite(values)
    read_back = np.array([row["scores"]["novelty"] for row in written], dtype=np.float64)
    np.testing.assert_array_equal(read_back[finite].astype(np.float32), values[finite])


def test_rows_json_of_a_batch_without_scores() -> None:
    scored = ScoredBatch(np.array([2, 0]), {}, {}, np.array([True, False]), np.zeros(2, bool))
    assert scored.rows_json().objects == [orjson.dumps(row) for row in rows_built_in_python(scored)]


def test_rows_json_as_a_json_string_is_what_serialising_the_decoded_array_gives() -> None:
    whole = gathered()
    assert whole.rows_json().string() == orjson.dumps(orjson.dumps(whole.rows()).decode())
    for start, stop in ((1, 4), (4, 5), (0, 5)):
        part = whole.slice(start, stop).rows_json()
        assert part.string() == orjson.dumps(part.array().decode())
    # Or any rows of it, from the batch's escaped rows.
    for start, stop in ((1, 4), (4, 5), (0, 1), (2, 3), (0, 5)):
        assert whole.rows_json().string(slice(start, stop)) == orjson.dumps(
            orjson.dumps(whole.rows()[start:stop]).decode()
        )
    # Embedded as a fragment, it reads back as the rows.
    document = orjson.dumps({"scores": orjson.Fragment(whole.slice(2, 3).rows_json().string())})
    assert orjson.loads(orjson.loads(document)["scores"]) == orjson.loads(
        orjson.dumps(whole.rows()[2:3])
    )


def test_rows_json_string_escapes_backslashes_and_quotes_of_any_row() -> None:
    # ScoredBatch rows hold no strings; rows that did would still be escaped correctly.
    rows = [{"predicted": 1, "note": 'a "quoted" \\ back\nslash'}, {"predicted": 2, "note": "é"}]
    rows_json = RowsJson([orjson.dumps(row) for row in rows])
    assert rows_json.string() == orjson.dumps(rows_json.array().decode())
    assert rows_json.part(slice(1, 2)).string() == orjson.dumps(orjson.dumps(rows[1:]).decode())


def test_a_prediction_slice_reads_exactly_its_rows_of_every_output() -> None:
    probabilities = np.arange(12, dtype=np.float32).reshape(4, 3)
    embedding = np.arange(8, dtype=np.float32).reshape(4, 2)
    whole = Prediction(probabilities, embedding, None, {"probabilities": probabilities})
    part = whole.slice(1, 3)
    np.testing.assert_array_equal(part.probabilities, probabilities[1:3])
    assert part.embedding is not None
    np.testing.assert_array_equal(part.embedding, embedding[1:3])
    assert part.logits is None
    assert list(part.tensors) == ["probabilities"]
    np.testing.assert_array_equal(part.tensors["probabilities"], probabilities[1:3])
    np.testing.assert_array_equal(part.slice(1, 2).probabilities, probabilities[2:3])
