"""Redis SIGKILLed and restarted under continuous load against the real service process.

Predictions never fail while Redis is gone. Every event the service answered for is either in
the stream after recovery or counted in `edgeharvest_events_dropped_total`, and the two add up
exactly to what was sent: with a buffer that holds the whole outage nothing is dropped, with a
small one the overflow is dropped and counted.

This Redis writes every change to its append-only file before it answers, and a killed process
leaves what it wrote in the page cache, so a SIGKILL loses nothing it acknowledged: what is
tested is the service's accounting, not Redis's durability.

One case no at-least-once writer can account for exactly: a batch Redis applied whose reply
the kill cut off. The service re-sends it (duplicate entries, deduplicated by id: the first
variant may meet this) or, if the buffer overflows meanwhile, drops it as the oldest and counts
it, though it is in the stream. The overflow variant rules that out by pausing Redis's writes
(CLIENT PAUSE WRITE) the instant before the kill, so that no batch is mid-flight: then every
count must match. `bench/soak.py` kills without the pause.
"""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from service.embedded_redis import redis_server_executable
from service.events import decode_entry
from service.redis_keys import event_stream
from tests.metric_samples import sample_sum
from tests.prediction_load import PredictionLoad
from tests.redis_server import RedisServer
from tests.service_process import ServiceProcess
from tests.support import MODELS_DIR

DIGITS = load_digits().data.astype(np.float32)
STREAM = event_stream("digits", "1")
BATCH = 8
WRITTEN = "edgeharvest_events_written_total"
DROPPED = "edgeharvest_events_dropped_total"


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own that keeps every write it acknowledged through a SIGKILL."""
    launcher = tmp_path / "redis-server-durable"
    # Later options override earlier ones: RedisServer's `--appendonly no` becomes yes.
    launcher.write_text(
        "#!/bin/sh\n"
        f'exec {shlex.quote(redis_server_executable())} "$@" '
        "--appendonly yes --appendfsync always\n"
    )
    launcher.chmod(0o755)
    with RedisServer(executable=str(launcher)) as server:
        yield server


@pytest.mark.parametrize(
    ("capacity", "overflows"),
    [(100_000, False), (200, True)],
    ids=["buffer-holds-the-outage", "buffer-overflows"],
)
def test_redis_killed_under_load_every_event_delivered_or_counted(
    durable_redis: RedisServer, capacity: int, overflows: bool
) -> None:
    env = {
        "EDGEHARVEST_REDIS_URL": durable_redis.url,
        "EDGEHARVEST_EVENT_BUFFER_CAPACITY": str(capacity),
        # Retry at least twice a second, so recovery is seen soon after the restart.
        "EDGEHARVEST_EVENT_BACKOFF_MAX": "0.5",
        # No trimming: every event ever written must still be there to be counted.
        "EDGEHARVEST_EVENT_STREAM_MAXLEN": "10000000",
        "EDGEHARVEST_LOG_LEVEL": "warning",
    }
    buffer_depths: list[float] = []
    with ServiceProcess(MODELS_DIR, env) as service:
        load = PredictionLoad(service.url, DIGITS, batch=BATCH, threads=2).start()
        try:
            load.wait_for(lambda: service.metric(WRITTEN) >= 500)
            if overflows:
                # Every batch Redis executed before this has its reply written already; any
                # sent later waits unexecuted and dies with the server.
                with durable_redis.client() as admin:
                    admin.client_pause(60_000, all=False)
            durable_redis.stop()  # SIGKILL, as a crash would
            killed_at = load.sent

            def outage_long_enough() -> bool:
                metrics = service.metrics()
                buffer_depths.append(sample_sum(metrics, "edgeharvest_event_buffer_events"))
                if overflows:
                    return sample_sum(metrics, DROPPED) >= 2 * capacity
                return load.sent >= killed_at + 2000

            load.wait_for(outage_long_enough)
            assert load.sent > killed_at
            durable_redis.start()
            written_at_restart = service.metric(WRITTEN)
            load.wait_for(lambda: service.metric(WRITTEN) >= written_at_restart + 500)
        finally:
            load.stop()
        assert load.failures == []
        sent = load.sent
        # Load stopped: wait until the writer has settled every event one way or the other.
        load.wait_for(lambda: service.metric(WRITTEN) + service.metric(DROPPED) >= sent)
        metrics = service.metrics()
        written, dropped = sample_sum(metrics, WRITTEN), sample_sum(metrics, DROPPED)
        assert sample_sum(metrics, "edgeharvest_redis_write_errors_total") >= 1
        assert sample_sum(metrics, "edgeharvest_event_buffer_events") == 0

    with durable_redis.client() as client:
        entries = client.xrange(STREAM)
    # Delivery is at least once: a batch re-sent after a broken connection may repeat entries,
    # so events are counted by id.
    request_of = {
        event.id: event.meta["request_id"]
        for _, fields in entries
        for event in decode_entry(fields)
    }
    delivered = len(request_of)
    assert delivered + dropped == sent
    assert written == delivered
    assert max(buffer_depths) <= capacity
    events_per_request = Counter(request_of.values())
    assert set(events_per_request) <= set(load.answered_requests)
    assert max(events_per_request.values()) == BATCH
    if overflows:
        assert dropped >= 2 * capacity
        assert sample_sum(metrics, DROPPED, reason="buffer_full") == dropped
    else:
        assert dropped == 0
        assert events_per_request == dict.fromkeys(load.answered_requests, BATCH)
