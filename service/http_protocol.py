"""uvicorn's httptools protocol, sending a response's head and body in one write, and answering
the request of a connection made just before a graceful shutdown.

uvicorn writes the status line and headers to the socket as soon as the application sends
`http.response.start`, and the body in a second write when `http.response.body` follows: two
system calls, and two TCP segments, per response, where one would do. (On loopback, with a
digits-sized answer, one write fewer saved a few percent of the server's CPU per request at
most; see the README. On a network each segment also costs both ends a packet.)

`JoinedWritesTransport` holds a write back until the next one, which it sends together with it, or
until the event loop's current iteration ends, whichever comes first. A response whose body
follows its head in the same step of its task (every response of this service but the streamed
exports) leaves in one write, at the moment its body is sent, as before. Nothing waits longer
than the rest of a loop iteration, and at most one write is held, so a streamed response keeps
uvicorn's back-pressure.

`JoinedWritesHttpToolsProtocol.shutdown` says why a new connection outlives the shutdown's start.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class JoinedWritesTransport(asyncio.Transport):
    """A transport that joins each write to the one after it (see the module's docstring)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._release_scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        # Copied if mutable: the caller may reuse its buffer once write returns.
        data = data if isinstance(data, bytes) else bytes(data)
        held = self._held
        if held is not None:
            self._held = None
            # One writev(2) of both under uvloop, without copying a large body onto the head.
            self._transport.writelines((held, data))
            return
        self._held = data
        if not self._release_scheduled:
            self._release_scheduled = True
            self._loop.call_soon(self._release)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _release(self) -> None:
        """Send what is held (end of the loop iteration, close, or end of file)."""
        self._release_scheduled = False
        held = self._held
        if held is None:
            return
        self._held = None
        if not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._release()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def write_eof(self) -> None:
        self._release()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def get_write_buffer_size(self) -> int:
        held = 0 if self._held is None else len(self._held)
        return self._transport.get_write_buffer_size() + held


class JoinedWritesHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a `JoinedWritesTransport`, which also answers the first
    request of a connection that shutdown finds waiting for it (see `shutdown`)."""

    _last_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the methods of asyncio.Transport without subclassing it.
        joined = JoinedWritesTransport(cast(asyncio.Transport, transport), self.loop)
        super().connection_made(joined)

    def shutdown(self) -> None:
        """Start a graceful shutdown of this connection.

        uvicorn closes at once every connection without a request in progress. For a connection
        whose first request has not been read yet, that loses a request the client has most
        likely sent already: the kernel accepted the connection for the client before the
        server stopped listening, and the client wrote as soon as it connected. (A worker
        replaced on SIGHUP dropped a request this way in CI; a pod stopped by a rolling update
        would too.) Such a connection gets the keep-alive timeout to send its request, which
        is answered with `connection: close`; Go's net/http gives a new connection 5 s likewise.
        A kept-alive connection between requests is closed at once, as before.
        """
        if self.cycle is not None:
            super().shutdown()
            return
        self._last_request = True
        self.loop.call_later(self.timeout_keep_alive, self._close_unless_requested)

    def _close_unless_requested(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def on_headers_complete(self) -> None:
        # Called per request: the base class by name costs a third of what `super()` does.
        HttpToolsProtocol.on_headers_complete(self)
        if self._last_request and self.cycle is not None:
            self.cycle.keep_alive = False
