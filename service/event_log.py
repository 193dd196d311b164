"""The event log: a bounded in-process buffer, written to Redis Streams by a background task.

The request path only calls `append`, which never waits, fails or does IO. Each call queues one
stream entry holding the events of one inference batch (see `events.py`); the buffer's
capacity, its depth and the written and dropped counters all count events (predictions), not
entries, so they mean what they meant when every event was an entry of its own. When Redis is
slow or down, entries wait in the buffer; when a new entry does not fit, the oldest entries are
dropped, whole, until it does, because recent events matter more to monitoring (an entry of
more events than the whole capacity is dropped itself). Nothing is lost silently: every drop is
counted, in events, by reason.

Delivery is at least once. A batch is one non-transactional pipeline holding, per stream, one
Lua script that XADDs all of that stream's entries, passed packed into one argument (one command
per stream instead of one per entry, and one argument instead of two per field: redis-py
encodes every argument in Python). An entry is packed once, when it is appended. When the
connection breaks mid-pipeline we cannot know what Redis applied, so the whole batch goes back
to the front of the buffer and is sent again. A few entries may then appear twice in a stream;
consumers deduplicate by event id. Each script touches one key, and a pipeline without MULTI is
split per node by the cluster client, so this is cluster-safe.

Retention: `maxlen` counts events, but Redis trims a stream by entries. Each write trims its
stream to `MAXLEN ~` the number of newest entries that hold `maxlen` events, counted from the
entries this writer wrote (stream_retention.py), so a stream keeps about `maxlen` events
whatever the batch sizes, and a burst of large batches does not trim away older events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

from service.redis_connection import AsyncRedis
from service.stream_retention import EntriesForEvents

logger = logging.getLogger("edgeharvest.event_log")

# KEYS[1] = the stream
# ARGV[1] = approximate MAXLEN (entries), ARGV[2] = the entries, packed by `pack_entry`: per
#           entry a 4-byte little-endian field count, then per field its name and its value,
#           each as a 4-byte little-endian length and the bytes.
# Returns the number of entries added. Sent with EVAL (Redis caches it by digest), which any
# cluster pipeline can route by its key. One packed argument instead of two per field: redis-py
# encodes every argument in Python, which cost more per event than building the event.
XADD_BATCH_LUA = """
local blob = ARGV[2]
local pos = 1
local function u32()
  local a, b, c, d = string.byte(blob, pos, pos + 3)
  pos = pos + 4
  return a + b * 256 + c * 65536 + d * 16777216
end
local function chunk()
  local length = u32()
  local value = string.sub(blob, pos, pos + length - 1)
  pos = pos + length
  return value
end
local added = 0
while pos <= #blob do
  local entry = {}
  for j = 1, u32() * 2 do entry[j] = chunk() end
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(entry))
  added = added + 1
end
return added
"""

FieldValue = bytes | str | int | float
Fields = Mapping[str, FieldValue]

DROPPED_BUFFER_FULL = "buffer_full"
DROPPED_SHUTDOWN = "shutdown"
# Fields redis-py cannot encode (None, bool, nested values): they would fail every retry.
DROPPED_INVALID = "invalid"


class EventLogMetrics(Protocol):
    def buffer_depth(self, depth: int) -> None: ...
    def written(self, stream_key: str, count: int) -> None: ...
    def dropped(self, reason: str, count: int) -> None: ...
    def write_error(self) -> None: ...
    def write_latency(self, seconds: float) -> None: ...


class NullEventLogMetrics:
    def buffer_depth(self, depth: int) -> None:
        pass

    def written(self, stream_key: str, count: int) -> None:
        pass

    def dropped(self, reason: str, count: int) -> None:
        pass

    def write_error(self) -> None:
        pass

    def write_latency(self, seconds: float) -> None:
        pass


class Backoff:
    """Exponential delays with jitter: each in [d/2, d], d doubling from minimum to maximum."""

    def __init__(self, minimum: float, maximum: float, rng: random.Random) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self._rng = rng
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.minimum * 2 ** min(self._attempt, 32))
        self._attempt += 1
        # Jitter keeps many replicas from hammering a recovering Redis in lockstep.
        return self._rng.uniform(ceiling / 2, ceiling)


def _by_stream(batch: list[_Entry]) -> dict[str, list[_Entry]]:
    """Entries grouped by stream key, in order; dicts keep the streams' first-seen order."""
    groups: dict[str, list[_Entry]] = {}
    for entry in batch:
        groups.setdefault(entry.stream_key, []).append(entry)
    return groups


def _events(entries: list[_Entry]) -> int:
    return sum(entry.events for entry in entries)


_u32 = struct.Struct("<I").pack
_NAMES: dict[str, bytes] = {}


def _packed(value: FieldValue) -> bytes:
    """A field value as Redis stores it (numbers as redis-py would send them)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value).encode()
    raise TypeError(f"cannot store a {type(value).__name__} in a stream entry")


def pack_entry(fields: Fields) -> bytes | None:
    """One stream entry in XADD_BATCH_LUA's format; None if it is empty or holds a value Redis
    cannot store (None, a bool, a nested value), which would fail every retry."""
    if not fields:
        return None
    parts = [_u32(len(fields))]
    try:
        for name, value in fields.items():
            raw_name = _NAMES.get(name)
            if raw_name is None:
                raw_name = _NAMES.setdefault(name, _u32(len(name.encode())) + name.encode())
            raw = _packed(value)
            parts.append(raw_name)
            parts.append(_u32(len(raw)))
            parts.append(raw)
    except TypeError:
        return None
    return b"".join(parts)


class _Entry(NamedTuple):
    """A buffered stream entry, packed by `pack_entry`, and how many events it holds."""

    stream_key: str
    events: int
    packed: bytes


class EventLog:
    def __init__(
        self,
        redis: AsyncRedis | None = None,
        *,
        capacity: int = 10_000,
        batch_size: int = 500,
        flush_interval: float = 0.05,
        maxlen: int = 100_000,
        retention_seconds: float | None = None,
        trim_interval: float = 60.0,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        shutdown_timeout: float = 5.0,
        metrics: EventLogMetrics | None = None,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        for name, value in (("capacity", capacity), ("batch_size", batch_size), ("maxlen", maxlen)):
            if value < 1:
                raise ValueError(f"EventLog {name}={value} must be at least 1")
        if flush_interval <= 0:
            raise ValueError(f"EventLog flush_interval={flush_interval} must be positive")
        if retention_seconds is not None and retention_seconds <= 0:
            raise ValueError(f"EventLog retention_seconds={retention_seconds} must be positive")
        if not 0 < backoff_min <= backoff_max:
            raise ValueError(
                f"EventLog backoff_min={backoff_min}, backoff_max={backoff_max}: "
                "expected 0 < backoff_min <= backoff_max"
            )
        if shutdown_timeout < 0 or trim_interval < 0:
            raise ValueError(
                f"EventLog shutdown_timeout={shutdown_timeout}, trim_interval={trim_interval} "
                "must not be negative"
            )
        self._redis = redis
        self.capacity = capacity
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.maxlen = maxlen
        self.retention_seconds = retention_seconds
        self.trim_interval = trim_interval
        self.shutdown_timeout = shutdown_timeout
        self._metrics: EventLogMetrics = metrics or NullEventLogMetrics()
        self._backoff = Backoff(backoff_min, backoff_max, rng or random.Random())
        self._wall_clock = wall_clock
        self._buffer: deque[_Entry] = deque()
        # Per stream: how many newest entries hold `maxlen` events (MAXLEN counts entries).
        self._retention: dict[str, EntriesForEvents] = {}
        # Events in the buffer: what capacity, batch_size and the depth gauge count.
        self._buffered = 0
        # Set by `append` once a full batch waits, so the writer need not sleep out its interval.
        self._batch_ready = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._last_trim: dict[str, float] = {}
        self._failures = 0
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    @property
    def buffered(self) -> int:
        """Events waiting in the buffer."""
        return self._buffered

    def append(self, stream_key: str, fields: Fields, events: int = 1) -> None:
        """Queue one entry holding `events` events for `stream_key`. Never blocks, raises or
        awaits; its cost is packing the entry's fields once.

        Call it from the event loop's thread, like everything else that touches asyncio.
        """
        if self._closed:
            self._metrics.dropped(DROPPED_SHUTDOWN, events)
            return
        packed = pack_entry(fields)
        if packed is None:
            logger.warning("dropping an entry of %d events with unencodable fields", events)
            self._metrics.dropped(DROPPED_INVALID, events)
            return
        if events > self.capacity:
            self._metrics.dropped(DROPPED_BUFFER_FULL, events)
            return
        self._drop_oldest(self.capacity - events)
        self._buffer.append(_Entry(stream_key, events, packed))
        self._buffered += events
        if self._buffered >= self.batch_size:
            self._batch_ready.set()

    def _drop_oldest(self, keep: int) -> None:
        """Drop the oldest entries, whole, until at most `keep` events are buffered."""
        dropped = 0
        while self._buffered - dropped > keep:
            dropped += self._buffer.popleft().events
        if dropped:
            self._buffered -= dropped
            self._metrics.dropped(DROPPED_BUFFER_FULL, dropped)

    async def start(self, redis: AsyncRedis | None = None) -> None:
        """Start the writer, on `redis` or the client given to the constructor."""
        if self._task is not None:
            raise RuntimeError("EventLog.start() called twice")
        if redis is not None:
            self._redis = redis
        if self._redis is None:
            raise ValueError("EventLog needs a Redis client: pass one to EventLog() or start()")
        self._task = asyncio.create_task(self._run(), name="edgeharvest-event-writer")

    async def stop(self) -> None:
        """Flush for up to `shutdown_timeout` seconds; count what is left as dropped."""
        if self._closed:
            return
        task = self._task
        if task is not None:
            self._stop_requested.set()
            self._batch_ready.set()
            # Retry from the shortest delay: the shutdown budget is seconds, not minutes.
            self._backoff.reset()
            _, pending = await asyncio.wait({task}, timeout=self.shutdown_timeout)
            if pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # Events appended while the writer drained were still written; from here on they cannot.
        self._closed = True
        if self._buffer:
            logger.warning("dropping %d unwritten events at shutdown", self._buffered)
            self._metrics.dropped(DROPPED_SHUTDOWN, self._buffered)
            self._buffer.clear()
            self._buffered = 0
        self._metrics.buffer_depth(0)

    async def _run(self) -> None:
        stopping = self._stop_requested.is_set
        while not (stopping() and not self._buffer):
            try:
                if self._buffered < self.batch_size and not stopping():
                    self._batch_ready.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.flush_interval):
                            await self._batch_ready.wait()
                self._metrics.buffer_depth(self._buffered)
                if not self._buffer:
                    continue
                if await self._write_batch():
                    self._backoff.reset()
                else:
                    await self._pause(self._backoff.next_delay())
            except asyncio.CancelledError:
                raise
            except Exception:
                # Whatever went wrong, the writer must outlive it: the request path relies on it.
                logger.exception("event writer failed unexpectedly; retrying")
                await self._pause(self._backoff.next_delay())

    async def _pause(self, seconds: float) -> None:
        if self._stop_requested.is_set():
            await asyncio.sleep(seconds)
            return
        # A stop request cuts the pause short so shutdown tries to flush at once.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop_requested.wait()

    async def _write_batch(self) -> bool:
        """Write about batch_size events (whole entries); True if all were written."""
        batch = self._take()
        if not batch:
            return True
        trims = self._due_trims(batch)
        started = time.perf_counter()
        try:
            results = await self._send(batch, trims)
        except asyncio.CancelledError:
            self._requeue(batch)
            raise
        except Exception as exc:
            # The whole batch goes back: which XADDs Redis applied before the error is unknown.
            self._requeue(batch)
            self._write_failed(exc)
            return False
        elapsed = time.perf_counter() - started
        groups = _by_stream(batch)
        failed: list[_Entry] = []
        errors = []
        for (stream_key, entries), result in zip(groups.items(), results, strict=False):
            if isinstance(result, Exception):
                failed.extend(entries)
                errors.append(result)
            else:
                self._metrics.written(stream_key, _events(entries))
        self._record_trims(trims, results[len(groups) :])
        if failed:
            # Only the rejected streams are re-sent. A script stopped by an error midway keeps
            # the entries it added, so a few may be duplicated (consumers dedupe by event id),
            # and re-sent entries land after newer ones: consumers order by the time in `meta`.
            self._requeue(failed)
            self._write_failed(errors[0], rejected=_events(failed))
            return False
        self._metrics.write_latency(elapsed)
        if self._failures:
            logger.info("Redis writes recovered after %d failed attempts", self._failures)
            self._failures = 0
        return True

    def _take(self) -> list[_Entry]:
        """The oldest entries, whole, up to batch_size events (at least one entry)."""
        batch: list[_Entry] = []
        taken = 0
        while self._buffer and (not batch or taken + self._buffer[0].events <= self.batch_size):
            entry = self._buffer.popleft()
            batch.append(entry)
            taken += entry.events
        self._buffered -= taken
        return batch

    async def _send(self, batch: list[_Entry], trims: list[str]) -> list[Any]:
        assert self._redis is not None
        pipe = self._redis.pipeline(transaction=False)
        for stream_key, entries in _by_stream(batch).items():
            packed = b"".join([entry.packed for entry in entries])
            pipe.eval(
                XADD_BATCH_LUA, 1, stream_key, self._maxlen_entries(stream_key, entries), packed
            )
        if trims:
            assert self.retention_seconds is not None
            # Stream ids start with the server's time in milliseconds; ours is close enough for
            # a retention measured in hours or days.
            min_id = int((self._wall_clock() - self.retention_seconds) * 1000)
            for stream_key in trims:
                pipe.xtrim(stream_key, minid=min_id, approximate=True)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    def _maxlen_entries(self, stream_key: str, entries: list[_Entry]) -> int:
        """MAXLEN for a write of `entries` to a stream: the entries that hold its newest
        `maxlen` events (see the module docstring). A batch sent again after a broken
        connection is counted again, which only keeps a few more entries."""
        window = self._retention.get(stream_key)
        if window is None:
            window = self._retention[stream_key] = EntriesForEvents(self.maxlen)
        window.add(entry.events for entry in entries)
        return window.entries()

    def _due_trims(self, batch: list[_Entry]) -> list[str]:
        if self.retention_seconds is None:
            return []
        now = time.monotonic()
        streams = dict.fromkeys(entry.stream_key for entry in batch)
        return [
            key
            for key in streams
            if key not in self._last_trim or now - self._last_trim[key] >= self.trim_interval
        ]

    def _record_trims(self, trims: list[str], results: list[Any]) -> None:
        now = time.monotonic()
        for stream_key, result in zip(trims, results, strict=True):
            if isinstance(result, Exception):
                logger.warning("XTRIM MINID on %s failed: %s", stream_key, result)
            self._last_trim[stream_key] = now

    def _requeue(self, entries: list[_Entry]) -> None:
        # Back at the front, in order: these are older than anything appended meanwhile, so
        # they are the first to go if the buffer overflows.
        self._buffer.extendleft(reversed(entries))
        self._buffered += _events(entries)
        self._drop_oldest(self.capacity)

    def _write_failed(self, error: BaseException, rejected: int | None = None) -> None:
        self._failures += 1
        self._metrics.write_error()
        what = f"{rejected} events rejected" if rejected is not None else "batch failed"
        # One line per attempt; the backoff spaces attempts out to at most one per backoff_max.
        logger.warning(
            "Redis write failed (%s, attempt %d, %d buffered): %s: %s",
            what,
            self._failures,
            self._buffered,
            type(error).__name__,
            error,
        )
