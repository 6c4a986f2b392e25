"""An httpx transport on the router's own HTTP/1.1 pool (`http1.py`): httpx's API, a pool that
scales.

httpcore's pool scans every pooled connection on every request (a readability system call per
idle socket), which at a few thousand streams costs more CPU than the routing itself and makes
requests wait past the pool timeout. aiohttp's pool scales, but its per-read machinery cost
about a fifth of the router's CPU at 1,000 streams. The legs need only POST with a bytes body
to a vLLM server; the health probes GET.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import httpx

from di_router.router.http1 import Connection, Headers, Pool, request_head


class Http1Body(httpx.AsyncByteStream):
    """A body iterator that survives cancellation: a cancelled read loses no byte, so a task
    that gave up on a stream can hand it to another that keeps reading (the settling of a
    request whose decode cannot be aborted yet)."""

    def __init__(self, pool: Pool, connection: Connection) -> None:
        self._pool = pool
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

    async def aclose(self) -> None:
        """Back to the pool when fully received; otherwise the socket closes (the backend
        sees the disconnect and aborts)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool.release(connection)


_SET_HERE = (b"host", b"content-length")
"""Headers `request_head` writes itself."""


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


class Http1Transport(httpx.AsyncBaseTransport):
    """`limit` connections at most per origin, idle ones closed after `keepalive` seconds."""

    def __init__(self, limit: int, keepalive: float, ssl_context: ssl.SSLContext | None) -> None:
        self._limit = limit
        self._keepalive = keepalive
        self._ssl = ssl_context
        self._pools: dict[tuple[bytes, bytes, int | None], Pool] = {}

    def _pool(self, url: httpx.URL) -> Pool:
        key = (url.raw_scheme, url.raw_host, url.port)
        pool = self._pools.get(key)
        if pool is None:
            secure = url.raw_scheme == b"https"
            context = (self._ssl or ssl.create_default_context()) if secure else None
            port = url.port or (443 if secure else 80)
            pool = Pool(url.host, port, self._limit, self._keepalive, context, url.netloc)
            self._pools[key] = pool
        return pool

    def send(
        self,
        method: str,
        url: httpx.URL,
        headers: Sequence[tuple[bytes, bytes]],
        content: bytes,
        timeout: Mapping[str, float | None],
    ) -> asyncio.Future[Answer]:
        """The request begun now: on an idle connection it is written before this returns,
        with no task; otherwise a task opens a connection. Cancelling the future before the
        answer closes the connection (the backend sees the disconnect)."""
        pool = self._pools.get((url.raw_scheme, url.raw_host, url.port)) or self._pool(url)
        head = request_head(method, url.raw_path, headers, pool.host_header, content)
        connection = pool.take_idle()
        if connection is None:
            return asyncio.ensure_future(self._send_on_new(pool, head, content, timeout))
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Answer] = loop.create_future()
        answered = connection.send(head, content, timeout.get("read"))

        def on_answered(answered: asyncio.Future[tuple[int, Headers]]) -> None:
            if answer.done():
                return
            if (error := answered.exception()) is not None:
                connection.close()
                answer.set_exception(error)
                return
            status, headers = answered.result()
            answer.set_result(Answer(status, headers, Http1Body(pool, connection)))

        def on_answer(answer: asyncio.Future[Answer]) -> None:
            if answer.cancelled():
                connection.close()

        answered.add_done_callback(on_answered)
        answer.add_done_callback(on_answer)
        return answer

    async def _send_on_new(
        self, pool: Pool, head: bytes, content: bytes, timeout: Mapping[str, float | None]
    ) -> Answer:
        connection = await pool.acquire(timeout.get("connect"), timeout.get("pool"))
        try:
            status, headers = await connection.send(head, content, timeout.get("read"))
        except BaseException:
            connection.close()  # the request may be half sent: this connection is done
            raise
        return Answer(status, headers, Http1Body(pool, connection))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in _SET_HERE]
        answer = await self.send(
            request.method, request.url, headers, request.content,
            request.extensions.get("timeout", {}),
        )  # fmt: skip
        return httpx.Response(
            answer.status, headers=answer.headers, stream=answer.body, request=request
        )

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
