"""Bodies at the ASGI level: read a request body without ever holding more than the configured
limit, and send a whole response."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from starlette.types import Message, Receive, Send

from service.errors import PayloadTooLarge, UnsupportedMediaType


def _too_large(size: str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"request body of {size} bytes exceeds the limit of {limit} bytes "
        "(EDGEHARVEST_MAX_BODY_BYTES); send smaller batches"
    )


def _check_headers(headers: Mapping[str, str], limit: int) -> None:
    """415 if the body is compressed, 413 if its declared length exceeds `limit`.

    `headers` maps lower-case names to values.
    """
    encoding = headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; send the body uncompressed"
        )
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(declared, limit)


async def read_limited_body(
    chunks: AsyncIterator[bytes], headers: Mapping[str, str], limit: int
) -> bytes:
    """The whole body; 413 as soon as it is known to exceed `limit`, 415 if compressed.

    `headers` maps lower-case names to values.
    """
    _check_headers(headers, limit)
    return await _joined(chunks, limit)


async def _joined(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The chunks joined; 413 at the first that takes the total past `limit`."""
    parts = []
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > limit:
            raise _too_large(f"more than {limit}", limit)
        parts.append(chunk)
    return b"".join(parts)


async def receive_limited_body(receive: Receive, headers: Mapping[str, str], limit: int) -> bytes:
    """`read_limited_body` of an ASGI request. A body that comes in one message (every small
    request) is taken from it directly: an async generator over the messages costs more than
    the rest of this."""
    _check_headers(headers, limit)
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        body: bytes = message.get("body", b"")
        if len(body) > limit:
            raise _too_large(f"more than {limit}", limit)
        return body
    return await _joined(_messages(message, receive), limit)


async def _messages(first: Message, receive: Receive) -> AsyncIterator[bytes]:
    """The body chunks of the ASGI request whose first message is `first`."""
    message = first
    while message["type"] != "http.disconnect":
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return
        message = await receive()


async def send_body(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """One whole response: the status, `headers` plus content-length, then the body."""
    length = (b"content-length", str(len(body)).encode())
    await send({"type": "http.response.start", "status": status, "headers": [*headers, length]})
    await send({"type": "http.response.body", "body": body})
