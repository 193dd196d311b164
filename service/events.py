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

import random
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
    """128 random bits as 32 hex digits, like `uuid4().hex` at an eighth of its cost (it is
    called on every request that brings no id of its own). An id needs to be unique, not
    unpredictable; the `random` module reseeds itself in a forked child, so worker processes
    do not repeat each other's ids."""
    return f"{random.getrandbits(128):032x}"


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
    probabilities = _row_bytes(np.ascontiguousarray(prediction.probabilities, dtype="<f4"))
    halves = _row_bytes(np.ascontiguousarray(embeddings, dtype="<f2"))
    inputs = _row_bytes(np.ascontiguousarray(batch, dtype=batch.dtype.newbyteorder("<")))
    rows = scored.rows()
    # The meta JSON is assembled from pieces: what every event of the batch shares is encoded
    # once, each row's scores once (orjson), and only ids and indices per event. Building and
    # encoding one merged dict per event cost twice as much.
    shared = orjson.dumps(
        {
            "ts": timestamp,
            "model": model,
            "version": version,
            "input_dtype": _dtype_name(batch.dtype),
            "input_shape": list(batch.shape[1:]),
        }
    )[1:-1]
    events: list[EventFields] = []
    # One random id per batch, suffixed by the row: unique, and a random id per row would cost
    # more than the rest of the row's encoding.
    batch_id = new_event_id()
    for span, store_input in zip(spans, store_inputs, strict=True):
        request_id = orjson.dumps(span.request_id)
        for index, i in enumerate(range(span.start, span.stop)):
            event_id = f"{batch_id}-{i}"
            meta = b"".join(
                (
                    b'{"id":"',
                    event_id.encode(),
                    b'","request_id":',
                    request_id,
                    b',"index":',
                    str(index).encode(),
                    b",",
                    shared,
                    b",",
                    orjson.dumps(rows[i])[1:],
                )
            )
            fields: EventFields = {
                "id": event_id,
                "meta": meta,
                "embedding": halves[i],
                "probabilities": probabilities[i],
            }
            if store_input:
                fields["input"] = inputs[i]
            events.append(fields)
    return events


_DTYPE_NAMES: dict[np.dtype[Any], str] = {}


def _dtype_name(dtype: np.dtype[Any]) -> str:
    # numpy computes `dtype.name` in Python, a few microseconds each time.
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name
    return name


def _row_bytes(array: np.ndarray) -> list[bytes]:
    """Each row's bytes; one copy out of numpy, then slices."""
    raw = array.tobytes()
    width = len(raw) // len(array) if len(array) else 0
    return [raw[i : i + width] for i in range(0, len(raw), width)] if width else [b""] * len(array)


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
