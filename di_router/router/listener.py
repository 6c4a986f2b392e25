"""A listener that stops accepting at a connection cap, so the router never takes a socket it
cannot serve.

Hypercorn has no connection limit, and under uvloop an accept that hits the descriptor limit
triggers libuv's "EMFILE trick": every pending connection is accepted and closed at once, so
clients see a reset and the router logs nothing. Here connections are accepted one at a time
while fewer than the cap are open; the others wait in the kernel's backlog until one closes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

import uvloop

log = logging.getLogger("di_router.router")

_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPT_RETRY_S = 0.1  # after an accept failed for lack of descriptors (asyncio waits 1 s)


def capped_loop_factory(cap: int) -> Callable[[], asyncio.AbstractEventLoop]:
    """A uvloop factory whose servers on a given socket (Hypercorn's) accept at most `cap`
    connections at once."""

    def factory() -> asyncio.AbstractEventLoop:
        loop = CappedLoop()
        loop.connection_cap = cap
        return loop

    return factory


class CappedLoop(uvloop.Loop):
    connection_cap = 0

    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: Any = None,
        port: Any = None,
        *,
        sock: socket.socket | None = None,
        ssl: ssl.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
        **kwargs: Any,
    ) -> asyncio.AbstractServer:
        if sock is None or not self.connection_cap:
            return await super().create_server(
                protocol_factory, host, port, sock=sock, ssl=ssl,
                ssl_handshake_timeout=ssl_handshake_timeout, **kwargs,
            )  # fmt: skip
        sock.listen(kwargs.get("backlog", 100))
        return CappedListener(self, sock, protocol_factory, self.connection_cap, ssl,
                              ssl_handshake_timeout)  # fmt: skip


class CappedListener(asyncio.AbstractServer):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        cap: int,
        tls: ssl.SSLContext | None,
        handshake_timeout: float | None,
    ) -> None:
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._factory = protocol_factory
        self._tls = tls
        self._handshake_timeout = handshake_timeout
        self._room = asyncio.Semaphore(cap)
        self._connections: set[asyncio.Task[None]] = set()
        self._accepting = loop.create_task(self._accept())

    async def _accept(self) -> None:
        starved = False
        while True:
            await self._room.acquire()
            try:
                conn, _ = await self._loop.sock_accept(self._sock)
            except ConnectionAbortedError:  # reset while queued
                self._room.release()
                continue
            except OSError as exc:
                self._room.release()
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                if not starved:  # the connection stays queued in the kernel meanwhile
                    log.warning("cannot accept a connection (%s); retrying", exc.strerror)
                starved = True
                await asyncio.sleep(_ACCEPT_RETRY_S)
                continue
            starved = False
            task = self._loop.create_task(self._serve(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: socket.socket) -> None:
        """Hands the socket to the server's protocol and holds its place until it closes."""
        lost: asyncio.Future[None] = self._loop.create_future()
        try:
            await self._loop.connect_accepted_socket(
                lambda: _Watched(self._factory(), lost), conn, ssl=self._tls,
                ssl_handshake_timeout=self._handshake_timeout if self._tls else None,
            )  # fmt: skip
            await lost
        except OSError:  # a TLS handshake that failed or timed out
            conn.close()
        finally:
            self._room.release()

    def close(self) -> None:
        self._accepting.cancel()
        self._sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._accepting, return_exceptions=True)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return not self._accepting.done()

    async def start_serving(self) -> None:
        """It serves from its creation, as `create_server` does by default."""

    async def serve_forever(self) -> None:
        await self._accepting


class _Watched(asyncio.Protocol):
    """The server's own protocol, with a future that resolves when its connection is lost."""

    def __init__(self, inner: asyncio.BaseProtocol, lost: asyncio.Future[None]) -> None:
        assert isinstance(inner, asyncio.Protocol)
        self._inner = inner
        self._lost = lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            if not self._lost.done():
                self._lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool:
        """The client closed its side: the transport closes too (after what is being written).
        Hypercorn takes that end of file as a disconnect anyway, but frees the socket only when
        its keep-alive timer fires, and here each such socket would hold a place for 5 s."""
        self._inner.eof_received()
        return False

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()
