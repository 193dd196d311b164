"""The event log: a bounded in-process buffer, written to Redis Streams by a background task.

The request path only calls `append`, which never waits, fails or does IO. When Redis is slow
or down, events wait in the buffer; when the buffer is full the oldest are dropped, because
recent events matter more to monitoring. Nothing is lost silently: every drop is counted, by
reason.

Delivery is at least once. A batch is one non-transactional pipeline holding, per stream, one
Lua script that XADDs all of that stream's events, passed packed into one argument (one command
per stream instead of one per event, and one argument instead of two per field: about 2.7 us of
client CPU per event of five fields against 10.6 us with an argument per field, measured with
redis-py and hiredis on the development machine); when the connection breaks mid-pipeline we
cannot know what Redis applied, so the whole batch goes back to the front of the buffer and is
sent again. A few events may then appear twice in a stream; consumers deduplicate by the event's
`id` field. Each script touches one key, and a pipeline without MULTI is split per node by the
cluster client, so this is cluster-safe.
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
from typing import Any, Protocol

from service.redis_connection import AsyncRedis

logger = logging.getLogger("edgeharvest.event_log")

# KEYS[1] = the stream
# ARGV[1] = approximate MAXLEN, ARGV[2] = the events, packed by `pack_event`: per event a
#           4-byte little-endian field count, then per field its name and its value, each as a
#           4-byte little-endian length and the bytes.
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


def _by_stream(batch: list[_Packed]) -> dict[str, list[_Packed]]:
    """Events grouped by stream key, in order; dicts keep the streams' first-seen order."""
    groups: dict[str, list[_Packed]] = {}
    for event in batch:
        groups.setdefault(event[0], []).append(event)
    return groups


# Events packed between two yields to the event loop.
_PACK_CHUNK = 50
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


def pack_event(fields: Fields) -> bytes | None:
    """One event in XADD_BATCH_LUA's format; None if it is empty or holds a value Redis cannot
    store (None, a bool, a nested value), which would fail every retry."""
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


_Event = tuple[str, Fields]
# Taken from the buffer for one write: the events, and each one packed.
_Packed = tuple[str, Fields, bytes]


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
        self._buffer: deque[_Event] = deque()
        # Set by `append` once a full batch waits, so the writer need not sleep out its interval.
        self._batch_ready = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._last_trim: dict[str, float] = {}
        self._failures = 0
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def append(self, stream_key: str, fields: Fields) -> None:
        """Queue one event for `stream_key`. O(1); never blocks, raises or awaits.

        Call it from the event loop's thread, like everything else that touches asyncio.
        """
        if self._closed:
            self._metrics.dropped(DROPPED_SHUTDOWN, 1)
            return
        if len(self._buffer) >= self.capacity:
            self._buffer.popleft()
            self._metrics.dropped(DROPPED_BUFFER_FULL, 1)
        self._buffer.append((stream_key, fields))
        if len(self._buffer) >= self.batch_size:
            self._batch_ready.set()

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
            logger.warning("dropping %d unwritten events at shutdown", len(self._buffer))
            self._metrics.dropped(DROPPED_SHUTDOWN, len(self._buffer))
            self._buffer.clear()
        self._metrics.buffer_depth(0)

    async def _run(self) -> None:
        stopping = self._stop_requested.is_set
        while not (stopping() and not self._buffer):
            try:
                if len(self._buffer) < self.batch_size and not stopping():
                    self._batch_ready.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.flush_interval):
                            await self._batch_ready.wait()
                self._metrics.buffer_depth(len(self._buffer))
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
        """Write up to batch_size events; True if all were written."""
        batch = await self._take()
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
        failed: list[_Packed] = []
        errors = []
        for (stream_key, events), result in zip(groups.items(), results, strict=False):
            if isinstance(result, Exception):
                failed.extend(events)
                errors.append(result)
            else:
                self._metrics.written(stream_key, len(events))
        self._record_trims(trims, results[len(groups) :])
        if failed:
            # Only the rejected streams are re-sent. A script stopped by an error midway keeps
            # the entries it added, so a few may be duplicated (consumers dedupe by id), and
            # re-sent events land after newer ones: consumers order by the time in `meta`.
            self._requeue(failed)
            self._write_failed(errors[0], rejected=len(failed))
            return False
        self._metrics.write_latency(elapsed)
        if self._failures:
            logger.info("Redis writes recovered after %d failed attempts", self._failures)
            self._failures = 0
        return True

    async def _take(self) -> list[_Packed]:
        batch: list[_Packed] = []
        invalid = 0
        try:
            while self._buffer and len(batch) < self.batch_size:
                stream_key, fields = self._buffer.popleft()
                packed = pack_event(fields)
                if packed is not None:
                    batch.append((stream_key, fields, packed))
                else:
                    invalid += 1
                if (len(batch) + invalid) % _PACK_CHUNK == 0:
                    # Packing a full batch in one go held the event loop for about half a
                    # millisecond, which showed in the request p99: let requests in between.
                    await asyncio.sleep(0)
        except asyncio.CancelledError:
            self._requeue(batch)
            raise
        if invalid:
            logger.warning("dropping %d events with empty or unencodable fields", invalid)
            self._metrics.dropped(DROPPED_INVALID, invalid)
        return batch

    async def _send(self, batch: list[_Packed], trims: list[str]) -> list[Any]:
        assert self._redis is not None
        pipe = self._redis.pipeline(transaction=False)
        for stream_key, events in _by_stream(batch).items():
            packed = b"".join(event[2] for event in events)
            pipe.eval(XADD_BATCH_LUA, 1, stream_key, self.maxlen, packed)
        if trims:
            assert self.retention_seconds is not None
            # Stream ids start with the server's time in milliseconds; ours is close enough for
            # a retention measured in hours or days.
            min_id = int((self._wall_clock() - self.retention_seconds) * 1000)
            for stream_key in trims:
                pipe.xtrim(stream_key, minid=min_id, approximate=True)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    def _due_trims(self, batch: list[_Packed]) -> list[str]:
        if self.retention_seconds is None:
            return []
        now = time.monotonic()
        streams = dict.fromkeys(event[0] for event in batch)
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

    def _requeue(self, events: list[_Packed]) -> None:
        # Back at the front, in order: these are older than anything appended meanwhile.
        self._buffer.extendleft((stream_key, fields) for stream_key, fields, _ in reversed(events))
        overflow = len(self._buffer) - self.capacity
        if overflow > 0:
            for _ in range(overflow):
                self._buffer.popleft()
            self._metrics.dropped(DROPPED_BUFFER_FULL, overflow)

    def _write_failed(self, error: BaseException, rejected: int | None = None) -> None:
        self._failures += 1
        self._metrics.write_error()
        what = f"{rejected} events rejected" if rejected is not None else "batch failed"
        # One line per attempt; the backoff spaces attempts out to at most one per backoff_max.
        logger.warning(
            "Redis write failed (%s, attempt %d, %d buffered): %s: %s",
            what,
            self._failures,
            len(self._buffer),
            type(error).__name__,
            error,
        )
