"""A response's head and body in one write (`service/http_protocol.py`): the transport's rules,
exactly, then the real server: one write system call per response, and responses that stream
or wait for `100 Continue` arrive whole. At a graceful shutdown, a connection that was made but
has not sent its request yet gets it answered, and one that sends nothing is closed after the
keep-alive timeout."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sklearn.datasets import load_digits

from service.cli import UVICORN_OPTIONS
from service.http_protocol import JoinedWritesTransport
from tests.support import MODELS_DIR, free_port, start_server


class SocketStandIn(asyncio.Transport):
    """What the joining transport passes on, in order: the writes it makes and the calls that
    end the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Any] = []
        self.closing = False
        self.buffered = 7

    def write(self, data: Any) -> None:
        self.calls.append(bytes(data))

    def close(self) -> None:
        self.calls.append("close")
        self.closing = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.closing = True

    def write_eof(self) -> None:
        self.calls.append("eof")

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered


def joined() -> tuple[JoinedWritesTransport, SocketStandIn]:
    inner = SocketStandIn()
    return JoinedWritesTransport(inner, asyncio.get_running_loop()), inner


def run(scenario: Any) -> None:
    asyncio.run(scenario())


def test_a_head_and_its_body_leave_in_one_write_when_the_body_is_sent() -> None:
    async def scenario() -> None:
        transport, inner = joined()
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        assert inner.calls == []
        transport.write(b'{"a":1}')
        assert inner.calls == [b'HTTP/1.1 200 OK\r\n\r\n{"a":1}']
        await asyncio.sleep(0)
        assert inner.calls == [b'HTTP/1.1 200 OK\r\n\r\n{"a":1}']

    run(scenario)


def test_a_lone_write_leaves_at_the_end_of_the_loop_iteration() -> None:
    async def scenario() -> None:
        transport, inner = joined()
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert inner.calls == []
        await asyncio.sleep(0)
        assert inner.calls == [b"HTTP/1.1 100 Continue\r\n\r\n"]

    run(scenario)


def test_at_most_one_write_is_held() -> None:
    async def scenario() -> None:
        transport, inner = joined()
        for chunk in (b"a", b"b", b"c"):
            transport.write(chunk)
        assert inner.calls == [b"ab"]
        assert transport.get_write_buffer_size() == 7 + 1
        await asyncio.sleep(0)
        assert inner.calls == [b"ab", b"c"]
        assert transport.get_write_buffer_size() == 7

    run(scenario)


def test_a_held_write_goes_before_close_and_end_of_file_and_is_dropped_by_abort() -> None:
    async def scenario() -> None:
        transport, inner = joined()
        transport.write(b"last")
        transport.write_eof()
        transport.write(b"after eof")
        transport.close()
        assert inner.calls == [b"last", "eof", b"after eof", "close"]

        transport, inner = joined()
        transport.write(b"lost")
        transport.abort()
        await asyncio.sleep(0)
        assert inner.calls == ["abort"]

    run(scenario)


def test_nothing_is_written_to_a_transport_that_is_closing() -> None:
    async def scenario() -> None:
        transport, inner = joined()
        transport.write(b"late")
        inner.closing = True  # the peer went away before the loop iteration ended
        await asyncio.sleep(0)
        assert inner.calls == []

    run(scenario)


def test_empty_mutable_and_several_writes() -> None:
    async def scenario() -> None:
        transport, inner = joined()
        transport.write(b"")
        buffer = bytearray(b"head")
        transport.write(buffer)
        buffer[:] = b"XXXX"  # the caller may reuse its buffer once write returns
        transport.writelines([b"bo", memoryview(b"dy")])
        assert inner.calls == [b"headbody"]

    run(scenario)


def write_syscalls(pid: int) -> int:
    """write(2)-like system calls the process's main thread, which runs the event loop, has made
    (Linux's /proc/PID/task/PID/io `syscw`)."""
    for line in Path(f"/proc/{pid}/task/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError(f"no syscw in /proc/{pid}/task/{pid}/io")


def test_the_server_writes_each_response_in_one_system_call() -> None:
    # Without monitoring: the event log's writes to Redis go out on the same thread, as many
    # as its flushes, and those depend on timing.
    process, base_url = start_server(MODELS_DIR, {"EDGEHARVEST_MONITORING_ENABLED": "false"})
    try:
        rows = load_digits().data[:1].tolist()
        body = httpx.Request("POST", "/", json={"instances": rows}).read()
        host, port = base_url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        headers = {"content-type": "application/json"}

        def predict() -> None:
            connection.request("POST", "/v1/models/digits/predict", body, headers)
            response = connection.getresponse()
            assert response.status == 200, response.read()
            assert response.read().startswith(b'{"model_name":"digits"')

        predict()  # the connection is open and the server warm
        before = write_syscalls(process.pid)
        requests = 100
        for _ in range(requests):
            predict()
        writes = write_syscalls(process.pid) - before
        connection.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    # uvicorn's own protocol makes two per response (head, then body).
    assert writes == requests, f"{writes} writes for {requests} responses"


async def streaming_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Chunks with loop turns and a pause between them, or the request body echoed back."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/echo":
        body = (await receive())["body"]
        length = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": length})
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for i in range(5):
        await send({"type": "http.response.body", "body": b"chunk%d;" % i, "more_body": True})
        await asyncio.sleep(0.01 if i == 2 else 0)
    await send({"type": "http.response.body", "body": b"end"})


@contextmanager
def serving(**options: Any) -> Iterator[tuple[uvicorn.Server, threading.Thread, int]]:
    """`streaming_app` served by uvicorn with the service's options, on a free port, in a
    thread; the server is asked to stop on leaving, if it was not already."""
    port = free_port()
    config = uvicorn.Config(
        streaming_app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        **UVICORN_OPTIONS,
        **options,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(300):
        if server.started:
            break
        thread.join(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield server, thread, port
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def streaming_server() -> Iterator[tuple[str, int]]:
    with serving() as (_, _, port):
        yield "127.0.0.1", port


def read_to_end(connection: socket.socket) -> bytes:
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def test_a_streamed_response_arrives_whole(streaming_server: tuple[str, int]) -> None:
    host, port = streaming_server
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as client:
        for _ in range(3):  # on one kept-alive connection
            response = client.get("/stream")
            assert response.status_code == 200
            assert response.headers["transfer-encoding"] == "chunked"
            assert response.content == b"chunk0;chunk1;chunk2;chunk3;chunk4;end"


def test_100_continue_is_sent_before_the_body_is_read(streaming_server: tuple[str, int]) -> None:
    host, port = streaming_server
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(
            b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
        )
        # The client waits for this before it sends the body: a held write must not wait for
        # the body that never comes without it.
        assert connection.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        connection.sendall(b"hello")
        response = b""
        while not response.endswith(b"hello"):
            chunk = connection.recv(1024)
            assert chunk, f"connection closed after {response!r}"
            response += chunk
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 5\r\n" in response


def test_pipelined_requests_are_answered_in_order(streaming_server: tuple[str, int]) -> None:
    host, port = streaming_server
    request = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
    with socket.create_connection((host, port), timeout=30) as connection:
        # Three requests in one segment: each response's held head must go out with its own
        # body, in order, and the last response must close the connection.
        connection.sendall(
            request % (5, b"first")
            + request % (6, b"second")
            + b"POST /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
            + b"content-length: 5\r\n\r\nthird"
        )
        received = read_to_end(connection)
    responses = received.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert [r.rsplit(b"\r\n\r\n", 1)[1] for r in responses] == [b"first", b"second", b"third"]


def wait_until_refused(port: int) -> None:
    """Until the server has stopped listening: its graceful shutdown has begun, and has already
    told every open connection (uvicorn does both in one step)."""
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=30).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.05)
    raise AssertionError(f"port {port} still accepts connections")


@contextmanager
def connection_open_at_shutdown(**options: Any) -> Iterator[socket.socket]:
    """A connection to `serving(**options)` that the server has accepted and that has sent
    nothing when the graceful shutdown begins; on leaving, the server must have stopped."""
    with serving(**options) as (server, thread, port):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            # Answered on a later connection, so the server has accepted this one: one
            # process, one accept queue, first come first accepted.
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                assert client.get("/stream").status_code == 200
            server.should_exit = True
            wait_until_refused(port)
            yield connection
        thread.join(30)
        assert not thread.is_alive(), "the server did not finish shutting down"


def test_a_request_on_a_connection_made_before_shutdown_is_answered() -> None:
    with connection_open_at_shutdown() as waiting:
        # What a client that connected just before the shutdown sends a moment later.
        waiting.sendall(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello")
        received = read_to_end(waiting)
    # uvicorn's own protocol closed this connection unanswered (received == b"").
    assert received.startswith(b"HTTP/1.1 200 OK\r\n"), received
    assert b"\r\nconnection: close\r\n" in received
    assert received.endswith(b"\r\n\r\nhello")


def test_a_connection_that_sends_nothing_does_not_hold_shutdown_beyond_keep_alive() -> None:
    with connection_open_at_shutdown(timeout_keep_alive=1) as silent:
        # Closed by the server, unanswered, once the keep-alive timeout has passed.
        assert read_to_end(silent) == b""
