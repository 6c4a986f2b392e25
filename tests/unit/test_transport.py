"""The router's HTTP/1.1 client (`http1.py`, `transport.py`) against scripted servers on real
sockets: framing cut at every byte, keep-alive reuse, failures on the httpx class the router's
messages depend on ("never connected" against "broke mid-stream"), and time bounds."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from di_router.router.backends import Backend
from di_router.router.transport import Http1Transport
from di_router.router.upstream import Leg, UpstreamError

pytestmark = pytest.mark.anyio

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
EVENT = b"data: {}\n\n"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


class Server:
    """A loopback server running `script` per connection; it counts connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.script(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self._server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def trickled(payload: bytes) -> Script:
    """Answer every request on the connection with `payload`, one byte per write."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            for i in range(len(payload)):
                writer.write(payload[i : i + 1])
                await writer.drain()

    return script


async def body_of(response: httpx.Response) -> bytes:
    parts = [part async for part in response.aiter_raw()]
    await response.aclose()
    return b"".join(parts)


def post(url: str, timeout: float = 5.0) -> httpx.Request:
    return httpx.Request(
        "POST", url + "/v1/completions", content=b"{}",
        extensions={"timeout": {"connect": timeout, "read": timeout, "pool": timeout}},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "body"),
    [
        (CHUNKED + chunk(EVENT) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n",
         EVENT + b"data: [DONE]\n\n"),
        (CHUNKED + b"5;ext=1\r\nhello\r\n0\r\ntrailer: x\r\n\r\n", b"hello"),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
         b"hello"),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}", b"{}"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    ],
    ids=["sse", "extension-and-trailer", "interim-1xx", "content-length", "no-content"],
)  # fmt: skip
async def test_framing_survives_a_cut_at_every_byte_and_the_connection_is_reused(
    payload: bytes, body: bytes
) -> None:
    transport = Http1Transport(4, 5.0, None)
    async with Server(trickled(payload)) as server:
        for _ in range(2):
            assert await body_of(await transport.handle_async_request(post(server.url))) == body
        assert server.connections == 1
    await transport.aclose()


async def test_a_body_delimited_by_the_close_ends_there_and_is_not_reused() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        await writer.drain()

    transport = Http1Transport(4, 5.0, None)
    async with Server(script) as server:
        for _ in range(2):
            assert await body_of(await transport.handle_async_request(post(server.url))) == (
                b"all of it"
            )
        assert server.connections == 2
    await transport.aclose()


async def test_bytes_that_arrived_with_a_broken_connection_are_not_lost() -> None:
    """An event sent just before a cut decides whether a server has a slot to free."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED + chunk(EVENT))  # the chunked body never ends
        await writer.drain()

    transport = Http1Transport(4, 5.0, None)
    async with Server(script) as server:
        response = await transport.handle_async_request(post(server.url))
        stream = response.stream.__aiter__()  # type: ignore[union-attr]
        assert await anext(stream) == EVENT
        with pytest.raises(httpx.RemoteProtocolError):
            await anext(stream)
        await response.aclose()
    await transport.aclose()


async def test_a_silent_server_is_a_read_timeout_before_and_after_the_headers() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if server.connections == 2:
            writer.write(CHUNKED + chunk(EVENT))
            await writer.drain()
        await asyncio.sleep(30)

    transport = Http1Transport(4, 5.0, None)
    async with Server(script) as server:
        with pytest.raises(httpx.ReadTimeout):
            await transport.handle_async_request(post(server.url, timeout=0.2))
        response = await transport.handle_async_request(post(server.url, timeout=0.2))
        stream = response.stream.__aiter__()  # type: ignore[union-attr]
        assert await anext(stream) == EVENT
        with pytest.raises(httpx.ReadTimeout):
            await anext(stream)
        await response.aclose()
    await transport.aclose()


async def test_a_full_pool_makes_the_next_request_wait_then_time_out() -> None:
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    transport = Http1Transport(1, 5.0, None)
    async with Server(script) as server:
        first = asyncio.ensure_future(transport.handle_async_request(post(server.url)))
        for _ in range(400):  # bounded poll: until the first request holds the one connection
            if server.connections:
                break
            await asyncio.sleep(0.005)
        with pytest.raises(httpx.ConnectTimeout):
            await transport.handle_async_request(post(server.url, timeout=0.2))
        waiting = asyncio.ensure_future(transport.handle_async_request(post(server.url)))
        release.set()
        assert await body_of(await first) == b"ok"
        assert await body_of(await waiting) == b"ok"
        assert server.connections == 1
    await transport.aclose()


async def test_a_refused_connection_is_a_connect_error_with_the_os_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    transport = Http1Transport(4, 5.0, None)
    with pytest.raises(httpx.ConnectError) as info:
        await transport.handle_async_request(post(f"http://127.0.0.1:{port}"))
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ECONNREFUSED
    await transport.aclose()


@pytest.mark.parametrize(
    "payload",
    [b"SSH-2.0-OpenSSH\r\n\r\n", CHUNKED + b"zz\r\n", b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n"],
    ids=["not-http", "bad-chunk-size", "bad-header"],
)
async def test_a_malformed_answer_is_a_protocol_error(payload: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(payload)
        await writer.drain()
        await asyncio.sleep(5)

    transport = Http1Transport(4, 5.0, None)
    async with Server(script) as server:
        with pytest.raises(httpx.RemoteProtocolError):
            await body_of(await transport.handle_async_request(post(server.url)))
    await transport.aclose()


async def test_a_line_break_in_a_header_never_reaches_the_wire() -> None:
    transport = Http1Transport(4, 5.0, None)
    request = post("http://127.0.0.1:9")
    request.headers["x-request-id"] = "a\r\nx-evil: 1"
    with pytest.raises(httpx.LocalProtocolError):
        await transport.handle_async_request(request)
    await transport.aclose()


@pytest.mark.parametrize(
    ("code", "status", "error_type"),
    [(errno.EMFILE, 503, "no_descriptors"), (errno.ENFILE, 503, "no_descriptors"),
     (errno.ECONNREFUSED, 502, "connect_error")],
)  # fmt: skip
async def test_running_out_of_descriptors_is_told_apart(
    code: int, status: int, error_type: str
) -> None:
    """The router's own descriptor shortage is a 503, not a backend refusing (a 502)."""

    class Refusing(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("os error") from OSError(code, "os error")

    probe = httpx.AsyncClient(transport=Refusing(), trust_env=False)
    backend = Backend("decode", "http://10.0.0.1:8100", transport=Refusing(), probe=probe)
    leg = Leg(backend, "/v1/completions", b"{}", {}, 5.0, 1024)
    with pytest.raises(UpstreamError) as info:
        await leg.response()
    assert (info.value.status, info.value.error_type) == (status, error_type)
    assert info.value.never_arrived
    await leg.aclose()


async def test_a_slow_reader_pauses_the_socket_and_loses_nothing() -> None:
    """Flow control: beyond the high-water mark the client stops reading the socket until the
    consumer catches up, so a fast backend cannot fill the router's memory."""
    piece = b"x" * 65536
    pieces = 64

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED)
        for _ in range(pieces):
            writer.write(chunk(piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    transport = Http1Transport(4, 5.0, None)
    async with Server(script) as server:
        response = await transport.handle_async_request(post(server.url))
        received = 0
        largest = 0
        async for part in aiter_slowly(response):
            received += len(part)
            largest = max(largest, len(part))
        assert received == len(piece) * pieces
        assert largest <= 1024 * 1024  # buffered bytes stayed bounded
        await response.aclose()
    await transport.aclose()


async def aiter_slowly(response: httpx.Response) -> AsyncIterator[bytes]:
    async for part in response.aiter_raw():
        await asyncio.sleep(0.001)
        yield part


async def test_the_keep_alive_clock_starts_at_the_answers_last_byte() -> None:
    """A prefill leg is let go only when its whole request ends, seconds after its answer's
    last byte; the server's idle close counts from that byte. A connection the server is
    about to close (or has closed) must not be reused by the later time."""
    server_idle_s, keepalive_s = 0.5, 0.4
    crossed = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        answered = None
        while True:
            await read_request(reader)
            if answered is not None and loop.time() - answered > server_idle_s:
                crossed.append(True)
                return  # its idle close crossed the request on the wire: no answer
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            answered = loop.time()

    transport = Http1Transport(4, keepalive_s, None)
    async with Server(script) as server:
        response = await transport.handle_async_request(post(server.url))
        assert [part async for part in response.stream] == [b"ok"]  # type: ignore[union-attr]
        await asyncio.sleep(0.35)  # the request the leg served goes on; then it lets go
        await response.aclose()
        await asyncio.sleep(0.2)  # idle 0.55 s by the server's clock, 0.2 s since let go
        assert await body_of(await transport.handle_async_request(post(server.url))) == b"ok"
        assert (server.connections, crossed) == (2, [])
    await transport.aclose()


@pytest.mark.parametrize("times", [1, 2])
async def test_a_request_that_crossed_an_idle_close_goes_once_more(times: int) -> None:
    """A server that closes a kept-alive connection as the next request arrives never read
    it: the request goes again, once, on a new connection. A second silent close is an
    error (the server is failing, not closing an idle connection)."""
    state = {"answered": 0, "closes": times}

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            if state["answered"] and state["closes"]:
                state["closes"] -= 1
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            state["answered"] += 1

    transport = Http1Transport(4, 5.0, None)
    async with Server(script) as server:
        assert await body_of(await transport.handle_async_request(post(server.url))) == b"ok"
        if times == 1:  # the kept-alive connection meets the close; a new one answers
            assert await body_of(await transport.handle_async_request(post(server.url))) == b"ok"
            assert server.connections == 2
        else:
            with pytest.raises(httpx.RemoteProtocolError):
                await transport.handle_async_request(post(server.url))
    await transport.aclose()
