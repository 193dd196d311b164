"""Drift state in Redis: the shared window buffer, the worker state, and the window history.

Every change is a compare-and-set in one Lua script over keys of one model (one hash tag, one
Cluster slot), so any number of drift workers can share a stream:
- `ingest` moves the events of a batch of stream entries into the buffer hash (keyed by event
  id, so a redelivered event overwrites itself), stores the streaming detectors' new state and
  acknowledges the entries - only if the detectors' state is still the one the worker read;
- `close_window` removes one window's events from the buffer, stores the next state and pushes
  the window's report - only if the state is still the one the worker evaluated against.
A worker that loses a race reads again and retries; a worker that dies before its script ran
leaves its entries pending in the consumer group, and they are claimed again. So a window is
neither lost nor counted twice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.commands.core import Script

from service.redis_connection import SyncRedis
from service.redis_keys import (
    drift_buffer,
    drift_history,
    drift_state,
    drift_streaming,
    event_stream,
)

# KEYS: streaming, buffer, stream. ARGV: expected streaming state ("" when absent), new state,
# group, number of buffer pairs n, then n (event id, packed event) pairs, then the entry ids.
INGEST_LUA = """
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
local n = tonumber(ARGV[4])
local i = 5
while i < 5 + 2 * n do
  local last = math.min(i + 2 * 250 - 1, 4 + 2 * n)
  redis.call('HSET', KEYS[2], unpack(ARGV, i, last))
  i = last + 1
end
while i <= #ARGV do
  local last = math.min(i + 499, #ARGV)
  redis.call('XACK', KEYS[3], ARGV[3], unpack(ARGV, i, last))
  i = last + 1
end
return 1
"""

# KEYS: state, buffer, history. ARGV: expected state ("" when absent), new state, report
# ("" for none), history size, then the event ids leaving the buffer.
CLOSE_LUA = """
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
local i = 5
while i <= #ARGV do
  local last = math.min(i + 499, #ARGV)
  redis.call('HDEL', KEYS[2], unpack(ARGV, i, last))
  i = last + 1
end
if ARGV[3] ~= '' then
  redis.call('LPUSH', KEYS[3], ARGV[3])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[4]) - 1)
end
return 1
"""


def _text(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    return raw.decode() if isinstance(raw, bytes) else raw


@dataclass(frozen=True)
class Snapshot:
    """A JSON value as read, with its raw text: the `expected` of the next compare-and-set."""

    raw: str
    value: dict[str, Any]


def _snapshot(raw: bytes | str | None) -> Snapshot:
    text = _text(raw)
    return Snapshot(text, json.loads(text) if text else {})


def dumps(value: object) -> str:
    # Sorted keys: equal states have equal text. NaN is written as NaN (Python's json reads it).
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class DriftStore:
    """Drift keys of one model version."""

    def __init__(self, redis: SyncRedis, model: str, version: str) -> None:
        self.redis = redis
        self.model = model
        self.version = version
        self.stream_key = event_stream(model, version)
        self.buffer_key = drift_buffer(model, version)
        self.state_key = drift_state(model, version)
        self.streaming_key = drift_streaming(model, version)
        self.history_key = drift_history(model, version)
        self._ingest: Script = redis.register_script(INGEST_LUA)
        self._close: Script = redis.register_script(CLOSE_LUA)

    # ---- the worker's side ------------------------------------------------------------------

    def streaming(self) -> Snapshot:
        return _snapshot(self.redis.get(self.streaming_key))

    def state(self) -> Snapshot:
        return _snapshot(self.redis.get(self.state_key))

    def ingest(
        self,
        expected_streaming: Snapshot,
        streaming: dict[str, Any],
        group: str,
        events: Sequence[tuple[str, bytes]],
        entry_ids: Sequence[bytes | str],
    ) -> bool:
        pairs: list[bytes | str] = []
        for event_id, packed in events:
            pairs += [event_id, packed]
        args: list[Any] = [
            expected_streaming.raw,
            dumps(streaming),
            group,
            len(events),
            *pairs,
            *entry_ids,
        ]
        keys = [self.streaming_key, self.buffer_key, self.stream_key]
        return bool(self._ingest(keys=keys, args=args))

    def buffered(self) -> dict[str, bytes]:
        raw: Any = self.redis.hgetall(self.buffer_key)
        return {_text(k): v for k, v in raw.items()}

    def buffered_count(self) -> int:
        return int(self.redis.hlen(self.buffer_key))

    def close_window(
        self,
        expected_state: Snapshot,
        state: dict[str, Any],
        report: dict[str, Any] | None,
        history_size: int,
        event_ids: Sequence[str],
    ) -> bool:
        args: list[Any] = [
            expected_state.raw,
            dumps(state),
            "" if report is None else dumps(report),
            history_size,
            *event_ids,
        ]
        keys = [self.state_key, self.buffer_key, self.history_key]
        return bool(self._close(keys=keys, args=args))

    # ---- the readers' side (API, metrics, report) -------------------------------------------

    def history(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` window reports, newest first."""
        if limit <= 0:
            return []
        raw: Any = self.redis.lrange(self.history_key, 0, limit - 1)
        return [json.loads(r) for r in raw]

    def overview(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
        """State, streaming state and latest report, read in one round trip."""
        pipe: Any = self.redis.pipeline(transaction=False)
        pipe.get(self.state_key)
        pipe.get(self.streaming_key)
        pipe.lindex(self.history_key, 0)
        state, streaming, latest = pipe.execute()
        return (
            _snapshot(state).value,
            _snapshot(streaming).value,
            json.loads(latest) if latest else None,
        )
