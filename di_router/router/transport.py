"""An httpx transport on aiohttp's connection pool: httpx's API, a pool that scales.

httpcore's pool scans every pooled connection on every request (a readability system call per
idle socket), which at a few thousand streams costs more CPU than the routing itself and makes
requests wait past the pool timeout. aiohttp keeps idle connections in a per-host stack and its
HTTP parser is in C. The `httpx-aiohttp` package does the same job, but it maps a server that
drops the connection mid-response to `ConnectTimeout`; the router's error messages depend on
telling "never connected" from "broke mid-stream", so the mapping here is exact.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp
import httpx


@contextmanager
def _mapped_errors() -> Iterator[None]:
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:  # connecting, or waiting for the pool
        raise httpx.ConnectTimeout(str(exc) or "connect timeout") from exc
    except aiohttp.SocketTimeoutError as exc:  # no byte within the read timeout
        raise httpx.ReadTimeout(str(exc) or "read timeout") from exc
    except aiohttp.ClientSSLError as exc:  # the TLS handshake failed: say why, not "refused"
        cause = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", exc)
        raise httpx.ConnectError(str(exc)) from cause
    except aiohttp.ClientConnectorError as exc:  # refused, unreachable, out of descriptors
        raise httpx.ConnectError(str(exc)) from exc
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
    except aiohttp.ClientError as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
    except OSError as exc:  # the socket failed under aiohttp (reset while writing)
        raise httpx.ReadError(str(exc)) from exc


class _Body(httpx.AsyncByteStream):
    """A body iterator that survives cancellation: a cancelled read loses no byte, so a task
    that gave up on a stream can hand it to another that keeps reading (the settling of a
    request whose decode cannot be aborted yet)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._failure: Exception | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        content = self._response.content
        try:  # per event on the hot path: a bare try costs nothing when nothing is raised
            if self._failure is not None:
                raise self._failure
            chunk = await content.readany()
        except Exception as exc:
            # aiohttp drops what arrived with a broken connection (its reads raise first); an
            # event sent just before the cut decides whether a server has a slot to free, so
            # hand those bytes over first and the error on the next read.
            rest = content._read_nowait(-1) if content._buffer and exc is not self._failure else b""
            if rest:
                self._failure = exc
                return rest
            with _mapped_errors():
                raise
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        """Back to the pool when fully read; otherwise the socket closes (the backend aborts)."""
        response = self._response
        if response.content.at_eof():
            response.release()
        else:
            response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One backend's pool: `limit` connections at most, idle ones closed after `keepalive`."""

    def __init__(self, limit: int, keepalive: float, ssl_context: ssl.SSLContext | None) -> None:
        self._limit = limit
        self._keepalive = keepalive
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        """Created lazily: aiohttp binds its session to the running event loop."""
        connector = aiohttp.TCPConnector(
            limit=self._limit,
            keepalive_timeout=self._keepalive,
            ssl=self._ssl,
            enable_cleanup_closed=False,
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session
        if session is None:
            session = self._session = self._open()
        timeout = request.extensions.get("timeout", {})
        headers = [(k, v) for k, v in request.headers.multi_items() if k != "host"]
        with _mapped_errors():
            response = await session.request(
                request.method,
                str(request.url),
                headers=headers,
                data=request.content or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeout.get("pool"),
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            )
        return httpx.Response(
            status_code=response.status,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers],
            stream=_Body(response),
            request=request,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            await asyncio.sleep(0)  # let aiohttp's transports finish closing (its own advice)
