"""Prediction events: one per instance, encoded compactly for a Redis Stream, and decoded back.

Fields of a stream entry:
- `id`: the event id (hex), also the idempotency key of everything downstream;
- `meta`: JSON with ids, time, model, version, prediction, scores, percentiles and flags;
- `input`: the raw input tensor of the instance (little-endian, dtype and shape in `meta`),
  absent when not sampled;
- `embedding`: the L2-normalised embedding as little-endian float16 (half the bytes of float32,
  and unit vectors need no more precision than float16 keeps);
- `probabilities`: the class probabilities as little-endian float32.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.batch_plan import RequestSpan
from service.onnx_classifier import Prediction
from service.scores import ScoredBatch

EventFields = dict[str, bytes | str]


@dataclass(frozen=True)
class Event:
    id: str
    meta: dict[str, Any]
    input: np.ndarray | None
    embedding: np.ndarray
    probabilities: np.ndarray

    @property
    def predicted(self) -> int:
        return int(self.meta["predicted"])

    @property
    def scores(self) -> dict[str, float]:
        result: dict[str, float] = self.meta["scores"]
        return result

    @property
    def percentiles(self) -> dict[str, float]:
        result: dict[str, float] = self.meta["percentiles"]
        return result


def new_event_id() -> str:
    return uuid.uuid4().hex


def encode_events(
    *,
    model: str,
    version: str,
    request_id: str,
    batch: np.ndarray,
    prediction: Prediction,
    scored: ScoredBatch,
    embeddings: np.ndarray,
    timestamp: float,
    store_input: bool,
) -> list[EventFields]:
    """The events of one request's batch."""
    return encode_batch_events(
        model=model,
        version=version,
        spans=[RequestSpan(request_id, 0, len(batch))],
        batch=batch,
        prediction=prediction,
        scored=scored,
        embeddings=embeddings,
        timestamp=timestamp,
        store_inputs=[store_input],
    )


def encode_batch_events(
    *,
    model: str,
    version: str,
    spans: Sequence[RequestSpan],
    batch: np.ndarray,
    prediction: Prediction,
    scored: ScoredBatch,
    embeddings: np.ndarray,
    timestamp: float,
    store_inputs: Sequence[bool],
) -> list[EventFields]:
    """The events of a batch gathered from several requests, in row order.

    Each request's events carry its own id and their index within that request, so they are
    the same whether the request was served alone or gathered with others (only the random
    event ids and the time differ).
    """
    probabilities = np.ascontiguousarray(prediction.probabilities, dtype="<f4")
    halves = np.ascontiguousarray(embeddings, dtype="<f2")
    inputs = np.ascontiguousarray(batch, dtype=batch.dtype.newbyteorder("<"))
    input_shape = list(batch.shape[1:])
    input_dtype = batch.dtype.name
    rows = scored.rows()
    events: list[EventFields] = []
    # One random id per batch, suffixed by the row: unique, and a uuid4 per row would cost more
    # than the rest of the row's encoding.
    batch_id = new_event_id()
    for span, store_input in zip(spans, store_inputs, strict=True):
        for index, i in enumerate(range(span.start, span.stop)):
            event_id = f"{batch_id}-{i}"
            meta = {
                "id": event_id,
                "ts": timestamp,
                "model": model,
                "version": version,
                "request_id": span.request_id,
                "index": index,
                **rows[i],
                "input_dtype": input_dtype,
                "input_shape": input_shape,
            }
            fields: EventFields = {
                "id": event_id,
                "meta": orjson.dumps(meta),
                "embedding": halves[i].tobytes(),
                "probabilities": probabilities[i].tobytes(),
            }
            if store_input:
                fields["input"] = inputs[i].tobytes()
            events.append(fields)
    return events


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _raw(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def decode_event(fields: dict[Any, Any]) -> Event:
    """Decode a stream entry as redis-py returns it (bytes or str keys)."""
    get = {_text(k): v for k, v in fields.items()}
    meta = orjson.loads(get["meta"])
    raw_input = get.get("input")
    tensor = None
    if raw_input is not None:
        dtype = np.dtype(meta["input_dtype"]).newbyteorder("<")
        tensor = np.frombuffer(_raw(raw_input), dtype=dtype).reshape(meta["input_shape"])
    return Event(
        id=_text(get["id"]),
        meta=meta,
        input=tensor,
        embedding=np.frombuffer(_raw(get["embedding"]), dtype="<f2").astype(np.float32),
        probabilities=np.frombuffer(_raw(get["probabilities"]), dtype="<f4"),
    )
