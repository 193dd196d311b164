"""Read a request body without ever holding more than the configured limit."""

from __future__ import annotations

from starlette.requests import Request

from service.errors import PayloadTooLarge, UnsupportedMediaType


def _too_large(size: str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"request body of {size} bytes exceeds the limit of {limit} bytes "
        "(EDGEHARVEST_MAX_BODY_BYTES); send smaller batches"
    )


async def read_body(request: Request, limit: int) -> bytes:
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; send the body uncompressed"
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(declared, limit)
    chunks = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large(f"more than {limit}", limit)
        chunks.append(chunk)
    return b"".join(chunks)
