"""The client's side of one request, over plain ASGI: read the body, answer, stream, notice
the client leaving.

The two completion routes skip the web framework: they need nothing of it, and owning the
receive loop fixes what the framework gets wrong here (on Python 3.11 Quart's body read with
`asyncio.wait_for` swallows a disconnect that arrives with the body, so the request runs on
with nobody listening).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DISCONNECTED = "client disconnected"
"""The cancellation message of a request task whose client went away."""


class ClientGone(Exception):
    """The client disconnected before its request was read."""


class BodyError(Exception):
    """The body cannot be accepted: too large (413) or too slow (408)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Client:
    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self.headers: dict[str, str] = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
        }
        """Lower-case names; a repeated header keeps its last value."""
        self.gone = False
        self.started = False
        """Response headers were sent: from here on errors go into the stream."""
        self.completed = False
        """The last byte of the response was handed to the server."""
        self._watch: asyncio.Future[Message] | None = None

    async def read_body(self, limit: int, timeout: float) -> bytes:
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyError(413, f"The request body is larger than {limit} bytes.")
        parts: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await self._receive()
                    if message["type"] == "http.disconnect":
                        self.gone = True
                        raise ClientGone
                    part = message.get("body", b"")
                    size += len(part)
                    if size > limit:
                        raise BodyError(413, f"The request body is larger than {limit} bytes.")
                    parts.append(part)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise BodyError(408, f"The request body did not arrive within {timeout:g}s.") from None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def watch_disconnect(self, task: asyncio.Task[Any]) -> None:
        """Cancel `task` (with `DISCONNECTED`) when the client goes away."""

        def on_message(watch: asyncio.Future[Message]) -> None:
            if watch.cancelled() or watch.exception() is not None:
                return
            if watch.result()["type"] == "http.disconnect":
                self.gone = True
                if not self.completed:
                    task.cancel(DISCONNECTED)

        self._watch = asyncio.ensure_future(self._receive())
        self._watch.add_done_callback(on_message)

    def stop_watching(self) -> None:
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()

    async def respond(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        await self.start(status, [(b"content-type", b"application/json"), *headers])
        await self.write(body, last=True)

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        if not self.gone:
            await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, data: bytes, last: bool = False) -> None:
        if last:
            self.completed = True
        if not self.gone:
            await self._send({"type": "http.response.body", "body": data, "more_body": not last})
