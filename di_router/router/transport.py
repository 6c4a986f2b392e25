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
from collections.abc import AsyncIterator

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
            pool = Pool(url.host, port, self._limit, self._keepalive, context)
            self._pools[key] = pool
        return pool

    def start(self, request: httpx.Request) -> asyncio.Future[httpx.Response]:
        """`handle_async_request` begun now: on an idle connection the request is written before
        this returns, with no task; otherwise a task opens a connection. Cancelling the
        future before the response closes the connection (the backend sees the disconnect)."""
        url = request.url
        pool = self._pools.get((url.raw_scheme, url.raw_host, url.port)) or self._pool(url)
        connection = pool.take_idle()
        if connection is None:
            return asyncio.ensure_future(self.handle_async_request(request))
        loop = asyncio.get_running_loop()
        response: asyncio.Future[httpx.Response] = loop.create_future()
        try:
            head = request_head(request.method, url.raw_path, request.headers.raw)
        except httpx.HTTPError as exc:
            pool.release(connection)
            response.set_exception(exc)
            return response
        timeout = request.extensions.get("timeout", {})
        answered = connection.send(head, request.content, timeout.get("read"))

        def on_answer(answered: asyncio.Future[tuple[int, Headers]]) -> None:
            if response.done():
                return
            if (error := answered.exception()) is not None:
                connection.close()
                response.set_exception(error)
                return
            status, headers = answered.result()
            body = Http1Body(pool, connection)
            response.set_result(
                httpx.Response(status, headers=headers, stream=body, request=request)
            )

        def on_response(response: asyncio.Future[httpx.Response]) -> None:
            if response.cancelled():
                connection.close()

        answered.add_done_callback(on_answer)
        response.add_done_callback(on_response)
        return response

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        pool = self._pools.get((url.raw_scheme, url.raw_host, url.port)) or self._pool(url)
        timeout = request.extensions.get("timeout", {})
        head = request_head(request.method, url.raw_path, request.headers.raw)
        connection = await pool.acquire(timeout.get("connect"), timeout.get("pool"))
        try:
            status, headers = await connection.send(head, request.content, timeout.get("read"))
        except BaseException:
            connection.close()  # the request may be half sent: this connection is done
            raise
        return httpx.Response(
            status, headers=headers, stream=Http1Body(pool, connection), request=request
        )

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
