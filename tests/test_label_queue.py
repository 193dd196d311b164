"""The labeling queue against a real Redis: ordering, leases, fences, idempotency, concurrency,
stats, export order, and that every key of every command and script lives in the model's slot."""

from __future__ import annotations

import dataclasses
import itertools
import re
import socket
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from redis.crc import key_slot

from service import redis_keys as label_queue_keys
from service.embedded_redis import redis_server_executable
from service.label_queue import (
    CLAIM_LUA,
    DISCARD_LUA,
    ENQUEUE_LUA,
    HEARTBEAT_LUA,
    KNOWN_ITEMS_LUA,
    LABEL_LUA,
    REQUEUE_EXPIRED_LUA,
    SKIP_LUA,
    STATS_LUA,
    AlreadyLabeled,
    IdempotencyKeyReused,
    InvalidLabel,
    InvalidQueueRequest,
    ItemNotFound,
    ItemState,
    LabelQueue,
    QueueItem,
    QueueStats,
    StaleLease,
)
from service.redis_connection import SyncRedis, create_redis
from tests.support import free_port

MODEL, VERSION = "digits", "1"
LEASE = 60.0


def make_item(
    index: int,
    priority: float = 0.5,
    *,
    lane: str = "low_confidence",
    predicted_class: str = "3",
    content_hash: str | None = None,
) -> QueueItem:
    return QueueItem(
        item_id=f"item-{index:04d}",
        content_hash=content_hash or f"hash-{index:04d}",
        priority=priority,
        lane=lane,
        rule="max_probability<p5",
        predicted=int(predicted_class),
        predicted_class=predicted_class,
        model_version=VERSION,
        created_at=1_700_000_000.123456 + index,
        evidence={"scores": {"max_probability": 0.41}, "percentiles": {"energy": 99.2}},
        nearest_labeled_distance=0.25 if index % 2 else None,
        input=np.full(4, index, dtype="<f4").tobytes(),
        input_dtype="float32",
        input_shape=(2, 2),
        embedding=(np.arange(4) + index).astype("<f2").tobytes(),
        probabilities=(0.1, 0.2, 0.7),
    )


def item_id(index: int) -> str:
    return f"item-{index:04d}"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as connection:
        yield connection


@pytest.fixture
def queue(client: redis.Redis) -> LabelQueue:
    return LabelQueue(client, MODEL, VERSION, lease_seconds=LEASE)


def claimed_ids(queue: LabelQueue, labeler: str, count: int, now: float) -> list[str]:
    return [claimed.item.item_id for claimed in queue.claim(labeler, count, now)]


def test_enqueue_is_idempotent_by_id_and_by_content_hash(queue: LabelQueue) -> None:
    a, b = make_item(1), make_item(2)
    same_content = make_item(3, content_hash=a.content_hash)
    assert queue.enqueue([a, b, a, same_content], now=0.0) == 2
    assert queue.enqueue([a, b], now=1.0) == 0
    assert queue.stats(now=2.0).queued == 2
    stored = queue.get(a.item_id)
    assert stored.item == a
    assert stored.state is ItemState.QUEUED
    assert stored.enqueued_at == 0.0
    with pytest.raises(ItemNotFound):
        queue.get(same_content.item_id)


def test_claim_hands_out_highest_priority_first_and_ties_in_enqueue_order(
    queue: LabelQueue,
) -> None:
    queue.enqueue([make_item(1, 0.5), make_item(2, 0.9), make_item(3, 0.5)], now=0.0)
    queue.enqueue([make_item(4, 0.9), make_item(5, 0.1), make_item(6, 0.5)], now=1.0)
    assert claimed_ids(queue, "alice", 4, now=2.0) == [item_id(i) for i in (2, 4, 1, 3)]
    assert claimed_ids(queue, "bob", 4, now=2.0) == [item_id(6), item_id(5)]
    assert queue.claim("carol", 1, now=2.0) == []


def test_claim_returns_the_content_under_a_lease(queue: LabelQueue) -> None:
    item = make_item(1)
    queue.enqueue([item], now=0.0)
    [claimed] = queue.claim("alice", 3, now=100.0)
    assert claimed.item == item
    assert claimed.expires_at == 160.0
    assert len(claimed.token) == 32
    stored = queue.get(item.item_id)
    assert stored.state is ItemState.LEASED
    assert stored.lease is not None
    assert (stored.lease.labeler, stored.lease.claimed_at, stored.lease.expires_at) == (
        "alice",
        100.0,
        160.0,
    )
    assert [(entry.event, entry.at, entry.by) for entry in stored.history] == [
        ("enqueued", 0.0, None),
        ("claimed", 100.0, "alice"),
    ]


def test_heartbeat_extends_the_lease(queue: LabelQueue) -> None:
    queue.enqueue([make_item(1)], now=0.0)
    [claimed] = queue.claim("alice", 1, now=100.0)
    assert queue.heartbeat(item_id(1), claimed.token, now=150.0) == 210.0
    assert queue.requeue_expired_leases(now=209.9) == 0
    assert queue.heartbeat(item_id(1), claimed.token, now=200.0, lease_seconds=5.0) == 205.0
    lease = queue.get(item_id(1)).lease
    assert lease is not None and lease.expires_at == 205.0
    assert queue.requeue_expired_leases(now=204.9) == 0
    assert queue.requeue_expired_leases(now=205.0) == 1
    assert queue.get(item_id(1)).state is ItemState.QUEUED


def test_an_expired_lease_comes_back_at_its_old_place(queue: LabelQueue) -> None:
    queue.enqueue([make_item(1, 0.9), make_item(2, 0.5)], now=0.0)
    assert claimed_ids(queue, "alice", 1, now=0.0) == [item_id(1)]
    assert queue.requeue_expired_leases(now=59.9) == 0
    assert queue.stats(now=59.9).leased == 1
    assert queue.requeue_expired_leases(now=60.0) == 1
    stored = queue.get(item_id(1))
    assert stored.state is ItemState.QUEUED
    assert stored.lease is None
    assert (stored.history[-1].event, stored.history[-1].by) == ("lease_expired", "alice")
    assert claimed_ids(queue, "bob", 2, now=61.0) == [item_id(1), item_id(2)]


def test_claim_returns_expired_leases_first(queue: LabelQueue) -> None:
    queue.enqueue([make_item(1)], now=0.0)
    assert claimed_ids(queue, "alice", 1, now=0.0) == [item_id(1)]
    assert queue.claim("bob", 1, now=59.0) == []
    assert claimed_ids(queue, "bob", 1, now=60.0) == [item_id(1)]


def test_stale_tokens_are_refused(queue: LabelQueue) -> None:
    queue.enqueue([make_item(1)], now=0.0)
    [alice] = queue.claim("alice", 1, now=0.0)
    with pytest.raises(StaleLease, match="another lease"):
        queue.label(item_id(1), "wrong", "3", "alice", "k0", now=1.0)
    # Expired but not yet swept: refused all the same.
    with pytest.raises(StaleLease, match=r"expired at 60\.0"):
        queue.heartbeat(item_id(1), alice.token, now=60.0)
    with pytest.raises(StaleLease):
        queue.label(item_id(1), alice.token, "3", "alice", "k1", now=60.0)
    [bob] = queue.claim("bob", 1, now=61.0)
    refused: list[Callable[[], object]] = [
        lambda: queue.label(item_id(1), alice.token, "3", "alice", "k2", now=62.0),
        lambda: queue.skip(item_id(1), alice.token, "alice", now=62.0),
        lambda: queue.discard(item_id(1), alice.token, "alice", "blurry", now=62.0),
        lambda: queue.heartbeat(item_id(1), alice.token, now=62.0),
    ]
    for attempt in refused:
        with pytest.raises(StaleLease) as refusal:
            attempt()
        assert refusal.value.status_code == 409
    assert queue.heartbeat(item_id(1), bob.token, now=62.0) == 122.0
    queue.label(item_id(1), bob.token, "5", "bob", "k3", now=63.0)
    with pytest.raises(StaleLease, match="the item is labeled"):
        queue.skip(item_id(1), bob.token, "bob", now=64.0)


def test_a_replayed_label_changes_nothing(queue: LabelQueue) -> None:
    queue.enqueue([make_item(1)], now=0.0)
    [claimed] = queue.claim("alice", 1, now=0.0)
    first = queue.label(item_id(1), claimed.token, "7", "alice", "submit-1", now=10.0)
    assert first == queue.get(item_id(1)).label
    assert (first.label, first.labeler, first.labeled_at, first.replayed) == (
        "7",
        "alice",
        10.0,
        False,
    )
    before = queue.get(item_id(1))
    replays = [
        queue.label(item_id(1), claimed.token, "7", "alice", "submit-1", now=20.0),
        # After the lease is gone, and from another token: still the first answer.
        queue.label(item_id(1), "another-token", "7", "alice", "submit-1", now=9999.0),
    ]
    for replay in replays:
        assert replay.replayed
        assert dataclasses.replace(replay, replayed=False) == first
    assert queue.get(item_id(1)) == before
    with pytest.raises(AlreadyLabeled) as refusal:
        queue.label(item_id(1), claimed.token, "7", "alice", "submit-2", now=30.0)
    assert refusal.value.status_code == 409
    with pytest.raises(IdempotencyKeyReused):
        queue.label(item_id(1), claimed.token, "8", "alice", "submit-1", now=30.0)
    assert queue.get(item_id(1)) == before
    assert queue.stats(now=40.0).labeled == 1


def test_skip_puts_the_item_back_for_someone_else(queue: LabelQueue) -> None:
    queue.enqueue([make_item(1, 0.9), make_item(2, 0.5)], now=0.0)
    [claimed] = queue.claim("alice", 1, now=1.0)
    queue.skip(item_id(1), claimed.token, "alice", now=2.0)
    assert claimed_ids(queue, "alice", 2, now=3.0) == [item_id(2)]
    assert claimed_ids(queue, "bob", 2, now=4.0) == [item_id(1)]
    stored = queue.get(item_id(1))
    assert stored.skipped_by == ("alice",)
    assert [(entry.event, entry.by) for entry in stored.history] == [
        ("enqueued", None),
        ("claimed", "alice"),
        ("skipped", "alice"),
        ("claimed", "bob"),
    ]


def test_discard_is_terminal_and_the_content_never_returns(queue: LabelQueue) -> None:
    item = make_item(1)
    queue.enqueue([item], now=0.0)
    [claimed] = queue.claim("alice", 1, now=1.0)
    queue.discard(item.item_id, claimed.token, "alice", "blurry", now=2.0)
    stored = queue.get(item.item_id)
    assert stored.state is ItemState.DISCARDED
    assert stored.discard is not None
    assert (stored.discard.labeler, stored.discard.discarded_at, stored.discard.reason) == (
        "alice",
        2.0,
        "blurry",
    )
    assert queue.claim("bob", 1, now=3.0) == []
    assert queue.requeue_expired_leases(now=1000.0) == 0
    with pytest.raises(StaleLease, match="discarded"):
        queue.label(item.item_id, claimed.token, "3", "alice", "k", now=3.0)
    assert queue.enqueue([item, make_item(2, content_hash=item.content_hash)], now=4.0) == 0
    assert queue.seen_hashes([item.content_hash, "never-seen"]) == [True, False]
    stats = queue.stats(now=5.0)
    assert (stats.queued, stats.leased, stats.discarded) == (0, 0, 1)


def test_unknown_items_and_bad_arguments_are_refused(queue: LabelQueue) -> None:
    queue.enqueue([make_item(1)], now=0.0)
    [claimed] = queue.claim("alice", 1, now=0.0)
    with pytest.raises(ItemNotFound) as missing:
        queue.get("nope")
    assert missing.value.status_code == 404
    with pytest.raises(ItemNotFound):
        queue.label("nope", claimed.token, "3", "alice", "k", now=1.0)
    with pytest.raises(ItemNotFound):
        queue.heartbeat("nope", claimed.token, now=1.0)
    for label in ("", "x" * 257):
        with pytest.raises(InvalidLabel) as invalid:
            queue.label(item_id(1), claimed.token, label, "alice", "k", now=1.0)
        assert invalid.value.status_code == 400
    with pytest.raises(InvalidQueueRequest, match="count 0"):
        queue.claim("alice", 0, now=1.0)
    with pytest.raises(InvalidQueueRequest, match="labeler"):
        queue.claim("", 1, now=1.0)
    assert queue.label(item_id(1), claimed.token, "x" * 256, "alice", "k", now=1.0).label
    with pytest.raises(ValueError, match="version '2'"):
        queue.enqueue([dataclasses.replace(make_item(2), model_version="2")], now=1.0)
    with pytest.raises(InvalidQueueRequest, match="priority"):
        queue.enqueue([make_item(3, float("nan"))], now=1.0)


def test_history_is_bounded(queue: LabelQueue) -> None:
    queue.enqueue([make_item(1)], now=0.0)
    for round_ in range(40):  # each claim first returns the previous, expired lease
        assert claimed_ids(queue, "alice", 1, now=round_ * LEASE) == [item_id(1)]
    history = queue.get(item_id(1)).history
    assert len(history) == 50
    assert (history[0].event, history[-1].event, history[-1].at) == ("enqueued", "claimed", 2340)


def test_stats_on_a_small_scenario(client: redis.Redis, queue: LabelQueue) -> None:
    queue.enqueue(
        [
            make_item(1, 0.9, lane="low_confidence", predicted_class="3"),
            make_item(2, 0.8, lane="low_confidence", predicted_class="3"),
            make_item(3, 0.7, lane="novel", predicted_class="7"),
        ],
        now=0.0,
    )
    queue.enqueue(
        [
            make_item(4, 0.6, lane="novel", predicted_class="7"),
            make_item(5, 0.5, lane="random", predicted_class="1"),
            make_item(6, 0.4, lane="low_confidence", predicted_class="1"),
        ],
        now=10.0,
    )
    first, second, _ = queue.claim("alice", 3, now=100.0)
    queue.label(item_id(1), first.token, "3", "alice", "k1", now=110.0)
    queue.discard(item_id(2), second.token, "alice", "duplicate", now=120.0)
    assert queue.stats(now=130.0) == QueueStats(
        queued=3,
        leased=1,
        expired_leases=0,
        labeled=1,
        discarded=1,
        queued_by_lane={"novel": 1, "random": 1, "low_confidence": 1},
        queued_by_class={"7": 1, "1": 2},
        oldest_queued_age_seconds=120.0,
        labeled_last_hour=1,
    )
    assert queue.stats(now=3709.5).labeled_last_hour == 1
    late = queue.stats(now=3710.0)
    assert (late.labeled_last_hour, late.leased, late.expired_leases) == (0, 1, 1)
    assert queue.requeue_expired_leases(now=3710.0) == 1
    assert queue.stats(now=3710.0) == QueueStats(
        queued=4,
        leased=0,
        expired_leases=0,
        labeled=1,
        discarded=1,
        queued_by_lane={"novel": 2, "random": 1, "low_confidence": 1},
        queued_by_class={"7": 2, "1": 2},
        oldest_queued_age_seconds=3710.0,
        labeled_last_hour=0,
    )
    empty = LabelQueue(client, MODEL, "empty").stats(now=0.0)
    assert (empty.queued, empty.oldest_queued_age_seconds, empty.queued_by_lane) == (0, None, {})


def test_iter_labeled_yields_in_labeling_order(queue: LabelQueue) -> None:
    queue.enqueue([make_item(i) for i in range(1, 6)], now=0.0)
    tokens = {claimed.item.item_id: claimed.token for claimed in queue.claim("a", 5, now=0.0)}
    for index, at in ((3, 30.0), (1, 10.0), (5, 20.0), (2, 20.0), (4, 20.0)):
        queue.label(item_id(index), tokens[item_id(index)], "3", "a", f"k{index}", now=at)
    expected = [item_id(i) for i in (1, 2, 4, 5, 3)]
    for batch in (1, 2, 500):
        exported = list(queue.iter_labeled(batch=batch))
        assert [stored.item.item_id for stored in exported] == expected
        assert all(stored.state is ItemState.LABELED for stored in exported)
    assert [s.item.item_id for s in queue.iter_labeled(since=20.0, batch=2)] == expected[1:]
    assert [s.item.item_id for s in queue.iter_labeled(since=20.5)] == [item_id(3)]


def test_seen_hashes_and_known_embeddings(queue: LabelQueue) -> None:
    items = [make_item(i, 1.0 - i / 10) for i in range(1, 5)]
    queue.enqueue(items, now=0.0)
    first, second = queue.claim("alice", 2, now=1.0)
    queue.label(item_id(1), first.token, "3", "alice", "k", now=2.0)
    queue.discard(item_id(2), second.token, "alice", "", now=2.0)
    queue.claim("bob", 1, now=3.0)
    known = queue.known_embeddings()
    assert sorted(known.item_ids) == [item_id(1), item_id(3), item_id(4)]
    rows = dict(zip(known.item_ids, known.vectors, strict=True))
    for item in (items[0], items[2], items[3]):
        expected = np.frombuffer(item.embedding, dtype="<f2").astype(np.float32)
        np.testing.assert_array_equal(rows[item.item_id], expected)
    assert known.vectors.dtype == np.float32
    labeled = {i for i, flag in zip(known.item_ids, known.labeled, strict=True) if flag}
    assert labeled == {item_id(1)}
    assert queue.seen_hashes([items[1].content_hash, "nope", items[3].content_hash]) == [
        True,
        False,
        True,
    ]
    assert queue.seen_hashes([]) == []


def test_eight_concurrent_labelers_never_hold_the_same_item(redis_url: str) -> None:
    items, workers, now = 1000, 8, 1000.0
    with redis.Redis.from_url(redis_url) as setup:
        queue = LabelQueue(setup, MODEL, VERSION)
        queue.enqueue([make_item(i, (i % 7) / 7) for i in range(items)], now=0.0)
    # Ticks from one shared counter order events across threads. A hold is recorded from after
    # the claim returned to before the release was sent: inside the real lease, so two holds of
    # one item may only overlap if the queue really handed it out twice.
    ticks = itertools.count()
    holds: dict[str, list[tuple[int, int, str, str]]] = defaultdict(list)
    errors: list[BaseException] = []
    stop = threading.Event()

    def labeler(index: int) -> None:
        name = f"labeler-{index}"
        client = redis.Redis.from_url(redis_url)
        own = LabelQueue(client, MODEL, VERSION)
        try:
            while not stop.is_set():
                claimed = own.claim(name, 5, now=now)
                if not claimed:
                    stats = own.stats(now=now)
                    if stats.queued == 0 and stats.leased == 0:
                        return
                    time.sleep(0.001)  # the rest is leased by others, or skipped by us
                    continue
                for lease in claimed:
                    start = next(ticks)
                    number = int(lease.item.item_id.split("-")[1])
                    end = next(ticks)
                    if number % 16 == index:
                        own.skip(lease.item.item_id, lease.token, name, now=now)
                        outcome = "skipped"
                    else:
                        own.label(lease.item.item_id, lease.token, "3", name, name, now=now)
                        outcome = "labeled"
                    holds[lease.item.item_id].append((start, end, name, outcome))
        except BaseException as error:
            errors.append(error)
            stop.set()  # the others would wait for its leases forever
        finally:
            client.close()

    started = time.monotonic()
    threads = [threading.Thread(target=labeler, args=(i,), daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    stop.set()
    elapsed = time.monotonic() - started
    assert not errors, errors[:3]
    assert not any(thread.is_alive() for thread in threads), "labelers still running after 30s"
    assert len(holds) == items
    skipped = 0
    for item, item_holds in holds.items():
        item_holds.sort()
        for (_, end, _, _), (start, _, _, _) in itertools.pairwise(item_holds):
            assert end < start, f"{item} was held twice at once: {item_holds}"
        outcomes = [outcome for *_, outcome in item_holds]
        assert outcomes.count("labeled") == 1 and outcomes[-1] == "labeled"
        skippers = {name for _, _, name, outcome in item_holds if outcome == "skipped"}
        assert item_holds[-1][2] not in skippers
        skipped += len(skippers)
    assert skipped > 0
    with redis.Redis.from_url(redis_url) as check:
        stats = LabelQueue(check, MODEL, VERSION).stats(now=now)
    assert (stats.queued, stats.leased, stats.labeled) == (0, 0, items)
    assert elapsed < 10, f"took {elapsed:.1f}s"


def exercise_every_operation(queue: LabelQueue) -> None:
    queue.enqueue([make_item(1, 0.9), make_item(2, 0.5), make_item(3, 0.1)], now=0.0)
    first, second = queue.claim("alice", 2, now=1.0)
    queue.heartbeat(first.item.item_id, first.token, now=2.0)
    queue.label(first.item.item_id, first.token, "3", "alice", "k1", now=3.0)
    queue.label(first.item.item_id, first.token, "3", "alice", "k1", now=4.0)
    queue.skip(second.item.item_id, second.token, "alice", now=5.0)
    [third] = queue.claim("bob", 1, now=6.0)
    queue.discard(third.item.item_id, third.token, "bob", "blurry", now=7.0)
    queue.claim("carol", 1, now=8.0)
    queue.requeue_expired_leases(now=1000.0)
    assert queue.get(first.item.item_id).state is ItemState.LABELED
    assert queue.stats(now=1000.0).labeled == 1
    assert [s.item.item_id for s in queue.iter_labeled()] == [first.item.item_id]
    assert queue.seen_hashes(["hash-0001", "x"]) == [True, False]
    assert len(queue.known_embeddings().item_ids) == 2


_MONITOR_LINE = re.compile(r"^\S+ \[\d+ ([^\]]*)\] (.*)$")
_MONITOR_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", "a": b"\a", "b": b"\b", '"': b'"', "\\": b"\\"}


def _unescape(text: str) -> bytes:
    """Undo Redis' sdscatrepr quoting of one MONITOR argument."""
    out, i = bytearray(), 0
    while i < len(text):
        if text[i] != "\\":
            out += text[i].encode("latin-1")
            i += 1
        elif text[i + 1] == "x":
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            out += _ESCAPES[text[i + 1]]
            i += 2
    return bytes(out)


def _monitored(client: redis.Redis, action: Callable[[], None]) -> list[tuple[bool, list[bytes]]]:
    """(issued by a script?, arguments) of every command the server ran during `action`."""
    sentinel = "label-queue-monitor-done"
    commands: list[tuple[bool, list[bytes]]] = []
    with client.monitor() as monitor:  # type: ignore[no-untyped-call]
        action()
        client.echo(sentinel)
        while True:
            line = monitor.connection.read_response()
            match = _MONITOR_LINE.match(line.decode("ascii") if isinstance(line, bytes) else line)
            assert match, line
            args = [_unescape(arg) for arg in _MONITOR_ARG.findall(match.group(2))]
            if args == [b"ECHO", sentinel.encode()]:
                return commands
            commands.append((match.group(1) == "lua", args))


def test_every_key_is_declared_and_in_the_models_slot(client: redis.Redis) -> None:
    queue = LabelQueue(client, MODEL, VERSION, lease_seconds=LEASE)
    commands = _monitored(client, lambda: exercise_every_operation(queue))

    def keys_of(args: list[bytes]) -> list[bytes]:
        try:
            return [str(key).encode() for key in client.command_getkeys(*args)]
        except redis.ResponseError:  # a command without keys (PING, SCRIPT LOAD, ...)
            return []

    # Redis 7 shows a script's own commands before its EVALSHA, older servers after it.
    first = next(i for i, (lua, args) in enumerate(commands) if lua or args[0] == b"EVALSHA")
    scripted_first = commands[first][0]
    script_calls: list[tuple[bytes, set[bytes], set[bytes]]] = []  # sha, declared, touched
    pending: set[bytes] = set()
    for lua, args in commands:
        if lua:
            (pending if scripted_first else script_calls[-1][2]).update(keys_of(args))
        elif args[0].upper() == b"EVALSHA":
            script_calls.append((args[1], set(keys_of(args)), pending))
            pending = set()
    script_calls = [call for call in script_calls if call[2]]  # drop NOSCRIPT attempts
    scripts = (
        ENQUEUE_LUA,
        CLAIM_LUA,
        HEARTBEAT_LUA,
        LABEL_LUA,
        SKIP_LUA,
        DISCARD_LUA,
        REQUEUE_EXPIRED_LUA,
        STATS_LUA,
        KNOWN_ITEMS_LUA,
    )
    assert {call[0].decode() for call in script_calls} == {
        client.register_script(script).sha for script in scripts
    }
    for sha, declared, used in script_calls:
        assert used <= declared, f"script {sha!r} touched undeclared keys {used - declared}"
    slot = key_slot(label_queue_keys.label_queue(MODEL, VERSION).encode())
    every_key = {key for _, args in commands for key in keys_of(args)}
    assert any(b":item:" in key for key in every_key)
    assert {key: key_slot(key) for key in every_key} == dict.fromkeys(every_key, slot)


def _port_with_free_bus_port() -> int:
    """A free port whose cluster bus port (+10000; Redis 6.2 has no `cluster-port`) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A one-node Redis Cluster owning every slot: enough for the cluster client's routing."""
    directory: Path = tmp_path_factory.mktemp("redis-cluster")
    port = _port_with_free_bus_port()
    process = subprocess.Popen(
        [
            redis_server_executable(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(directory / "nodes.conf"),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        node = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                node.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        admin: Any = node  # execute_command is untyped in redis-py
        admin.execute_command("CLUSTER", "ADDSLOTS", *range(16384))  # 6.2: no ADDSLOTSRANGE
        while b"cluster_state:ok" not in admin.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the one-node cluster did not come up"
            time.sleep(0.02)
        node.close()
        yield f"redis://127.0.0.1:{port}/0?cluster=true"
    finally:
        process.kill()
        process.wait()


def test_runs_on_a_redis_cluster(cluster_url: str) -> None:
    client: SyncRedis = create_redis(cluster_url)
    assert isinstance(client, redis.cluster.RedisCluster)
    try:
        exercise_every_operation(LabelQueue(client, MODEL, VERSION, lease_seconds=LEASE))
    finally:
        client.close()
