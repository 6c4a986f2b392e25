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
from collections.abc import Mapping, Sequence

import httpx

from di_router.router.http1 import Answer, Http1Body, Pool, Request, request_head

__all__ = ["Answer", "Http1Body", "Http1Transport"]


_SET_HERE = (b"host", b"content-length")
"""Headers `request_head` writes itself."""


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
        """The request begun now (see `Pool.send`); the answer future is resolved by the
        connection as the headers arrive. Cancelling it before the answer closes the
        connection (the backend sees the disconnect)."""
        pool = self._pools.get((url.raw_scheme, url.raw_host, url.port)) or self._pool(url)
        head = request_head(method, url.raw_path, headers, pool.host_header, content)
        return pool.send(
            Request(head, content, timeout.get("read"), timeout.get("connect"), timeout.get("pool"))
        )

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
