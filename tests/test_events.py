"""Event encoding: every field decodes back to what went in."""

from __future__ import annotations

import numpy as np

from service.events import decode_event, encode_events
from service.onnx_classifier import Prediction
from service.scores import ScoredBatch


def test_events_round_trip() -> None:
    batch = np.arange(2 * 64, dtype=np.float32).reshape(2, 64) / 7
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7]], dtype=np.float32)
    embeddings = np.array([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    scored = ScoredBatch(
        predicted=np.array([0, 1]),
        scores={"max_probability": np.array([0.9, 0.7], dtype=np.float32)},
        percentiles={"max_probability": np.array([40.0, 3.0], dtype=np.float32)},
        low_confidence=np.array([False, True]),
        novel=np.array([False, False]),
    )
    fields = encode_events(
        model="digits",
        version="1",
        request_id="r-1",
        batch=batch,
        prediction=Prediction(probabilities, None, None),
        scored=scored,
        embeddings=embeddings,
        timestamp=1700000000.5,
        store_input=True,
    )
    assert len(fields) == 2
    # Redis returns bytes keys and values: decode what redis-py would hand back.
    as_stored = [
        {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in f.items()}
        for f in fields
    ]
    events = [decode_event(f) for f in as_stored]
    assert events[0].id != events[1].id
    np.testing.assert_array_equal(events[1].input, batch[1])
    np.testing.assert_allclose(events[0].embedding, embeddings[0], atol=1e-3)
    np.testing.assert_array_equal(events[1].probabilities, probabilities[1])
    assert events[1].predicted == 1
    assert events[1].meta["flags"] == {"low_confidence": True, "novel": False}
    assert events[1].percentiles == {"max_probability": 3.0}
    assert events[0].meta["request_id"] == "r-1"
    assert events[0].meta["ts"] == 1700000000.5
    assert events[1].meta["index"] == 1


def test_events_without_input() -> None:
    scored = ScoredBatch(np.array([0]), {}, {}, np.array([False]), np.array([False]))
    fields = encode_events(
        model="m",
        version="1",
        request_id="r",
        batch=np.zeros((1, 3), np.float32),
        prediction=Prediction(np.ones((1, 1), np.float32), None, None),
        scored=scored,
        embeddings=np.zeros((1, 2), np.float32),
        timestamp=0.0,
        store_input=False,
    )
    assert "input" not in fields[0]
    assert decode_event(fields[0]).input is None
