"""Prediction events: one per instance, logged one inference batch per Redis Stream entry.

The batcher gathers several requests into one onnxruntime call; all their events go into one
stream entry (one XADD per batch instead of one per prediction, which was most of the event
log's cost on the event loop). Fields of an entry of n rows:
- `batch`: the batch id (32 hex digits). Row i's event id is `<batch>-<i>`: unique, and the
  idempotency key of everything downstream (label queue, dedup, drift window buffer);
- `meta`: JSON, `{"ts", "model", "version", "input_dtype", "input_shape", "requests", "rows"}`:
  what all rows share once; `requests`, one `[request_id, start, stop, input_stored]` per
  request, in row order, covering rows [start, stop) (inputs are sampled per request); `rows`,
  per row its predicted class, scores, percentiles and flags;
- `embedding`: the n L2-normalised embeddings as little-endian float16 (half the bytes of
  float32, and unit vectors need no more precision than float16 keeps);
- `probabilities`: the n rows of class probabilities as little-endian float32;
- `input`: the raw input tensors (little-endian, dtype and shape per row in `meta`) of the rows
  whose request stored its input, in row order; absent when none did.

`decode_entry` gives the entry's events, each with the same id and meta an entry of its own
used to carry: `id`, `request_id`, `index` (the row within its request), the shared fields,
then its row. A single event on its own (the drift worker's window buffer keeps events one by
one) is `event_fields` / `decode_event`, the layout stream entries had before batches.
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

# The meta fields every event of an entry shares, in the order an event's meta lists them.
_SHARED = ("ts", "model", "version", "input_dtype", "input_shape")


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


def encode_batch_entry(
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
) -> EventFields:
    """The stream entry of a batch gathered from the requests `spans`, whose inputs are stored
    where `store_inputs` says (one flag per request)."""
    requests = [
        (span.request_id, span.start, span.stop, store)
        for span, store in zip(spans, store_inputs, strict=True)
    ]
    meta = orjson.dumps(
        {
            "ts": timestamp,
            "model": model,
            "version": version,
            "input_dtype": _dtype_name(batch.dtype),
            "input_shape": list(batch.shape[1:]),
            "requests": requests,
            # Serialised once per batch; the OIP responses reuse the same bytes.
            "rows": orjson.Fragment(scored.rows_json().array()),
        }
    )
    fields: EventFields = {
        # One random id per batch, suffixed by the row: unique, and a random id per row would
        # cost more than the rest of the row's encoding.
        "batch": new_event_id(),
        "meta": meta,
        "embedding": np.ascontiguousarray(embeddings, dtype="<f2").tobytes(),
        "probabilities": np.ascontiguousarray(prediction.probabilities, dtype="<f4").tobytes(),
    }
    stored = batch
    if not all(store_inputs):
        rows = [i for _, start, stop, store in requests if store for i in range(start, stop)]
        stored = batch[rows]
    if len(stored):
        little_endian = batch.dtype.newbyteorder("<")
        fields["input"] = np.ascontiguousarray(stored, dtype=little_endian).tobytes()
    return fields


_DTYPE_NAMES: dict[np.dtype[Any], str] = {}


def _dtype_name(dtype: np.dtype[Any]) -> str:
    # numpy computes `dtype.name` in Python, a few microseconds each time.
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name
    return name


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _raw(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def decode_entry(fields: dict[Any, Any]) -> list[Event]:
    """The events of a stream entry as redis-py returns it (bytes or str keys), in row order.

    Raises KeyError or ValueError when the entry is not a batch entry. An entry of a single
    event (the format before batch entries) gives that event, so streams written by an older
    version are still read.
    """
    get = {_text(k): v for k, v in fields.items()}
    if "batch" not in get:
        return [decode_event(fields)]
    batch_id = _text(get["batch"])
    meta = orjson.loads(get["meta"])
    rows = meta["rows"]
    n = len(rows)
    embeddings = np.frombuffer(_raw(get["embedding"]), dtype="<f2").astype(np.float32)
    probabilities = np.frombuffer(_raw(get["probabilities"]), dtype="<f4")
    shape = meta["input_shape"]
    inputs = None
    if "input" in get:
        dtype = np.dtype(meta["input_dtype"]).newbyteorder("<")
        inputs = np.frombuffer(_raw(get["input"]), dtype=dtype).reshape(-1, *shape)
    if n == 0 or len(embeddings) % n or len(probabilities) % n:
        raise ValueError(f"entry {batch_id}: arrays do not split into its {n} rows")
    embeddings = embeddings.reshape(n, -1)
    probabilities = probabilities.reshape(n, -1)
    shared = {name: meta[name] for name in _SHARED}
    events: list[Event] = []
    stored = 0
    for request_id, start, stop, store in meta["requests"]:
        for index, i in enumerate(range(start, stop)):
            event_id = f"{batch_id}-{i}"
            tensor = None
            if store:
                if inputs is None or stored >= len(inputs):
                    raise ValueError(f"entry {batch_id}: row {i} has no stored input")
                tensor = inputs[stored]
                stored += 1
            event_meta = {"id": event_id, "request_id": request_id, "index": index, **shared}
            event_meta.update(rows[i])
            events.append(Event(event_id, event_meta, tensor, embeddings[i], probabilities[i]))
    if len(events) != n:
        raise ValueError(f"entry {batch_id}: its requests cover {len(events)} of {n} rows")
    return events


def event_fields(event: Event) -> dict[str, bytes]:
    """One event on its own: `id`, `meta` (JSON), `embedding` (float16), `probabilities`
    (float32) and, if stored, `input`. `decode_event` reads it back exactly."""
    fields = {
        "id": event.id.encode(),
        "meta": orjson.dumps(event.meta),
        "embedding": np.ascontiguousarray(event.embedding, dtype="<f2").tobytes(),
        "probabilities": np.ascontiguousarray(event.probabilities, dtype="<f4").tobytes(),
    }
    if event.input is not None:
        fields["input"] = np.ascontiguousarray(
            event.input, dtype=event.input.dtype.newbyteorder("<")
        ).tobytes()
    return fields


def decode_event(fields: dict[Any, Any]) -> Event:
    """One event's fields (bytes or str keys), as `event_fields` writes them."""
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
