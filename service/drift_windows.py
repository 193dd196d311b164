"""The drift worker's pure logic: buffered events, which of them form the next window, the data
a window hands to the tests, streaming alarms, and the summaries a report shows. No IO.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.drift_detectors import PageHinkley, WindowData
from service.events import Event, decode_event

# Page-Hinkley on each score's reference percentile / 100, which is uniform on [0, 1] while
# traffic looks like the reference: novelty is watched for rises, confidence for falls.
STREAMING_SCORES: tuple[tuple[str, str], ...] = (("novelty", "up"), ("max_probability", "down"))
HISTOGRAM_BINS = 20

_LENGTH = struct.Struct("<BI")


# ---- buffered events ---------------------------------------------------------------------


def pack_event(entry_id: str, row: int, timestamp: float, fields: Mapping[str, bytes]) -> bytes:
    """The event of row `row` of stream entry `entry_id` as one hash value:
    `entry_id row ts\\n`, then its fields' (name, value) pairs, length-prefixed."""
    parts = [f"{entry_id} {row} {timestamp!r}\n".encode()]
    for name, value in fields.items():
        key = name.encode()
        parts += [_LENGTH.pack(len(key), len(value)), key, value]
    return b"".join(parts)


@dataclass(frozen=True)
class BufferedEvent:
    entry_id: str
    row: int
    timestamp: float
    packed: bytes

    @property
    def order(self) -> tuple[int, int, int]:
        """Stream order: entry ids are `<milliseconds>-<sequence>`, then the row in the entry."""
        ms, _, seq = self.entry_id.partition("-")
        return int(ms), int(seq or 0), self.row

    def fields(self) -> dict[str, bytes]:
        data = self.packed
        offset = data.index(b"\n") + 1
        fields = {}
        while offset < len(data):
            key_length, value_length = _LENGTH.unpack_from(data, offset)
            offset += _LENGTH.size
            key = data[offset : offset + key_length].decode()
            offset += key_length
            fields[key] = data[offset : offset + value_length]
            offset += value_length
        return fields

    def event(self) -> Event:
        return decode_event(self.fields())


def read_buffered(packed: bytes) -> BufferedEvent:
    entry_id, *rest = packed[: packed.index(b"\n")].decode().split(" ")
    # `entry_id ts`: buffered before entries held batches, one event per entry.
    row, timestamp = rest if len(rest) == 2 else ("0", rest[0])
    return BufferedEvent(entry_id, int(row), float(timestamp), packed)


# ---- which events form the next window ---------------------------------------------------


@dataclass(frozen=True)
class WindowPlan:
    index: int
    start_time: float
    end_time: float
    # Event ids of the window, in stream order.
    event_ids: list[str]
    # Events of time windows that were already closed: removed, counted, not tested.
    late_ids: list[str]


def plan_count_window(
    buffered: Mapping[str, BufferedEvent], size: int, next_index: int
) -> WindowPlan | None:
    """The oldest `size` buffered events, once there are that many."""
    if len(buffered) < size:
        return None
    ordered = sorted(buffered, key=lambda event_id: buffered[event_id].order)[:size]
    times = [buffered[i].timestamp for i in ordered]
    return WindowPlan(next_index, min(times), max(times), ordered, [])


def plan_time_window(
    buffered: Mapping[str, BufferedEvent],
    seconds: float,
    next_index: int,
    now: float,
    grace: float,
) -> WindowPlan | None:
    """The earliest period of `seconds` (aligned to the epoch) that ended `grace` ago.

    Windows are numbered by period, `floor(ts / seconds)`, so every worker agrees on them;
    events of a period below `next_index` came after their window closed and are late.
    """
    periods: dict[int, list[str]] = {}
    late = []
    for event_id, event in buffered.items():
        period = math.floor(event.timestamp / seconds)
        if period < next_index:
            late.append(event_id)
        else:
            periods.setdefault(period, []).append(event_id)
    ready = [p for p in periods if now >= (p + 1) * seconds + grace]
    if not ready:
        return WindowPlan(next_index, 0.0, 0.0, [], sorted(late)) if late else None
    period = min(ready)
    ordered = sorted(periods[period], key=lambda event_id: buffered[event_id].order)
    return WindowPlan(period, period * seconds, (period + 1) * seconds, ordered, sorted(late))


# ---- what a window hands to the tests ----------------------------------------------------


def window_data(events: Sequence[Event], score_names: Iterable[str]) -> WindowData:
    """Arrays of a window's events; inputs only from the events that stored theirs."""
    if not events:
        raise ValueError("a window needs at least one event")
    scores = {
        name: np.array([e.scores.get(name, math.nan) for e in events], dtype=np.float64)
        for name in score_names
    }
    inputs = [e.input.reshape(-1) for e in events if e.input is not None]
    return WindowData(
        predicted=np.array([e.predicted for e in events], dtype=np.int64),
        scores=scores,
        probabilities=np.stack([e.probabilities for e in events]).astype(np.float64),
        embeddings=np.stack([e.embedding for e in events]).astype(np.float64),
        inputs=np.stack(inputs).astype(np.float64) if inputs else None,
    )


def score_histograms(
    reference: Mapping[str, np.ndarray],
    window: Mapping[str, np.ndarray],
    bins: int = HISTOGRAM_BINS,
) -> dict[str, dict[str, list[float]]]:
    """Per score: shared bin edges, and the share of reference and window values per bin."""
    result = {}
    for name in sorted(set(reference) & set(window)):
        ref = np.asarray(reference[name], dtype=np.float64)
        win = np.asarray(window[name], dtype=np.float64)
        ref, win = ref[np.isfinite(ref)], win[np.isfinite(win)]
        if not len(ref) or not len(win):
            continue
        low = float(min(ref.min(), win.min()))
        high = float(max(ref.max(), win.max()))
        if high <= low:
            high = low + 1.0
        edges = np.linspace(low, high, bins + 1)
        result[name] = {
            "edges": edges.tolist(),
            "reference": (np.histogram(ref, edges)[0] / len(ref)).tolist(),
            "window": (np.histogram(win, edges)[0] / len(win)).tolist(),
        }
    return result


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float as None, so strict JSON encoders accept it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    if isinstance(value, np.generic):
        return finite_json(value.item())
    return value


# ---- streaming alarms --------------------------------------------------------------------


class StreamingAlarms:
    """Page-Hinkley per watched score, fed event by event, resumable from its `state()`.

    A score is in alarm while its last detection lies fewer than `span` events back, so a
    detection stays visible (as a gauge) for about one window.
    """

    def __init__(self, state: Mapping[str, Any], span: int) -> None:
        self.span = span
        self._detectors: dict[str, PageHinkley] = {}
        self._counts: dict[str, dict[str, int | None]] = {}
        for score, direction in STREAMING_SCORES:
            saved = state.get(score, {})
            detector = PageHinkley(direction=direction)  # type: ignore[arg-type]
            if "detector" in saved:
                detector.restore(saved["detector"])
            self._detectors[score] = detector
            self._counts[score] = {
                "detections": int(saved.get("detections", 0)),
                "since_detection": saved.get("since_detection"),
            }

    def update(self, percentiles: Mapping[str, float]) -> None:
        for score, detector in self._detectors.items():
            value = percentiles.get(score)
            if value is None or not math.isfinite(value):
                continue
            counts = self._counts[score]
            if counts["since_detection"] is not None:
                counts["since_detection"] += 1
            if detector.update(value / 100.0).drift_detected:
                counts["detections"] = int(counts["detections"] or 0) + 1
                counts["since_detection"] = 0

    def alarm(self, score: str) -> bool:
        since = self._counts[score]["since_detection"]
        return since is not None and since < self.span

    def state(self) -> dict[str, Any]:
        return {
            score: {
                "detector": detector.state(),
                **self._counts[score],
                "alarm": self.alarm(score),
            }
            for score, detector in self._detectors.items()
        }
