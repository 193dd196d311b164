"""The labeling queue of one model version: enqueue, claim under a lease, label, skip, discard.

Lifecycle: queued -> leased -> labeled | discarded; a lease that expires, or a skip, puts the
item back in the queue at its old place. Every state change is one Lua script, so it is atomic,
and every script gets all its keys in KEYS (one hash tag, one Cluster slot). Scripts never read a
clock: callers pass `now`.

Layout (names in `redis_keys.py`):
- `item:<id>` hash: the immutable content (`meta` JSON, `input` and `embedding` bytes), written
  once by `enqueue` and only read afterwards, so it can be fetched outside any script;
- `records` hash: item id -> JSON lifecycle record (state, lease, label, discard, history). The
  mutable state lives in one hash of fixed name rather than in the item hashes because `claim`
  and the lease sweep pick their items inside the script, and a script may only touch keys it
  was given in KEYS;
- `queue` sorted set: score = -priority, member = 16-digit enqueue sequence + ':' + id, so
  ZRANGE from the start gives the highest priority first and, within equal priority, the first
  enqueued (equal scores are ordered by member). A returned item keeps its score and member;
- `leases` (by expiry), `labeled` (by label time), `since` (queued items by enqueue time),
  `depth:lane` / `depth:class` counters of queued items, `discarded` and `hashes` sets.

Timestamps and scores go into the Lua JSON records as strings: Redis' cjson prints numbers with
14 significant digits, which would round epoch times.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

import numpy as np
import orjson
from redis.commands.core import Script

from service import redis_keys as keys
from service.errors import BadRequest, EdgeharvestError
from service.redis_connection import SyncRedis

MAX_TEXT_LENGTH = 256  # labels, labeler names, idempotency keys, item ids
MAX_REASON_LENGTH = 1024
MAX_CLAIM = 100
# How many queue entries one claim may look at to get past items this labeler skipped before.
CLAIM_SCAN_LIMIT = 1000
# Expired leases returned per script call, so no single call blocks Redis for long.
REQUEUE_BATCH = 1000
ENQUEUE_BATCH = 100
READ_BATCH = 500
LABEL_RATE_WINDOW_SECONDS = 3600.0
EMBEDDING_DTYPE = "<f2"  # little-endian float16, as in the event stream


class LeaseConflict(EdgeharvestError):
    """The item is not in the state the request needs."""

    status_code = 409


class StaleLease(LeaseConflict):
    """The lease token is not the item's current lease (wrong, expired, or the item moved on)."""


class AlreadyLabeled(LeaseConflict):
    """The item was labeled by a request with another idempotency key."""


class IdempotencyKeyReused(LeaseConflict):
    """The idempotency key was used for the same item with another label or labeler."""


class ItemNotFound(EdgeharvestError):
    status_code = 404


class InvalidQueueRequest(BadRequest):
    pass


class InvalidLabel(InvalidQueueRequest):
    pass


class ItemState(StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    LABELED = "labeled"
    DISCARDED = "discarded"


@dataclass(frozen=True)
class QueueItem:
    """What the selector enqueues. `item_id` is the event id; `embedding` is little-endian float16
    bytes; `input` (raw tensor bytes, little-endian) may be absent when the event had none."""

    item_id: str
    content_hash: str
    priority: float
    lane: str
    rule: str
    predicted: int
    predicted_class: str
    model_version: str
    created_at: float
    evidence: dict[str, Any]  # scores, percentiles, reasons: anything JSON-able
    nearest_labeled_distance: float | None
    input: bytes | None
    input_dtype: str
    input_shape: tuple[int, ...]
    embedding: bytes
    probabilities: tuple[float, ...]


@dataclass(frozen=True)
class ClaimedItem:
    item: QueueItem
    token: str
    expires_at: float


@dataclass(frozen=True)
class LabelResult:
    item_id: str
    label: str
    labeler: str
    labeled_at: float
    idempotency_key: str
    replayed: bool = False


@dataclass(frozen=True)
class Lease:
    labeler: str
    claimed_at: float
    expires_at: float


@dataclass(frozen=True)
class Discard:
    labeler: str
    discarded_at: float
    reason: str


@dataclass(frozen=True)
class HistoryEntry:
    event: str  # enqueued, claimed, lease_expired, skipped, labeled, discarded
    at: float
    by: str | None = None
    detail: str | None = None  # the label, or the discard reason


@dataclass(frozen=True)
class StoredItem:
    item: QueueItem
    state: ItemState
    enqueued_at: float
    lease: Lease | None
    label: LabelResult | None
    discard: Discard | None
    skipped_by: tuple[str, ...]
    history: tuple[HistoryEntry, ...]  # heartbeats are not recorded; at most 50 entries


@dataclass(frozen=True)
class QueueStats:
    queued: int
    leased: int
    expired_leases: int  # leased, past expiry, not yet returned by a sweep or a claim
    labeled: int
    discarded: int
    queued_by_lane: dict[str, int]
    queued_by_class: dict[str, int]
    oldest_queued_age_seconds: float | None
    labeled_last_hour: int


@dataclass(frozen=True, eq=False)
class KnownEmbeddings:
    """Embeddings (float32, one row per item) of every queued, leased or labeled item."""

    item_ids: tuple[str, ...]
    vectors: np.ndarray
    labeled: np.ndarray = field(repr=False)  # bool mask over the rows


_COMMON_LUA = """
local queue_key, leases_key, records_key, since_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local lane_depth_key, class_depth_key = KEYS[5], KEYS[6]
local labeled_key, discarded_key, hashes_key, sequence_key = KEYS[7], KEYS[8], KEYS[9], KEYS[10]

local function load(item_id)
    local raw = redis.call('HGET', records_key, item_id)
    if not raw then return nil end
    return cjson.decode(raw)
end

local function save(item_id, record)
    redis.call('HSET', records_key, item_id, cjson.encode(record))
end

-- Bounded history: an item skipped or abandoned forever must not grow without end.
local function remember(record, entry)
    local history = record.history
    history[#history + 1] = entry
    if #history > 50 then table.remove(history, 2) end
end

local function count_queued(record, delta)
    for _, counter in ipairs({{lane_depth_key, record.lane}, {class_depth_key, record.class}}) do
        if redis.call('HINCRBY', counter[1], counter[2], delta) <= 0 then
            redis.call('HDEL', counter[1], counter[2])
        end
    end
end

local function to_queue(item_id, record)
    record.state = 'queued'
    record.lease = nil
    redis.call('ZREM', leases_key, item_id)
    redis.call('ZADD', queue_key, record.score, record.member)
    redis.call('ZADD', since_key, record.enqueued_at, item_id)
    count_queued(record, 1)
end

-- nil when `token` holds the item's live lease, else the reply refusing the request.
local function refuse(record, token, now)
    if not record then return {'not_found'} end
    if record.state ~= 'leased' then return {'stale', record.state} end
    if record.lease.token ~= token then return {'stale', 'token'} end
    if tonumber(now) >= tonumber(record.lease.expires_at) then
        return {'stale', 'expired', record.lease.expires_at}
    end
    return nil
end

local function requeue_expired(now, limit)
    local expired = redis.call('ZRANGEBYSCORE', leases_key, '-inf', now, 'LIMIT', 0, limit)
    for _, item_id in ipairs(expired) do
        local record = load(item_id)
        redis.call('ZREM', leases_key, item_id)
        if record and record.state == 'leased' then
            remember(record, {event = 'lease_expired', at = now, by = record.lease.labeler})
            to_queue(item_id, record)
            save(item_id, record)
        end
    end
    return #expired
end
"""

ENQUEUE_LUA = (
    """
-- KEYS[1..10] = the queue's fixed keys; KEYS[10 + i] = item hash of the i-th item
-- ARGV[1] = now; then 8 per item: id, content hash, queue score (-priority), lane,
--   predicted class, meta JSON, input bytes ('' = none), embedding bytes
-- Returns the ids that were new: an id seen before, or a content hash seen before, is skipped.
"""
    + _COMMON_LUA
    + """
local now = ARGV[1]
local added = {}
for i = 1, #KEYS - 10 do
    local base = 2 + (i - 1) * 8
    local item_id = ARGV[base]
    if redis.call('HEXISTS', records_key, item_id) == 0
        and redis.call('SADD', hashes_key, ARGV[base + 1]) == 1 then
        local sequence = redis.call('INCR', sequence_key)
        local record = {
            state = 'queued', score = ARGV[base + 2], lane = ARGV[base + 3],
            class = ARGV[base + 4], enqueued_at = now,
            member = string.format('%016d', sequence) .. ':' .. item_id,
            history = {{event = 'enqueued', at = now}},
        }
        local item_key = KEYS[10 + i]
        redis.call('HSET', item_key, 'meta', ARGV[base + 5], 'embedding', ARGV[base + 7])
        if ARGV[base + 6] ~= '' then redis.call('HSET', item_key, 'input', ARGV[base + 6]) end
        to_queue(item_id, record)
        save(item_id, record)
        added[#added + 1] = item_id
    end
end
return added
"""
)

CLAIM_LUA = (
    """
-- KEYS[1..10] = the queue's fixed keys
-- ARGV[1] = labeler, ARGV[2] = now, ARGV[3] = lease expiry, ARGV[4] = scan limit,
-- ARGV[5] = requeue batch, ARGV[6..] = one fresh lease token per wanted item
-- Returns item id, token, item id, token, ... best first; never an item this labeler skipped.
"""
    + _COMMON_LUA
    + """
local labeler, now, expires_at = ARGV[1], ARGV[2], ARGV[3]
local scan_limit, count = tonumber(ARGV[4]), #ARGV - 5
requeue_expired(now, tonumber(ARGV[5]))

local function skipped(record)
    for _, name in ipairs(record.skipped_by or {}) do
        if name == labeler then return true end
    end
    return false
end

-- Choose first, remove afterwards: removing while scanning would shift the ZRANGE offsets.
local chosen, offset, window = {}, 0, math.max(count, 32)
while #chosen < count and offset < scan_limit do
    local members = redis.call('ZRANGE', queue_key, offset, offset + window - 1)
    if #members == 0 then break end
    for _, member in ipairs(members) do
        local item_id = string.sub(member, 18)
        local record = load(item_id)
        if record and not skipped(record) then
            chosen[#chosen + 1] = {item_id, record}
            if #chosen == count then break end
        end
    end
    offset = offset + #members
end

local result = {}
for i, pick in ipairs(chosen) do
    local item_id, record, token = pick[1], pick[2], ARGV[5 + i]
    redis.call('ZREM', queue_key, record.member)
    redis.call('ZREM', since_key, item_id)
    count_queued(record, -1)
    record.state = 'leased'
    record.lease = {token = token, labeler = labeler, claimed_at = now, expires_at = expires_at}
    remember(record, {event = 'claimed', at = now, by = labeler})
    redis.call('ZADD', leases_key, expires_at, item_id)
    save(item_id, record)
    result[#result + 1] = item_id
    result[#result + 1] = token
end
return result
"""
)

HEARTBEAT_LUA = (
    """
-- KEYS[1..10] = the queue's fixed keys
-- ARGV[1] = item id, ARGV[2] = lease token, ARGV[3] = now, ARGV[4] = new lease expiry
-- Returns {'ok'} or a refusal.
"""
    + _COMMON_LUA
    + """
local item_id = ARGV[1]
local record = load(item_id)
local refusal = refuse(record, ARGV[2], ARGV[3])
if refusal then return refusal end
record.lease.expires_at = ARGV[4]
redis.call('ZADD', leases_key, ARGV[4], item_id)
save(item_id, record)
return {'ok'}
"""
)

LABEL_LUA = (
    """
-- KEYS[1..10] = the queue's fixed keys
-- ARGV[1] = item id, ARGV[2] = lease token, ARGV[3] = label, ARGV[4] = labeler,
-- ARGV[5] = idempotency key, ARGV[6] = now
-- Returns {'labeled' | 'replayed', label, labeler, labeled at, idempotency key} or a refusal.
-- A replay (same key, same label and labeler) is answered before the lease is checked.
"""
    + _COMMON_LUA
    + """
local item_id, label, labeler, key, now = ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local record = load(item_id)
if record and record.label then
    local done = record.label
    if done.key ~= key then return {'already_labeled', done.key} end
    if done.value ~= label or done.by ~= labeler then return {'key_reused'} end
    return {'replayed', done.value, done.by, done.at, done.key}
end
local refusal = refuse(record, ARGV[2], now)
if refusal then return refusal end
redis.call('ZREM', leases_key, item_id)
record.lease = nil
record.state = 'labeled'
record.label = {value = label, by = labeler, at = now, key = key}
remember(record, {event = 'labeled', at = now, by = labeler, detail = label})
redis.call('ZADD', labeled_key, now, item_id)
save(item_id, record)
return {'labeled', label, labeler, now, key}
"""
)

IMPORT_LABEL_LUA = (
    """
-- KEYS[1..10] = the queue's fixed keys
-- ARGV[1] = item id, ARGV[2] = label, ARGV[3] = labeler, ARGV[4] = idempotency key, ARGV[5] = now
-- Labels a queued or leased item without a lease: labels made in another tool (Label Studio)
-- and imported. A live lease is ended (its holder's later submit is refused as stale).
-- Returns like LABEL_LUA; a discarded item is refused.
"""
    + _COMMON_LUA
    + """
local item_id, label, labeler, key, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local record = load(item_id)
if not record then return {'not_found'} end
if record.label then
    local done = record.label
    if done.key ~= key then return {'already_labeled', done.key} end
    if done.value ~= label or done.by ~= labeler then return {'key_reused'} end
    return {'replayed', done.value, done.by, done.at, done.key}
end
if record.state == 'queued' then
    redis.call('ZREM', queue_key, record.member)
    redis.call('ZREM', since_key, item_id)
    count_queued(record, -1)
elseif record.state == 'leased' then
    redis.call('ZREM', leases_key, item_id)
    record.lease = nil
else
    return {'stale', record.state}
end
record.state = 'labeled'
record.label = {value = label, by = labeler, at = now, key = key}
remember(record, {event = 'labeled', at = now, by = labeler, detail = 'imported: ' .. label})
redis.call('ZADD', labeled_key, now, item_id)
save(item_id, record)
return {'labeled', label, labeler, now, key}
"""
)

SKIP_LUA = (
    """
-- KEYS[1..10] = the queue's fixed keys
-- ARGV[1] = item id, ARGV[2] = lease token, ARGV[3] = labeler, ARGV[4] = now
-- Returns {'ok'} or a refusal. The item goes back at its old place; this labeler's claims
-- pass it by from now on.
"""
    + _COMMON_LUA
    + """
local item_id, labeler, now = ARGV[1], ARGV[3], ARGV[4]
local record = load(item_id)
local refusal = refuse(record, ARGV[2], now)
if refusal then return refusal end
local skipped_by = record.skipped_by or {}
local known = false
for _, name in ipairs(skipped_by) do known = known or name == labeler end
if not known then skipped_by[#skipped_by + 1] = labeler end
record.skipped_by = skipped_by
remember(record, {event = 'skipped', at = now, by = labeler})
to_queue(item_id, record)
save(item_id, record)
return {'ok'}
"""
)

DISCARD_LUA = (
    """
-- KEYS[1..10] = the queue's fixed keys
-- ARGV[1] = item id, ARGV[2] = lease token, ARGV[3] = labeler, ARGV[4] = reason, ARGV[5] = now
-- Returns {'ok'} or a refusal. The content hash stays in the hashes set: never enqueued again.
"""
    + _COMMON_LUA
    + """
local item_id, labeler, reason, now = ARGV[1], ARGV[3], ARGV[4], ARGV[5]
local record = load(item_id)
local refusal = refuse(record, ARGV[2], now)
if refusal then return refusal end
redis.call('ZREM', leases_key, item_id)
record.lease = nil
record.state = 'discarded'
record.discard = {by = labeler, at = now, reason = reason}
remember(record, {event = 'discarded', at = now, by = labeler, detail = reason})
redis.call('SADD', discarded_key, item_id)
save(item_id, record)
return {'ok'}
"""
)

REQUEUE_EXPIRED_LUA = (
    """
-- KEYS[1..10] = the queue's fixed keys
-- ARGV[1] = now, ARGV[2] = the most leases to return in this call
-- Returns how many expired leases were found (and their items returned to the queue).
"""
    + _COMMON_LUA
    + """
return requeue_expired(ARGV[1], tonumber(ARGV[2]))
"""
)

STATS_LUA = (
    """
-- KEYS[1..10] = the queue's fixed keys
-- ARGV[1] = now, ARGV[2] = start of the label-rate window (exclusive)
-- Returns queued, leased, expired leases, labeled, discarded, oldest enqueue time ('' if none),
-- labels in the window, depth by lane (flat hash), depth by class (flat hash). Writes nothing.
"""
    + _COMMON_LUA
    + """
local oldest = redis.call('ZRANGE', since_key, 0, 0, 'WITHSCORES')
return {
    redis.call('ZCARD', queue_key),
    redis.call('ZCARD', leases_key),
    redis.call('ZCOUNT', leases_key, '-inf', ARGV[1]),
    redis.call('ZCARD', labeled_key),
    redis.call('SCARD', discarded_key),
    oldest[2] or '',
    redis.call('ZCOUNT', labeled_key, '(' .. ARGV[2], ARGV[1]),
    redis.call('HGETALL', lane_depth_key),
    redis.call('HGETALL', class_depth_key),
}
"""
)

KNOWN_ITEMS_LUA = (
    """
-- KEYS[1..10] = the queue's fixed keys
-- Returns {queued and leased ids}, {labeled ids}, read in one snapshot. Writes nothing.
"""
    + _COMMON_LUA
    + """
local pending = redis.call('ZRANGE', leases_key, 0, -1)
for _, member in ipairs(redis.call('ZRANGE', queue_key, 0, -1)) do
    pending[#pending + 1] = string.sub(member, 18)
end
return {pending, redis.call('ZRANGE', labeled_key, 0, -1)}
"""
)


class LabelQueue:
    """The labeling queue of one model version. Thread-safe: it holds no state but its client.

    Labels are opaque strings of 1 to 256 characters here; the REST layer checks them against
    the model's class names, which the queue does not know.
    """

    def __init__(
        self, redis: SyncRedis, model: str, version: str, *, lease_seconds: float = 600.0
    ) -> None:
        if not model or "{" in model or "}" in model:
            raise ValueError(f"LabelQueue model '{model}' must be non-empty and brace-free")
        if not version:
            raise ValueError("LabelQueue version must be non-empty")
        if redis.get_encoder().decode_responses:
            raise ValueError("LabelQueue needs a client with decode_responses=False (binary data)")
        self.model = model
        self.version = version
        self.lease_seconds = _positive("lease_seconds", lease_seconds)
        self._redis = redis
        # Order matters: it is the KEYS[1..10] layout every script expects.
        self._keys = [
            keys.label_queue(model, version),
            keys.label_queue_leases(model, version),
            keys.label_queue_records(model, version),
            keys.label_queue_since(model, version),
            keys.label_queue_depth_by_lane(model, version),
            keys.label_queue_depth_by_class(model, version),
            keys.label_queue_labeled(model, version),
            keys.label_queue_discarded(model, version),
            keys.label_queue_content_hashes(model, version),
            keys.label_queue_sequence(model, version),
        ]
        self._enqueue = redis.register_script(ENQUEUE_LUA)
        self._claim = redis.register_script(CLAIM_LUA)
        self._heartbeat = redis.register_script(HEARTBEAT_LUA)
        self._label = redis.register_script(LABEL_LUA)
        self._import_label = redis.register_script(IMPORT_LABEL_LUA)
        self._skip = redis.register_script(SKIP_LUA)
        self._discard = redis.register_script(DISCARD_LUA)
        self._requeue_expired = redis.register_script(REQUEUE_EXPIRED_LUA)
        self._stats = redis.register_script(STATS_LUA)
        self._known_items = redis.register_script(KNOWN_ITEMS_LUA)

    def enqueue(self, items: Sequence[QueueItem], now: float) -> int:
        """Queue the items not seen before (by id, then by content hash); return how many."""
        at = _num(_finite("now", now))
        for item in items:
            self._check_item(item)
        added = 0
        # Each batch is atomic and replaying any of them is a no-op, so a crash between
        # batches loses nothing once the caller retries.
        for start in range(0, len(items), ENQUEUE_BATCH):
            batch = items[start : start + ENQUEUE_BATCH]
            args: list[str | bytes] = [at]
            for item in batch:
                args += [
                    item.item_id,
                    item.content_hash,
                    _num(-item.priority),
                    item.lane,
                    item.predicted_class,
                    _encode_meta(item),
                    item.input or b"",
                    item.embedding,
                ]
            item_keys = [self._item_key(item.item_id) for item in batch]
            added += len(self._run(self._enqueue, args, item_keys))
        return added

    def claim(
        self, labeler: str, count: int, now: float, lease_seconds: float | None = None
    ) -> list[ClaimedItem]:
        """Lease up to `count` items, highest priority first, after returning expired leases."""
        _check_text("labeler", labeler)
        if not 1 <= count <= MAX_CLAIM:
            raise InvalidQueueRequest(f"claim count {count} must be between 1 and {MAX_CLAIM}")
        expires_at = _finite("now", now) + self._lease(lease_seconds)
        tokens = [secrets.token_hex(16) for _ in range(count)]
        args: list[str | int] = [labeler, _num(now), _num(expires_at), CLAIM_SCAN_LIMIT]
        args += [REQUEUE_BATCH, *tokens]
        reply = [_text(value) for value in self._run(self._claim, args)]
        leased = list(zip(reply[0::2], reply[1::2], strict=True))
        contents = self._read_items([item_id for item_id, _ in leased])
        return [
            ClaimedItem(item=contents[item_id], token=token, expires_at=expires_at)
            for item_id, token in leased
        ]

    def heartbeat(
        self, item_id: str, token: str, now: float, lease_seconds: float | None = None
    ) -> float:
        """Extend a live lease to `now + lease_seconds`; return the new expiry."""
        expires_at = _finite("now", now) + self._lease(lease_seconds)
        reply = self._run(self._heartbeat, [item_id, token, _num(now), _num(expires_at)])
        _raise_refusal(reply, item_id)
        return expires_at

    def label(
        self, item_id: str, token: str, label: str, labeler: str, idempotency_key: str, now: float
    ) -> LabelResult:
        """Label a leased item. A replay of the same key returns the first result, changing
        nothing, even once the lease is gone; another key on a labeled item is refused."""
        if not label or len(label) > MAX_TEXT_LENGTH:
            raise InvalidLabel(
                f"label '{label[:64]}' has {len(label)} characters; expected 1 to {MAX_TEXT_LENGTH}"
            )
        _check_text("labeler", labeler)
        _check_text("idempotency_key", idempotency_key)
        args = [item_id, token, label, labeler, idempotency_key, _num(_finite("now", now))]
        return self._label_result(self._run(self._label, args), item_id, idempotency_key)

    def _label_result(self, reply: Any, item_id: str, idempotency_key: str) -> LabelResult:
        code = _text(reply[0])
        if code == "already_labeled":
            raise AlreadyLabeled(
                f"item '{item_id}' is already labeled by a request with idempotency key "
                f"'{_text(reply[1])}', not '{idempotency_key}'"
            )
        if code == "key_reused":
            raise IdempotencyKeyReused(
                f"idempotency key '{idempotency_key}' already labeled item '{item_id}' with "
                "another label or labeler; use a new key for a new request"
            )
        if code not in ("labeled", "replayed"):
            _raise_refusal(reply, item_id)
        value, by, at, key = (_text(part) for part in reply[1:5])
        return LabelResult(item_id, value, by, float(at), key, replayed=code == "replayed")

    def import_label(
        self, item_id: str, label: str, labeler: str, idempotency_key: str, now: float
    ) -> LabelResult:
        """Label a queued or leased item without a lease (labels made in another tool).

        Replays behave as in `label`; a discarded item is refused."""
        if not label or len(label) > MAX_TEXT_LENGTH:
            raise InvalidLabel(
                f"label '{label[:64]}' has {len(label)} characters; expected 1 to {MAX_TEXT_LENGTH}"
            )
        _check_text("labeler", labeler)
        _check_text("idempotency_key", idempotency_key)
        args = [item_id, label, labeler, idempotency_key, _num(_finite("now", now))]
        return self._label_result(self._run(self._import_label, args), item_id, idempotency_key)

    def skip(self, item_id: str, token: str, labeler: str, now: float) -> None:
        """Return a leased item to the queue at its old place, for another labeler."""
        _check_text("labeler", labeler)
        reply = self._run(self._skip, [item_id, token, labeler, _num(_finite("now", now))])
        _raise_refusal(reply, item_id)

    def discard(self, item_id: str, token: str, labeler: str, reason: str, now: float) -> None:
        """End a leased item as not worth labeling; its content is never enqueued again."""
        _check_text("labeler", labeler)
        if len(reason) > MAX_REASON_LENGTH:
            raise InvalidQueueRequest(
                f"discard reason has {len(reason)} characters; expected at most {MAX_REASON_LENGTH}"
            )
        args = [item_id, token, labeler, reason, _num(_finite("now", now))]
        _raise_refusal(self._run(self._discard, args), item_id)

    def requeue_expired_leases(self, now: float) -> int:
        """Return every item whose lease expired at or before `now`; return how many."""
        at = _num(_finite("now", now))
        total = 0
        while True:
            found = int(self._run(self._requeue_expired, [at, REQUEUE_BATCH]))
            total += found
            if found < REQUEUE_BATCH:
                return total

    def iter_queued(self, batch: int = 500) -> Iterator[StoredItem]:
        """Queued items, best first (a snapshot per page: items may move between pages)."""
        offset = 0
        while True:
            members: list[bytes] = self._redis.zrange(  # type: ignore[assignment]
                self._keys[0], offset, offset + batch - 1
            )
            if not members:
                return
            # Members are "<16-digit sequence>:<item id>".
            yield from self._read_stored([_text(m)[17:] for m in members])
            offset += len(members)

    def get(self, item_id: str) -> StoredItem:
        found = self._read_stored([item_id])
        if not found:
            raise ItemNotFound(f"item '{item_id}' is not in the labeling queue of {self._name}")
        return found[0]

    def stats(self, now: float) -> QueueStats:
        window_start = _finite("now", now) - LABEL_RATE_WINDOW_SECONDS
        reply = self._run(self._stats, [_num(now), _num(window_start)])
        queued, leased, expired, labeled, discarded = (int(value) for value in reply[:5])
        oldest = _text(reply[5])
        return QueueStats(
            queued=queued,
            leased=leased,
            expired_leases=expired,
            labeled=labeled,
            discarded=discarded,
            queued_by_lane=_counts(reply[7]),
            queued_by_class=_counts(reply[8]),
            oldest_queued_age_seconds=max(0.0, now - float(oldest)) if oldest else None,
            labeled_last_hour=int(reply[6]),
        )

    def iter_labeled(
        self, since: float | None = None, batch: int = READ_BATCH
    ) -> Iterator[StoredItem]:
        """Labeled items in label-time order (ties by item id), from `since` (inclusive)."""
        if batch < 1:
            raise InvalidQueueRequest(f"batch {batch} must be at least 1")
        low = -math.inf if since is None else _finite("since", since)
        offset = 0  # entries at score `low` already yielded
        while True:
            page = cast(
                list[tuple[bytes, float]],
                self._redis.zrangebyscore(
                    keys.label_queue_labeled(self.model, self.version),
                    _num(low),
                    "+inf",
                    start=offset,
                    num=batch,
                    withscores=True,
                ),
            )
            yield from self._read_stored([_text(member) for member, _ in page])
            if len(page) < batch:
                return
            last = page[-1][1]
            tied = sum(1 for _, score in page if score == last)
            offset, low = (offset + tied, low) if last == low else (tied, last)

    def seen_hashes(self, hashes: Sequence[str]) -> list[bool]:
        """For each content hash: was an item with it ever enqueued (in any state)?"""
        if not hashes:
            return []
        found = cast(
            list[int],
            self._redis.smismember(
                keys.label_queue_content_hashes(self.model, self.version), list(hashes)
            ),
        )
        return [bool(flag) for flag in found]

    def known_embeddings(self) -> KnownEmbeddings:
        """Embeddings of the queued, leased and labeled items (not the discarded), for dedup."""
        pending, labeled = self._run(self._known_items, [])
        ids = [_text(item_id) for item_id in [*pending, *labeled]]
        vectors: list[np.ndarray] = []
        for start in range(0, len(ids), READ_BATCH):
            pipe = self._redis.pipeline(transaction=False)
            for item_id in ids[start : start + READ_BATCH]:
                pipe.hget(self._item_key(item_id), "embedding")
            vectors += [np.frombuffer(raw, dtype=EMBEDDING_DTYPE) for raw in pipe.execute()]
        mask = np.zeros(len(ids), dtype=bool)
        mask[len(pending) :] = True
        matrix = np.vstack(vectors).astype(np.float32) if vectors else np.zeros((0, 0), np.float32)
        return KnownEmbeddings(item_ids=tuple(ids), vectors=matrix, labeled=mask)

    @property
    def _name(self) -> str:
        return f"model '{self.model}' version '{self.version}'"

    def _item_key(self, item_id: str) -> str:
        return keys.label_queue_item(self.model, self.version, item_id)

    def _lease(self, lease_seconds: float | None) -> float:
        return (
            self.lease_seconds
            if lease_seconds is None
            else _positive("lease_seconds", lease_seconds)
        )

    def _run(
        self, script: Script, args: Sequence[str | bytes | int], item_keys: Sequence[str] = ()
    ) -> Any:
        return script(keys=[*self._keys, *item_keys], args=args)

    def _check_item(self, item: QueueItem) -> None:
        _check_text("item_id", item.item_id)
        _check_text("content_hash", item.content_hash)
        _finite("priority", item.priority)
        if item.model_version != self.version:
            raise ValueError(
                f"item '{item.item_id}' is from model version '{item.model_version}', "
                f"not this queue's '{self.version}'"
            )
        if not item.embedding or len(item.embedding) % 2:
            raise ValueError(
                f"item '{item.item_id}' embedding has {len(item.embedding)} bytes; expected "
                "a non-empty float16 vector"
            )
        if item.input is not None:
            expected = math.prod(item.input_shape) * np.dtype(item.input_dtype).itemsize
            if expected == 0 or len(item.input) != expected:
                raise ValueError(
                    f"item '{item.item_id}' input has {len(item.input)} bytes; shape "
                    f"{item.input_shape} of {item.input_dtype} needs {expected} (not 0)"
                )

    def _read_items(self, item_ids: Sequence[str]) -> dict[str, QueueItem]:
        pipe = self._redis.pipeline(transaction=False)
        for item_id in item_ids:
            pipe.hgetall(self._item_key(item_id))
        return {
            item_id: _decode_item(fields)
            for item_id, fields in zip(item_ids, pipe.execute(), strict=True)
        }

    def _read_stored(self, item_ids: Sequence[str]) -> list[StoredItem]:
        """The items that exist, in order. Content never changes and a record is one value, so
        a plain pipeline reads a consistent view of each item."""
        pipe = self._redis.pipeline(transaction=False)
        for item_id in item_ids:
            pipe.hgetall(self._item_key(item_id))
            pipe.hget(keys.label_queue_records(self.model, self.version), item_id)
        replies = pipe.execute()
        stored = []
        for fields, record in zip(replies[0::2], replies[1::2], strict=True):
            if fields and record is not None:
                stored.append(_decode_stored(_decode_item(fields), orjson.loads(record)))
        return stored


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _num(value: float) -> str:
    # repr round-trips a float exactly; Redis and Lua's tonumber both parse it.
    return repr(float(value))


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidQueueRequest(f"{name}={value} must be a finite number")
    return float(value)


def _positive(name: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise InvalidQueueRequest(f"{name}={value} must be a positive finite number of seconds")
    return float(value)


def _check_text(name: str, value: str) -> None:
    if not value or len(value) > MAX_TEXT_LENGTH:
        raise InvalidQueueRequest(
            f"{name} '{value[:64]}' has {len(value)} characters; expected 1 to {MAX_TEXT_LENGTH}"
        )


def _raise_refusal(reply: list[Any], item_id: str) -> None:
    """Turn a script's refusal reply into its exception; return quietly on success."""
    code = _text(reply[0])
    if code == "ok":
        return
    if code == "not_found":
        raise ItemNotFound(f"item '{item_id}' is not in the labeling queue")
    if code == "stale":
        reason = _text(reply[1])
        if reason == "token":
            why = "another lease holds it; claim again"
        elif reason == "expired":
            why = f"the lease expired at {float(_text(reply[2]))}; claim again"
        else:
            why = f"the item is {reason}"
        raise StaleLease(f"lease token for item '{item_id}' is not current: {why}")
    raise RuntimeError(f"label queue script replied {reply!r} for item '{item_id}'")


def _counts(flat: list[bytes]) -> dict[str, int]:
    return {_text(name): int(count) for name, count in zip(flat[0::2], flat[1::2], strict=True)}


def _encode_meta(item: QueueItem) -> bytes:
    return orjson.dumps(
        {
            "item_id": item.item_id,
            "content_hash": item.content_hash,
            "priority": item.priority,
            "lane": item.lane,
            "rule": item.rule,
            "predicted": item.predicted,
            "predicted_class": item.predicted_class,
            "model_version": item.model_version,
            "created_at": item.created_at,
            "evidence": item.evidence,
            "nearest_labeled_distance": item.nearest_labeled_distance,
            "input_dtype": item.input_dtype,
            "input_shape": item.input_shape,
            "probabilities": item.probabilities,
        }
    )


def _decode_item(fields: dict[bytes, bytes]) -> QueueItem:
    meta = orjson.loads(fields[b"meta"])
    return QueueItem(
        item_id=meta["item_id"],
        content_hash=meta["content_hash"],
        priority=meta["priority"],
        lane=meta["lane"],
        rule=meta["rule"],
        predicted=meta["predicted"],
        predicted_class=meta["predicted_class"],
        model_version=meta["model_version"],
        created_at=meta["created_at"],
        evidence=meta["evidence"],
        nearest_labeled_distance=meta["nearest_labeled_distance"],
        input=fields.get(b"input"),
        input_dtype=meta["input_dtype"],
        input_shape=tuple(meta["input_shape"]),
        embedding=fields[b"embedding"],
        probabilities=tuple(meta["probabilities"]),
    )


def _decode_stored(item: QueueItem, record: dict[str, Any]) -> StoredItem:
    lease, label, discard = record.get("lease"), record.get("label"), record.get("discard")
    return StoredItem(
        item=item,
        state=ItemState(record["state"]),
        enqueued_at=float(record["enqueued_at"]),
        lease=Lease(lease["labeler"], float(lease["claimed_at"]), float(lease["expires_at"]))
        if lease
        else None,
        label=LabelResult(
            item.item_id, label["value"], label["by"], float(label["at"]), label["key"]
        )
        if label
        else None,
        discard=Discard(discard["by"], float(discard["at"]), discard["reason"])
        if discard
        else None,
        # cjson writes an empty Lua table as {}, so an empty list may come back as a dict.
        skipped_by=tuple(record.get("skipped_by") or ()),
        history=tuple(
            HistoryEntry(entry["event"], float(entry["at"]), entry.get("by"), entry.get("detail"))
            for entry in record["history"]
        ),
    )
