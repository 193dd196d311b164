"""The packed form the event writer hands its Lua script: one argument per stream and batch."""

from __future__ import annotations

import struct

import pytest

from service.event_log import pack_entry


def unpack(blob: bytes) -> list[dict[bytes, bytes]]:
    """What XADD_BATCH_LUA reads, in Python: per entry a field count, then length-prefixed
    names and values, all lengths 4-byte little-endian."""
    events, pos = [], 0

    def u32() -> int:
        nonlocal pos
        (value,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        return int(value)

    def chunk() -> bytes:
        nonlocal pos
        length = u32()
        value = blob[pos : pos + length]
        pos += length
        return value

    while pos < len(blob):
        count = u32()
        events.append({chunk(): chunk() for _ in range(count)})
    return events


def test_entries_pack_and_unpack_to_what_redis_stores() -> None:
    first = {"id": "e1", "meta": b'{"a": 1}', "embedding": bytes(range(256)), "n": 7, "x": 0.25}
    second = {"id": "é", "empty": b""}
    packed = [pack_entry(first), pack_entry(second)]
    assert all(p is not None for p in packed)
    assert unpack(b"".join(p for p in packed if p is not None)) == [
        {
            b"id": b"e1",
            b"meta": b'{"a": 1}',
            b"embedding": bytes(range(256)),
            b"n": b"7",
            b"x": b"0.25",
        },
        {b"id": "é".encode(), b"empty": b""},
    ]


@pytest.mark.parametrize(
    "fields", [{}, {"id": "e", "flag": True}, {"id": "e", "none": None}, {"id": "e", "l": [1]}]
)
def test_unstorable_entries_are_refused(fields: dict[str, object]) -> None:
    assert pack_entry(fields) is None  # type: ignore[arg-type]
