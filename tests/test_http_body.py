"""Reading request bodies at the ASGI level (`receive_limited_body`), and a chunked upload
through the real server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import orjson
import pytest
from sklearn.datasets import load_digits

from service.errors import PayloadTooLarge, UnsupportedMediaType
from service.http_body import receive_limited_body


class Messages:
    """An ASGI `receive` that hands out the given messages and counts how many were taken."""

    def __init__(self, *messages: dict[str, object]) -> None:
        self.messages = list(messages)
        self.taken = 0

    async def __call__(self) -> dict[str, object]:
        self.taken += 1
        return self.messages.pop(0)


def body(chunk: bytes, more: bool = False) -> dict[str, object]:
    return {"type": "http.request", "body": chunk, "more_body": more}


def read(receive: Messages, headers: dict[str, str] | None = None, limit: int = 10) -> bytes:
    return asyncio.run(receive_limited_body(receive, headers or {}, limit))


def test_a_body_in_one_message() -> None:
    receive = Messages(body(b"0123456789"))
    assert read(receive) == b"0123456789"
    assert receive.taken == 1


def test_a_body_in_several_messages_is_joined() -> None:
    receive = Messages(body(b"012", more=True), body(b"", more=True), body(b"3456"))
    assert read(receive) == b"0123456"
    assert receive.taken == 3


def test_a_disconnect_ends_the_body() -> None:
    assert read(Messages({"type": "http.disconnect"})) == b""
    assert read(Messages(body(b"01", more=True), {"type": "http.disconnect"})) == b"01"


def test_one_message_over_the_limit_is_413() -> None:
    with pytest.raises(PayloadTooLarge, match="more than 10 bytes"):
        read(Messages(body(b"0123456789A")))


def test_several_messages_over_the_limit_stop_at_the_first_past_it() -> None:
    receive = Messages(body(b"012345", more=True), body(b"6789AB", more=True), body(b"never"))
    with pytest.raises(PayloadTooLarge, match="EDGEHARVEST_MAX_BODY_BYTES"):
        read(receive)
    assert receive.taken == 2


def test_headers_are_refused_before_anything_is_read() -> None:
    receive = Messages(body(b"01"))
    with pytest.raises(PayloadTooLarge, match="request body of 11 bytes"):
        read(receive, {"content-length": "11"})
    with pytest.raises(UnsupportedMediaType, match="'gzip' is not supported"):
        read(receive, {"content-encoding": "gzip"})
    assert receive.taken == 0


def test_a_chunked_upload_through_the_server(live_server: str) -> None:
    rows = load_digits().data[:3].tolist()
    content = orjson.dumps({"instances": rows})

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(content), 100):
            yield content[start : start + 100]

    # A generator body goes out with Transfer-Encoding: chunked, in several ASGI messages.
    response = httpx.post(f"{live_server}/v1/models/digits/predict", content=chunks(), timeout=30)
    assert response.status_code == 200, response.text
    assert [p["class_index"] for p in response.json()["predictions"]] == [0, 1, 2]
