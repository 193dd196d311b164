"""Event encoding: a batch entry decodes into exactly the events it holds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.batch_plan import RequestSpan
from service.events import (
    Event,
    decode_entry,
    decode_event,
    encode_batch_entry,
    event_fields,
)
from service.onnx_classifier import Prediction
from service.scores import ScoredBatch


def as_stored(fields: dict[str, bytes | str]) -> dict[bytes, bytes]:
    """What redis-py hands back: bytes keys and values."""
    return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}


def scored_batch(n: int) -> ScoredBatch:
    rows = np.arange(n)
    return ScoredBatch(
        predicted=rows % 2,
        scores={
            "max_probability": (0.5 + rows / 20).astype(np.float32),
            "novelty": (rows / 3).astype(np.float32),
        },
        percentiles={"max_probability": (rows * 10.5).astype(np.float32)},
        low_confidence=rows % 3 == 0,
        novel=rows == 4,
    )


def test_a_batch_entry_decodes_into_exactly_the_events_of_its_requests() -> None:
    # Five rows from three requests; the middle one did not store its input.
    batch = (np.arange(5 * 4, dtype=np.float32).reshape(5, 4) / 7).astype(">f4")
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5], [0.2, 0.8], [0.6, 0.4]])
    embeddings = np.array(
        [[0.6, 0.8, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.28, 0.96, 0.0]]
    )
    spans = [RequestSpan("r-a", 0, 2), RequestSpan("r-b", 2, 3), RequestSpan("r-c", 3, 5)]
    scored = scored_batch(5)
    fields = encode_batch_entry(
        model="digits",
        version="1",
        spans=spans,
        batch=batch,
        prediction=Prediction(probabilities.astype(np.float32), None, None),
        scored=scored,
        embeddings=embeddings,
        timestamp=1700000000.5,
        store_inputs=[True, False, True],
    )
    assert sorted(fields) == ["batch", "embedding", "input", "meta", "probabilities"]
    assert len(fields["input"]) == 4 * 4 * 4  # the four stored rows, not five

    events = decode_entry(as_stored(fields))

    batch_id = fields["batch"]
    assert isinstance(batch_id, str) and len(batch_id) == 32
    rows = scored.rows()
    expected_meta: list[dict[str, Any]] = [
        {
            "id": f"{batch_id}-{i}",
            "request_id": request_id,
            "index": index,
            "ts": 1700000000.5,
            "model": "digits",
            "version": "1",
            "input_dtype": "float32",
            "input_shape": [4],
            **rows[i],
        }
        for i, (request_id, index) in enumerate(
            [("r-a", 0), ("r-a", 1), ("r-b", 0), ("r-c", 0), ("r-c", 1)]
        )
    ]
    assert [e.id for e in events] == [f"{batch_id}-{i}" for i in range(5)]
    assert [e.meta for e in events] == expected_meta
    assert [list(e.meta) for e in events] == [list(m) for m in expected_meta]
    for i, event in enumerate(events):
        if i == 2:
            assert event.input is None
        else:
            assert event.input is not None
            assert event.input.dtype == np.dtype("<f4") and event.input.shape == (4,)
            np.testing.assert_array_equal(event.input, batch[i])
        assert event.embedding.dtype == np.float32
        np.testing.assert_array_equal(event.embedding, embeddings[i].astype(np.float16))
        assert event.probabilities.dtype == np.dtype("<f4")
        np.testing.assert_array_equal(event.probabilities, probabilities[i].astype(np.float32))
    assert events[4].predicted == 0
    assert events[4].meta["flags"] == {"low_confidence": False, "novel": True}
    assert events[3].percentiles == {"max_probability": pytest.approx(31.5)}


def test_an_entry_whose_requests_store_no_input_has_no_input_field() -> None:
    scored = ScoredBatch(np.array([0]), {}, {}, np.array([False]), np.array([False]))
    fields = encode_batch_entry(
        model="m",
        version="1",
        spans=[RequestSpan("r", 0, 1)],
        batch=np.zeros((1, 3), np.float32),
        prediction=Prediction(np.ones((1, 1), np.float32), None, None),
        scored=scored,
        embeddings=np.zeros((1, 2), np.float32),
        timestamp=0.0,
        store_inputs=[False],
    )
    assert "input" not in fields
    (event,) = decode_entry(fields)
    assert event.input is None
    assert event.id == f"{fields['batch']}-0"


def test_an_entry_of_a_single_event_written_before_batch_entries_is_still_read() -> None:
    event = Event(
        id="abc-3",
        meta={"id": "abc-3", "input_dtype": "uint8", "input_shape": [2], "predicted": 1},
        input=np.array([7, 9], np.uint8),
        embedding=np.array([0.6, 0.8], np.float16).astype(np.float32),
        probabilities=np.array([0.25, 0.75], np.float32),
    )
    (decoded,) = decode_entry(as_stored(dict(event_fields(event))))
    assert_same_event(decoded, event)


def test_a_single_event_round_trips_exactly() -> None:
    event = Event(
        id="abc-0",
        meta={"id": "abc-0", "input_dtype": "float32", "input_shape": [2, 2], "scores": {}},
        input=np.arange(4, dtype=np.float32).reshape(2, 2) / 3,
        embedding=np.array([0.1, 0.2, 0.3], np.float16).astype(np.float32),
        probabilities=np.array([1 / 3, 2 / 3], np.float32),
    )
    assert_same_event(decode_event(event_fields(event)), event)
    without_input = Event(event.id, event.meta, None, event.embedding, event.probabilities)
    assert "input" not in event_fields(without_input)
    assert_same_event(decode_event(event_fields(without_input)), without_input)


@pytest.mark.parametrize(
    "change",
    [
        {"meta": b'{"ts": 1}'},  # no rows
        {"embedding": b"\x00" * 6},  # 3 halves for 2 rows
    ],
)
def test_a_malformed_entry_raises_what_consumers_count_as_undecodable(
    change: dict[str, bytes],
) -> None:
    scored = ScoredBatch(np.array([0, 1]), {}, {}, np.zeros(2, bool), np.zeros(2, bool))
    fields = encode_batch_entry(
        model="m",
        version="1",
        spans=[RequestSpan("r", 0, 2)],
        batch=np.zeros((2, 3), np.float32),
        prediction=Prediction(np.ones((2, 2), np.float32), None, None),
        scored=scored,
        embeddings=np.zeros((2, 2), np.float32),
        timestamp=0.0,
        store_inputs=[True],
    )
    with pytest.raises((KeyError, ValueError)):
        decode_entry({**fields, **change})


def assert_same_event(actual: Event, expected: Event) -> None:
    assert actual.id == expected.id
    assert actual.meta == expected.meta
    if expected.input is None:
        assert actual.input is None
    else:
        assert actual.input is not None
        assert actual.input.dtype == expected.input.dtype
        np.testing.assert_array_equal(actual.input, expected.input)
    np.testing.assert_array_equal(actual.embedding, expected.embedding)
    np.testing.assert_array_equal(actual.probabilities, expected.probabilities)
