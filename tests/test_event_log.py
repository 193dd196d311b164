"""The event log against a real Redis: delivery, batching, trimming, outages and shutdown."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import pytest

from service.event_log import EventLog
from service.redis_connection import AsyncRedis, create_async_redis
from service.redis_keys import event_stream
from tests.redis_server import RedisServer

pytestmark = pytest.mark.anyio

STREAM = event_stream("digits", "1")
EventFields = dict[str, bytes | str | int | float]


class CountingMetrics:
    def __init__(self) -> None:
        self.depths: list[int] = []
        self.written_by_stream: Counter[str] = Counter()
        self.dropped_by_reason: Counter[str] = Counter()
        self.write_errors = 0
        self.latencies: list[float] = []

    @property
    def written_total(self) -> int:
        return sum(self.written_by_stream.values())

    def buffer_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def written(self, stream_key: str, count: int) -> None:
        self.written_by_stream[stream_key] += count

    def dropped(self, reason: str, count: int) -> None:
        self.dropped_by_reason[reason] += count

    def write_error(self) -> None:
        self.write_errors += 1

    def write_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A server of the test's own, so that killing it leaves the shared one alone."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[AsyncRedis]:
    client = create_async_redis(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def private_client(private_redis: RedisServer) -> AsyncIterator[AsyncRedis]:
    client = create_async_redis(private_redis.url)
    yield client
    await client.aclose()


def event(i: int) -> EventFields:
    return {
        "id": f"e{i:06d}",
        "meta": f'{{"index": {i}, "label": "é"}}',
        "embedding": bytes(range(256))[i % 256 :] + b"\x00\xff",
        "n": i,
        "score": i / 3,
    }


def as_stored(fields: EventFields) -> dict[bytes, bytes]:
    """What Redis gives back: str as UTF-8, numbers as redis-py writes them (their repr)."""
    stored = {}
    for key, value in fields.items():
        if isinstance(value, bytes):
            stored[key.encode()] = value
        elif isinstance(value, str):
            stored[key.encode()] = value.encode()
        else:
            stored[key.encode()] = repr(value).encode()
    return stored


async def stream_entries(redis: AsyncRedis, stream: str = STREAM) -> list[dict[bytes, bytes]]:
    """The fields of every entry, oldest first (as bytes: the client does not decode)."""
    entries = await redis.xrange(stream)
    return [cast(dict[bytes, bytes], fields) for _, fields in entries or []]


async def stream_ids(redis: AsyncRedis, stream: str = STREAM) -> list[str]:
    return [fields[b"id"].decode() for fields in await stream_entries(redis, stream)]


async def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for a condition; the timeout only guards against hanging, it asserts nothing fast."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def fast_retrying_log(client: AsyncRedis, metrics: CountingMetrics, **options: Any) -> EventLog:
    """An event log that retries every few milliseconds, so outages resolve quickly."""
    return EventLog(
        client, backoff_min=0.01, backoff_max=0.05, rng=random.Random(7), metrics=metrics,
        **options,
    )  # fmt: skip


async def test_events_land_in_the_stream_intact_and_in_order(redis: AsyncRedis) -> None:
    metrics = CountingMetrics()
    log = EventLog(redis, metrics=metrics)
    await log.start()
    events = [event(i) for i in range(300)]
    for fields in events:
        log.append(STREAM, fields)
    await wait_until(lambda: metrics.written_total == len(events))
    await log.stop()

    assert await stream_entries(redis) == [as_stored(fields) for fields in events]
    assert metrics.dropped_by_reason == Counter()
    assert metrics.write_errors == 0


async def test_batches_span_streams_and_keep_each_stream_in_order(redis: AsyncRedis) -> None:
    streams = [event_stream(model, "1") for model in ("digits", "iris", "mnist")]
    metrics = CountingMetrics()
    log = EventLog(redis, batch_size=100, metrics=metrics)
    await log.start()
    for i in range(3000):
        log.append(streams[i % 3], event(i))
    # All 3000 are queued before the writer first runs, so it writes exactly 30 full batches.
    await wait_until(lambda: metrics.written_total == 3000)
    await log.stop()

    assert len(metrics.latencies) == 30
    assert metrics.written_by_stream == Counter(dict.fromkeys(streams, 1000))
    for k, stream in enumerate(streams):
        assert await stream_ids(redis, stream) == [f"e{i:06d}" for i in range(k, 3000, 3)]


async def test_maxlen_bounds_each_stream(redis: AsyncRedis) -> None:
    metrics = CountingMetrics()
    log = EventLog(redis, maxlen=100, batch_size=50, metrics=metrics)
    await log.start()
    for i in range(2000):
        log.append(STREAM, event(i))
    await wait_until(lambda: metrics.written_total == 2000)
    await log.stop()

    # MAXLEN ~ trims whole stream nodes (100 entries each by default), never below maxlen.
    length = await redis.xlen(STREAM)
    assert 100 <= length < 200
    assert (await stream_ids(redis))[-1] == "e001999"


async def test_retention_trims_old_entries_at_most_once_per_interval(redis: AsyncRedis) -> None:
    # Entries with ids 1-0 .. 300-0 were written in January 1970.
    for i in range(1, 301):
        await redis.xadd(STREAM, {"id": f"old{i}"}, id=f"{i}-0")
    now = [time.time()]
    metrics = CountingMetrics()
    log = EventLog(
        redis, retention_seconds=3600, trim_interval=3600, metrics=metrics,
        wall_clock=lambda: now[0],
    )  # fmt: skip
    await log.start()
    for i in range(10):
        log.append(STREAM, event(i))
    await wait_until(lambda: metrics.written_total == 10)

    ids = await stream_ids(redis)
    # MINID ~ removes whole nodes only: at most one node's worth of old entries may remain.
    assert sum(1 for i in ids if i.startswith("old")) < 100
    assert [i for i in ids if not i.startswith("old")] == [f"e{i:06d}" for i in range(10)]

    # Two days later every entry is past retention, but the next trim is an hour away.
    now[0] += 2 * 86400
    for i in range(10, 20):
        log.append(STREAM, event(i))
    await wait_until(lambda: metrics.written_total == 20)
    await log.stop()
    assert [i for i in await stream_ids(redis) if not i.startswith("old")] == [
        f"e{i:06d}" for i in range(20)
    ]


async def test_outage_buffers_events_and_delivers_all_after_restart(
    private_redis: RedisServer, private_client: AsyncRedis
) -> None:
    metrics = CountingMetrics()
    log = fast_retrying_log(private_client, metrics, batch_size=50)
    await log.start()
    before = [event(i) for i in range(100)]
    for fields in before:
        log.append(STREAM, fields)
    await wait_until(lambda: metrics.written_total == 100)
    # Read now: the test server persists nothing, so a crash loses what it held.
    written_before = await stream_ids(private_client)

    private_redis.stop()
    during = [event(i) for i in range(100, 1100)]
    for n, fields in enumerate(during):
        log.append(STREAM, fields)
        if n % 50 == 0:
            await asyncio.sleep(0.005)  # the writer tries, and fails, mid-traffic
    await wait_until(lambda: metrics.write_errors >= 3 and log.buffered == len(during))
    assert metrics.dropped_by_reason == Counter()
    assert metrics.written_total == 100

    private_redis.start()
    await wait_until(lambda: metrics.written_total == 1100)
    written_after = await stream_ids(private_client)
    await log.stop()

    assert written_before == [f["id"] for f in before]
    assert written_after == [f["id"] for f in during]
    assert metrics.dropped_by_reason == Counter()


async def test_full_buffer_drops_the_oldest_and_counts_them(
    private_redis: RedisServer, private_client: AsyncRedis
) -> None:
    private_redis.stop()
    metrics = CountingMetrics()
    log = fast_retrying_log(private_client, metrics, capacity=50, batch_size=10)
    await log.start()
    appended = []
    for i in range(300):
        fields = event(i)
        log.append(STREAM, fields)
        appended.append(fields["id"])
        assert log.buffered <= 50
        if i % 20 == 0:
            await asyncio.sleep(0.002)
    # Once no batch is out being tried, the buffer holds exactly its capacity.
    await wait_until(lambda: log.buffered == 50 and metrics.write_errors >= 1)
    assert metrics.dropped_by_reason == Counter({"buffer_full": 250})
    assert max(metrics.depths) <= 50

    private_redis.start()
    await wait_until(lambda: metrics.written_total == 50)
    await log.stop()
    # The newest survive, in order; every other id was counted as dropped.
    assert await stream_ids(private_client) == appended[-50:]
    assert metrics.dropped_by_reason == Counter({"buffer_full": 250})


async def test_stop_flushes_everything_buffered(redis: AsyncRedis) -> None:
    metrics = CountingMetrics()
    # A long interval: only stop() can make the writer send the last partial batch.
    log = EventLog(redis, batch_size=100, flush_interval=60, metrics=metrics)
    await log.start()
    for i in range(250):
        log.append(STREAM, event(i))
    await log.stop()

    assert await stream_ids(redis) == [f"e{i:06d}" for i in range(250)]
    assert log.buffered == 0
    assert metrics.dropped_by_reason == Counter()


async def test_stop_with_redis_down_counts_leftovers_as_shutdown_drops(
    private_redis: RedisServer, private_client: AsyncRedis
) -> None:
    private_redis.stop()
    metrics = CountingMetrics()
    log = fast_retrying_log(private_client, metrics, shutdown_timeout=0.2)
    await log.start()
    for i in range(30):
        log.append(STREAM, event(i))
    await log.stop()

    assert metrics.dropped_by_reason == Counter({"shutdown": 30})
    assert metrics.write_errors >= 1
    assert log.buffered == 0
    log.append(STREAM, event(30))
    assert metrics.dropped_by_reason == Counter({"shutdown": 31})


async def test_unencodable_events_are_dropped_without_blocking_the_rest(
    redis: AsyncRedis,
) -> None:
    metrics = CountingMetrics()
    log = EventLog(redis, metrics=metrics)
    await log.start()
    log.append(STREAM, {"id": "bad", "value": None})  # type: ignore[dict-item]
    log.append(STREAM, {})
    log.append(STREAM, event(1))
    await wait_until(lambda: metrics.written_total == 1)
    await log.stop()

    assert await stream_ids(redis) == ["e000001"]
    assert metrics.dropped_by_reason == Counter({"invalid": 2})


async def test_rejected_commands_are_retried_alone(redis: AsyncRedis) -> None:
    blocked = event_stream("iris", "1")
    await redis.set(blocked, "not a stream")  # every XADD to it fails with WRONGTYPE
    metrics = CountingMetrics()
    log = fast_retrying_log(redis, metrics)
    await log.start()
    for i in range(20):
        log.append(STREAM if i % 2 else blocked, event(i))
    await wait_until(
        lambda: metrics.written_total == 10 and metrics.write_errors >= 2 and log.buffered == 10
    )
    await redis.delete(blocked)
    await wait_until(lambda: metrics.written_total == 20)
    await log.stop()

    # Each event exactly once: the accepted half was not sent again with the rejected half.
    assert await stream_ids(redis) == [f"e{i:06d}" for i in range(1, 20, 2)]
    assert await stream_ids(redis, blocked) == [f"e{i:06d}" for i in range(0, 20, 2)]
    assert metrics.dropped_by_reason == Counter()


def test_buffer_gauge_is_read_at_scrape_time_even_while_redis_is_down() -> None:
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry
    from prometheus_client.parser import text_string_to_metric_families

    from service.app import create_app
    from service.settings import Settings
    from tests.support import MODELS_DIR, free_port

    # Nothing listens there: every write fails and the events wait in the buffer.
    settings = Settings(
        model_dir=MODELS_DIR,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        event_backoff_min=30.0,
        event_backoff_max=30.0,
        event_shutdown_timeout=0.0,
    )
    app = create_app(settings, registry=CollectorRegistry())
    one = {"instances": [[0.0] * 64] * 5}

    def sample(client: TestClient, name: str) -> float:
        text = client.get("/metrics").text
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name
        )

    with TestClient(app) as client:
        assert client.post("/v1/models/digits/predict", json=one).status_code == 200
        # Wait for the first failed write: the writer then backs off for 30 s, with no write
        # in flight, and stops reporting the depth itself.
        deadline = time.monotonic() + 30  # only bounds a broken run
        while sample(client, "edgeharvest_redis_write_errors_total") < 1:
            assert time.monotonic() < deadline, "the event writer never tried to write"
            time.sleep(0.02)
        for _ in range(2):
            assert client.post("/v1/models/digits/predict", json=one).status_code == 200
        depth = sample(client, "edgeharvest_event_buffer_events")
    assert depth == 15


# ---- entries of several events (one inference batch each) ------------------------------------


def batch_entry(i: int, events: int) -> EventFields:
    """An entry standing for `events` events, told apart by its id."""
    return {"id": f"b{i:06d}", "events": events}


async def test_capacity_and_counters_count_events_and_whole_entries_are_dropped(
    private_redis: RedisServer, private_client: AsyncRedis
) -> None:
    private_redis.stop()
    metrics = CountingMetrics()
    log = fast_retrying_log(private_client, metrics, capacity=50, batch_size=20)
    await log.start()
    sizes = [16, 1, 7, 16, 3, 16, 16, 5, 9, 16, 2, 16]  # 123 events in 12 entries
    for i, size in enumerate(sizes):
        log.append(STREAM, batch_entry(i, size), size)
        assert log.buffered <= 50
        await asyncio.sleep(0.002)
    # An entry of more events than the whole capacity can never be kept: dropped at once.
    log.append(STREAM, batch_entry(99, 51), 51)
    # What stays is the newest entries that fit, whole: 5 + 9 + 16 + 2 + 16 = 48 events (the
    # 16 before them would make 64). Once no batch is out being tried, the buffer holds them.
    kept = [7, 8, 9, 10, 11]
    await wait_until(lambda: log.buffered == 48 and metrics.write_errors >= 1)
    assert metrics.dropped_by_reason == Counter({"buffer_full": sum(sizes) - log.buffered + 51})
    assert max(metrics.depths) <= 50

    private_redis.start()
    await wait_until(lambda: metrics.written_total == sum(sizes[i] for i in kept))
    await log.stop()
    assert await stream_ids(private_client) == [f"b{i:06d}" for i in kept]
    # A write takes whole entries of up to batch_size events: [5, 9], [16, 2], [16].
    assert len(metrics.latencies) == 3


async def test_writes_take_whole_entries_and_count_their_events(redis: AsyncRedis) -> None:
    metrics = CountingMetrics()
    log = EventLog(redis, batch_size=40, flush_interval=60, metrics=metrics)
    await log.start()
    for i in range(10):
        log.append(STREAM, batch_entry(i, 16), 16)
    await log.stop()

    assert await stream_ids(redis) == [f"b{i:06d}" for i in range(10)]
    assert metrics.written_total == 160
    # Two entries (32 events) per write: a third would pass batch_size.
    assert len(metrics.latencies) == 5
    assert metrics.dropped_by_reason == Counter()


async def test_stop_counts_the_events_of_unwritten_entries(
    private_redis: RedisServer, private_client: AsyncRedis
) -> None:
    private_redis.stop()
    metrics = CountingMetrics()
    log = fast_retrying_log(private_client, metrics, shutdown_timeout=0.2)
    await log.start()
    for i in range(3):
        log.append(STREAM, batch_entry(i, 16), 16)
    log.append(STREAM, {"id": "bad", "value": None}, 16)  # type: ignore[dict-item]
    await log.stop()
    log.append(STREAM, batch_entry(3, 16), 16)

    assert metrics.dropped_by_reason == Counter({"shutdown": 64, "invalid": 16})


async def test_maxlen_counts_events_whatever_the_entries_hold(redis: AsyncRedis) -> None:
    metrics = CountingMetrics()
    log = EventLog(redis, maxlen=1000, batch_size=100, metrics=metrics)
    await log.start()
    for i in range(500):
        log.append(STREAM, batch_entry(i, 10), 10)
    await wait_until(lambda: metrics.written_total == 5000)
    await log.stop()

    # About 1,000 events: MAXLEN ~ 100 entries of 10, trimmed by whole stream nodes (100
    # entries each by default), never below.
    length = await redis.xlen(STREAM)
    assert 100 <= length < 200
    assert (await stream_ids(redis))[-1] == "b000499"


async def test_a_burst_of_large_entries_does_not_trim_the_older_events(redis: AsyncRedis) -> None:
    """MAXLEN counts the entries that hold the newest `maxlen` events, not `maxlen` over the
    events per entry of one write: 32-event entries after single events keep about 1,000."""
    metrics = CountingMetrics()
    log = EventLog(redis, maxlen=1000, batch_size=100, metrics=metrics)
    await log.start()
    for i in range(3000):
        log.append(STREAM, batch_entry(i, 1), 1)
    await wait_until(lambda: metrics.written_total == 3000)
    for i in range(3000, 3003):
        log.append(STREAM, batch_entry(i, 32), 32)
    await wait_until(lambda: metrics.written_total == 3096)
    await log.stop()

    ids = await stream_ids(redis)
    events = sum(32 if i >= "b003000" else 1 for i in ids)
    # MAXLEN ~ 907 entries (3 of 32 events, 904 of 1), trimmed by whole stream nodes (100
    # entries each by default), never below: at least the newest 1,000 events.
    assert 1000 <= events < 1000 + 100 + 32
    assert ids[-1] == "b003002"
