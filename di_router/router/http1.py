"""A minimal HTTP/1.1 client for the router's upstream legs: an asyncio protocol per connection
and a pool per backend.

The router relays tens of thousands of events a second, each one a read of a small chunk; a
general client spends most of its time per read on layers the router does not need (a stream
reader, a timer rescheduled on every read, header multidicts, payload objects). Here a read is a
chunked-body decode in `data_received` and a future set, the silence timeout is one timer per
connection rather than one per read, and idle connections sit in a LIFO stack (O(1) per
request, whatever the pool size). Failures are httpx's exception classes, so the httpx
transport over this (`transport.py`) only adapts objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import httpx

_HIGH_WATER = 256 * 1024
"""Buffered body bytes beyond which the socket is not read until the consumer catches up."""
_MAX_HEAD = 64 * 1024
"""A status line and headers larger than this are not HTTP from a vLLM server."""

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Answer:
    """A response's status and headers, its body unread: what a leg needs of a response,
    without building an httpx.Response per leg."""

    status: int
    headers: Headers
    body: httpx.AsyncByteStream
    closed: bool = False

    async def aclose(self) -> None:
        """Close the body once, however many owners let go of it."""
        if not self.closed:
            self.closed = True
            await self.body.aclose()

    def header(self, name: bytes) -> str | None:
        """The last value of a header (`name` in lower case)."""
        for key, value in reversed(self.headers):
            if key.lower() == name:
                return value.decode("latin-1")
        return None


@dataclass(slots=True)
class Request:
    """What a connection writes, and the bounds of the wait for its answer."""

    head: bytes
    body: bytes
    read_timeout: float | None
    connect_timeout: float | None
    pool_timeout: float | None
    resent: bool = False


class Http1Body(httpx.AsyncByteStream):
    """A body iterator that survives cancellation: a cancelled read loses no byte, so a task
    that gave up on a stream can hand it to another that keeps reading (the settling of a
    request whose decode cannot be aborted yet)."""

    def __init__(self, connection: Connection) -> None:
        self._connection: Connection | None = connection

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._connection is None:
            raise StopAsyncIteration
        data = await self._connection.read()
        if not data:
            raise StopAsyncIteration
        return data

    @property
    def complete(self) -> bool:
        """Every byte of the body arrived: nothing more to wait for."""
        return self._connection is None or self._connection.complete

    def set_silence(self, timeout: float) -> None:
        """Bound each further silence of the server by `timeout` instead of the request's."""
        if self._connection is not None:
            self._connection.set_silence(timeout)

    async def aclose(self) -> None:
        """Back to the pool when fully received; otherwise the socket closes (the backend
        sees the disconnect and aborts)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.pool.release(connection)


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        """When the last answer's last byte arrived: the server's keep-alive clock."""
        self.served = 0
        """Answers this connection carried whole (a reused connection may meet an idle close)."""
        self._request: Request | None = None
        self.reusable = False
        self._raw = b""  # the start of a head or chunk line that is not whole yet
        self._answer: asyncio.Future[Answer] | None = None
        self._body: list[bytes] = []  # decoded body bytes not yet read
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._in_body = False
        self._complete = False
        self._chunked = False
        self._remaining = -1  # bytes left in the current chunk or the body; -1: until close
        self._chunk_end = False  # the CRLF after a chunk's data is due
        self._timeout = 0.0
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._answer is None:  # an idle connection has nothing to say
            self.close()
            return
        self._last_read = self._loop.time()
        if self._raw:
            data = self._raw + data
            self._raw = b""
        try:
            if not self._in_body:
                data = self._take_head(data)
            if self._chunked:
                self._take_chunks(data)
            elif data:
                self._take_plain(data)
        except httpx.RemoteProtocolError as exc:
            self._fail(exc)
            self.close()
            return
        if self._complete:
            # The server's keep-alive clock starts now, not when the router lets go of the
            # connection (a prefill leg is closed only when the whole request ends, seconds
            # later): reusing it by the later time races the server's idle close.
            self.idle_since = self._last_read
            self._wake()
        elif self._buffered:
            self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.reusable = False
        if self._timer is not None:
            self._timer.cancel()
        if self._in_body and not self._chunked and self._remaining < 0:
            self._complete = True  # a body delimited by the close
        elif not self._complete:
            request, answer = self._request, self._answer
            silent = not self._in_body and not self._raw
            if exc is None and silent and self.served and request and not request.resent:
                if answer is not None and not answer.done():
                    # The server's idle close crossed the request on the wire: it never
                    # read it. Once more on a new connection, answering the same future.
                    self.pool.resend(request, answer)
            elif exc is None:
                what = "server closed the connection without sending a response"
                if self._in_body:
                    what = "server closed the connection before the body ended"
                self._fail(httpx.RemoteProtocolError(what))
            else:
                error = httpx.ReadError(str(exc) or type(exc).__name__)
                error.__cause__ = exc
                self._fail(error)
        self._wake()
        self.pool.forget(self)

    # -- the request

    def send(
        self, request: Request, answer: asyncio.Future[Answer] | None = None
    ) -> asyncio.Future[Answer]:
        """Write the request. The future is resolved here, as the headers are parsed (not by
        a callback one loop pass later); cancelling it before then closes the connection.
        The read timeout bounds each silence of the server, from the request to the body's
        end."""
        assert self.transport is not None
        if answer is None:
            answer = self._loop.create_future()
        self._answer = answer
        answer.add_done_callback(self._on_answer_done)
        self._request = request
        self._timeout = request.read_timeout or 0.0
        self._last_read = now = self._loop.time()
        # A timer left from the last request on this connection serves this one too when it
        # fires early enough (it re-arms from the last byte): one timer per connection, not
        # one per request.
        if self._timer is None or self._timer.when() > now + self._timeout:
            self._arm()
        head, body = request.head, request.body
        self.transport.write(head + body if len(body) < 16384 else head)
        if len(body) >= 16384:
            self.transport.write(body)
        return answer

    def set_silence(self, timeout: float) -> None:
        self._timeout = timeout
        self._arm()

    def _on_answer_done(self, answer: asyncio.Future[Answer]) -> None:
        if answer.cancelled():
            self.close()

    async def read(self) -> bytes:
        """The body bytes that arrived since the last read; b"" at its end.

        A cancelled read loses nothing. Bytes that arrived before a failure are returned
        before the failure is raised.
        """
        while not self._buffered:
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            # Silence counts from the last byte or from now, whichever is later: a consumer
            # that was slow (the socket paused) must not find the backend timed out.
            self._last_read = max(self._last_read, self._loop.time())
            if self._timer is None:
                self._arm()
            try:
                await self._waiter
            finally:
                self._waiter = None
        parts = self._body
        self._body = []
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @property
    def complete(self) -> bool:
        """The whole body was received (it may still be unread)."""
        return self._complete

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        """Ready for the next request on the same connection."""
        self.served += 1
        self._answer = None
        self._request = None
        self._raw = b""
        self._body = []
        self._buffered = 0
        self._in_body = self._complete = self._chunked = self._chunk_end = False
        self._remaining = -1

    # -- parsing

    def _take_head(self, data: bytes) -> bytes:
        """Status line and headers (skipping interim 1xx answers); returns the bytes after."""
        while not self._in_body:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > _MAX_HEAD:
                    raise httpx.RemoteProtocolError("response head too large")
                self._raw = data
                return b""
            self._start(data[:end])
            data = data[end + 4 :]
        return data

    def _start(self, head: bytes) -> None:
        """Read the status line and headers; an interim (1xx) answer changes nothing."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise httpx.RemoteProtocolError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
        status = int(parts[1])
        if 100 <= status < 200:
            return
        headers: Headers = []
        keep_alive = parts[0] == b"HTTP/1.1"
        length = -1
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise httpx.RemoteProtocolError("malformed header line")
            name = name.strip().lower()
            value = value.strip()
            headers.append((name, value))
            if name == b"transfer-encoding":
                self._chunked = value.lower().endswith(b"chunked")
            elif name == b"content-length":
                if not value.isdigit():
                    raise httpx.RemoteProtocolError("malformed content-length")
                length = int(value)
            elif name == b"connection":
                keep_alive = b"close" not in value.lower()
        self._in_body = True
        if status in (204, 304):
            length = 0
        if not self._chunked:
            self._remaining = length
            if length < 0:
                keep_alive = False  # the body ends with the connection
        self.reusable = keep_alive
        self._complete = length == 0 and not self._chunked
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(Answer(status, headers, Http1Body(self)))

    def _take_plain(self, data: bytes) -> None:
        if self._remaining >= 0:
            if len(data) > self._remaining:
                data = data[: self._remaining]  # bytes past the body: not ours
                self.reusable = False
            self._remaining -= len(data)
            if self._remaining == 0:
                self._complete = True
        if data:
            self._push(data)

    def _take_chunks(self, data: bytes) -> None:
        """Decode a chunked body by position over the bytes at hand: the usual read, one
        whole chunk (an SSE event), costs a find, an int and a slice."""
        pos, size = 0, len(data)
        while pos < size and not self._complete:
            if self._chunk_end:
                if size - pos < 2:
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise httpx.RemoteProtocolError("malformed chunked body")
                pos += 2
                self._chunk_end = False
            elif self._remaining > 0:
                end = min(pos + self._remaining, size)
                self._push(data[pos:end])
                self._remaining -= end - pos
                pos = end
                if self._remaining == 0:
                    self._remaining = -1
                    self._chunk_end = True
            else:  # a chunk-size line, or (after the last chunk) a trailer or the blank line
                end = data.find(b"\r\n", pos)
                if end < 0:
                    if size - pos > 1024:
                        raise httpx.RemoteProtocolError("malformed chunk size")
                    break
                line = data[pos:end]
                pos = end + 2
                if self._remaining == 0:  # trailers end with a blank line
                    self._complete = not line
                    continue
                try:
                    self._remaining = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise httpx.RemoteProtocolError("malformed chunk size") from None
                if self._remaining < 0:
                    raise httpx.RemoteProtocolError("malformed chunk size")
        if self._complete:
            if pos < size:
                self.reusable = False  # bytes past the body: not ours
        elif pos < size:
            self._raw = data[pos:]

    def _push(self, data: bytes) -> None:
        self._body.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    # -- failures and time

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self.reusable = False
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(error)
            self._answer.exception()  # a caller that gave up must not leave it unretrieved
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._timeout > 0:
            self._timer = self._loop.call_at(self._last_read + self._timeout, self._check_silence)

    def _check_silence(self) -> None:
        """One timer per silence period, not one per read: re-armed from the last byte."""
        self._timer = None
        waiting = self._waiter is not None or (self._answer is not None and not self._answer.done())
        if not waiting or self._complete or self._error is not None:
            return
        if self._loop.time() - self._last_read < self._timeout:
            self._arm()
            return
        self._fail(httpx.ReadTimeout(f"no byte for {self._timeout:g} s"))
        self.close()


class Pool:
    """At most `limit` connections to one origin; idle ones reused last-in first-out."""

    def __init__(
        self,
        host: str,
        port: int,
        limit: int,
        keepalive: float,
        ssl_context: ssl.SSLContext | None,
        host_header: bytes,
    ) -> None:
        self.host = host
        self.port = port
        self.limit = limit
        self.keepalive = keepalive
        self.ssl = ssl_context
        self.host_header = host_header
        self._idle: dict[Connection, None] = {}  # insertion-ordered: popitem() is LIFO
        self._count = 0  # open or opening connections
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._resends: set[asyncio.Task[Answer]] = set()
        self._closed = False

    def take_idle(self) -> Connection | None:
        """The connection that went idle last, if one is fresh enough."""
        if not self._idle:
            return None
        now = asyncio.get_running_loop().time()
        while self._idle:
            connection, _ = self._idle.popitem()
            fresh = now - connection.idle_since < self.keepalive
            if fresh and connection.reusable and connection.transport is not None:
                return connection
            connection.close()  # expired: the server may be about to close it too
        return None

    def send(self, request: Request) -> asyncio.Future[Answer]:
        """On an idle connection the request is written before this returns, with no task;
        otherwise a task opens a connection."""
        connection = self.take_idle()
        if connection is not None:
            return connection.send(request)
        return asyncio.ensure_future(self._send_on_new(request))

    def resend(self, request: Request, answer: asyncio.Future[Answer]) -> None:
        """Once more, on a new connection, for the same answer future."""
        request.resent = True
        task = asyncio.ensure_future(self._send_on_new(request, answer, fresh=True))
        self._resends.add(task)
        task.add_done_callback(self._resent)

    def _resent(self, task: asyncio.Task[Answer]) -> None:
        self._resends.discard(task)
        if not task.cancelled():
            task.exception()  # the answer future carries any failure

    async def _send_on_new(
        self,
        request: Request,
        answer: asyncio.Future[Answer] | None = None,
        fresh: bool = False,
    ) -> Answer:
        try:
            connection = await self.acquire(request.connect_timeout, request.pool_timeout, fresh)
        except Exception as exc:
            if answer is None:
                raise
            if not answer.done():
                answer.set_exception(exc)
            raise
        if answer is not None and answer.done():  # given up on while connecting
            connection.close()
            return await answer
        try:
            return await connection.send(request, answer)
        except BaseException:
            connection.close()  # the request may be half sent: this connection is done
            raise

    async def acquire(
        self, connect_timeout: float | None, pool_timeout: float | None, fresh: bool = False
    ) -> Connection:
        """An idle connection (unless `fresh`), else a new one when the pool has room."""
        while (connection := None if fresh else self.take_idle()) is None:
            if self._count < self.limit:
                break
            await self._wait_for_room(pool_timeout)
        if connection is not None:
            return connection
        self._count += 1
        try:
            return await self._connect(connect_timeout)
        except BaseException:
            self._count -= 1
            self._room()
            raise

    async def _wait_for_room(self, timeout: float | None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            raise httpx.ConnectTimeout("no free connection in the pool in time") from None
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    async def _connect(self, timeout: float | None) -> Connection:
        loop = asyncio.get_running_loop()
        server_hostname = self.host if self.ssl is not None else None
        try:
            async with asyncio.timeout(timeout):
                transport, connection = await loop.create_connection(
                    lambda: Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=server_hostname,
                )
        except TimeoutError:
            what = f"no connection to {self.host}:{self.port} in time"
            raise httpx.ConnectTimeout(what) from None
        except OSError as exc:  # refused, unreachable, out of descriptors, TLS (ssl.SSLError)
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        connection.transport = transport  # uvloop may call connection_made after this
        return connection

    def release(self, connection: Connection) -> None:
        """Back to the idle stack when the body was read whole and the server keeps it open."""
        if connection.reusable and connection.complete and not self._closed:
            connection.reset()
            self._idle[connection] = None
            self._room()
        else:
            connection.close()  # forget() follows from connection_lost

    def forget(self, connection: Connection) -> None:
        """The connection closed (either side)."""
        self._idle.pop(connection, None)
        self._count -= 1
        self._room()

    def _room(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        self._closed = True
        for connection in list(self._idle):
            connection.close()
        self._idle.clear()


def request_head(
    method: str,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    host: bytes,
    content: bytes,
) -> bytes:
    """The request line and headers, `Host` and `Content-Length` included; a header that could
    split the request is refused."""
    lines = [method.encode("ascii") + b" " + target + b" HTTP/1.1", b"Host: " + host]
    if content or method not in ("GET", "HEAD"):
        lines.append(b"Content-Length: %d" % len(content))
    for name, value in headers:
        if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name:
            raise httpx.LocalProtocolError(f"header {name!r} holds a line break")
        lines.append(name + b": " + value)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)
