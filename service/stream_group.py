"""One consumer of a Redis consumer group on event streams: what the selector and drift workers
share. A round takes the entries another consumer left pending for too long (it died) before
new ones, so nothing read is ever left behind; rounds repeat until stopped or drained. Between
rounds the model repository is read again now and then, so a model version loaded into the API
after the worker started is watched too, without a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import redis

from service.redis_connection import SyncRedis

Entry = tuple[bytes, dict[bytes, bytes]]
Stream = TypeVar("Stream")
StreamKey = tuple[str, str]  # (model, version)


class GroupReader:
    def __init__(
        self,
        redis_client: SyncRedis,
        group: str,
        consumer: str,
        *,
        round_size: int,
        block_ms: int,
        claim_idle_ms: int,
    ) -> None:
        self.redis = redis_client
        self.group = group
        self.consumer = consumer
        self.round_size = round_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms

    def ensure_group(self, key: str) -> None:
        try:
            # From the start of the stream: events logged before any worker ran count too.
            self.redis.xgroup_create(key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read_round(self, key: str, block: bool) -> list[Entry]:
        """Stale pending entries of the group if any, else new ones (waiting up to `block_ms`
        when `block`)."""
        entries = self._claim_stale(key)
        if entries:
            return entries
        reply: Any = self.redis.xreadgroup(
            self.group,
            self.consumer,
            {key: ">"},
            count=self.round_size,
            block=self.block_ms if block else None,
        )
        return reply[0][1] if reply else []

    def _claim_stale(self, key: str) -> list[Entry]:
        reply: Any = self.redis.xautoclaim(
            key,
            self.group,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id="0-0",
            count=self.round_size,
        )
        # [next id, claimed entries, deleted ids]; entries trimmed away come back as None.
        return [(i, f) for i, f in reply[1] if f]


def run_rounds(
    stop: threading.Event,
    one_round: Callable[[bool], int],
    burst: bool,
    logger: logging.Logger,
    name: str,
) -> int:
    """Call `one_round(block)` until `stop` is set; with `burst`, until a round finds nothing.
    Returns the number of stream entries processed."""
    processed = 0
    try:
        while not stop.is_set():
            count = one_round(not burst)
            processed += count
            if burst and count == 0:
                break
    finally:
        logger.info("%s stopped after %d stream entries", name, processed)
    return processed


def round_over(
    streams: Sequence[Stream],
    process: Callable[[Stream, bool], int],
    block: bool,
    stop: threading.Event,
    block_ms: int,
) -> int:
    """One round over every stream; returns the entries processed. The read of a lone stream
    blocks in Redis while it is idle. With several streams (or none) reads cannot block, one
    idle stream would hold up the others, so an idle round waits here instead of spinning."""
    lone = len(streams) == 1
    count = sum(process(stream, block and lone) for stream in streams)
    if block and not lone and count == 0:
        stop.wait(block_ms / 1000)
    return count


class StreamDiscovery(Generic[Stream]):
    """Every `interval` seconds, the streams the repository now has that the worker does not
    watch yet (`discover(known keys)` reads the repository). A repository that cannot be read
    just now (a manifest being written, say) is logged and tried again at the next interval;
    the worker goes on with the streams it has."""

    def __init__(
        self,
        discover: Callable[[set[StreamKey]], list[Stream]] | None,
        interval: float,
        logger: logging.Logger,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._discover = discover
        self._interval = interval
        self._logger = logger
        self._clock = clock
        self._next = clock() + interval

    def new_streams(self, known: set[StreamKey]) -> list[Stream]:
        if self._discover is None or self._clock() < self._next:
            return []
        self._next = self._clock() + self._interval
        try:
            return self._discover(known)
        except Exception as exc:
            self._logger.warning("cannot read the model repository now (%s); will retry", exc)
            return []
